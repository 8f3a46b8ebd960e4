"""``info``: what a store holds (steps, tensors, encodings, codecs, bytes raw vs stored)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import zarr

from ..read.store import HistoryStore, open_store
from . import layout
from .validate import expected_arrays


def committed_arrays(store: HistoryStore) -> dict[str, int]:
    """Every array of the store with its number of committed rows."""
    return {p: spec.rows for p, spec in expected_arrays(store.meta, store.commit).items()}


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
