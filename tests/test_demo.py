"""The main job end to end at a reduced size: the report's content, not only its existence."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import historystore as hs
from attribution.cli import main
from attribution.demo.run import run_demo
from attribution.demo.train import TrainConfig
from attribution.results import AttributionResult
from historystore.meta.verify import verify


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    figures = run_demo(out, TrainConfig(epochs=2), test_points=4, top_k=5, progress=False)
    return out, figures


def test_demo_finds_the_planted_duplicate_in_every_layer(demo) -> None:
    out, figures = demo
    result = AttributionResult.load(out / "scores.npz")
    store = hs.open_store(out / "history.zarr")
    planted = store.meta.config["planted_ids"]
    assert len(planted) == 1
    for layer in ("conv2", "fc1", "fc2"):
        ids, scores = result.topk(layer)
        assert ids[0, 0] == planted[0], (layer, ids[0])  # test #0: its duplicate ranks first
        assert np.all(np.diff(scores[0]) <= 0)
        # the decomposition sums back to the layer's preactivation
        assert result.decomposition_error(layer).max() < 1e-3
    assert verify(str(out / "history.zarr")).ok
    assert figures["test accuracy"] > 0.8


def test_demo_report_holds_ridge_data_per_class_and_the_figures(demo) -> None:
    out, _figures = demo
    result = AttributionResult.load(out / "scores.npz")
    store = hs.open_store(out / "history.zarr")
    _, labels, offsets = store.batches()
    step_class = labels[offsets[:-1]]
    for layer in ("conv2", "fc1", "fc2"):
        ridge = result.ridge(layer)  # [points, classes, grid]
        assert ridge.shape[:2] == (4, 10)
        grid = result.arrays["grid"]
        mass = np.trapezoid(ridge, grid, axis=2)
        # single-class protocol: every class had steps, so every class has a density
        assert set(step_class.tolist()) == set(range(10))
        np.testing.assert_allclose(mass, 1.0, atol=0.05)
    html = (out / "report.html").read_text()
    assert "Test point #0" in html and "Test point #3" in html
    assert len(re.findall(r"data:image/png;base64,", html)) == 2 * 4
    assert "planted" in html and "compression ratio" in html
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == store.num_steps and summary["report"].endswith("report.html")


def test_explain_cli_on_the_demo_store(demo, tmp_path) -> None:
    out, _ = demo
    args = [
        "explain",
        str(out / "history.zarr"),
        "--model",
        "attribution.demo.factories:model",
        "--test",
        "attribution.demo.factories:test_data",
        "--data",
        "attribution.demo.factories:train_data",
        "--limit",
        "2",
        "--layers",
        "fc2",
        "--top-k",
        "3",
        "--no-progress",
        "--out",
        str(tmp_path / "ex"),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    res = AttributionResult.load(tmp_path / "ex" / "scores.npz")
    assert res.layer_names == ["fc2"] and res.topk("fc2")[0].shape == (2, 3)
    ref = AttributionResult.load(out / "scores.npz")
    # the CLI explains test points 0 and 1; the demo explained 0 and one point per other class
    np.testing.assert_allclose(res["fc2"]["gamma"][0], ref["fc2"]["gamma"][0], rtol=1e-4, atol=1e-6)
    bad = CliRunner().invoke(main, [*args[:3], "nope.module:fn", *args[4:]])
    assert bad.exit_code == 1 and "cannot import" in bad.output


def test_demo_training_is_deterministic_for_a_seed(tmp_path) -> None:
    """Same seed: the same batches and bit-identical weights; another seed: other batches."""
    from attribution.demo.train import train

    cfg = TrainConfig(epochs=1)
    runs = [train(tmp_path / f"{i}.zarr", cfg, progress=False) for i in range(2)]
    other = train(tmp_path / "o.zarr", TrainConfig(epochs=1, seed=1), progress=False)
    a, b, c = (hs.open_store(r.store_path) for r in (*runs, other))
    assert a.num_steps == b.num_steps > 0
    np.testing.assert_array_equal(a.batches()[0], b.batches()[0])
    np.testing.assert_array_equal(a.batches()[1], b.batches()[1])
    ta, tb = a.params_at(a.num_steps), b.params_at(b.num_steps)
    assert all(torch.equal(ta[n].view(torch.int32), tb[n].view(torch.int32)) for n in ta)
    assert not np.array_equal(a.batches()[0][:64], c.batches()[0][:64])
