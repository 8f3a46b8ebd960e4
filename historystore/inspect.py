"""``info`` and ``verify``: what a store holds and whether it is sound.

``verify`` proves exactness on the store at hand: it replays θ from θ_0 through every step,
compares with each keyframe and the last step bit for bit, reads every array (each chunk's
crc32c is checked on decode) and checks that no chunk file of the committed range is missing
(zarr would silently return zeros for a missing chunk).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr

from . import layout, tensors
from .errors import CorruptStoreError, HistoryStoreError
from .reader import HistoryStore, open_store


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def committed_arrays(store: HistoryStore) -> dict[str, int]:
    """Every array of the store with its number of committed rows."""
    m, c, T = store.meta, store.commit, store.num_steps
    out: dict[str, int] = {}
    for t in m.tensors:
        for a in store.encodings[t.name].arrays(t.shape, t.dtype):
            out[layout.param_path(t.name, a)] = T
        out[layout.keyframe_path(t.name)] = c.num_keyframes
    for b in m.buffers:
        out[layout.buffer_path(b.name)] = c.num_keyframes
    out["keyframe_steps"] = c.num_keyframes
    for name, specs in m.optim_state.items():
        for s in specs:
            out[layout.optim_path(name, s.name)] = T
    for k in layout.STEP_SCALARS:
        out[f"steps/{k}"] = T
    out["steps/nonfinite"] = T
    out["steps/theta_crc"] = T
    for k in m.hparam_keys:
        out[layout.hparam_path(k)] = T
    for path in layout.RAGGED:
        out[path] = c.ragged_count(path)
    return out


def _row_bytes(arr: zarr.Array) -> int:
    return int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize


def info(path: str) -> dict[str, Any]:
    """A JSON-able summary: steps, tensors with encodings/codecs, keyframes, bytes raw/stored."""
    store = open_store(path)
    m = store.meta
    tensors_out = []
    raw_total = 0
    for t in m.tensors:
        raw = 0
        stored = 0
        for a in store.encodings[t.name].arrays(t.shape, t.dtype):
            p = layout.param_path(t.name, a)
            raw += (
                store.num_steps * t.nbytes
                if a == "delta"
                else store.num_steps * _row_bytes(store.group[p])
            )
            stored += _du(os.path.join(path, p))
        dense_raw = store.num_steps * t.nbytes
        tensors_out.append(
            {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "encoding": t.encoding,
                "encoding_params": t.encoding_params,
                "encoding_reason": t.encoding_reason,
                "codec": t.codec,
                "chunk_steps": t.chunk_steps,
                "bytes_raw": dense_raw,
                "bytes_stored": stored,
                "ratio": dense_raw / stored if stored else math.nan,
            }
        )
    for p, rows in committed_arrays(store).items():
        arr = store.group[p]
        raw_total += rows * _row_bytes(arr)
    # encodings may store less than a dense delta: count the dense float size as "raw"
    raw_total += sum(t["bytes_raw"] for t in tensors_out) - sum(
        store.num_steps * _row_bytes(store.group[layout.param_path(t.name, a)])
        for t in m.tensors
        for a in store.encodings[t.name].arrays(t.shape, t.dtype)
    )
    stored_total = _du(path)
    nf = store.nonfinite()
    bad_steps = np.flatnonzero(nf.sum(axis=1)) if nf.size else np.zeros(0, dtype=np.int64)
    return {
        "path": path,
        "num_steps": store.num_steps,
        "schema_version": m.schema_version,
        "library_version": m.library_version,
        "optimizer": m.optimizer["class"],
        "optimizer_state": {n: [s.name for s in specs] for n, specs in m.optim_state.items()},
        "hyperparameters": m.hparam_keys,
        "keyframe_steps": store.keyframe_steps.tolist(),
        "steps_per_block": store.steps_per_block,
        "num_examples_recorded": store.commit.num_ids,
        "num_replay_fixes": store.commit.num_fixes,
        "tensors": tensors_out,
        "num_parameters": sum(math.prod(t.shape) for t in m.tensors),
        "bytes_raw": int(raw_total),
        "bytes_stored": int(stored_total),
        "ratio": raw_total / stored_total if stored_total else math.nan,
        "nonfinite_steps": bad_steps[:20].tolist(),
        "num_nonfinite_steps": len(bad_steps),
        "config": m.config,
        "recorder": m.recorder,
    }


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


def _check_files(store: HistoryStore, path: str, rows: int, report: VerifyReport) -> None:
    arr = store.group[path]
    per_file = arr.shards[0] if arr.shards else arr.chunks[0]
    tail = "/".join("0" for _ in arr.shape[1:])
    for i in range(math.ceil(rows / per_file)):
        key = f"c/{i}" + (f"/{tail}" if tail else "")
        if not os.path.exists(os.path.join(store.path, path, key)):
            lo, hi = i * per_file, min(rows, (i + 1) * per_file)
            report.fail(f"array {path!r}: chunk file {key!r} (rows {lo}-{hi - 1}) is missing")
            return


def verify(path: str, progress: bool = False) -> VerifyReport:
    """Check a store end to end; never raises for a damaged store (the report says why)."""
    report = VerifyReport(path)
    try:
        store = open_store(path)
    except (HistoryStoreError, OSError, ValueError) as e:
        report.fail(str(e))
        return report
    report.num_steps = store.num_steps
    arrays = committed_arrays(store)
    for p, rows in arrays.items():
        try:
            arr = store.group[p]
        except KeyError:
            report.fail(f"array {p!r} is missing")
            continue
        if arr.shape[0] < rows:
            report.fail(f"array {p!r} holds {arr.shape[0]} rows but {rows} are committed")
        elif rows:
            _check_files(store, p, rows, report)
    if not report.ok:
        return report
    try:
        _verify_data(store, arrays, report, progress)
    except (HistoryStoreError, ValueError, RuntimeError, OSError) as e:
        report.fail(str(e))
    return report


def _verify_data(
    store: HistoryStore, arrays: dict[str, int], report: VerifyReport, progress: bool
) -> None:
    from tqdm.auto import tqdm

    # every non-delta array: read in full (checksums)
    for p, rows in arrays.items():
        if p.startswith("params/") and not p.endswith("/keyframes"):
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
    names = store.tensor_names
    theta = store.keyframe(0)
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
            for i in np.flatnonzero(crc[b0:b1, 0]):
                step = b0 + int(i) + 1
                for j, name in enumerate(names):
                    if name in lossless and tensors.crc_marker(theta[name]) != int(crc[b0 + i, j]):
                        report.fail(
                            f"replay of {name!r} to step {step} does not match its "
                            "recorded checksum: deltas or fixes before it are corrupt"
                        )
                        bar.close()
                        return
                report.checkpoints_checked += 1
        if k >= len(store.keyframe_steps):
            break
        expected = store.keyframe(k)
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
    report.arrays_checked += sum(
        1 for p in arrays if p.startswith("params/") and not p.endswith("/keyframes")
    )
    nf = store.nonfinite()
    if nf.size and nf.any():
        steps, cols = np.nonzero(nf)
        names = store.tensor_names
        report.warnings.append(
            f"non-finite values (NaN/inf) in the deltas of {len(np.unique(steps))} steps, first "
            f"at step {int(steps[0])} in tensor {names[int(cols[0])]!r}"
        )
    _ = torch  # torch is used through tensors helpers
