"""The xarray view: named dimensions, the store's real values, committed rows only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

import historystore as hs

from .conftest import Run


def test_to_xarray_names_dimensions_and_holds_the_recorded_values(run: Run) -> None:
    store = hs.open_store(run.path)
    ds = store.to_xarray()
    assert isinstance(ds, xr.Dataset)
    T = store.num_steps
    assert ds.sizes["step"] == T == 120 and ds.sizes["keyframe"] == len(store.keyframe_steps)
    w = ds["delta.fc1.weight"]
    assert w.dims == ("step", "fc1.weight.dim0", "fc1.weight.dim1") and w.shape == (T, 32, 256)
    assert w.chunks is not None  # lazy: read from the store when computed
    for t in (0, 33, T - 1):  # Δ_t exactly as the trained weights moved (replay adds fixes)
        want = store.delta(t)["fc1.weight"].numpy()
        np.testing.assert_array_equal(w.sel(step=t).values, want)
        diff = (run.snapshots[t + 1]["fc1.weight"] - run.snapshots[t]["fc1.weight"]).numpy()
        np.testing.assert_array_equal(w.sel(step=t).values, diff)
    # θ at keyframes, by the step they were taken at
    kf = ds["keyframe.conv1.weight"]
    assert kf.dims == ("keyframe", *(f"conv1.weight.dim{i}" for i in range(4)))
    for k in store.keyframe_steps.tolist():
        want = run.snapshots[k]["conv1.weight"].numpy()
        np.testing.assert_array_equal(kf.sel(keyframe=k).values, want)
    # θ_0 + ΣΔ along the step axis lands on the trained weights (float sum: not bit-exact)
    theta = ds["keyframe.fc2.bias"].sel(keyframe=0) + ds["delta.fc2.bias"].sum("step")
    np.testing.assert_allclose(theta.values, run.snapshots[-1]["fc2.bias"].numpy(), atol=1e-6)
    np.testing.assert_allclose(ds["loss"].values, run.losses, rtol=1e-6)
    np.testing.assert_allclose(ds["hparam.g0.lr"].values, run.lrs)
    # the ragged batches: one sample axis, sample_step says which step each id belongs to
    for t in (0, 57, T - 1):
        sel = ds["ids"].where(ds["sample_step"] == t, drop=True)
        np.testing.assert_array_equal(sel.values.astype(np.int64), run.ids[t].numpy())
    assert int((ds["sample_step"] == T - 1).sum()) == 13  # the short last batch
    # optimizer state after step t (momentum buffer or Adam moments), on the tensor's axes
    for t, state in run.states.items():
        for key, v in state["fc1.bias"].items():
            if v.dim():
                got = ds[f"optim.fc1.bias.{key}"].sel(step=t).values
                np.testing.assert_array_equal(got, v.numpy())
    assert ds.attrs["encoding.fc1.weight"] == "full" and ds.attrs["num_steps"] == T


def test_to_xarray_selects_tensors_and_stops_at_the_commit(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "copy.zarr"
    shutil.copytree(run.path, path)
    # a writer killed after a block's data but before its commit leaves rows nobody trusts
    raw = zarr.open_group(path, mode="r+")["params/fc2.bias/delta"]
    T = hs.open_store(run.path).num_steps
    if raw.shape[0] < T + 4:  # (the writer sizes arrays several blocks ahead)
        raw.resize((T + 4, 10))
    raw[T : T + 4] = np.full((4, 10), 7.0, dtype=np.float32)
    store = hs.open_store(path)
    ds = store.to_xarray(names=["fc2.bias"])
    assert [v for v in ds.data_vars if v.startswith("delta.")] == ["delta.fc2.bias"]
    assert ds.sizes["step"] == store.num_steps == T and ds["delta.fc2.bias"].shape == (T, 10)
    last = ds["delta.fc2.bias"].isel(step=-1).values
    np.testing.assert_array_equal(last, store.delta(T - 1)["fc2.bias"].numpy())
    assert not (ds["delta.fc2.bias"] == 7.0).all(axis=1).any()


def test_to_xarray_says_when_the_state_is_in_compact_form(tmp_path: Path, digits) -> None:
    """Compact AdamW: optim.* are the stored uint8 log-code differences (no exp_avg), and the
    dataset says so rather than describing them as the optimizer's state."""
    from .conftest import record_run

    run = record_run(tmp_path / "c.zarr", "adamw", 4, digits, config=hs.RecorderConfig.compact())
    store = hs.open_store(run.path)
    ds = store.to_xarray(["fc1.weight"])
    assert ds["optim.fc1.weight.exp_avg_sq"].dtype == np.uint8
    assert "optim.fc1.weight.exp_avg" not in ds
    assert "log8" in ds.attrs["state_plan"] and "optimizer_state(t)" in ds.attrs["state_plan"]
    v = store.optimizer_state(2)["fc1.weight"]["exp_avg_sq"]
    assert v.dtype.is_floating_point and float(v.max()) > 0
