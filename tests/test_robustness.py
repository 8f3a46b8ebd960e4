"""Bad input gets a clear error and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import historystore as hs
from attribution.cli import main
from attribution.demo.model import DigitsCNN
from historystore.meta.verify import verify

from .conftest import record_run


@pytest.fixture
def small(tmp_path, digits):
    return record_run(
        tmp_path / "small.zarr",
        "sgd",
        40,
        digits,
        config=hs.RecorderConfig(keyframe_every=16, steps_per_block=8),
    )


def _train_step(model, opt, digits, n=16):
    idx = torch.arange(n)
    loss = torch.nn.functional.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return idx, loss


def test_not_a_store(tmp_path):
    with pytest.raises(hs.NotAStoreError, match="does not exist"):
        hs.open_store(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("hello")
    with pytest.raises(hs.NotAStoreError):
        hs.open_store(tmp_path / "plain")
    zarr.open_group(tmp_path / "foreign.zarr", mode="w").attrs["x"] = 1
    with pytest.raises(hs.NotAStoreError, match="not a historystore"):
        hs.open_store(tmp_path / "foreign.zarr")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "foreign.zarr")])
    assert result.exit_code == 1 and "not a historystore" in result.output


def test_newer_schema_is_refused(small):
    g = zarr.open_group(small.path, mode="r+")
    meta = g.attrs["historystore"]
    g.attrs["historystore"] = {**meta, "schema_version": 99}
    with pytest.raises(hs.SchemaVersionError, match="upgrade"):
        hs.open_store(small.path)


def test_existing_path_is_not_overwritten_silently(small, digits):
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(hs.RecorderError, match="already exists"),
        hs.Recorder(small.path, model, opt),
    ):
        pass
    assert hs.open_store(small.path).num_steps == 40  # nothing lost


def test_resume_with_a_different_model_is_refused(small):
    model = DigitsCNN(channels=4, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(hs.ModelMismatchError, match="conv1.weight"):
        hs.Recorder(small.path, model, opt, resume=True).__enter__()
    model = DigitsCNN(channels=8, hidden=32)  # right shapes, wrong weights
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(hs.ModelMismatchError, match="restore the model first"):
        hs.Recorder(small.path, model, opt, resume=True).__enter__()
    with pytest.raises(hs.ModelMismatchError, match="no parameter"):
        hs.open_store(small.path).check_model(torch.nn.Linear(3, 3))
    assert verify(str(small.path)).ok


def test_step_without_optimizer_step_is_an_error(tmp_path, digits):
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with hs.Recorder(tmp_path / "r.zarr", model, opt) as rec:
        idx, loss = _train_step(model, opt, digits)
        rec.step(idx, loss=loss)
        with pytest.raises(hs.RecorderError, match="optimizer.step\\(\\) has not run"):
            rec.step(idx, loss=loss)
        # bad arguments are refused before the step is consumed: a corrected call records it
        with pytest.raises(ValueError, match="labels"):
            _train_step(model, opt, digits)
            rec.step(idx, labels=[1, 2], loss=loss)
        rec.step(idx, loss=loss)
        with pytest.raises(ValueError, match="1-D"):
            _train_step(model, opt, digits)
            rec.step(np.zeros((2, 2), dtype=np.int64))
        rec.step(idx, loss=loss)
        final = {n: p.detach().clone() for n, p in model.named_parameters()}
    store = hs.open_store(tmp_path / "r.zarr")
    assert store.num_steps == 3
    assert all(torch.equal(store.params_at(3)[n], v) for n, v in final.items())


def test_nan_delta_is_recorded_flagged_and_reported(tmp_path, digits):
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "nan.zarr"
    with hs.Recorder(path, model, opt) as rec:
        for t in range(6):
            idx, loss = _train_step(model, opt, digits)
            if t == 3:
                with torch.no_grad():
                    model.fc2.weight[0, 0] = float("nan")
            rec.step(idx, loss=loss)
    store = hs.open_store(path)
    assert store.nonfinite()[3].tolist()[store.tensor_names.index("fc2.weight")] == 1
    assert torch.isnan(store.params_at(6)["fc2.weight"][0, 0])
    out = CliRunner().invoke(main, ["info", "--json", str(path)])
    assert json.loads(out.output)["nonfinite_steps"] == [3, 4, 5]
    out = CliRunner().invoke(main, ["verify", "--no-progress", str(path)])
    assert out.exit_code == 3, out.output
    assert "step 3" in out.output and "fc2.weight" in out.output


def test_corrupted_chunk_is_detected(small):
    shard = Path(small.path) / "params" / "fc1.weight" / "delta" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify(str(small.path))
    assert not report.ok and "fc1.weight" in report.problems[0]
    with pytest.raises(hs.CorruptStoreError, match="fc1.weight"):
        hs.open_store(small.path).params_at(12)
    out = CliRunner().invoke(main, ["verify", "--no-progress", str(small.path)])
    assert out.exit_code == 1 and "FAILED" in out.output


def test_missing_chunk_file_is_detected(small):
    (Path(small.path) / "params" / "conv1.bias" / "delta" / "c" / "2" / "0").unlink()
    report = verify(str(small.path))
    assert not report.ok and "conv1.bias" in report.problems[0] and "missing" in report.problems[0]
    with pytest.raises(hs.CorruptStoreError, match="missing"):
        hs.open_store(small.path).delta(17)


def test_writer_errors_reach_the_training_loop(tmp_path, digits, monkeypatch):
    from historystore.write import writer

    real_write = writer.BlockWriter.write

    def failing(self, block):
        if block.t0 >= 8:
            raise OSError("disk full")
        real_write(self, block)

    monkeypatch.setattr(writer.BlockWriter, "write", failing)
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "w.zarr"
    with (
        pytest.raises(hs.RecorderError, match="disk full"),
        hs.Recorder(
            path,
            model,
            opt,
            # one commit per block: the failure hits exactly the block that starts at step 8
            hs.RecorderConfig(keyframe_every=8, steps_per_block=4, join_blocks=False),
        ) as rec,
    ):
        for _ in range(40):
            idx, loss = _train_step(model, opt, digits)
            rec.step(idx, loss=loss)
            time.sleep(0.005)
    store = hs.open_store(path)
    assert store.num_steps == 8  # what was committed before the failure is intact
    assert verify(str(path)).ok


KILL_WORKER = textwrap.dedent("""
    import sys, torch, historystore as hs
    from attribution.demo.data import load_digits
    from attribution.demo.model import DigitsCNN
    d = load_digits(); torch.manual_seed(0)
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    cfg = hs.RecorderConfig(keyframe_every=16, steps_per_block=4)
    with hs.Recorder(sys.argv[1], model, opt, cfg) as rec:
        for t in range(100000):
            idx = torch.randint(0, len(d.y_train), (32,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(d.x_train[idx]), d.y_train[idx])
            opt.zero_grad(); loss.backward(); opt.step()
            rec.step(idx, labels=d.y_train[idx], loss=loss)
""")


def test_sigkill_mid_run_leaves_a_sound_resumable_store(tmp_path, digits):
    path = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-c", KILL_WORKER, str(path)])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if zarr.open_group(path, mode="r")["commit"].attrs["num_steps"] >= 30:
                    break
            except Exception:
                pass
            time.sleep(0.05)
        else:
            pytest.fail("the recording subprocess made no progress")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    report = verify(str(path))
    assert report.ok, report.problems
    store = hs.open_store(path)
    t = store.num_steps
    assert t >= 30 and t % 4 == 0
    # resume: restore model+optimizer from the store, continue, verify again
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    store.restore(model, opt)
    with hs.Recorder(path, model, opt, resume=True) as rec:
        for _ in range(10):
            idx, loss = _train_step(model, opt, digits)
            rec.step(idx, loss=loss)
    store = hs.open_store(path)
    assert store.num_steps == t + 10
    final = store.params_at(t + 10)
    for n, p in model.named_parameters():
        assert torch.equal(final[n], p.detach()), n
    report = verify(str(path))
    assert report.ok and not report.notes, (report.problems, report.notes)


def test_a_commit_is_one_metadata_write(tmp_path, digits, monkeypatch):
    """zarr's ``attrs.update`` writes the JSON once per key: a kill between two of those
    writes left a commit mixing two blocks' counts (found by the SIGKILL test)."""
    import zarr.storage._local as local

    writes: list[bytes] = []
    real_put = local._put

    def put(path, value, exclusive=False):
        if str(path).endswith(os.path.join("commit", "zarr.json")):
            writes.append(bytes(value.as_buffer_like()))
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # one commit per block (the counts below), and the thread writer: the writes are observed
    # in this process (the writer process runs the same BlockWriter code)
    cfg = hs.RecorderConfig(keyframe_every=8, steps_per_block=4, join_blocks=False)
    with hs.Recorder(tmp_path / "c.zarr", model, opt, cfg, writer="thread") as rec:
        for _ in range(12):
            idx, loss = _train_step(model, opt, digits)
            rec.step(idx, loss=loss)
    counts = [json.loads(w)["attributes"] for w in writes]
    assert counts[0] == {}  # the empty group, before the layout exists
    # the initial counts, θ_0's keyframe, three blocks of 4 steps, the final keyframe at 12:
    # one write each, and every write carries all counts
    assert [c.get("num_steps") for c in counts[1:]] == [0, 0, 4, 8, 12, 12]
    assert [c.get("num_keyframes") for c in counts[1:]] == [0, 1, 1, 2, 2, 3]
    assert all(set(c) >= {"num_steps", "num_ids", "num_fixes", "num_keyframes"} for c in counts[1:])
    assert counts[-1]["num_ids"] == hs.open_store(tmp_path / "c.zarr").commit.num_ids


# -- found by review: resume edge cases, failed steps, frozen parameters ----------------------


def _snap(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _bits_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)) for n in a)


def test_resume_that_records_nothing_and_replay_from_an_unaligned_keyframe(tmp_path, digits):
    """A clean close leaves a keyframe at step 5, inside a block: replay from it must not
    skip steps; a resume that records nothing must not add a second keyframe at 5."""
    torch.manual_seed(0)
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = hs.RecorderConfig(keyframe_every=4, steps_per_block=2)
    path = tmp_path / "r.zarr"
    snaps = [_snap(model)]
    with hs.Recorder(path, model, opt, cfg) as rec:
        for _ in range(5):
            rec.step(*_train_step(model, opt, digits)[:1])
            snaps.append(_snap(model))
    with hs.Recorder(path, model, opt, cfg, resume=True):
        pass  # e.g. the data loader failed at once
    with hs.Recorder(path, model, opt, cfg, resume=True) as rec:
        for _ in range(5):
            rec.step(*_train_step(model, opt, digits)[:1])
            snaps.append(_snap(model))
    store = hs.open_store(path)
    assert store.keyframe_steps.tolist() == [0, 4, 5, 8, 10]
    for t in range(len(snaps)):
        assert _bits_equal(store.params_at(t), snaps[t]), t
    assert verify(str(path)).ok


@pytest.mark.parametrize("failure", ["two_optimizer_steps", "param_group_added"])
def test_a_refused_step_leaves_a_sound_store_without_a_wrong_final_keyframe(
    tmp_path, digits, failure
):
    torch.manual_seed(0)
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "f.zarr"
    snaps = [_snap(model)]
    with (
        pytest.raises(hs.RecorderError),
        hs.Recorder(path, model, opt, hs.RecorderConfig(keyframe_every=8)) as rec,
    ):
        for t in range(6):
            idx, _ = _train_step(model, opt, digits)
            if t == 3 and failure == "two_optimizer_steps":
                _train_step(model, opt, digits)
            if t == 3 and failure == "param_group_added":
                opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
            rec.step(idx)
            snaps.append(_snap(model))
    store = hs.open_store(path)
    assert store.num_steps == 3 and store.keyframe_steps.tolist() == [0]
    assert _bits_equal(store.params_at(3), snaps[3])
    assert verify(str(path)).ok


def test_untrained_parameters_and_buffers_come_back_with_restore(tmp_path, digits):
    """A frozen layer (not in the optimizer) has no deltas but must be restored; after an
    unclean end, buffers come from the last keyframe, with a warning."""
    torch.manual_seed(0)
    model = DigitsCNN(channels=8, hidden=32, batch_norm=True)
    frozen = {id(p) for p in model.conv1.parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if id(p) not in frozen], lr=0.1)
    path = tmp_path / "u.zarr"
    with hs.Recorder(path, model, opt, hs.RecorderConfig(keyframe_every=4)) as rec:
        for _ in range(6):
            rec.step(*_train_step(model, opt, digits)[:1])
    fresh = DigitsCNN(channels=8, hidden=32, batch_norm=True)
    hs.open_store(path).restore(fresh)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n

    with (
        pytest.raises(RuntimeError, match="boom"),
        hs.Recorder(path, model, opt, resume=True) as rec,
    ):
        rec.step(*_train_step(model, opt, digits)[:1])
        _train_step(model, opt, digits)  # an optimizer step that is never recorded
        raise RuntimeError("boom")
    store = hs.open_store(path)
    assert store.num_steps == 7 and store.keyframe_steps.tolist() == [0, 4, 6]
    with pytest.warns(UserWarning, match="no keyframe at step 7"):
        store.restore(DigitsCNN(channels=8, hidden=32, batch_norm=True))


def test_optimizer_state_that_appears_late_is_recorded(tmp_path, digits):
    """fc1 is frozen for a warm-up (no gradient, so AdamW keeps no state for it), then
    trained: its state arrays start then; earlier rows read as zeros; resume still works."""
    torch.manual_seed(0)
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = hs.RecorderConfig(keyframe_every=4, steps_per_block=2)
    path = tmp_path / "late.zarr"
    states = []
    with hs.Recorder(path, model, opt, cfg) as rec:
        for t in range(7):
            model.fc1.weight.requires_grad_(t >= 3)
            rec.step(*_train_step(model, opt, digits)[:1])
            st = opt.state.get(model.fc1.weight, {})
            states.append({k: v.clone() for k, v in st.items()})
    store = hs.open_store(path)
    assert verify(str(path)).ok
    for t in range(7):
        got = store.optimizer_state(t)["fc1.weight"]
        if t < 3:
            assert not states[t] and all(float(v.abs().max()) == 0 for v in got.values())
        else:
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(got[k], states[t][k].reshape(got[k].shape).to(got[k].dtype))
    # restore model and optimizer from the store, then continue the same store
    fresh = DigitsCNN(channels=8, hidden=32)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    store.restore(fresh, opt2)
    with hs.Recorder(path, fresh, opt2, cfg, resume=True) as rec:
        rec.step(*_train_step(fresh, opt2, digits)[:1])
    assert hs.open_store(path).num_steps == 8 and verify(str(path)).ok
