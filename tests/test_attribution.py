"""Preactivation attribution on real recorded runs: exact decomposition for every supported
layer, hand-computed γ/γ̄/KDE, a planted influential example, parallel = sequential, save/load."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import historystore as hs
from attribution import (
    AttributionResult,
    Engine,
    LayerAdapter,
    explain,
    register_adapter,
    supported_layers,
)
from attribution.demo.data import Digits
from attribution.demo.model import DigitsCNN

from .conftest import Run, make_optimizer

# -- helpers -----------------------------------------------------------------------------------


def digits_model() -> DigitsCNN:
    return DigitsCNN(channels=8, hidden=32)


def capture(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple]:
    """(input, output) of the named modules in one forward pass (independent of the engine)."""
    mods = dict(model.named_modules())
    got: dict[str, tuple] = {}
    hs_ = [
        mods[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, (a[0], o)))
        for n in names
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hs_:
        h.remove()
    return got


def preact(module: nn.Module, w: torch.Tensor, b: torch.Tensor | None, a: torch.Tensor):
    """f(W, a) + b with the module's own functional form, in float64."""
    w, a = w.double(), a.double()
    b = b.double() if b is not None else None
    if isinstance(module, nn.Linear):
        return nn.functional.linear(a, w, b)
    assert isinstance(module, nn.modules.conv._ConvNd)
    return module._conv_forward(a, w, b)


def load(model: nn.Module, theta: dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in theta:
                p.copy_(theta[n])
    return model


def assert_decomposes(res: AttributionResult, layers: list[str]) -> None:
    """init + Σ_t c_t equals the final model's preactivation, and Σ_t γ_t + ⟨z, init⟩ = ‖z‖²."""
    assert sorted(res.layer_names) == sorted(layers)
    for layer in layers:
        d = res[layer]
        z = d["preactivation"].astype(np.float64)
        scale = np.abs(z).max()
        np.testing.assert_allclose(d["total"], z, rtol=1e-4, atol=1e-5 * scale, err_msg=layer)
        assert res.decomposition_error(layer).max() < 1e-5, layer
        zz = (z * z).sum(1)
        lhs = d["gamma"].astype(np.float64).sum(1) + (z * d["init"]).sum(1)
        np.testing.assert_allclose(lhs, zz, rtol=1e-4, err_msg=layer)


# -- adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (nn.Linear(5, 3), (4, 5)),
        (nn.Linear(5, 3), (4, 2, 6, 5)),  # leading dims: the preactivation is [2, 6, 3]
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="circular"), (4, 4, 9)),
        (nn.Conv2d(3, 4, 3, padding=2, dilation=2), (4, 3, 7, 6)),
        (nn.Conv2d(4, 4, 3, padding="same", groups=4, padding_mode="reflect"), (4, 4, 6, 6)),
        (nn.Conv3d(2, 3, 2, stride=(1, 2, 1), bias=False), (4, 2, 3, 4, 3)),
    ],
    ids=["linear", "linear-seq", "conv1d-grouped", "conv2d-dilated", "conv2d-depthwise", "conv3d"],
)
def test_adapters_stack_steps_like_separate_forward_calls(
    module: nn.Module, shape: tuple[int, ...]
) -> None:
    """One stacked call over S weights equals S forward passes of the module with them."""
    from attribution import adapter_for

    torch.manual_seed(0)
    ad = adapter_for(module)
    assert ad is not None
    s = 3
    a = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(s, *module.weight.shape, dtype=torch.float64)
    b = torch.randn(s, *module.bias.shape, dtype=torch.float64) if module.bias is not None else None
    module = module.double()
    got = ad.step_contributions(module, w, b, a)
    no_bias = ad.contributions(module, w, a)
    for i in range(s):
        with torch.no_grad():
            module.weight.copy_(w[i])
            if b is not None:
                module.bias.copy_(b[i])
            expect = module(a)
            if b is not None:
                module.bias.zero_()
            expect_nb = module(a)
        torch.testing.assert_close(got[:, i], expect)
        torch.testing.assert_close(no_bias[:, i], expect_nb)


# -- decomposition on the digits CNN (SGD+momentum and AdamW) ----------------------------------


def test_decomposition_every_digits_layer(run: Run, digits: Digits) -> None:
    x = digits.x_test[:11]
    res = explain(run.path, digits_model(), x, scheduler="sync", test_batch_size=4, progress=False)
    layers = ["conv1", "conv2", "fc1", "fc2"]
    assert_decomposes(res, layers)
    assert res["conv2"]["gamma"].shape == (11, 120)
    assert res["conv2"]["init"].shape == (11, 16 * 8 * 8)  # C×H×W flattened
    assert res.attrs["layers"]["conv2"]["out_shape"] == [16, 8, 8]
    # references in the engine's test batches of 4: CPU conv kernels depend on the batch size,
    # and a batch of 11 differs from batches of 4 by a few ulps of |z| ~ 10
    final = _final(run)
    with torch.no_grad():
        ref = torch.cat([final(c) for c in x.split(4)]).numpy()
    np.testing.assert_allclose(res.arrays["outputs"], ref, rtol=1e-5, atol=1e-6)

    # independent reference from the training snapshots (float64, no store involved)
    parts = [capture(final, c, layers) for c in x.split(4)]
    got = {n: tuple(torch.cat([p[n][i] for p in parts]) for i in (0, 1)) for n in layers}
    mods = dict(final.named_modules())
    for layer in layers:
        a, z = got[layer]
        z = z.double().flatten(1)
        th0 = run.snapshots[0]
        init = preact(mods[layer], th0[f"{layer}.weight"], th0[f"{layer}.bias"], a).flatten(1)
        np.testing.assert_allclose(res[layer]["init"], init.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res[layer]["preactivation"], z.numpy(), rtol=1e-5, atol=1e-6)
        for t in (0, 31, 32, 77, 119):
            s0, s1 = run.snapshots[t], run.snapshots[t + 1]
            dw = s1[f"{layer}.weight"].double() - s0[f"{layer}.weight"].double()
            db = s1[f"{layer}.bias"].double() - s0[f"{layer}.bias"].double()
            c = preact(mods[layer], dw, db, a).flatten(1)
            gamma = (c * z).sum(1)
            np.testing.assert_allclose(
                res[layer]["gamma"][:, t],
                gamma.numpy(),
                rtol=2e-3,
                atol=1e-6 * float(z.abs().max()),
            )
            np.testing.assert_allclose(res[layer]["norm"][:, t], c.norm(dim=1).numpy(), rtol=2e-3)
            cos = gamma / (z.norm(dim=1) * c.norm(dim=1))
            np.testing.assert_allclose(res[layer]["cosine"][:, t], cos.numpy(), atol=2e-3)


def _final(run: Run) -> nn.Module:
    return load(digits_model(), run.snapshots[-1]).eval()


# -- Conv1d, grouped/strided/circular convs, a frozen bias and a custom adapter ----------------


class Scale(nn.Module):
    """y = x ⊙ w + b: linear in w; not a built-in layer, explained via a registered adapter."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.full((n,), 0.5), requires_grad=False)  # never trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


class ScaleAdapter(LayerAdapter):
    bias_dim = -1

    def contributions(self, module: nn.Module, weights: torch.Tensor, inputs: torch.Tensor):
        return inputs[:, None, :] * weights[None]  # [B, S, n]


register_adapter(Scale, ScaleAdapter())


class TinySeq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2, padding_mode="circular")
        self.conv2 = nn.Conv1d(4, 4, 3, padding=1, dilation=1, bias=False)
        self.scale = Scale(24)
        self.fc = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x)).flatten(1)
        return self.fc(torch.relu(self.scale(x)))


def record_tiny(path: Path, kind: str, steps: int = 24) -> tuple[TinySeq, torch.Tensor]:
    torch.manual_seed(1)
    model = TinySeq()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9)
        if kind == "sgd"
        else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    )
    x = torch.randn(40, 2, 12)
    y = torch.randint(0, 3, (40,))
    g = torch.Generator().manual_seed(0)
    with hs.Recorder(path, model, opt, hs.RecorderConfig(keyframe_every=8)) as rec:
        for _ in range(steps):
            idx = torch.randperm(40, generator=g)[:6]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, labels=y[idx], loss=loss)
    return model, x


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_decomposition_conv1d_frozen_bias_and_custom_adapter(tmp_path: Path, kind: str) -> None:
    trained, x = record_tiny(tmp_path / "tiny.zarr", kind)
    store = hs.open_store(tmp_path / "tiny.zarr")
    assert "scale.bias" not in store.tensor_names
    assert supported_layers(TinySeq(), store) == ["conv1", "conv2", "scale", "fc"]
    res = explain(store, TinySeq(), x[:7], test_batch_size=3, progress=False, device="cpu")
    assert_decomposes(res, ["conv1", "conv2", "scale", "fc"])
    # the constant (untrained) bias enters the initialisation term only: W_0 = 1, b = 0.5
    got = capture(trained, x[:7], ["scale"])
    a = got["scale"][0].double()
    np.testing.assert_allclose(res["scale"]["init"], (a * 1.0 + 0.5).numpy(), rtol=1e-5, atol=1e-6)


# -- γ, γ̄, example scores and class KDE on a hand-computable run -------------------------------


class Planned(torch.optim.Optimizer):
    """Applies hand-set deltas, so the recorded history is known exactly."""

    def __init__(self, params: list[nn.Parameter], plan: list[list[torch.Tensor]]) -> None:
        super().__init__(params, {"lr": 1.0})
        self.plan = plan
        self.t = 0

    @torch.no_grad()
    def step(self, closure: object = None) -> None:
        for p, d in zip(self.param_groups[0]["params"], self.plan[self.t], strict=True):
            p.add_(d)
        self.t += 1


def test_gamma_cosine_scores_and_kde_by_hand(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    T = torch.tensor
    plan = [  # (ΔW, Δb) per step
        [T([[1.0, 0.0], [0.0, 0.0]]), T([0.0, 1.0])],
        [T([[0.0, 1.0], [0.0, 0.0]]), T([0.0, 0.0])],
        [T([[0.0, 0.0], [0.0, 0.0]]), T([0.0, 0.0])],
    ]
    batches = [([0, 1], [0, 1]), ([1], [1]), ([2], [0])]
    opt = Planned(list(model.parameters()), plan)
    path = tmp_path / "hand.zarr"
    with hs.Recorder(path, model, opt, hs.RecorderConfig(keyframe_every=2)) as rec:
        for ids, labels in batches:
            opt.step()
            rec.step(ids, labels=labels)

    # W_T = [[2,1],[0,1]], b_T = [0,1], a = [1,2]: z = [4,3], ‖z‖ = 5
    # init = W_0 a + b_0 = [1,2]; c_1 = [1,0]+[0,1] = [1,1]; c_2 = [2,0]; c_3 = 0
    a = T([[1.0, 2.0]])
    for sched in ("sync", "threads"):
        res = explain(
            path,
            nn.Sequential(nn.Linear(2, 2)),
            a,
            top_k=3,
            scheduler=sched,
            num_workers=2,
            progress=False,
            scores_path=tmp_path / f"scores-{sched}.zarr",
        )
        d = res["0"]
        np.testing.assert_allclose(d["preactivation"], [[4, 3]])
        np.testing.assert_allclose(d["init"], [[1, 2]])
        np.testing.assert_allclose(d["total"], [[4, 3]])
        np.testing.assert_allclose(d["gamma"], [[7, 8, 0]], rtol=1e-6)
        np.testing.assert_allclose(d["norm"], [[math.sqrt(2), 2, 0]], rtol=1e-6)
        np.testing.assert_allclose(d["cosine"], [[7 / (5 * math.sqrt(2)), 0.8, 0]], rtol=1e-6)
        # example scores: id 0 gets 7/2, id 1 gets 7/2 + 8, id 2 gets 0
        np.testing.assert_array_equal(d["topk_ids"], [[1, 0, 2]])
        np.testing.assert_allclose(d["topk_scores"], [[11.5, 3.5, 0.0]], rtol=1e-6)
        np.testing.assert_array_equal(d["bottomk_ids"], [[2, 0, 1]])
        full = zarr.open_array(str(tmp_path / f"scores-{sched}.zarr" / "0"), mode="r")
        np.testing.assert_allclose(full[:], [[3.5, 11.5, 0.0]], rtol=1e-6)
        # classes: class 0 in steps 1, 3 (weights √2, 0); class 1 in steps 1, 2 (√2, 2)
        np.testing.assert_allclose(d["class_weight"], [[math.sqrt(2), math.sqrt(2) + 2]])
        grid = res.arrays["grid"].astype(np.float64)
        assert len(grid) == 201 and grid[0] == -1 and grid[-1] == 1

        def k(c: float, grid: np.ndarray = grid) -> np.ndarray:
            return np.exp(-0.5 * ((grid - c) / 0.1) ** 2)

        g1 = 7 / (5 * math.sqrt(2))
        expect = np.stack([math.sqrt(2) * k(g1), math.sqrt(2) * k(g1) + 2 * k(0.8)])
        np.testing.assert_allclose(d["class_kde"][0], expect, rtol=1e-5, atol=1e-6)
        norm = math.sqrt(2 * math.pi) * 0.1
        np.testing.assert_allclose(res.ridge("0")[0, 0], k(g1) / norm, rtol=1e-5, atol=1e-6)
        assert res.attrs["class_steps"] == [2, 2]


# -- top-k on a planted example ----------------------------------------------------------------


def test_planted_example_ranks_first(tmp_path: Path, digits: Digits) -> None:
    """A distinct pattern of a fresh class (one training id put into every third batch) is the
    most influential training example of its own test copy at every layer, and explains a
    larger share of that copy's output than of any other test point's."""
    n = len(digits.y_train)
    pattern = (torch.arange(64).view(8, 8) % 2 == torch.arange(8)[:, None] % 2).float()
    x_train = torch.cat([digits.x_train, pattern.view(1, 1, 8, 8)])
    y_train = torch.cat([digits.y_train, torch.tensor([10])])
    torch.manual_seed(0)
    model = digits_model()
    model.fc2 = nn.Linear(32, 11)
    opt = make_optimizer("sgd", model)
    g = torch.Generator().manual_seed(0)
    with hs.Recorder(tmp_path / "p.zarr", model, opt, hs.RecorderConfig(keyframe_every=32)) as rec:
        for t in range(96):
            idx = torch.randperm(n, generator=g)[:24]
            if t % 3 == 0:
                idx[0] = n
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, labels=y_train[idx], loss=loss)
    fresh = digits_model()
    fresh.fc2 = nn.Linear(32, 11)
    test = torch.cat([pattern.view(1, 1, 8, 8), digits.x_test[:8]])
    res = explain(tmp_path / "p.zarr", fresh, test, top_k=5, progress=False)
    assert res.arrays["outputs"][0].argmax() == 10
    assert res.attrs["num_classes"] == 11 and res.attrs["class_steps"][10] == 32
    for layer in res.layer_names:
        ids, scores = res.topk(layer)
        assert ids[0, 0] == n, (layer, ids[0])
        assert scores[0, 0] > 1.5 * scores[0, 1], (layer, scores[0])
        assert res[layer]["class_weight"][0, 10] > 0
    # the planted id's share of Σ_t γ_t is largest for its own copy (at the logits)
    ids, scores = res.topk("fc2")
    share = scores[:, 0] / res["fc2"]["gamma"].sum(1)
    assert (ids[:, 0] == n).all()
    assert share[0] > 1.05 * share[1:].max(), share


# -- parallel = sequential, save/load, errors --------------------------------------------------


def _assert_same(a: AttributionResult, b: AttributionResult) -> None:
    assert a.layer_names == b.layer_names
    for layer in a.layer_names:
        for key, v in a[layer].items():
            w = b[layer][key]
            assert v.shape == w.shape and v.dtype == w.dtype, (layer, key)
            if key.endswith("_ids"):
                np.testing.assert_array_equal(v, w, err_msg=f"{layer}/{key}")
            else:
                scale = max(float(np.nanmax(np.abs(v))), 1e-30) if v.size else 1.0
                np.testing.assert_allclose(
                    v, w, rtol=1e-5, atol=1e-6 * scale, err_msg=f"{layer}/{key}"
                )


def test_parallel_equals_sequential(run: Run, digits: Digits) -> None:
    x = digits.x_test[:6]
    seq = explain(run.path, digits_model(), x, scheduler="sync", progress=False)
    engine = Engine(run.path, digits_model(), scheduler="threads", num_workers=3)
    assert engine.ranges(3) == [(0, 32), (32, 64), (64, 96), (96, 120)]
    par = engine.explain(x)
    _assert_same(seq, par)
    # smaller blocks than the store's, more workers than keyframe ranges: split at blocks
    small = explain(
        run.path, digits_model(), x, block_steps=8, num_workers=6, progress=False, prefetch=1
    )
    _assert_same(seq, small)


def test_distributed_client_equals_sequential(run: Run, digits: Digits) -> None:
    distributed = pytest.importorskip("distributed")
    x = digits.x_test[:3]
    seq = explain(run.path, digits_model(), x, scheduler="sync", progress=False)
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
    ) as client:
        dist = explain(run.path, digits_model(), x, scheduler=client, progress=False)
    _assert_same(seq, dist)
    assert dist.attrs["scheduler"] == "distributed"


@pytest.mark.parametrize("suffix", [".npz", ".zarr"])
def test_save_load_round_trip(run: Run, digits: Digits, tmp_path: Path, suffix: str) -> None:
    res = explain(run.path, digits_model(), digits.x_test[:3], progress=False, top_k=4)
    path = res.save(tmp_path / f"res{suffix}")
    back = AttributionResult.load(path)
    assert back.method == "preactivation" and back.attrs == res.attrs
    _assert_same(res, back)
    assert set(back.arrays) == {"grid", "outputs"}
    np.testing.assert_array_equal(back.arrays["grid"], res.arrays["grid"])
    np.testing.assert_array_equal(back.ridge("fc1"), res.ridge("fc1"))
    if suffix == ".npz":  # plain numpy, no pickle
        with np.load(path, allow_pickle=False) as z:
            assert z["layer/fc2/topk_ids"].shape == (3, 4)


def test_scores_kde_and_classes_agree_with_the_per_step_arrays(
    run: Run, digits: Digits, tmp_path: Path
) -> None:
    """The streamed aggregates equal what the per-step arrays and the batches imply."""
    x = digits.x_test[:5]
    res = explain(
        run.path,
        digits_model(),
        x,
        progress=False,
        test_batch_size=2,
        scores_path=tmp_path / "scores.zarr",
        top_k=3,
    )
    store = hs.open_store(run.path)
    ids, labels, off = store.batches()
    grid = res.arrays["grid"].astype(np.float64)
    for layer in ("conv1", "fc2"):
        d = res[layer]
        full = zarr.open_array(str(tmp_path / "scores.zarr" / layer), mode="r")[:]
        assert full.shape == (5, int(ids.max()) + 1)
        # each step's γ is split over its examples: the scores sum to Σ_t γ_t
        np.testing.assert_allclose(full.sum(1), d["gamma"].sum(1), rtol=1e-4)
        np.testing.assert_array_equal(
            np.sort(full, axis=1)[:, ::-1][:, :3], d["topk_scores"].astype(np.float32)
        )
        # class weights and KDE, recomputed per step from the stored batches
        weight = np.zeros((5, 10))
        kde = np.zeros((5, 10, len(grid)))
        for t in range(store.num_steps):
            for c in np.unique(labels[off[t] : off[t + 1]]):
                w = d["norm"][:, t].astype(np.float64)
                weight[:, c] += w
                u = (grid[None] - d["cosine"][:, t, None]) / 0.1
                kde[:, c] += w[:, None] * np.exp(-0.5 * u * u)
        np.testing.assert_allclose(d["class_weight"], weight, rtol=1e-5)
        np.testing.assert_allclose(d["class_kde"], kde, rtol=1e-4, atol=1e-5 * kde.max())


def test_mismatched_model_and_bad_arguments_give_clear_errors(run: Run, digits: Digits) -> None:
    x = digits.x_test[:2]
    with pytest.raises(hs.ModelMismatchError, match=r"conv1\.weight"):
        explain(run.path, DigitsCNN(channels=16, hidden=32), x, progress=False)
    with pytest.raises(KeyError, match="explainable layers"):
        explain(run.path, digits_model(), x, layers=["fc3"], progress=False)
    with pytest.raises(TypeError, match="register_adapter"):
        explain(run.path, digits_model(), x, layers=["bn1"], progress=False)
    with pytest.raises(ValueError, match="scheduler"):
        explain(run.path, digits_model(), x, scheduler="processes", progress=False)
    with pytest.raises(ValueError, match="unknown attribution method"):
        explain(run.path, digits_model(), x, method="nope", progress=False)
    with pytest.raises(hs.NotAStoreError):
        explain(Path(run.path).parent / "missing.zarr", digits_model(), x, progress=False)


class Twice(nn.Module):
    """``shared`` is applied twice per forward pass (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_layer_called_twice_is_skipped_or_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Twice()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with hs.Recorder(tmp_path / "t.zarr", model, opt) as rec:
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(torch.arange(8), labels=y, loss=loss)
    res = explain(tmp_path / "t.zarr", Twice(), x[:2], progress=False)
    assert res.layer_names == ["head"]
    assert "called 2 times" in res.attrs["skipped_layers"]["shared"]
    assert_decomposes(res, ["head"])
    with pytest.raises(ValueError, match=r"layer 'shared': called 2 times"):
        explain(tmp_path / "t.zarr", Twice(), x[:2], layers=["shared"], progress=False)


# -- exact per-example split from per-example factors ------------------------------------------


def record_factors_run(
    path: Path, digits: Digits, bsz: int, steps: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Record plain SGD (lr 0.1) on the encodings MLP with fc1's deltas as per-example
    factors; return, per step, (ids, ΔW_i of each example by its own backward pass, Δb)."""
    from historystore.encodings import EncodingRule

    from .test_encodings import MLP

    torch.manual_seed(0)
    model, lr = MLP(), 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cfg = hs.RecorderConfig(
        encodings=(EncodingRule("lowrank", {"max_rows": bsz}, pattern="fc1.weight"),)
    )
    g = torch.Generator().manual_seed(seed)
    per_example: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # ids, ΔW_i, Δb
    with hs.Recorder(path, model, opt, cfg) as rec:
        for _ in range(steps):
            idx = torch.randperm(len(digits.y_train), generator=g)[:bsz]
            x, y = digits.x_train[idx], digits.y_train[idx]
            dws = []
            model.eval()  # (no dropout/BN here) keeps these passes out of the recorded factors
            for i in range(bsz):  # the reference: example i's part of the mean loss
                model.zero_grad()
                (nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) / bsz).backward()
                dws.append(-lr * model.fc1.weight.grad.double())
            model.train()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            db = -lr * model.fc1.bias.grad.double()
            opt.step()
            rec.step(idx, labels=y, loss=loss)
            per_example.append((idx, torch.stack(dws), db))
    return per_example


def test_factors_split_each_steps_gamma_exactly_per_example(tmp_path: Path, digits: Digits) -> None:
    """With per-example factors of fc1 (plain SGD), example i's score is Σ_t ⟨z, ΔW_{t,i} a⟩
    plus its equal share of the bias part, where ΔW_{t,i} = −η ∂(L_t)/∂W restricted to example
    i, computed here independently by one backward pass per example."""
    path = tmp_path / "f.zarr"
    from .test_encodings import MLP

    steps = 24
    per_example = record_factors_run(path, digits, bsz=16, steps=steps, seed=0)
    store = hs.open_store(path)
    assert store.meta.tensor("fc1.weight").encoding == "factors"

    x = digits.x_test[:3]
    kw = dict(layers=["fc1"], scheduler="sync", progress=False, top_k=4, test_batch_size=3)
    exact = explain(path, MLP(), x, scores_path=tmp_path / "exact.zarr", **kw)
    equal = explain(
        path,
        MLP(),
        x,
        scores_path=tmp_path / "equal.zarr",
        method_options={"split": "equal"},
        **kw,
    )
    s_exact = zarr.open_array(str(tmp_path / "exact.zarr" / "fc1"), mode="r")[:].astype(np.float64)
    s_equal = zarr.open_array(str(tmp_path / "equal.zarr" / "fc1"), mode="r")[:].astype(np.float64)

    a, z = capture(load(MLP(), store.params_at(steps)), x, ["fc1"])["fc1"]
    a, z = a.double(), z.double()
    ref = np.zeros_like(s_exact)
    for ids, dws, db in per_example:
        bias_part = (z @ db).numpy() / len(ids)  # ⟨z, Δb_t⟩, split equally
        for i, tid in enumerate(ids.tolist()):
            ref[:, tid] += ((a @ dws[i].T) * z).sum(1).numpy() + bias_part
    scale = np.abs(ref).max()
    np.testing.assert_allclose(s_exact, ref, rtol=1e-3, atol=1e-4 * scale)
    # both splits hand out the same total, Σ_t γ_t, but differently
    np.testing.assert_allclose(s_exact.sum(1), exact["fc1"]["gamma"].sum(1), rtol=1e-4)
    np.testing.assert_allclose(s_equal.sum(1), s_exact.sum(1), rtol=1e-4)
    assert np.abs(s_exact - s_equal).max() > 0.1 * scale
    np.testing.assert_array_equal(equal["fc1"]["gamma"], exact["fc1"]["gamma"])


def test_float64_models_decompose_to_float64_precision(tmp_path: Path, digits: Digits) -> None:
    from .test_encodings import MLP

    torch.manual_seed(0)
    model = MLP().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    path = tmp_path / "f64.zarr"
    with hs.Recorder(path, model, opt) as rec:
        for t in range(12):
            idx = torch.arange(16 * t, 16 * t + 16)
            x, y = digits.x_train[idx].double(), digits.y_train[idx]
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, labels=y, loss=loss)
    res = explain(path, MLP().double(), digits.x_test[:3].double(), progress=False)
    for layer in ("fc1", "fc2"):
        assert res[layer]["preactivation"].dtype == np.float64
        assert res.decomposition_error(layer).max() < 1e-12
