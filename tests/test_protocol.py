"""Single-class ghost-sample protocol: sampler and ghost batch norm (Pfahler & Morik, Alg. 2)."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from historystore.protocol import (
    GhostBatch,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostSamplerConfig,
    SingleClassGhostSampler,
    convert_batchnorm,
    ghost_split,
    mixture_stats,
    set_ghost_split,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors gain nothing from intra-op threads, and OpenMP spin-waiting makes them
    10x slower when another process competes for the cores; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- sampler


def _labels(sizes: list[int], seed: int = 0) -> torch.Tensor:
    """Shuffled labels with class k appearing sizes[k] times."""
    y = torch.cat([torch.full((s,), k) for k, s in enumerate(sizes)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


def _epoch(sampler: SingleClassGhostSampler) -> list[GhostBatch]:
    return list(sampler)


def test_batches_single_class_and_cover_epoch_once() -> None:
    y = _labels([23, 17, 10, 1])
    s = SingleClassGhostSampler(y, batch_size=4, ghost_size=6, seed=3)
    batches = _epoch(s)
    assert len(batches) == len(s) == 6 + 5 + 3 + 1
    for b in batches:
        assert b.ids.dtype == torch.int64 and b.ghost_ids.dtype == torch.int64
        assert torch.all(y[b.ids] == b.label)
        assert len(b.ghost_ids) == 6
        assert len(set(b.ghost_ids.tolist())) == 6  # without replacement
        assert not set(b.ids.tolist()) & set(b.ghost_ids.tolist())
        assert torch.equal(b.all_ids[: b.n_real], b.ids)
        assert torch.equal(b.all_ids[b.n_real :], b.ghost_ids)
    real = torch.cat([b.ids for b in batches]).sort().values
    assert torch.equal(real, torch.arange(len(y)))
    # batches of different classes are interleaved, not grouped by class
    order = [b.label for b in batches]
    assert order != sorted(order)


def test_ragged_last_batch_and_drop_last() -> None:
    y = _labels([10, 7])
    s = SingleClassGhostSampler(y, batch_size=4, ghost_size=3, seed=0)
    assert len(s) == 3 + 2
    sizes = {0: [], 1: []}
    for b in s:
        sizes[b.label].append(b.n_real)
    assert sorted(sizes[0]) == [2, 4, 4] and sorted(sizes[1]) == [3, 4]

    d = SingleClassGhostSampler(y, batch_size=4, ghost_size=3, seed=0, drop_last=True)
    batches = _epoch(d)
    assert len(d) == len(batches) == 2 + 1
    assert all(b.n_real == 4 for b in batches)
    assert len(torch.cat([b.ids for b in batches]).unique()) == 12


def test_ghost_class_frequencies_match_prior() -> None:
    sizes = [300, 200, 100]
    prior = np.array(sizes) / sum(sizes)
    y = _labels(sizes, seed=1)
    s = SingleClassGhostSampler(y, batch_size=8, ghost_size=16, seed=0)
    counts = np.zeros(3)
    for epoch in range(8):
        s.set_epoch(epoch)
        for b in s:
            counts += np.bincount(y[b.ghost_ids].numpy(), minlength=3)
    assert counts.sum() > 9000
    np.testing.assert_allclose(counts / counts.sum(), prior, atol=0.015)


def test_ghosts_follow_prior_even_for_the_batch_class() -> None:
    # A batch takes 20 of class 2's 30 examples. Uniform sampling from the rest would give
    # class 2 a ghost share of 10/100 = 0.10; the prior-weighted draw keeps it near 0.25.
    sizes = [60, 30, 30]
    y = _labels(sizes, seed=2)
    s = SingleClassGhostSampler(y, batch_size=20, ghost_size=4, seed=5)
    by_label: dict[int, Counter[int]] = {k: Counter() for k in range(3)}
    for epoch in range(500):
        s.set_epoch(epoch)
        for b in s:
            if b.n_real == 20:
                by_label[b.label].update(y[b.ghost_ids].tolist())
    own = by_label[2][2] / sum(by_label[2].values())
    assert own == pytest.approx(0.25, abs=0.03)
    assert own > 0.18  # far from the 0.10 of uniform sampling


def test_determinism_and_epochs() -> None:
    y = _labels([40, 25, 9])

    def signature(s: SingleClassGhostSampler) -> list[tuple[int, list[int], list[int]]]:
        return [(b.label, b.ids.tolist(), b.ghost_ids.tolist()) for b in s]

    rng_before = torch.get_rng_state()
    a = SingleClassGhostSampler(y, batch_size=5, ghost_size=7, seed=11)
    b = SingleClassGhostSampler(y, batch_size=5, ghost_size=7, seed=11)
    first = signature(a)
    assert first == signature(b)
    assert first == signature(a)  # iterating again gives the same epoch
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched

    a.set_epoch(1)
    second = signature(a)
    assert second != first
    b.set_epoch(1)
    assert signature(b) == second
    a.set_epoch(0)
    assert signature(a) == first
    assert signature(SingleClassGhostSampler(y, batch_size=5, ghost_size=7, seed=12)) != first


def test_accepts_numpy_and_lists() -> None:
    y = [0, 1, 0, 1, 2, 2, 0]
    for labels in (y, np.array(y, dtype=np.int32), torch.tensor(y, dtype=torch.int16)):
        s = SingleClassGhostSampler(labels, batch_size=2, ghost_size=2, seed=0)
        assert len(s) == 2 + 1 + 1
        assert sorted(torch.cat([b.ids for b in s]).tolist()) == list(range(7))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0, "ghost_size": 2}, "batch_size"),
        ({"batch_size": -3, "ghost_size": 2}, "batch_size"),
        ({"batch_size": 2, "ghost_size": 0}, "ghost_size"),
        ({"batch_size": 2, "ghost_size": -1}, "ghost_size"),
        ({"batch_size": 2, "ghost_size": 11}, "ghost_size"),
        ({"batch_size": 4, "ghost_size": 7}, "too large"),  # 10 - 4 = 6 possible ghosts
        ({"batch_size": 2.0, "ghost_size": 2}, "int"),
        ({"batch_size": 2, "ghost_size": 2, "seed": -1}, "seed"),
    ],
)
def test_sampler_rejects_bad_sizes(kwargs: dict, match: str) -> None:
    y = torch.tensor([0] * 5 + [1] * 5)
    with pytest.raises(ValueError, match=match):
        SingleClassGhostSampler(y, **kwargs)


@pytest.mark.parametrize(
    "labels",
    [
        torch.zeros(3, 4, dtype=torch.long),
        torch.tensor([0.0, 1.0, 1.0]),
        np.array([0.5, 1.0]),
        torch.tensor([True, False, True]),
        torch.tensor([], dtype=torch.long),
    ],
)
def test_sampler_rejects_bad_labels(labels: object) -> None:
    with pytest.raises(ValueError, match="labels"):
        SingleClassGhostSampler(labels, batch_size=1, ghost_size=1)  # type: ignore[arg-type]


def test_set_epoch_and_config_validation() -> None:
    s = SingleClassGhostSampler([0, 1, 1], batch_size=1, ghost_size=1)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
    cfg = GhostSamplerConfig(batch_size=3, ghost_size=2)
    assert (cfg.seed, cfg.drop_last) == (0, False)
    assert s.config == GhostSamplerConfig(1, 1, 0, False)


# --------------------------------------------------------------------------- ghost batch norm


def _reference_stats(x: torch.Tensor, n_real: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean / biased var / Kish n_eff with explicit per-value weights, in float64.

    Every ghost row weighs 1 in total and the whole real batch weighs 1 in total.
    """
    x = x.double()
    n = x.shape[0]
    m = int(np.prod(x.shape[2:])) if x.dim() > 2 else 1
    row_w = torch.full((n,), 1.0 / m, dtype=torch.float64)
    row_w[:n_real] = 1.0 / (n_real * m)
    w = row_w.view(-1, *([1] * (x.dim() - 1))).expand_as(x)
    dims = [0, *range(2, x.dim())]
    total = w.sum(dims)
    mean = (w * x).sum(dims) / total
    shape = (1, -1) + (1,) * (x.dim() - 2)
    var = (w * (x - mean.view(shape)) ** 2).sum(dims) / total
    w0 = w.select(1, 0)  # the weights are the same for every channel
    n_eff = float(w0.sum() ** 2 / (w0**2).sum())
    assert float(total[0]) == pytest.approx(1 + n - n_real)
    return mean, var, n_eff


def _reference_forward(
    x: torch.Tensor, n_real: int, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    mean, var, n_eff = _reference_stats(x, n_real)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x.double() - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    y = y * bn.weight.double().view(shape) + bn.bias.double().view(shape)
    return y, mean, var, n_eff


def _affine(bn: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))


@pytest.mark.parametrize(
    ("cls", "shape", "n_real"),
    [
        (GhostBatchNorm1d, (13, 5), 4),
        (GhostBatchNorm1d, (9, 3, 7), 2),
        (GhostBatchNorm2d, (10, 4, 3, 5), 3),
        (GhostBatchNorm2d, (6, 2, 4, 4), 5),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_mixture_statistics_against_explicit_weights(cls, shape, n_real, momentum) -> None:
    g = torch.Generator().manual_seed(0)
    bn = cls(shape[1], momentum=momentum).train()
    _affine(bn, 1)
    run_mean = torch.zeros(shape[1], dtype=torch.float64)
    run_var = torch.ones(shape[1], dtype=torch.float64)
    for step in range(4):
        # the real part is shifted and scaled, so it differs from the ghosts
        x = torch.randn(shape, generator=g) * 2 + 1
        x[:n_real] = x[:n_real] * 0.5 + 3.0 + step
        with ghost_split(bn, n_real):
            y = bn(x)
        ref_y, mean, var, n_eff = _reference_forward(x, n_real, bn)
        torch.testing.assert_close(y.double(), ref_y, atol=2e-5, rtol=1e-5)

        factor = 1.0 / (step + 1) if momentum is None else momentum
        run_mean = (1 - factor) * run_mean + factor * mean
        run_var = (1 - factor) * run_var + factor * var * n_eff / (n_eff - 1)
        torch.testing.assert_close(bn.running_mean.double(), run_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), run_var, atol=1e-5, rtol=1e-5)
        assert int(bn.num_batches_tracked) == step + 1

        m_ours, v_ours, n_ours = mixture_stats(x.double(), n_real)
        torch.testing.assert_close(m_ours, mean)
        torch.testing.assert_close(v_ours, var)
        assert n_ours == pytest.approx(n_eff)

    assert bn.ghost_n_real is None  # the context manager resets the split
    # eval mode uses the running statistics, exactly like nn.BatchNorm
    bn.eval()
    x = torch.randn(shape, generator=g)
    with ghost_split(bn, n_real):
        y = bn(x)
    ref = nn.BatchNorm1d if cls is GhostBatchNorm1d else nn.BatchNorm2d
    plain = ref(shape[1], momentum=momentum)
    plain.load_state_dict(bn.state_dict())
    assert torch.equal(y, plain.eval()(x))


def test_mixture_formulas_closed_form_and_paper_correction() -> None:
    # Closed form of the module docstring vs. the printed (uncorrected) formulas of the paper.
    g = torch.Generator().manual_seed(4)
    n_real, n_ghost = 6, 10
    x = torch.randn(n_real + n_ghost, 3, generator=g, dtype=torch.float64)
    x[:n_real] += 2.0
    mean, var, _ = mixture_stats(x, n_real)
    mu_b, mu_g = x[:n_real].mean(0), x[n_real:].mean(0)
    var_b, var_g = x[:n_real].var(0, unbiased=False), x[n_real:].var(0, unbiased=False)
    G = n_ghost
    c = G / (1 + G)
    torch.testing.assert_close(mean, (G * mu_g + mu_b) / (1 + G))
    torch.testing.assert_close(
        var, (G * var_g + var_b) / (1 + G) + G * (mu_g - mu_b) ** 2 / (1 + G) ** 2
    )
    paper_mean = mu_g + (mu_g - mu_b) / (1 + G)
    paper_var = c * var_g + var_b + c * (mu_g - mu_b) ** 2 / (1 + G)
    assert torch.all((mean - paper_mean).abs() > 0.1)
    assert torch.all(paper_var > var)
    # the real batch's mean lies on the other side of μ_g than the paper's correction
    assert torch.all(torch.sign(mean - mu_g) == torch.sign(mu_b - mu_g))


def test_same_values_in_real_and_ghost_reduce_to_ordinary_stats() -> None:
    g = torch.Generator().manual_seed(5)
    # (a) the ghost part repeats the real batch: both parts have the same mean and variance,
    #     so the mixture equals the ordinary statistics, for any relative weighting.
    real = torch.randn(4, 3, 2, 2, generator=g) * 3 - 1
    x = torch.cat([real, real, real])
    bn = GhostBatchNorm2d(3, momentum=None).train()
    with ghost_split(bn, 4):
        y = bn(x)
    mean, var, _ = mixture_stats(x.double(), 4)
    torch.testing.assert_close(mean, real.double().mean((0, 2, 3)))
    torch.testing.assert_close(var, real.double().var((0, 2, 3), unbiased=False))
    plain = nn.BatchNorm2d(3).train()
    torch.testing.assert_close(y, plain(x), atol=1e-5, rtol=1e-5)
    # The paper's printed variance would be (1+2G)/(1+G) times too large here (G = 8).
    G = 8
    paper_var = G / (1 + G) * var + var
    torch.testing.assert_close(paper_var / var, torch.full_like(var, (1 + 2 * G) / (1 + G)))

    # (b) a real batch of one example weighs exactly like one ghost: every value has the
    #     same weight, so the layer is nn.BatchNorm (outputs and running stats, Bessel n).
    for cls, ref, shape in (
        (GhostBatchNorm1d, nn.BatchNorm1d, (7, 4)),
        (GhostBatchNorm2d, nn.BatchNorm2d, (5, 4, 3, 3)),
    ):
        ghost, plain = cls(4).train(), ref(4).train()
        _affine(ghost, 6)
        plain.load_state_dict(ghost.state_dict())
        for _ in range(3):
            x = torch.randn(shape, generator=g) + 2
            with ghost_split(ghost, 1):
                y = ghost(x)
            torch.testing.assert_close(y, plain(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ghost.running_mean, plain.running_mean)
        torch.testing.assert_close(ghost.running_var, plain.running_var)


@pytest.mark.parametrize(
    ("cls", "ref", "shape"),
    [
        (GhostBatchNorm1d, nn.BatchNorm1d, (8, 5)),
        (GhostBatchNorm1d, nn.BatchNorm1d, (8, 5, 6)),
        (GhostBatchNorm2d, nn.BatchNorm2d, (6, 3, 4, 5)),
    ],
)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False, "eps": 1e-3}],
)
def test_no_split_is_exactly_nn_batchnorm(cls, ref, shape, kwargs) -> None:
    g = torch.Generator().manual_seed(7)
    ghost, plain = cls(shape[1], **kwargs), ref(shape[1], **kwargs)
    if ghost.affine:
        _affine(ghost, 8)
    plain.load_state_dict(ghost.state_dict())
    for step in range(5):
        x = torch.randn(shape, generator=g) * (step + 1) + step
        assert torch.equal(ghost(x), plain(x))
        # a split covering the whole batch means no ghosts: also plain batch norm
        with ghost_split(ghost, shape[0]):
            assert torch.equal(ghost(x), plain(x))
    for a, b in zip(ghost.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ghost.eval()
    plain.eval()
    x = torch.randn(shape, generator=g)
    assert torch.equal(ghost(x), plain(x))


def test_state_dict_round_trip_with_nn_batchnorm() -> None:
    plain = nn.BatchNorm2d(4, momentum=0.3)
    _affine(plain, 9)
    plain.train()(torch.randn(5, 4, 3, 3))
    ghost = GhostBatchNorm2d(4, momentum=0.3)
    assert (
        list(ghost.state_dict())
        == list(plain.state_dict())
        == [
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ]
    )
    ghost.load_state_dict(plain.state_dict())
    back = nn.BatchNorm2d(4, momentum=0.3)
    back.load_state_dict(ghost.state_dict())
    for a, b in zip(back.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert isinstance(ghost, nn.BatchNorm2d) and isinstance(GhostBatchNorm1d(2), nn.BatchNorm1d)


def test_gradients_match_reference_autograd() -> None:
    g = torch.Generator().manual_seed(10)
    n_real = 3
    x = (torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64) + 1).requires_grad_()
    bn = GhostBatchNorm2d(3, dtype=torch.float64).train()
    _affine(bn, 11)
    probe = torch.randn(n_real, 3, 2, 2, generator=g, dtype=torch.float64)
    with ghost_split(bn, n_real):
        loss = (bn(x)[:n_real] * probe).sum()  # loss on the real rows only
    loss.backward()
    gx, gw, gb = x.grad.clone(), bn.weight.grad.clone(), bn.bias.grad.clone()
    assert torch.isfinite(gx).all() and gx[n_real:].abs().sum() > 0  # ghosts via statistics

    x2 = x.detach().clone().requires_grad_()
    w2 = bn.weight.detach().clone().requires_grad_()
    b2 = bn.bias.detach().clone().requires_grad_()
    mean, var, _ = _reference_stats(x2, n_real)
    shape = (1, -1, 1, 1)
    y = (x2 - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    (((y * w2.view(shape) + b2.view(shape))[:n_real]) * probe).sum().backward()
    torch.testing.assert_close(gx, x2.grad)
    torch.testing.assert_close(gw, w2.grad)
    torch.testing.assert_close(gb, b2.grad)

    # detach_ghost_stats: same forward, no gradient reaches the ghost rows
    det = GhostBatchNorm2d(3, dtype=torch.float64, detach_ghost_stats=True).train()
    det.load_state_dict(bn.state_dict())
    x3 = x.detach().clone().requires_grad_()
    with ghost_split(det, n_real):
        out = det(x3)
    with ghost_split(bn, n_real):
        torch.testing.assert_close(out, bn(x.detach()))
    (out[:n_real] * probe).sum().backward()
    assert torch.count_nonzero(x3.grad[n_real:]) == 0
    assert x3.grad[:n_real].abs().sum() > 0


def test_split_helpers_and_errors() -> None:
    model = nn.Sequential(nn.Linear(4, 6), GhostBatchNorm1d(6), nn.ReLU(), GhostBatchNorm1d(6))
    assert set_ghost_split(model, 3) == 2
    assert all(m.ghost_n_real == 3 for m in model if isinstance(m, GhostBatchNorm1d))
    with ghost_split(model, 2):
        assert model[1].ghost_n_real == 2
        with pytest.raises(ValueError, match="exceeds"):
            model[1](torch.randn(1, 6))
    assert model[1].ghost_n_real == 3  # restored to the previous value
    assert set_ghost_split(model, None) == 2 and model[3].ghost_n_real is None
    assert set_ghost_split(nn.Linear(2, 2), 4) == 0
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="n_real"):
            set_ghost_split(model, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_real"):
        mixture_stats(torch.randn(4, 2), 0)


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 8),
        nn.BatchNorm1d(8, momentum=None),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def test_convert_batchnorm_keeps_outputs_and_state() -> None:
    torch.manual_seed(12)
    net = _small_net().train()
    for _ in range(3):  # non-trivial running statistics
        net(torch.randn(10, 2, 5, 5))
    net.eval()
    x = torch.randn(7, 2, 5, 5)
    expected = net(x)
    reference = copy.deepcopy(net)
    weight = net[1].weight
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    out = convert_batchnorm(net)
    assert out is net
    assert type(net[1]) is GhostBatchNorm2d and type(net[5]) is GhostBatchNorm1d
    assert net[1].weight is weight and not net[1].training  # shared tensors, mode kept
    assert net[5].momentum is None
    assert torch.equal(net(x), expected)
    with ghost_split(net, 3):  # eval: running statistics, split irrelevant
        assert torch.equal(net(x), expected)
    assert net.state_dict().keys() == reference.state_dict().keys()

    # train mode without a split is still plain batch norm, step for step
    net.train()
    reference.train()
    for _ in range(2):
        xb = torch.randn(6, 2, 5, 5)
        assert torch.equal(net(xb), reference(xb))
    # an optimiser built before the conversion still updates the converted layer
    net(torch.randn(6, 2, 5, 5)).sum().backward()
    before = net[1].weight.detach().clone()
    opt.step()
    assert not torch.equal(net[1].weight, before)

    assert type(convert_batchnorm(nn.BatchNorm1d(3))) is GhostBatchNorm1d


def test_end_to_end_protocol_step() -> None:
    # one epoch of the protocol on a tiny problem: loss on real rows only, weights move
    torch.manual_seed(13)
    y = _labels([12, 9, 7])
    x = torch.randn(len(y), 2, 5, 5) + y.view(-1, 1, 1, 1).float()
    net = convert_batchnorm(_small_net())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sampler = SingleClassGhostSampler(y, batch_size=4, ghost_size=5, seed=0)
    losses = []
    for batch in sampler:
        with ghost_split(net, batch.n_real):
            logits = net(x[batch.all_ids])[: batch.n_real]
        loss = nn.functional.cross_entropy(logits, y[batch.ids])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == len(sampler) == 3 + 3 + 2
    assert all(np.isfinite(losses))
    assert int(net[1].num_batches_tracked) == len(sampler)
