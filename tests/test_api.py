"""The attribution API users asked for (issue 12): self-influence with a documented sign,
per-example cosine scores, explaining a model with other weights against the history, clear
errors for small input mistakes, and README's `historystore explain` line run as written."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn

import historystore as hs
from attribution import Engine, explain, self_influence
from attribution.demo.data import Digits
from attribution.demo.model import DigitsCNN
from historystore.encodings import EncodingRule

from .conftest import Run
from .test_attribution import Planned, capture, digits_model, preact, record_factors_run

README = Path(__file__).resolve().parents[1] / "README.md"


class WideMLP(nn.Module):
    """fc1 is wide enough that per-example factors (16 rows) are smaller than its delta."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def record_mislabeled(path: Path, digits: Digits, n: int = 400, planted: int = 8):
    """Plain SGD on n digits with ``planted`` labels flipped to another class; fc1.weight is
    stored as exact per-example factors, fc2 as full deltas (equal split)."""
    x, y = digits.x_train[:n], digits.y_train[:n].clone()
    rng = np.random.default_rng(0)
    bad = np.sort(rng.choice(n, planted, replace=False))
    y[bad] = (y[bad] + torch.as_tensor(rng.integers(1, 10, planted))) % 10
    torch.manual_seed(0)
    model = WideMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = hs.RecorderConfig(
        keyframe_every=64,
        encodings=(EncodingRule("lowrank", {"max_rows": 16}, pattern="*.weight"),),
    )
    g = torch.Generator().manual_seed(0)
    with hs.Recorder(path, model, opt, cfg) as rec:
        for _ in range(600):
            idx = torch.randperm(n, generator=g)[:16]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, labels=y[idx], loss=loss)
    return x, y, bad


_MISLABELED: list[tuple[Path, torch.Tensor, torch.Tensor, np.ndarray]] = []


@pytest.fixture(scope="session")
def mislabeled(
    tmp_path_factory: pytest.TempPathFactory, digits: Digits
) -> tuple[Path, torch.Tensor, torch.Tensor, np.ndarray]:
    """The run of :func:`record_mislabeled`, recorded once per session (tests/test_quanda.py
    imports this fixture, which pytest then registers a second time: hence the cache)."""
    if not _MISLABELED:
        path = tmp_path_factory.mktemp("mislabeled") / "run.zarr"
        _MISLABELED.append((path, *record_mislabeled(path, digits)))
    return _MISLABELED[0]


# -- self-influence ----------------------------------------------------------------------------


def test_self_influence_ranks_planted_mislabeled_examples_first(
    mislabeled: tuple[Path, torch.Tensor, torch.Tensor, np.ndarray], tmp_path: Path
) -> None:
    path, x, _y, bad = mislabeled
    store = hs.open_store(path)
    assert store.meta.tensor("fc1.weight").encoding == "factors"  # exact split there
    assert store.meta.tensor("fc2.weight").encoding == "full"  # equal split there
    kinds = {}
    for score in ("gamma", "cosine"):
        si = self_influence(path, WideMLP(), x, test_batch_size=len(x), score=score, progress=False)
        kinds[score] = si
        assert sorted(si) == ["fc1", "fc2"]
        for layer, s in si.items():
            assert s.shape == (len(x),) and s.dtype == np.float64
            top = np.argsort(-s)[: len(bad)]
            hits = len(set(top.tolist()) & set(bad.tolist()))
            assert hits >= len(bad) - 1, (score, layer, sorted(top), bad)
            # the sign: well-fit examples score negative (their own updates agree with z)
            assert np.median(s) < 0 < s[bad].mean(), (score, layer)

    # the value is the negated diagonal of explain's per-example scores
    rows = np.array([bad[0], bad[1], 3, 57, 200])
    res = explain(
        path, WideMLP(), x[rows], top_k=3, progress=False, scores_path=tmp_path / "s.zarr"
    )
    for layer in res.layer_names:
        for score, name in (("gamma", layer), ("cosine", f"{layer}@cosine")):
            full = zarr.open_array(str(tmp_path / "s.zarr" / name), mode="r")[:]
            np.testing.assert_allclose(
                kinds[score][layer][rows], -full[np.arange(5), rows], rtol=1e-5, atol=1e-9
            )

    # rows with explicit ids; an id that never occurs in the run has no history: 0
    some = self_influence(
        path, WideMLP(), x[[*rows, 0]], ids=[*rows, 10_000], progress=False, test_batch_size=4
    )
    for layer, s in some.items():
        np.testing.assert_allclose(s[:5], kinds["gamma"][layer][rows], rtol=1e-5, atol=1e-9)
        assert s[5] == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        self_influence(path, WideMLP(), x[:2], ids=[0, -1], progress=False)
    with pytest.raises(ValueError, match="one per row"):
        self_influence(path, WideMLP(), x[:2], ids=[0, 1, 2], progress=False)
    engine = Engine(path, WideMLP(), progress=False)  # keep_scores not set: a clear error
    with pytest.raises(ValueError, match="keep_scores=True"):
        engine.self_influence(x[:2])
    # on_scores streams the same rows; keep_arrays=False keeps nothing else
    got: dict[tuple[str, str, int], np.ndarray] = {}
    streamed = Engine(path, WideMLP(), progress=False, keep_scores=True).explain(
        x[rows],
        test_batch_size=2,
        keep_arrays=False,
        on_scores=lambda layer, kind, s, row: got.__setitem__((layer, kind, row), s),
    )
    assert streamed.layer_names == [] and "outputs" not in streamed.arrays
    for layer in ("fc1", "fc2"):
        for kind, name in (("gamma", layer), ("cosine", f"{layer}@cosine")):
            full = zarr.open_array(str(tmp_path / "s.zarr" / name), mode="r")[:]
            rows_ = np.concatenate([got[(layer, kind, r)] for r in (0, 2, 4)])
            scale = np.abs(full).max()  # batches of 2, not 5: other float32 GEMM blocking
            np.testing.assert_allclose(rows_, full, rtol=1e-5, atol=1e-6 * scale)


# -- per-example cosine ------------------------------------------------------------------------


def test_per_example_cosine_by_hand_and_top_k_clamped(tmp_path: Path) -> None:
    """The run of test_gamma_cosine_scores_and_kde_by_hand: γ̄ = [7/(5√2), 0.8, 0]; id 0 is in
    step 1 (with id 1), id 1 in steps 1 and 2, id 2 in step 3. top_k=5 > 3 examples: clamped."""
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    t = torch.tensor
    plan = [
        [t([[1.0, 0.0], [0.0, 0.0]]), t([0.0, 1.0])],
        [t([[0.0, 1.0], [0.0, 0.0]]), t([0.0, 0.0])],
        [t([[0.0, 0.0], [0.0, 0.0]]), t([0.0, 0.0])],
    ]
    opt = Planned(list(model.parameters()), plan)
    path = tmp_path / "hand.zarr"
    with hs.Recorder(path, model, opt, hs.RecorderConfig(keyframe_every=2)) as rec:
        for ids, labels in [([0, 1], [0, 1]), ([1], [1]), ([2], [0])]:
            opt.step()
            rec.step(ids, labels=labels)
    g1 = 7 / (5 * math.sqrt(2))
    res = explain(
        path,
        nn.Sequential(nn.Linear(2, 2)),
        t([[1.0, 2.0]]),
        top_k=5,
        progress=False,
        scores_path=tmp_path / "scores.zarr",
    )
    d = res["0"]
    np.testing.assert_allclose(d["cosine"], [[g1, 0.8, 0.0]], rtol=1e-6)
    ids, scores = res.topk("0", score="cosine")
    np.testing.assert_array_equal(ids, [[1, 0, 2]])  # 3 columns, no -1 / NaN padding
    np.testing.assert_allclose(scores, [[g1 / 2 + 0.8, g1 / 2, 0.0]], rtol=1e-6)
    ids, scores = res.bottomk("0", score="cosine")
    np.testing.assert_array_equal(ids, [[2, 0, 1]])
    full = zarr.open_array(str(tmp_path / "scores.zarr" / "0@cosine"), mode="r")[:]
    np.testing.assert_allclose(full, [[g1 / 2, g1 / 2 + 0.8, 0.0]], rtol=1e-6)
    ids, scores = res.topk("0")  # γ, also clamped
    np.testing.assert_array_equal(ids, [[1, 0, 2]])
    np.testing.assert_allclose(scores, [[11.5, 3.5, 0.0]], rtol=1e-6)
    assert res.attrs["scores"] == ["gamma", "cosine"]
    only = explain(
        path,
        nn.Sequential(nn.Linear(2, 2)),
        t([[1.0, 2.0]]),
        top_k=2,
        progress=False,
        method_options={"scores": "cosine"},
    )
    assert "topk_ids" not in only["0"]
    np.testing.assert_array_equal(only.topk("0", score="cosine")[0], [[1, 0]])
    with pytest.raises(KeyError, match="no per-example 'gamma' scores"):
        only.topk("0")
    with pytest.raises(ValueError, match="scores must be"):
        explain(
            path,
            nn.Sequential(nn.Linear(2, 2)),
            t([[1.0, 2.0]]),
            method_options={"scores": ("gamma", "tracin")},
        )


def test_per_example_cosine_splits_exactly_with_factors(tmp_path: Path, digits: Digits) -> None:
    """With per-example factors, example i's cosine score is Σ_t (⟨z, ΔW_{t,i} a⟩ + its equal
    share of ⟨z, Δb_t⟩) / (‖z‖ ‖c_t‖), ΔW_{t,i} from one backward pass per example."""
    path = tmp_path / "f.zarr"
    from .test_encodings import MLP

    steps = 16
    per_example = record_factors_run(path, digits, bsz=8, steps=steps, seed=1)
    store = hs.open_store(path)
    assert store.meta.tensor("fc1.weight").encoding == "factors"
    x = digits.x_test[:3]
    res = explain(
        path,
        MLP(),
        x,
        layers=["fc1"],
        progress=False,
        top_k=4,
        scores_path=tmp_path / "s.zarr",
        scheduler="sync",
    )
    got = zarr.open_array(str(tmp_path / "s.zarr" / "fc1@cosine"), mode="r")[:].astype(np.float64)
    params = store.params_at(steps)
    trained = MLP()
    with torch.no_grad():
        for n, p in trained.named_parameters():
            p.copy_(params[n])
    a, z = capture(trained, x, ["fc1"])["fc1"]
    a, z = a.double(), z.double()
    znorm = z.norm(dim=1).numpy()
    norm = res["fc1"]["norm"].astype(np.float64)
    ref = np.zeros_like(got)
    for t, (ids, dws, db) in enumerate(per_example):
        inv = 1.0 / (znorm * norm[:, t])
        bias_part = (z @ db).numpy() / len(ids)
        for i, tid in enumerate(ids.tolist()):
            ref[:, tid] += (((a @ dws[i].T) * z).sum(1).numpy() + bias_part) * inv
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * scale)
    np.testing.assert_allclose(got.sum(1), res["fc1"]["cosine"].sum(1), rtol=1e-4)
    top = np.argsort(-got, axis=1)[:, :4]
    np.testing.assert_array_equal(res.topk("fc1", score="cosine")[0], top)


# -- weights="model" ---------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["sgd"], indirect=True)
def test_weights_model_explains_other_weights_against_the_history(run: Run, digits: Digits) -> None:
    x = digits.x_test[:3]
    store = hs.open_store(run.path)
    t_total = store.num_steps
    # a model that already holds θ_T: the same result as loading it from the store
    trained = digits_model()
    store.restore(trained)
    same = explain(run.path, trained, x, weights="model", progress=False, scheduler="sync")
    ref = explain(run.path, digits_model(), x, progress=False, scheduler="sync")
    for layer in ref.layer_names:
        for key, v in ref[layer].items():
            np.testing.assert_array_equal(same[layer][key], v, err_msg=f"{layer}/{key}")

    # a randomised copy: its weights are kept and give a, z; θ_0 and Δ_t come from the store
    torch.manual_seed(123)
    rnd = digits_model()
    before = {n: p.detach().clone() for n, p in rnd.named_parameters()}
    res = explain(run.path, rnd, x, weights="model", progress=False, scheduler="sync")
    assert all(torch.equal(p, before[n]) for n, p in rnd.named_parameters())
    assert res.attrs["weights"] == "model"
    got = capture(rnd, x, ["conv1", "fc2"])
    theta0, theta_t = store.params_at(0), store.params_at(t_total)
    mods = dict(rnd.named_modules())
    for layer in ("conv1", "fc2"):
        a, z = got[layer]
        m = mods[layer]
        w, b = f"{layer}.weight", f"{layer}.bias"
        d = res[layer]
        zf = z.double().reshape(len(x), -1)
        np.testing.assert_allclose(d["preactivation"], zf.numpy(), rtol=1e-6, atol=1e-6)
        init = preact(m, theta0[w], theta0[b], a).reshape(len(x), -1)
        np.testing.assert_allclose(d["init"], init.numpy(), rtol=1e-4, atol=1e-5)
        total = preact(m, theta_t[w], theta_t[b], a).reshape(len(x), -1)
        np.testing.assert_allclose(d["total"], total.numpy(), rtol=1e-4, atol=1e-4)
        for t in (0, 57, t_total - 1):
            delta = store.delta(t, [w, b])
            c = preact(m, delta[w], delta[b], a).reshape(len(x), -1)
            gamma = (c * zf).sum(1).numpy()
            np.testing.assert_allclose(d["gamma"][:, t], gamma, rtol=2e-4, atol=1e-6, err_msg=layer)
            np.testing.assert_allclose(d["norm"][:, t], c.norm(dim=1).numpy(), rtol=2e-4, atol=1e-7)
        # the decomposition no longer sums to the model's z: the error is the distance
        # between the model's layer and the recorded θ_T at the model's inputs
        err = np.linalg.norm(total.numpy() - zf.numpy(), axis=1) / np.linalg.norm(zf, axis=1)
        np.testing.assert_allclose(res.decomposition_error(layer), err, rtol=1e-4)
        assert err.min() > 0.1
    # weights="store" (default) overwrites the same model with θ_T
    explain(run.path, rnd, x, progress=False, layers=["fc2"])
    assert torch.equal(rnd.fc2.weight, theta_t["fc2.weight"])
    with pytest.raises(ValueError, match="weights must be"):
        explain(run.path, digits_model(), x, weights="final", progress=False)
    with pytest.raises(hs.ModelMismatchError, match=r"conv1\.weight"):
        explain(run.path, DigitsCNN(channels=16, hidden=32), x, weights="model", progress=False)


# -- clear errors ------------------------------------------------------------------------------


class Reshaping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x).reshape(-1, 12))  # pairs of rows: a batch must be even


@pytest.mark.parametrize("run", ["sgd"], indirect=True)
def test_wrong_test_shape_names_the_layer(run: Run, digits: Digits, tmp_path: Path) -> None:
    x = digits.x_test[:2]
    with pytest.raises(ValueError, match=r"layer 'conv1' \(Conv2d\(1, 8.*input of shape \(2, 64\)"):
        explain(run.path, digits_model(), x.flatten(1), progress=False)
    big = torch.zeros(2, 1, 10, 10)  # convolutions run, fc1 gets 8·2·5·5 = 400 features, not 256
    with pytest.raises(ValueError, match=r"layer 'fc1' \(Linear\(in_features=256.*\(2, 400\)"):
        explain(run.path, digits_model(), big, progress=False)
    # outside any submodule: the last layer that ran is named
    torch.manual_seed(0)
    model = Reshaping()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with hs.Recorder(tmp_path / "r.zarr", model, opt) as rec:
        for _ in range(2):
            model(torch.randn(4, 4)).sum().backward()
            opt.step()
            rec.step([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"outside its submodules, after layer 'fc1' .*\(1, 6\)"):
        explain(tmp_path / "r.zarr", Reshaping(), torch.randn(1, 4), progress=False)


# -- README's command line, run as written -----------------------------------------------------


def readme_explain_command() -> list[str]:
    """The `historystore explain` command of README's explain section (continuations joined)."""
    text = README.read_text()
    lines = text.replace("\\\n", " ").splitlines()
    found = [ln.strip() for ln in lines if ln.strip().startswith(".venv/bin/historystore explain")]
    assert len(found) == 1, found
    return shlex.split(found[0], comments=True)


def test_readme_explain_command_runs_on_the_demo_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attribution.cli import main
    from attribution.demo.train import TrainConfig, train
    from attribution.results import AttributionResult

    args = readme_explain_command()
    assert args[0] == ".venv/bin/historystore" and args[1] == "explain"
    store = Path(args[2])
    out = Path(args[args.index("--out") + 1])
    monkeypatch.chdir(tmp_path)
    # the store README's demo command writes (at a smaller size: one epoch)
    run = train(store, TrainConfig(epochs=1), progress=False)
    r = CliRunner().invoke(main, [*args[1:], "--no-progress"])
    assert r.exit_code == 0, r.output
    res = AttributionResult.load(out / "scores.npz")
    assert (out / "report.html").exists()
    planted = hs.open_store(store).meta.config["planted_ids"]
    # test point 0 is the image planted in the training set: its copy ranks first
    for layer in res.layer_names:
        assert res.topk(layer)[0][0, 0] == planted[0], layer
    assert run.store_path == store
