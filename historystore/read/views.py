"""An ``xarray.Dataset`` view of a store: the history with named dimensions, lazily.

Why a view rather than ``xarray.open_zarr``: the raw arrays hold rows beyond the commit after
a crash and the ragged batch arrays have no step axis; the view cuts every array to its
committed rows, names the axes (``step``, ``keyframe``, ``sample``, ``<tensor>.dim<i>``) and
keeps the data in the store (dask arrays over the zarr chunks, so a remote store streams too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..meta import layout

if TYPE_CHECKING:
    import xarray

    from .store import HistoryStore


def _axes(name: str, ndim: int, suffix: str = "") -> tuple[str, ...]:
    return tuple(f"{name}{suffix}.dim{i}" for i in range(ndim))


def to_xarray(store: HistoryStore, names: list[str] | None = None) -> xarray.Dataset:
    """The store as an ``xarray.Dataset`` (see :meth:`HistoryStore.to_xarray`)."""
    try:
        import dask.array as da
        import xarray as xr
    except ImportError as e:  # pragma: no cover - xarray is an optional extra
        raise ImportError(
            "HistoryStore.to_xarray needs xarray: pip install 'historystore[xarray]'"
        ) from e
    T = store.num_steps
    K = len(store.keyframe_steps)
    meta = store.meta
    names = store._names(names)
    data: dict[str, Any] = {}
    skipped: list[str] = []

    def lazy(path: str, rows: int) -> Any:
        arr = store._array(path)
        return da.from_zarr(arr)[:rows]

    for k, v in store._scalars.items():
        data[k] = (("step",), v)
    for k, v in store._hparams.items():
        data[f"hparam.{k}"] = (("step",), v)
    for n in names:
        t = meta.tensor(n)
        tensor_axes = _axes(n, len(t.shape))
        if t.dtype == "bfloat16":  # stored as uint16 bits: numpy has no bfloat16
            skipped.append(n)
            continue
        for a, spec in store.encodings[n].arrays().items():
            axes = tensor_axes if spec.shape == t.shape else _axes(n, len(spec.shape), f".{a}")
            var = a if a == "delta" else f"delta_{a}"
            data[f"{var}.{n}"] = (("step", *axes), lazy(layout.param_path(n, a), T))
        data[f"keyframe.{n}"] = (("keyframe", *tensor_axes), lazy(layout.keyframe_path(n), K))
        for s in meta.optim_state.get(n, []):
            axes = tensor_axes if s.shape == t.shape else _axes(n, len(s.shape), f".{s.name}")
            data[f"optim.{n}.{s.name}"] = (("step", *axes), lazy(layout.optim_path(n, s.name), T))
    ids, labels, offsets = store.batches(0, T)
    data["ids"] = (("sample",), ids)
    data["labels"] = (("sample",), labels)
    coords = {
        "step": np.arange(T, dtype=np.int64),
        "keyframe": np.asarray(store.keyframe_steps, dtype=np.int64),
        "sample_step": (("sample",), np.repeat(np.arange(T, dtype=np.int64), np.diff(offsets))),
    }
    attrs: dict[str, Any] = {
        "historystore": store.path,
        "num_steps": T,
        "optimizer": meta.optimizer["class"],
        "description": "deltas Δ_t = θ_(t+1) − θ_t as stored (delta.<tensor>: dense; "
        "delta_<array>.<tensor>: an encoding's own arrays), θ at keyframes, optimizer state "
        "after step t, per-step scalars and hyperparameters, and the example ids/labels of "
        "each step (sample axis; sample_step says which step)",
        **{f"encoding.{n}": meta.tensor(n).encoding for n in names},
    }
    if skipped:
        attrs["not_included"] = f"bfloat16 tensors (stored as uint16 bits): {skipped}"
    plan = meta.recorder.get("state_plan", {})
    if plan:  # the compact profile: optim.* hold what was stored, not the optimizer's values
        attrs["state_plan"] = (
            f"optimizer state stored in the compact profile's form {plan}: log8 keys are uint8 "
            "code differences (codes at a range's first step; <key>_logrange holds the range), "
            "derived keys are absent; HistoryStore.optimizer_state(t) and scan(optim=True) serve "
            "the values"
        )
    return xr.Dataset(data, coords=coords, attrs=attrs)
