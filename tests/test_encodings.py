"""Encodings: exact factors, SVD and sketch errors against theory, rounded replay bounds."""

from __future__ import annotations

import math

import numcodecs
import numpy as np
import pytest
import torch

import historystore as hs
from historystore.encodings import (
    EncodingRule,
    ProjectedEncoding,
    StepContext,
    SVDEncoding,
    bitround,
    get_encoding,
)
from historystore.meta.info import info
from historystore.meta.verify import verify


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 24)
        self.fc2 = torch.nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_per_example_factors_are_exact_for_linear_under_plain_sgd(tmp_path, digits) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rules = (EncodingRule("lowrank", {"max_rows": 16, "rank": 4}, pattern="*.weight"),)
    g = torch.Generator().manual_seed(0)
    expected, per_example, batches = [], [], []
    with hs.Recorder(tmp_path / "f.zarr", model, opt, hs.RecorderConfig(encodings=rules)) as rec:
        for t in range(30):
            n = 16 if t < 29 else 9  # ragged last batch
            idx = torch.randperm(len(digits.y_train), generator=g)[:n]
            x, y = digits.x_train[idx], digits.y_train[idx]
            if t == 3:  # per-example gradients of fc1.weight: mean loss = (1/n) Σ ℓ_b
                model.eval()  # side computations in eval mode are not captured as factor rows
                grads = []
                for b in range(n):
                    model.zero_grad()
                    torch.nn.functional.cross_entropy(model(x[b : b + 1]), y[b : b + 1]).backward()
                    grads.append(model.fc1.weight.grad.clone() / n)
                per_example.append(torch.stack(grads))
                model.train()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            expected.append({k: -0.1 * p.grad.clone() for k, p in model.named_parameters()})
            opt.step()
            rec.step(idx, labels=y, loss=loss)
            batches.append(n)
    store = hs.open_store(tmp_path / "f.zarr")
    assert store.meta.tensor("fc1.weight").encoding == "factors"
    assert store.meta.tensor("fc1.bias").encoding == "full"
    # 16·(24+10) factor entries would exceed the 10·24 dense ones: fc2.weight stays full
    fc2 = store.meta.tensor("fc2.weight")
    assert fc2.encoding == "full" and "kept full" in fc2.encoding_reason
    for t in range(30):
        d = store.delta(t)
        for name in ("fc1.weight", "fc2.weight"):
            torch.testing.assert_close(d[name], expected[t][name], rtol=1e-5, atol=1e-8)
    # exact per-example split: row b of the factors is example b's own update
    f = store.encoded("fc1.weight", 3, 4)
    u, v = f["u"][0], f["v"][0]
    for b in range(16):
        torch.testing.assert_close(
            torch.outer(u[b], v[b]), -0.1 * per_example[0][b], rtol=1e-4, atol=1e-8
        )
    last = store.encoded("fc1.weight", 29, 30)
    assert torch.count_nonzero(last["v"][0, 9:]) == 0  # padding rows of the ragged batch
    # size: rows·(in+out) instead of in·out
    assert u.numel() + v.numel() < 24 * 64 // 1 and verify(str(store.path)).ok


def test_lowrank_falls_back_to_svd_with_a_reason(tmp_path, digits) -> None:
    from attribution.demo.model import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(channels=4, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rules = (EncodingRule("lowrank", {"rank": 3, "max_rows": 32}),)
    with hs.Recorder(tmp_path / "s.zarr", model, opt, hs.RecorderConfig(encodings=rules)) as rec:
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(
                model(digits.x_train[:32]), digits.y_train[:32]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(torch.arange(32), loss=loss)
    d = {t["name"]: t for t in info(str(tmp_path / "s.zarr"))["tensors"]}
    assert (
        d["fc1.weight"]["encoding"] == "svd" and "plain SGD" in d["fc1.weight"]["encoding_reason"]
    )
    assert d["conv2.weight"]["encoding"] == "svd"  # conv kernel reshaped to [out, in·k·k]
    # conv1 is [4, 1·3·3]: rank 3 factors (3·(4+9) entries) are not smaller than 36 dense ones
    assert d["conv1.weight"]["encoding"] == "full"
    assert "not fewer than the dense" in d["conv1.weight"]["encoding_reason"]
    assert d["conv1.bias"]["encoding"] == "full" and "1-D" in d["conv1.bias"]["encoding_reason"]
    assert d["fc1.weight"]["delta_rel_error_max"] > 0


def test_svd_error_matches_theory_on_random_data() -> None:
    torch.manual_seed(0)
    m, n, r = 60, 40, 5
    q1, _ = torch.linalg.qr(torch.randn(m, m))
    q2, _ = torch.linalg.qr(torch.randn(n, n))
    sigma = torch.linspace(3.0, 0.1, n)
    a = (q1[:, :n] * sigma) @ q2.T
    enc = SVDEncoding((m, n), "float32", rank=r)
    arrays = enc.encode_step(a, StepContext())
    approx = enc.decode_block({k: v[None] for k, v in arrays.items()})[0]
    err = float((approx - a).norm() / a.norm())
    theory = float(sigma[r:].pow(2).sum().sqrt() / sigma.pow(2).sum().sqrt())  # Eckart-Young
    assert err == pytest.approx(theory, rel=1e-3)
    big = SVDEncoding((600, 500), "float32", rank=r)  # randomized path
    a2 = torch.randn(600, r) @ torch.randn(r, 500) + 1e-4 * torch.randn(600, 500)
    ar = big.encode_step(a2, StepContext())
    approx2 = big.decode_block({k: v[None] for k, v in ar.items()})[0]
    assert float((approx2 - a2).norm() / a2.norm()) < 1e-3


def test_count_sketch_inner_products_are_unbiased_with_the_jl_variance() -> None:
    torch.manual_seed(0)
    p, k, trials = 2000, 128, 400
    x = torch.randn(p)
    y = 0.5 * x + torch.randn(p)
    est = []
    for seed in range(trials):
        enc = ProjectedEncoding((p,), "float32", k=k, seed=seed, tensor="w")
        sx, sy = enc.sketch(x), enc.sketch(y)
        est.append(float(sx @ sy))
    est_t = torch.tensor(est, dtype=torch.float64)
    xy, xx, yy = float(x @ y), float(x @ x), float(y @ y)
    var = (xx * yy + xy**2 - 2 * float((x**2 * y**2).sum())) / k
    se = math.sqrt(var / trials)
    assert abs(float(est_t.mean()) - xy) < 4 * se
    assert float(est_t.var()) == pytest.approx(var, rel=0.2)
    # same seed and tensor: the same sketch (the test side reproduces the store's projection)
    a = ProjectedEncoding((40, 50), "float32", k=64, seed=3, tensor="fc.weight")
    b = get_encoding("projected", (40, 50), "float32", k=64, seed=3, tensor="fc.weight")
    v = torch.randn(7, 40, 50)
    assert torch.equal(a.sketch(v), b.sketch(v)) and a.sketch(v).shape == (7, 64)


def test_projected_store_gives_sketches_and_refuses_dense(tmp_path, digits) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rules = (EncodingRule("projected", {"k": 512}, pattern="fc1.weight"),)
    deltas = []
    with hs.Recorder(tmp_path / "p.zarr", model, opt, hs.RecorderConfig(encodings=rules)) as rec:
        for _ in range(6):
            before = model.fc1.weight.detach().clone()
            loss = torch.nn.functional.cross_entropy(
                model(digits.x_train[:32]), digits.y_train[:32]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(torch.arange(32), loss=loss)
            deltas.append(model.fc1.weight.detach() - before)
    store = hs.open_store(tmp_path / "p.zarr")
    enc = store.encodings["fc1.weight"]
    sk = store.encoded("fc1.weight", 0, 6)["sketch"]
    v = torch.randn(24, 64)
    for t in range(6):
        torch.testing.assert_close(sk[t], enc.sketch(deltas[t]), rtol=1e-5, atol=1e-9)
        exact = float((deltas[t] * v).sum())
        assert float(sk[t] @ enc.sketch(v)) == pytest.approx(
            exact, abs=0.35 * float(deltas[t].norm() * v.norm())
        )
    with pytest.raises(hs.EncodingError, match="sketch"):
        store.delta(2, names=["fc1.weight"])
    with pytest.raises(hs.EncodingError, match="keyframes"):
        store.params_at(3)
    block = next(store.scan(names=["fc1.weight"], dense=False))
    assert block.raw is not None and block.raw["fc1.weight"]["sketch"].shape == (6, 512)
    assert verify(str(store.path)).ok


@pytest.mark.parametrize("setting", [{"bits": 7}, {"bits": 12}, {"cast": "bfloat16"}])
def test_rounded_replay_stays_within_the_bound(tmp_path, digits, setting) -> None:
    from attribution.demo.model import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rules = (EncodingRule("rounded", setting),)
    cfg = hs.RecorderConfig(keyframe_every=16, encodings=rules)
    snaps = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    g = torch.Generator().manual_seed(1)
    with hs.Recorder(tmp_path / "r.zarr", model, opt, cfg) as rec:
        for _ in range(40):
            idx = torch.randperm(len(digits.y_train), generator=g)[:32]
            loss = torch.nn.functional.cross_entropy(
                model(digits.x_train[idx]), digits.y_train[idx]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, loss=loss)
            snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
    store = hs.open_store(tmp_path / "r.zarr")
    keep = setting.get("bits", 7)
    errors = store.encoding_error()
    for t in range(1, 41):
        theta = store.params_at(t)
        for i, name in enumerate(store.tensor_names):
            step = (snaps[t][name] - snaps[t - 1][name]).norm()
            err = (theta[name] - snaps[t][name]).norm()
            # error feedback: one step's rounding (2^-keep relative) + float32 rounding of θ
            bound = 2.0 ** (-keep) * float(step) * 1.5 + 2.0**-22 * float(snaps[t][name].norm())
            assert float(err) <= bound, (t, name, float(err), bound)
            if t not in store.keyframe_steps:  # recorded error = measured (keyframes are exact)
                rel = float(err / snaps[t][name].norm())
                assert errors[t - 1, i, 1] == pytest.approx(rel, rel=1e-3, abs=1e-9)
    assert verify(str(store.path)).ok


def test_bitround_matches_numcodecs() -> None:
    x = torch.randn(5000) * torch.logspace(-8, 2, 5000)
    for keep in (1, 5, 10, 20):
        ours = bitround(x, keep).numpy().view(np.int32)
        ref = numcodecs.BitRound(keep).encode(x.numpy()).view(np.int32)
        np.testing.assert_array_equal(ours, ref)


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown encoding"):
        EncodingRule("zip")
    with pytest.raises(ValueError, match="exactly one"):
        get_encoding("rounded", (3,), "float32")
    with pytest.raises(TypeError, match="EncodingRule"):
        hs.RecorderConfig(encodings=("full",))  # type: ignore[arg-type]


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("shape", [(256, 128), (37,), (16, 3, 3, 3)])
def test_log8_fast_path_equals_the_general_one(shape, zeros):
    """Adam's v >= 0 takes an in-place path: the same codes and ranges, bit for bit (with
    exact zeros, e.g. units without a gradient yet, and rows of zeros only)."""
    from historystore.encodings import state

    torch.manual_seed(0)
    v = torch.rand(*shape) ** 4 * 1e-6 + 1e-14  # many decades, all > 0
    if zeros:
        v.view(-1)[::5] = 0
        if v.dim() >= 2:
            v[1] = 0

    def flat(t):
        return t.float().reshape(t.shape[0], -1) if t.dim() >= 2 else t.float().reshape(1, -1)

    fast = state.log8_encode(v)
    slow = state._log8_general(v, flat(v), None)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1]) and fast[2] and slow[2]
    nxt = v * 1.05  # within the range: difference-coded against the first step's range
    f2 = state.log8_encode(nxt, fast[1])
    s2 = state._log8_general(nxt, flat(nxt), fast[1])
    assert torch.equal(f2[0], s2[0]) and torch.equal(f2[1], s2[1]) and not f2[2] and not s2[2]
    far = v * 1e4  # outside it: a new range, on both paths
    f3 = state.log8_encode(far, fast[1])
    s3 = state._log8_general(far, flat(far), fast[1])
    assert torch.equal(f3[0], s3[0]) and torch.equal(f3[1], s3[1]) and f3[2] and s3[2]
    # with the recorder's reused scratch (stale values from another step in it): same bits
    work = (torch.full((v.numel(),), float("nan")), torch.full((v.numel(),), -1.0))
    for x, rng, want in ((v, None, fast), (nxt, fast[1], f2), (far, fast[1], f3)):
        got = state.log8_encode(x, rng, work)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    dec = state.log8_decode(f2[0], f2[1], torch.float32)
    pos = nxt > 0
    assert ((dec[pos] / nxt[pos] - 1).abs().max()) < 0.06 and bool((dec[~pos] == 0).all())


@pytest.mark.parametrize("shape", [(64, 33), (8, 3, 3, 3), (0, 5), (4, 0)])
def test_quantized_row_scales_are_each_rows_largest_magnitude(shape):
    """Per-row scales from the rows' extremes: max |Δ| / qmax exactly (rows of negatives
    only, of zeros only, and empty tensors included), and the round trip within scale / 2."""
    from historystore.encodings.quantized import QuantizedEncoding

    torch.manual_seed(0)
    delta = torch.randn(*shape) * torch.logspace(-6, 0, shape[0]).view(-1, *[1] * (len(shape) - 1))
    if shape[0] >= 3 and delta[0].numel():
        delta[1] = -delta[1].abs()
        delta[2] = 0
    enc = QuantizedEncoding(shape, "float32", bits=6)
    out = enc.encode_step(delta, StepContext(lr=0.1))
    want = delta.abs().reshape(shape[0], -1).amax(dim=1) / enc.qmax if delta.numel() else None
    if want is not None:
        assert torch.equal(out["scale"], want)
        assert not torch.signbit(out["scale"]).any()
        dec = enc.decode_block({k: v.unsqueeze(0) for k, v in out.items()})[0]
        half = (out["scale"] / 2).view(-1, *[1] * (len(shape) - 1))
        assert bool(((dec - delta).abs() <= half * (1 + 1e-6)).all())
        # the recorder's path: decoded into its reused buffer, the same bits; and a second
        # step through the encoder's own reused quotient buffer codes like a fresh encoder
        buf = torch.full(shape, float("nan"))
        assert enc.decode_step(out, buf) is buf and torch.equal(buf, dec)
        again = enc.encode_step(delta * 3, StepContext(lr=0.1))
        fresh = QuantizedEncoding(shape, "float32", bits=6).encode_step(delta * 3, StepContext())
        assert all(torch.equal(again[k], fresh[k]) for k in fresh)
        assert torch.equal(
            out["q"],
            QuantizedEncoding(shape, "float32", bits=6).encode_step(delta, StepContext())["q"],
        )  # the first step's codes were not overwritten
    else:
        assert out["scale"].shape == (shape[0],) and out["q"].shape == shape
