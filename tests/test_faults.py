"""Fault injection: one writer per store, random SIGKILLs, a full disk, mutated metadata.

CI runs a small version (3 kills, 40 mutated stores); ``HISTORYSTORE_FAULTS_N=<kills>`` runs
more kills and 20x as many mutations, and ``python -m benchmarks.faults`` the full figures.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import historystore as hs
from benchmarks import faults
from historystore.meta.verify import verify
from historystore.write.lock import LocalWriterLock, lock_holder, writer_lock

N = int(os.environ.get("HISTORYSTORE_FAULTS_N", "0"))
KILLS = N or 3
FUZZ = 20 * N if N else 40


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """θ_T of the uninterrupted run every faulty run must reproduce bit for bit."""
    return faults.train(tmp_path_factory.mktemp("ref") / "ref.zarr")


def _linear_run(path: Path, **kw) -> tuple[torch.nn.Module, torch.optim.Optimizer, hs.Recorder]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, hs.Recorder(path, model, opt, hs.RecorderConfig(keyframe_every=4), **kw)


def _step(model, opt, rec, t):
    model(torch.full((2, 4), float(t))).sum().backward()
    opt.step()
    opt.zero_grad()
    rec.step([t, t + 1])


# -- one writer per store --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["overwrite", "resume"])
def test_a_second_writer_is_refused_and_names_the_holder(tmp_path, mode):
    path = tmp_path / "w.zarr"
    model, opt, first = _linear_run(path)
    with first:
        _step(model, opt, first, 0)
        holder = lock_holder(path)
        assert holder is not None and holder["pid"] == os.getpid()
        assert any("is recording into this store" in n for n in verify(str(path)).notes)
        m2 = torch.nn.Linear(4, 2)
        o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
        with (
            pytest.raises(
                hs.StoreLockedError, match=rf"is being written by pid {os.getpid()} on host"
            ),
            hs.Recorder(path, m2, o2, **{mode: True}),
        ):
            pass
        for t in range(1, 6):  # the first writer never noticed
            _step(model, opt, first, t)
    assert not (tmp_path / "w.zarr.lock").exists()  # a clean close removes the lock file
    assert lock_holder(path) is None
    store = hs.open_store(path)
    assert store.num_steps == 6
    assert torch.equal(store.params_at(6)["weight"], model.weight.detach())
    assert verify(str(path)).ok


def test_a_refused_recorder_releases_the_lock(tmp_path):
    path = tmp_path / "r.zarr"
    model, opt, rec = _linear_run(path)
    with rec:
        _step(model, opt, rec, 0)
    second = _linear_run(path)[2]
    with pytest.raises(hs.RecorderError, match="already exists"), second:  # inside __enter__
        pass
    model, opt, rec = _linear_run(path, overwrite=True)
    with rec:  # the failed one did not keep the lock
        _step(model, opt, rec, 0)
    assert hs.open_store(path).num_steps == 1


def test_a_recorder_that_fails_late_in_its_start_leaves_nothing_behind(tmp_path, monkeypatch):
    """A start that fails after the writer thread and the optimizer hook exist removes the hook,
    stops the thread and releases the lock: a retry in the same process starts cleanly."""
    import threading

    path = tmp_path / "late.zarr"
    model, opt, rec = _linear_run(path)
    threads = set(threading.enumerate())

    def fail(self, t0):
        raise RuntimeError("injected failure after the writer started")

    monkeypatch.setattr(hs.Recorder, "_start_block", fail)
    with pytest.raises(RuntimeError, match="injected"), rec:
        pass
    monkeypatch.undo()
    assert not opt._optimizer_step_post_hooks  # no hook left on the user's optimizer
    time.sleep(0.1)
    assert not [t for t in set(threading.enumerate()) - threads if t.is_alive()]
    model, opt, rec = _linear_run(path, overwrite=True)
    with rec:  # lock released, store overwritten
        _step(model, opt, rec, 0)
    assert hs.open_store(path).num_steps == 1
    assert verify(str(path)).ok


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_keep_the_lock_of_a_dead_parent(tmp_path):
    """DataLoader workers are forked from the trainer: if the trainer is killed while they
    live, the lock must be free at once (flock belongs to the open file, which fork shares)."""
    lock = LocalWriterLock(str(tmp_path / "f.zarr")).acquire()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: outlive the parent's lock, then leave without cleanup
        os.write(w, b"1")  # the fork hooks have run
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(r, 1) == b"1"
        os.close(lock._fd)  # the parent dies: its descriptor closes, nothing is released
        lock._fd = None
        with pytest.warns(RuntimeWarning, match=f"pid {os.getpid()} "):
            LocalWriterLock(str(tmp_path / "f.zarr")).acquire().release()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)


def test_a_lock_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(hs.RecorderError, match="cannot create the folder"):
        LocalWriterLock(str(tmp_path / "file" / "sub" / "s.zarr")).acquire()


def test_object_store_urls_get_no_lock_and_say_so():
    lock = writer_lock("s3://bucket/run.zarr")
    with pytest.warns(UserWarning, match="object stores have no writer lock"):
        lock.acquire()
    lock.release()
    assert isinstance(writer_lock("file:///tmp/run.zarr"), LocalWriterLock)


def test_two_writer_processes_and_the_stale_lock_of_a_killed_one(tmp_path):
    r = faults.two_writers(tmp_path)  # the first writer is killed with SIGKILL at the end
    assert r["second_writers_refused"] == r["second_writers_tried"] == 2, r
    assert "pid" in r["message"] and "since" in r["message"]
    assert r["verify_after"] and r["steps"] >= 0, r["problems"]
    path, lock_file = tmp_path / "two.zarr", tmp_path / "two.zarr.lock"
    pid = json.loads(lock_file.read_text())["pid"]  # the killed writer's record stays behind
    assert f"pid {pid} " in r["message"]
    assert lock_holder(path) is None  # ... but it names a dead process
    with pytest.warns(RuntimeWarning, match=rf"previous writer \(pid {pid} on host"):
        faults.train(path, hs.open_store(path).num_steps + 4, resume=True)
    assert not lock_file.exists() and verify(str(path)).ok


# -- SIGKILL at random times -----------------------------------------------------------------
def test_random_kills_verify_resume_and_replay_bit_exactly(tmp_path, reference):
    with pytest.warns(RuntimeWarning, match="ended without closing the recorder"):
        r = faults.kills(tmp_path, KILLS, seed=12, reference=reference)
    bad = [x for x in r["runs"] if not (x["verify_after_kill"] and x["bit_exact"])]
    assert not bad, bad
    assert r["sound_bit_exact_resumes"] == r["kills"] == KILLS, r
    assert any(0 < x["committed_steps"] < faults.STEPS for x in r["runs"]), r["runs"]


# -- a full disk -----------------------------------------------------------------------------
@pytest.mark.parametrize("mount", [True, False], ids=["tmpfs-if-allowed", "simulated-enospc"])
def test_disk_full_keeps_committed_steps_and_resumes_bit_exactly(tmp_path, reference, mount):
    r = faults.disk_full(tmp_path, reference=reference, mount=mount)
    assert r["no_space_error"], r["error"]
    assert r["verify_after_full"] and 0 < r["committed_steps"] < faults.STEPS, r
    assert r["bit_exact_after_resume"] and r["verify_after_resume"], r


# -- metadata fuzzer -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory) -> Path:
    return faults.small_store(tmp_path_factory.mktemp("fuzz") / "f.zarr", steps=8)


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(faults.SPECIAL_VALUES),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=FUZZ,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    file=st.integers(min_value=0),
    kind=st.sampled_from(faults.MUTATIONS),
    pick=st.integers(min_value=0, max_value=2**30),
    value=_values,
)
def test_mutated_metadata_always_gets_a_verdict(fuzz_store, file, kind, pick, value):
    files = faults.json_files(fuzz_store)
    f = files[file % len(files)]
    raw = f.read_bytes()
    try:
        f.write_bytes(faults.mutate(raw, kind, pick, value))
        r = faults.check_verdict(fuzz_store, max_seconds=20, max_rss_mb=512)
    finally:
        f.write_bytes(raw)
    assert not r["crash"], (f.relative_to(fuzz_store), kind, value, r)
