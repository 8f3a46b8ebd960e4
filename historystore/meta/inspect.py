"""``info`` and ``verify``: what a store holds and whether it is sound.

``verify`` proves exactness on the store at hand: it replays θ from θ_0 through every step,
compares with each keyframe and the last step bit for bit, reads every array (each chunk's
crc32c is checked on decode) and checks that no chunk file of the committed range is missing
(zarr would silently return zeros for a missing chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr

from .. import tensors
from ..errors import CorruptStoreError, HistoryStoreError
from ..read.store import HistoryStore, open_store
from . import layout

_du = layout.disk_usage  # bytes below a local path (the benchmarks measure with it too)


def committed_arrays(store: HistoryStore) -> dict[str, int]:
    """Every array of the store with its number of committed rows."""
    m, c, T = store.meta, store.commit, store.num_steps
    out: dict[str, int] = {}
    for t in m.tensors:
        for a in store.encodings[t.name].arrays():
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
    out["steps/encoding_error"] = T
    for k in m.hparam_keys:
        out[layout.hparam_path(k)] = T
    for path in layout.RAGGED:
        out[path] = c.ragged_count(path)
    return out


def _row_bytes(arr: zarr.Array) -> int:
    return int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize


def info(path: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able summary: steps, tensors with encodings/codecs, keyframes, bytes raw/stored
    (bytes on disk, or the objects' sizes in a bucket)."""
    store = open_store(path, storage_options=storage_options)
    m = store.meta
    tensors_out = []
    errors = store.encoding_error()
    encoded_paths = set()
    for i, t in enumerate(m.tensors):
        stored = 0
        for a in store.encodings[t.name].arrays():
            p = layout.param_path(t.name, a)
            encoded_paths.add(p)
            stored += layout.stored_bytes(store.group, p)
        dense_raw = store.num_steps * t.nbytes
        err = {}
        for j, what in enumerate(("delta", "theta")):
            e = errors[:, i, j] if errors.size else np.zeros(0)
            e = e[np.isfinite(e)]
            if e.size:
                err[f"{what}_rel_error_mean"] = float(e.mean())
                err[f"{what}_rel_error_max"] = float(e.max())
        tensors_out.append(
            {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "encoding": t.encoding,
                "encoding_params": t.encoding_params,
                "encoding_reason": t.encoding_reason,
                "lossless": store.encodings[t.name].lossless,
                "codec": t.codec,
                "chunk_steps": t.chunk_steps,
                "bytes_raw": dense_raw,
                "bytes_stored": stored,
                "ratio": dense_raw / stored if stored else math.nan,
                **err,
            }
        )
    # raw = every array uncompressed, with each delta counted as a dense tensor
    raw_total = sum(t["bytes_raw"] for t in tensors_out)
    for p, rows in committed_arrays(store).items():
        if p not in encoded_paths:
            raw_total += rows * _row_bytes(store.group[p])
    stored_total = layout.stored_bytes(store.group)
    nf = store.nonfinite()
    bad_steps = np.flatnonzero(nf.sum(axis=1)) if nf.size else np.zeros(0, dtype=np.int64)
    return {
        "path": store.path,
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


def _check_files(
    store: HistoryStore,
    path: str,
    rows: int,
    report: VerifyReport,
    chunks: layout.ChunkIndex,
) -> None:
    arr = store.group[path]
    per_file = arr.shards[0] if arr.shards else arr.chunks[0]
    tail = "/".join("0" for _ in arr.shape[1:])
    for i in range(math.ceil(rows / per_file)):
        key = f"c/{i}" + (f"/{tail}" if tail else "")
        if not chunks.exists(path, key):
            lo, hi = i * per_file, min(rows, (i + 1) * per_file)
            report.fail(f"array {path!r}: chunk file {key!r} (rows {lo}-{hi - 1}) is missing")
            return


def verify(
    path: str, progress: bool = False, *, storage_options: dict[str, Any] | None = None
) -> VerifyReport:
    """Check a store (a local path or a store URL) end to end; never raises for a damaged store
    (the report says why)."""
    report = VerifyReport(path)
    try:
        store = open_store(path, storage_options=storage_options)
    except (HistoryStoreError, OSError, ValueError) as e:
        report.fail(str(e))
        return report
    report.num_steps = store.num_steps
    arrays = committed_arrays(store)
    chunks = layout.ChunkIndex(store.group)
    for p, rows in arrays.items():
        try:
            arr = store.group[p]
        except KeyError:
            report.fail(f"array {p!r} is missing")
            continue
        if arr.shape[0] < rows:
            report.fail(f"array {p!r} holds {arr.shape[0]} rows but {rows} are committed")
        elif rows:
            _check_files(store, p, rows, report, chunks)
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
    _ = torch  # torch is used through tensors helpers
