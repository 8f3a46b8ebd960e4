"""The commit record: the only counts readers trust.

The writer rewrites it in one metadata write after all of a block's data (see
``historystore.write.writer``), so a SIGKILL leaves every committed step intact and nothing
half-written visible. That write is one file (replaced atomically by LocalStore's rename) or
one object (an atomic PUT on S3/GCS, which have no rename).
"""

from __future__ import annotations

from dataclasses import dataclass

import zarr


@dataclass
class Commit:
    """Committed counts: what readers may trust."""

    num_steps: int = 0
    num_ids: int = 0
    num_ghost_ids: int = 0
    num_fixes: int = 0
    num_keyframes: int = 0

    def ragged_count(self, path: str) -> int:
        return {
            "batch/ids": self.num_ids,
            "batch/labels": self.num_ids,
            "batch/ghost_ids": self.num_ghost_ids,
            "fixes/tensor": self.num_fixes,
            "fixes/index": self.num_fixes,
            "fixes/bits": self.num_fixes,
        }[path]


def read_commit(group: zarr.Group) -> Commit:
    attrs = group["commit"].attrs.asdict()
    return Commit(**{k: int(attrs.get(k, 0)) for k in Commit.__dataclass_fields__})
