"""The store on real recorded runs: exact replay, batches, optimizer state, scan."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import historystore as hs
from historystore.meta.info import info
from historystore.meta.verify import verify

from .conftest import Run, record_run


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def test_replay_is_bit_exact_at_every_step(run: Run) -> None:
    store = hs.open_store(run.path)
    assert store.num_steps == 120
    assert store.keyframe_steps.tolist() == [0, 32, 64, 96, 120]
    for t in range(store.num_steps + 1):
        theta = store.params_at(t)
        for name, expected in run.snapshots[t].items():
            assert torch.equal(bits(theta[name]), bits(expected)), (t, name)


def test_naive_float32_replay_is_not_exact_but_fixes_make_it_so(run: Run) -> None:
    """The trap the fixes exist for: θ_0 + Σ fl(θ_{t+1} − θ_t) drifts from the trained θ_T."""
    store = hs.open_store(run.path)
    theta = {n: v.clone() for n, v in run.snapshots[0].items()}
    for t in range(store.num_steps):
        for n, d in store.delta(t).items():
            theta[n] += d
    wrong = sum(int((bits(theta[n]) != bits(v)).sum()) for n, v in run.snapshots[-1].items())
    assert wrong > 0
    assert store.commit.num_fixes > 0


def test_delta_is_difference_of_consecutive_weights(run: Run) -> None:
    store = hs.open_store(run.path)
    for t in (0, 31, 32, 119):
        d = store.delta(t)
        for n in d:
            exact = run.snapshots[t + 1][n].double() - run.snapshots[t][n].double()
            torch.testing.assert_close(d[n].double(), exact, rtol=1e-6, atol=1e-9)


def test_batches_losses_and_lr(run: Run) -> None:
    store = hs.open_store(run.path)
    for t in (0, 5, 64, 119):
        b = store.batch(t)
        np.testing.assert_array_equal(b.ids, run.ids[t].numpy())
        np.testing.assert_array_equal(b.labels, run.labels[t].numpy())
        assert b.loss == pytest.approx(run.losses[t], rel=1e-6)
        assert b.lr == run.lrs[t]
    assert len(store.batch(119).ids) == 13  # ragged last batch
    np.testing.assert_allclose(store.loss, run.losses, rtol=1e-6)


def test_optimizer_state_matches_the_optimizer(run: Run) -> None:
    store = hs.open_store(run.path)
    for t, expected in run.states.items():
        got = store.optimizer_state(t)
        for name, st in expected.items():
            for key, value in st.items():
                assert torch.equal(got[name][key].reshape(value.shape), value), (t, name, key)


def test_scheduler_lr_is_captured(tmp_path, digits) -> None:
    run = record_run(tmp_path / "s.zarr", "sgd", 25, digits, scheduler=True)
    store = hs.open_store(run.path)
    np.testing.assert_array_equal(store.lr(), run.lrs)
    assert store.lr()[0] == 0.05 and store.lr()[10] == 0.025 and store.lr()[20] == 0.0125


def test_scan_yields_every_step_once_in_order(run: Run) -> None:
    store = hs.open_store(run.path)
    seen = []
    for block in store.scan(10, 100, names=["fc2.weight"], prefetch=2, block_steps=16):
        assert block.deltas["fc2.weight"].shape == (block.num_steps, 10, 32)
        for i in range(block.num_steps):
            t = block.start + i
            assert torch.equal(block.deltas["fc2.weight"][i], store.delta(t)["fc2.weight"])
            np.testing.assert_array_equal(block.step_ids(i), run.ids[t].numpy())
        seen.extend(range(block.start, block.stop))
    assert seen == list(range(10, 100))


def test_verify_and_info_on_a_sound_store(run: Run) -> None:
    report = verify(str(run.path))
    assert report.ok, report.problems
    assert report.keyframes_checked == 4
    d = info(str(run.path))
    assert d["num_steps"] == 120
    assert d["bytes_stored"] < d["bytes_raw"]
    assert {t["name"] for t in d["tensors"]} == set(run.snapshots[0])


def test_restore_then_resume_continues_the_run_exactly(tmp_path, digits) -> None:
    """Stop after 20 steps, restore model+optimizer from the store, resume: the result equals
    an uninterrupted 35-step run bit for bit (so the stored state is complete)."""
    from attribution.demo.model import DigitsCNN

    from .conftest import make_optimizer

    full = record_run(tmp_path / "full.zarr", "adamw", 35, digits, seed=3)
    part = tmp_path / "part.zarr"
    record_run(part, "adamw", 20, digits, seed=3)
    model = DigitsCNN(channels=8, hidden=32)
    opt = make_optimizer("adamw", model)
    store = hs.open_store(part)
    store.restore(model, opt)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        torch.randperm(len(digits.y_train), generator=g)  # same sampling stream
    with hs.Recorder(part, model, opt, resume=True) as rec:
        for _ in range(15):
            idx = torch.randperm(len(digits.y_train), generator=g)[:32]
            loss = torch.nn.functional.cross_entropy(
                model(digits.x_train[idx]), digits.y_train[idx]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, labels=digits.y_train[idx], loss=loss)
    store = hs.open_store(part)
    assert store.num_steps == 35
    final = store.params_at(35)
    for n, v in full.snapshots[-1].items():
        assert torch.equal(bits(final[n]), bits(v)), n
    assert verify(str(part)).ok


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_state_capture_follows_replaced_state_tensors(tmp_path, digits, kind) -> None:
    """The recorder repeats a step's state copies while the optimizer keeps its tensors;
    state replaced mid-run (``load_state_dict`` makes new tensors, or one tensor rebound in a
    param's state dict) is captured from then on, and each step's stored state is the
    optimizer's, bit for bit."""
    seen: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    names: dict[int, str] = {}

    def on_step(rec: hs.Recorder, t: int) -> None:
        opt = rec.optimizer
        if not names:
            names.update({id(p): n for n, p in rec.model.named_parameters()})
        if t in (9, 20):  # new state tensors (same values), as after a checkpoint reload
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if t == 15:  # one tensor rebound inside a param's existing state dict
            st = opt.state[next(iter(opt.state))]
            key = next(k for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim())
            st[key] = st[key].clone()
        seen[t] = {
            names[id(p)]: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
            for p, s in opt.state.items()
        }

    run = record_run(tmp_path / "s.zarr", kind, 30, digits, on_step=on_step)
    store = hs.open_store(run.path)
    for t in (8, 9, 10, 11, 14, 15, 16, 19, 20, 21, 29):
        got = store.optimizer_state(t)
        for name, st in seen[t].items():
            for key, value in st.items():
                assert torch.equal(got[name][key].reshape(value.shape), value), (t, name, key)
