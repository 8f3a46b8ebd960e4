"""The writer process: same bytes as the thread writer, and clear failures when it dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import zarr

import historystore as hs
from historystore.meta.verify import verify
from historystore.write import process

from .conftest import record_run

pytestmark = pytest.mark.skipif(not process.supported(), reason="the writer process needs Linux")


def _record(path, digits, writer, steps=40, kind="sgd", config=None, on_step=None):
    cfg = config or hs.RecorderConfig(keyframe_every=16, steps_per_block=8)
    return record_run(path, kind, steps, digits, config=cfg, writer=writer, on_step=on_step)


def _arrays(path):
    out = {}
    g = zarr.open_group(str(path), mode="r")
    for name, arr in g.arrays():
        out[name] = arr[:]
    for name, sub in g.groups():
        if name == "commit":
            continue
        for key, arr in sub.arrays():
            out[f"{name}/{key}"] = arr[:]
        for key, sub2 in sub.groups():
            for k2, arr in sub2.arrays():
                out[f"{name}/{key}/{k2}"] = arr[:]
    return out


@pytest.mark.parametrize("kind", ["sgd", "adamw", "adamw-compact"])
def test_process_and_thread_writers_store_the_same_bytes(tmp_path, digits, kind):
    cfg = hs.RecorderConfig(keyframe_every=16, steps_per_block=8)
    if kind == "adamw-compact":  # Δ codes from the trainer, v's log8 codes from the writer
        cfg = hs.RecorderConfig.compact(keyframe_every=16, steps_per_block=8)
        kind = "adamw"
    run = _record(tmp_path / "p.zarr", digits, "process", kind=kind, config=cfg)
    _record(tmp_path / "t.zarr", digits, "thread", kind=kind, config=cfg)
    compact = cfg.profile == "compact"
    assert run.stats["writer"] == "process"
    a, b = _arrays(tmp_path / "p.zarr"), _arrays(tmp_path / "t.zarr")
    assert sorted(a) == sorted(b)
    assert any(k.endswith("/q" if compact else "delta") for k in a) and "fixes/index" in a
    for k in a:
        if k == "steps/timestamp" or k == "steps/duration":
            continue
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert verify(str(tmp_path / "p.zarr")).ok
    store = hs.open_store(tmp_path / "p.zarr")
    parts = run.stats["parts"]
    if compact:  # v coded in the writer: the same codes as the trainer would make
        assert parts["log8 coding of v"]["calls"] > 0
        codes = [k for k in a if k.endswith("exp_avg_sq")]
        assert codes and all(a[k].dtype == np.uint8 for k in codes)
        stored = store.optimizer_state(35)
        g = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
        for n, st in run.states[35].items():
            v = st["exp_avg_sq"]
            rel = (stored[n]["exp_avg_sq"] - v).abs() / v.clamp_min(1e-30)
            # log8: within exp(span / 508) − 1 of v, span = the row's log range at this step
            rng = torch.from_numpy(g[f"optim/{n}/exp_avg_sq_logrange"][35]).reshape(-1, 3)
            bound = torch.expm1((rng[:, 1] - rng[:, 0]) / 508).view(-1, *[1] * (v.dim() - 1))
            assert bool((rel <= bound + 1e-5).all()), n
            assert float(rel.max()) < 0.1, n
        return
    assert len(a["fixes/index"]) > 0  # the run needs corrections: the test checks them
    replayed = store.params_at(40)
    for n, p in run.snapshots[40].items():
        assert torch.equal(replayed[n].view(torch.int32), p.view(torch.int32)), n
    assert parts["deltas"]["bytes"] == 40 * sum(p.numel() * 4 for p in run.snapshots[0].values())
    assert parts["exact deltas"]["calls"] == 5


def test_a_killed_writer_process_is_a_clear_error_and_loses_nothing_committed(tmp_path, digits):
    path = tmp_path / "k.zarr"

    def kill_writer(rec, t):
        if t == 20:
            deadline = time.time() + 20
            while rec._writer.stats["bytes_raw"] == 0 or hs.open_store(path).num_steps < 16:
                assert time.time() < deadline
                rec._writer.raise_if_failed()
                time.sleep(0.05)
            os.kill(rec._writer.pid, signal.SIGKILL)
            time.sleep(0.2)

    with pytest.raises(hs.RecorderError, match=r"writer process \(pid \d+\) died.*signal 9"):
        _record(path, digits, "process", on_step=kill_writer)
    store = hs.open_store(path)
    assert store.num_steps == 16
    assert verify(str(path)).ok


def test_ctrl_c_does_not_stop_the_writer_process(tmp_path, digits):
    def interrupt(rec, t):
        if t == 3:
            os.kill(rec._writer.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends it too

    _record(tmp_path / "i.zarr", digits, "process", on_step=interrupt)
    assert hs.open_store(tmp_path / "i.zarr").num_steps == 40


def test_the_writer_process_dies_with_its_trainer(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time, torch, historystore as hs
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = hs.Recorder({str(tmp_path / "d.zarr")!r}, model, opt, writer="process").__enter__()
        print(rec._writer.pid, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        os.kill(child, 0)  # alive
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while True:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            # a zombie until init reaps it counts as gone
            with open(f"/proc/{child}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
            assert time.time() < deadline, "the writer process outlived its trainer"
            time.sleep(0.05)
    finally:
        proc.kill()


def test_writer_choice_is_validated(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="writer must be one of"):
        hs.Recorder(tmp_path / "a.zarr", model, opt, writer="fork")
    with (
        pytest.raises(hs.RecorderError, match="local stores only"),
        hs.Recorder("memory://w-choice", model, opt, writer="process"),
    ):
        pass
    with hs.Recorder("memory://w-auto", model, opt) as rec:  # auto: the thread there
        assert not isinstance(rec._writer, process.ProcessWriter)


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_writer_behind_writes_the_waiting_blocks_together(tmp_path, digits, writer, monkeypatch):
    """Blocks that wait for a slow writer are written under one commit, and the store is the
    same as one written block by block."""
    from historystore.write import writer as w

    real = w.BlockWriter.write_many

    def slow(self, blocks):
        time.sleep(0.3)  # a slow disk: the next blocks queue up meanwhile
        return real(self, blocks)

    monkeypatch.setattr(w.BlockWriter, "write_many", slow)
    cfg = hs.RecorderConfig(keyframe_every=16, steps_per_block=4, max_pending_blocks=3)
    run = _record(tmp_path / "j.zarr", digits, writer, steps=40, config=cfg)
    joined = run.stats["parts"].get("blocks written together")
    assert joined is not None and joined["bytes"] >= 2 * joined["calls"]  # ≥ 2 per batch
    monkeypatch.undo()
    one = hs.RecorderConfig(keyframe_every=16, steps_per_block=4, join_blocks=False)
    _record(tmp_path / "o.zarr", digits, writer, steps=40, config=one)
    a, b = _arrays(tmp_path / "j.zarr"), _arrays(tmp_path / "o.zarr")
    for k in a:
        if k not in ("steps/timestamp", "steps/duration"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert verify(str(tmp_path / "j.zarr")).ok
    final = hs.open_store(tmp_path / "j.zarr").params_at(40)
    for n, p in run.snapshots[40].items():
        assert torch.equal(final[n].view(torch.int32), p.view(torch.int32)), n


def test_writer_keeps_off_the_trainers_cores() -> None:
    """The writer process pins itself (and so every thread it starts) to the CPUs the
    trainer's torch threads leave free, at least one; ``use(behind=True)`` moves every thread,
    those started before included (zarr's loop, the codec pool), to all of them."""
    code = (
        "import os, threading; from historystore.write.process import _Cores; c = _Cores({}); "
        "c.use(behind=False); a = sorted(os.sched_getaffinity(0)); go = threading.Event(); "
        "t = threading.Thread(target=go.wait); t.start(); "
        "b = sorted(os.sched_getaffinity(t.native_id)); c.use(behind=True); "
        "d = sorted(os.sched_getaffinity(t.native_id)); go.set(); t.join(); "
        "print([a, b, sorted(os.sched_getaffinity(0)), d])"
    )
    cpus = sorted(os.sched_getaffinity(0))
    for threads in (1, len(cpus), 64):
        out = subprocess.run(
            [sys.executable, "-c", code.format(threads)], capture_output=True, text=True, check=True
        ).stdout
        keep = max(1, len(cpus) - threads)
        assert json.loads(out) == [cpus[-keep:], cpus[-keep:], cpus, cpus], (threads, out)


def test_the_trainer_lends_the_writer_its_cores_while_it_waits() -> None:
    """The trainer's side re-pins every thread of the writer process: to all CPUs while it
    waits (backpressure, close), back to the free ones when it trains again."""
    from historystore.write.process import _Cores

    cpus = sorted(os.sched_getaffinity(0))
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import threading, time; threading.Thread(target=time.sleep, "
            "args=(30,)).start(); time.sleep(30)",
        ]
    )
    try:
        deadline = time.monotonic() + 30  # until its second thread has started
        while len(tids := os.listdir(f"/proc/{child.pid}/task")) < 2:
            assert time.monotonic() < deadline, "the child's thread never started"
            time.sleep(0.05)
        tids = [int(t) for t in tids]
        assert len(tids) == 2
        cores = _Cores(1, child.pid)
        cores.use(behind=False)
        assert all(sorted(os.sched_getaffinity(t)) == cpus[-max(1, len(cpus) - 1) :] for t in tids)
        cores.use(behind=True)
        assert all(sorted(os.sched_getaffinity(t)) == cpus for t in tids)
    finally:
        child.kill()
        child.wait()
