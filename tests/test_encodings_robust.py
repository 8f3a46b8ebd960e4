"""Encodings under real training-loop variations: clipping, loss scaling, broken assumptions,
and the policy's size fallback."""

from __future__ import annotations

import pytest
import torch

import historystore as hs
from historystore.encodings import EncodingRule, FactorsEncoding, StepContext, resolve
from historystore.meta.verify import verify

from .test_encodings import MLP

LR = 0.1
RULES = (EncodingRule("lowrank", {"max_rows": 16}, pattern="fc1.weight"),)


def _batches(digits, steps: int, n: int = 16):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(len(digits.y_train), generator=g)[:n]
        yield idx, digits.x_train[idx], digits.y_train[idx]


def _check_store(path, snaps, expected, steps: int) -> None:
    """Decoded Δ = the applied update, Σ_b u_b v_bᵀ = Δ, small recorded and replay errors."""
    store = hs.open_store(path)
    assert store.meta.tensor("fc1.weight").encoding == "factors"
    i = store.tensor_names.index("fc1.weight")
    errors = store.encoding_error()
    assert float(errors[:, i, 0].max()) < 1e-4 and float(errors[:, i, 1].max()) < 1e-6
    f = store.encoded("fc1.weight", 0, steps)
    for t in range(steps):
        true = snaps[t + 1] - snaps[t]
        split = torch.einsum("bo,bi->oi", f["u"][t], f["v"][t])  # per-example rows summed
        torch.testing.assert_close(split, true, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(store.delta(t)["fc1.weight"], expected[t], rtol=1e-4, atol=1e-8)
        theta = store.params_at(t + 1, names=["fc1.weight"])["fc1.weight"]
        assert float((theta - snaps[t + 1]).norm()) <= 1e-6 * float(snaps[t + 1].norm())
    assert verify(str(path)).ok


def test_factors_fold_the_clipping_coefficient(tmp_path, digits) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    snaps, expected, steps = [model.fc1.weight.detach().clone()], [], 12
    with hs.Recorder(tmp_path / "c.zarr", model, opt, hs.RecorderConfig(encodings=RULES)) as rec:
        for idx, x, y in _batches(digits, steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
            assert float(norm) > 0.2  # clipping scales every gradient by < 1/2
            expected.append(-LR * model.fc1.weight.grad.clone())
            opt.step()
            rec.step(idx, labels=y, loss=loss)
            snaps.append(model.fc1.weight.detach().clone())
    _check_store(tmp_path / "c.zarr", snaps, expected, steps)


def test_factors_fold_a_grad_scalers_loss_scale(tmp_path, digits) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    snaps, expected, steps = [model.fc1.weight.detach().clone()], [], 10
    with hs.Recorder(tmp_path / "s.zarr", model, opt, hs.RecorderConfig(encodings=RULES)) as rec:
        for idx, x, y in _batches(digits, steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()  # the hooks see gradients scaled by 2^12 and up
            scaler.unscale_(opt)
            expected.append(-LR * model.fc1.weight.grad.clone())
            scaler.step(opt)
            scaler.update()
            rec.step(idx, labels=y, loss=loss)
            snaps.append(model.fc1.weight.detach().clone())
    assert scaler.get_scale() > 2.0**12  # the scale grew: the fitted factor changed per step
    _check_store(tmp_path / "s.zarr", snaps, expected, steps)


def test_a_step_the_grad_scaler_skipped_is_forgotten_with_rec_skip(tmp_path, digits) -> None:
    """An inf gradient makes GradScaler skip optimizer.step(); rec.skip() drops that
    iteration's captured rows, so the next step's factors are exact again."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    snaps, expected, skipped = [model.fc1.weight.detach().clone()], [], 0
    with hs.Recorder(tmp_path / "k.zarr", model, opt, hs.RecorderConfig(encodings=RULES)) as rec:
        for t, (idx, x, y) in enumerate(_batches(digits, 8)):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss * (float("inf") if t == 2 else 1.0)).backward()
            scaler.unscale_(opt)
            grad = -LR * model.fc1.weight.grad.clone()
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < scale:  # the step was skipped
                skipped += 1
                with pytest.raises(hs.RecorderError, match="rec.skip"):
                    rec.step(idx, labels=y, loss=loss)
                rec.skip()
                continue
            expected.append(grad)
            rec.step(idx, labels=y, loss=loss)
            snaps.append(model.fc1.weight.detach().clone())
    assert skipped == 1
    _check_store(tmp_path / "k.zarr", snaps, expected, 7)


@pytest.mark.parametrize("breach", ["weight_decay", "hidden_update", "functional_forward"])
def test_factors_refuse_what_a_scalar_cannot_explain(tmp_path, digits, breach) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    path = tmp_path / "b.zarr"
    with (
        pytest.raises(hs.EncodingError) as err,
        hs.Recorder(path, model, opt, hs.RecorderConfig(encodings=RULES)) as rec,
    ):
        for t, (idx, x, y) in enumerate(_batches(digits, 6)):
            if t == 3 and breach == "weight_decay":
                opt.param_groups[0]["weight_decay"] = 0.05  # after the policy chose factors
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if t == 3 and breach == "functional_forward":  # bypasses fc1's hooks
                extra = torch.nn.functional.linear(x.flatten(1), model.fc1.weight)
                loss = loss + 0.1 * extra.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if t == 3 and breach == "hidden_update":
                with torch.no_grad():
                    model.fc1.weight.mul_(0.999)
            rec.step(idx, labels=y, loss=loss)
    msg = str(err.value)
    assert "'fc1.weight'" in msg and "tolerance 0.001" in msg and '"full"' in msg
    assert msg.startswith("step 3:")
    assert hs.open_store(path).num_steps == 3  # the steps before the breach are kept


def _factors_step(delta: torch.Tensor, a: torch.Tensor, g: torch.Tensor, lr: float = 1.0):
    enc = FactorsEncoding(tuple(delta.shape), "float32", max_rows=a.shape[0], tensor="w")
    arrays = enc.encode_step(delta, StepContext(lr=lr, inputs=a, grad_outputs=g))
    return arrays, enc.decode_block({k: v[None] for k, v in arrays.items()})[0]


def test_factors_accept_updates_lost_in_the_rounding_of_large_weights() -> None:
    torch.manual_seed(0)
    a, g = torch.randn(8, 50), torch.randn(8, 30)
    theta = 100 * torch.randn(30, 50)  # |θ| ~ 100: ulp ~ 1e-5, the update ~ 1e-5 too
    delta = (theta + 1e-6 * (-g.T @ a)) - theta  # many elements absorbed, the rest coarse
    assert 0 < int((delta == 0).sum()) < delta.numel()
    rel = (delta - 1e-6 * (-g.T @ a)).norm() / delta.norm()
    assert float(rel) > 1e-2  # float rounding alone is far above the tolerance
    _, dec = _factors_step(delta, a, g, lr=1e-6)
    assert float((dec - delta).norm() / delta.norm()) < 2 * float(rel)


def test_factors_fold_any_common_scale_and_refuse_noise() -> None:
    torch.manual_seed(0)
    a, g = torch.randn(8, 50), torch.randn(8, 30)
    for c in (0.37, 1 / 4096, -1.0, 0.0):
        delta = c * 0.1 * (-g.T @ a)
        arrays, dec = _factors_step(delta, a, g, lr=0.1)
        assert float((dec - delta).norm()) <= 1e-6 * float(delta.norm())
        assert float((arrays["u"] - c * 0.1 * -g).norm()) <= 1e-6 * float(g.norm()) * 0.1
    delta = 0.1 * (-g.T @ a)
    delta[0, 0] += 0.5 * float(delta.norm())  # one element off: not a scale
    with pytest.raises(hs.EncodingError, match="'w'.*relative residual"):
        _factors_step(delta, a, g, lr=0.1)
    with pytest.raises(ValueError, match="tolerance"):
        FactorsEncoding((3, 4), "float32", max_rows=2, tolerance=0)
    # a diverged step is stored as captured; non-finite rows against a finite Δ are refused
    bad = g.clone()
    bad[0, 0] = float("inf")
    _factors_step(torch.full((30, 50), float("nan")), a, bad, lr=0.1)
    with pytest.raises(hs.EncodingError, match="'w'.*NaN/inf.*GradScaler"):
        _factors_step(0.1 * (-g.T @ a), a, bad, lr=0.1)


def _linear(i: int, o: int) -> tuple[torch.nn.Linear, torch.Tensor]:
    m = torch.nn.Linear(i, o)
    return m, m.weight


@pytest.mark.parametrize(
    ("rule", "shape", "kept"),
    [
        (EncodingRule("lowrank", {"max_rows": 16}), (24, 64), "factors"),  # 16·88 < 24·64
        (EncodingRule("lowrank", {"max_rows": 32}), (24, 64), "full"),  # 32·88 >= 24·64
        (EncodingRule("svd", {"rank": 4}), (10, 24), "svd"),  # 4·34 < 240
        (EncodingRule("svd", {"rank": 8}), (10, 24), "full"),  # 8·34 >= 240
        (EncodingRule("projected", {"k": 239}), (10, 24), "projected"),
        (EncodingRule("projected", {"k": 240}), (10, 24), "full"),
        (EncodingRule("rounded", {"bits": 8}), (10, 24), "rounded"),  # same size: the codec gains
    ],
)
def test_policy_keeps_full_when_the_encoding_is_not_smaller(rule, shape, kept) -> None:
    module, weight = _linear(shape[1], shape[0])
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    enc, params, why = resolve((rule,), "fc.weight", weight, module, opt)
    assert enc == kept
    if kept == "full":
        assert params == {} and "kept full (lossless)" in why and "bytes per step" in why
    else:
        assert "kept full" not in why
    if kept == "factors":
        assert params == {"max_rows": 16, "tensor": "fc.weight"}


def test_policy_chains_the_reasons_of_lowrank_svd_and_full() -> None:
    module, weight = _linear(24, 10)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    rule = EncodingRule("lowrank", {"max_rows": 4, "rank": 8, "tolerance": 1e-2})
    enc, _, why = resolve((rule,), "fc.weight", weight, module, opt)
    assert enc == "full" and "plain SGD" in why and "svd would store 1088 bytes" in why
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    enc, params, _ = resolve((rule,), "fc.weight", weight, module, opt)
    assert enc == "factors" and params["tolerance"] == 1e-2
