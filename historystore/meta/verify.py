"""``verify``: whether a store is sound, as a verdict that never crashes.

It first validates every piece of metadata (:mod:`historystore.meta.validate`: root
attributes, every array's ``zarr.json``, the commit record, and that every chunk file of the
committed range exists: zarr would silently read a missing one as zeros), then proves
exactness on the store at hand: it replays θ from θ_0 through every step, compares with each
keyframe and the last step bit for bit, and reads every array (each chunk's crc32c is checked
on decode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import tensors
from ..errors import CorruptStoreError, HistoryStoreError
from ..read.store import HistoryStore
from ..write.lock import describe_holder, lock_holder
from . import layout
from .validate import validate_store


@dataclass
class VerifyReport:
    path: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    num_steps: int = 0
    keyframes_checked: int = 0
    checkpoints_checked: int = 0
    arrays_checked: int = 0
    notes: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.ok = False
        self.problems.append(msg)

    @property
    def summary(self) -> str:
        if self.ok:
            w = f"; {len(self.warnings)} warning(s)" if self.warnings else ""
            return (
                f"OK {self.path}: {self.num_steps} steps, {self.arrays_checked} arrays read "
                f"and checksummed, bit-exact replay to {self.keyframes_checked} keyframes "
                f"and {self.checkpoints_checked} block ends incl. the last step{w}"
            )
        return f"FAILED {self.path}: {self.problems[0]}"


def verify(
    path: str, progress: bool = False, *, storage_options: dict[str, Any] | None = None
) -> VerifyReport:
    """Check a store (a local path or a store URL) end to end; never raises for a damaged store
    (the report says why)."""
    report = VerifyReport(str(path))
    try:
        _verify(layout.local_path(path), report, progress, storage_options)
    except HistoryStoreError as e:
        report.fail(str(e))
    except Exception as e:  # a verdict, never a traceback (the fault tests assert it is unused)
        report.fail(f"unexpected {type(e).__name__} while reading the store (damaged?): {e}")
    return report


def _verify(
    path: str, report: VerifyReport, progress: bool, storage_options: dict[str, Any] | None
) -> None:
    holder = lock_holder(path) if layout.is_local(path) else None
    if holder:
        report.notes.append(
            f"{describe_holder(holder)} is recording into this store: steps after its last "
            "commit are not checked"
        )
    checked = validate_store(path, layout.read_only_store(path, storage_options), all_files=True)
    group = layout.open_group(path, mode="r", storage_options=storage_options)
    store = HistoryStore(path, group, checked.meta, checked.commit, storage_options=storage_options)
    report.num_steps = store.num_steps
    arrays = {p: spec.rows for p, spec in checked.arrays.items()}
    try:
        _verify_data(store, arrays, report, progress)
    except (HistoryStoreError, ValueError, RuntimeError, OSError) as e:
        report.fail(str(e))


def _verify_data(
    store: HistoryStore, arrays: dict[str, int], report: VerifyReport, progress: bool
) -> None:
    from tqdm.auto import tqdm

    names = store.tensor_names
    dense = [n for n in names if "dense" in store.encodings[n].capabilities]
    replayed = {layout.param_path(n, a) for n in dense for a in store.encodings[n].arrays()}
    # every array that replay does not read: read in full (chunk checksums)
    for p, rows in arrays.items():
        if p in replayed:
            continue
        arr = store.group[p]
        step = max(1, arr.chunks[0]) * 8
        for a in range(0, rows, step):
            try:
                arr[a : min(rows, a + step)]
            except Exception as e:
                raise CorruptStoreError(
                    f"array {p!r} rows {a}-{min(rows, a + step) - 1} cannot be read: {e!r}"
                ) from e
        report.arrays_checked += 1
    # replay θ from θ_0 through every step; compare with every keyframe bit for bit
    kf_steps = store.keyframe_steps.tolist()
    if kf_steps[-1] != store.num_steps:
        kf_steps = [*kf_steps, store.num_steps]  # killed recorder: no final keyframe
        report.notes.append(
            f"no keyframe at the last step {store.num_steps} (the recorder did "
            "not close, e.g. it was killed); replay checked by checksum"
        )
    lossless = {t.name for t in store.meta.tensors if store.encodings[t.name].lossless}
    crc = store.group["steps/theta_crc"][: store.num_steps]
    theta = store.keyframe(0, dense)
    bar = tqdm(total=store.num_steps, desc="verify", unit="step", disable=not progress, leave=False)
    for k in range(1, len(kf_steps)):
        a, b = kf_steps[k - 1], kf_steps[k]
        for b0, b1 in store.block_ranges(a, b):
            try:
                store.replay(theta, b0, b1)
            except Exception as e:
                raise CorruptStoreError(
                    f"deltas of steps {b0}-{b1 - 1} cannot be read: {e!r}"
                ) from e
            bar.update(b1 - b0)
            for i in np.flatnonzero(crc[b0:b1].any(axis=1)):
                step = b0 + int(i) + 1
                for j, name in enumerate(names):
                    want = int(crc[b0 + i, j])
                    if want and name in theta and tensors.crc_marker(theta[name]) != want:
                        report.fail(
                            f"replay of {name!r} to step {step} does not match its "
                            "recorded checksum: deltas or fixes before it are corrupt"
                        )
                        bar.close()
                        return
                report.checkpoints_checked += 1
        if k >= len(store.keyframe_steps):
            break
        expected = store.keyframe(k, dense)
        for name in lossless:
            it = tensors.int_view_dtype(theta[name].dtype)
            diff = theta[name].view(it) != expected[name].view(it)
            if bool(diff.any()):
                report.fail(
                    f"replay of {name!r} differs from the keyframe at step {b} in "
                    f"{int(diff.sum())} elements (first at flat index "
                    f"{int(diff.view(-1).nonzero()[0])}): deltas or fixes before step "
                    f"{b} are corrupt"
                )
                bar.close()
                return
        for name in set(theta) - lossless:  # lossy encodings restart from each keyframe
            theta[name] = expected[name].clone()
        report.keyframes_checked += 1
    bar.close()
    report.arrays_checked += len(replayed)
    nf = store.nonfinite()
    if nf.size and nf.any():
        steps, cols = np.nonzero(nf)
        report.warnings.append(
            f"non-finite values (NaN/inf) in the deltas of {len(np.unique(steps))} steps, first "
            f"at step {int(steps[0])} in tensor {names[int(cols[0])]!r}"
        )
