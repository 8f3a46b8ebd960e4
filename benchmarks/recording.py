#!/usr/bin/env python
"""Recording benchmark: what ``historystore.Recorder`` costs a training loop (wall/CPU overhead,
``rec.step``, backpressure), its writer's MB/s and the default codec's ratio on real deltas and
optimizer state, beside the machine's limits: fsync'd write, memcpy, sequential read, codec speed.

    python -m benchmarks.recording           # full, ~4 min: benchmarks/results/recording.json
    python -m benchmarks.recording --quick   # < 1 min, writes to a temp folder (or --out PATH)
"""

from __future__ import annotations

import cProfile
import itertools
import json
import math
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import historystore as hs
from historystore.meta.info import _row_bytes, committed_arrays, info

try:  # run as a module (python -m benchmarks.recording) or as a script
    from benchmarks import _machine
except ImportError:  # pragma: no cover
    import _machine  # type: ignore[no-redef]

MB = _machine.MB

DETAILS = """\
Workloads (CPU, deterministic, seeded; the same batches with and without the recorder):

* ``cnn-sgdm``   DigitsCNN(channels=16, hidden=64) on scikit-learn digits, SGD lr 0.05
  momentum 0.9, 300 steps of batch 32
* ``cnn-adamw``  the same, AdamW lr 2e-3 weight decay 0.01
* ``mlp-adamw``  an MLP 512-2048-1024-10 (3.2 M parameters) on generated data (Gaussian inputs
  labelled by a random teacher network), AdamW lr 1e-3, 150 steps of batch 64

Configs: ``default`` = ``RecorderConfig()`` (optimizer state every step; the writer process),
``default-thread`` = the same with ``Recorder(..., writer="thread")``, ``no-state`` =
``RecorderConfig(optimizer_state="none")``, ``compact`` = ``RecorderConfig.compact()`` (6-bit
error-fed deltas, Adam's v as log8 codes, m derived on read; state recorded). Each workload
runs training alone ("train") and under each config, interleaved (train, default, no-state,
compact, train, ...), ``--repeats`` times; figures are medians.

Measured:

* time: wall and CPU seconds (CPU = this process, all threads, and the writer process: the
  writer's compression included) of the whole loop; for recorded runs ``Recorder.__enter__``
  through ``close()``. overhead = recorded / train (medians); "x paired" = the median of
  each recorded run over the train run of its own repeat (the statistic to compare across
  sittings: plain training's own time moves ±20 % between runs on a shared VM, and pairing
  cancels the slow drift); "x loop" = the loop up to its
  last ``rec.step`` / train: recording's cost while training runs, without the one-off wait in
  ``close()`` for the writer to finish the last block; "x steady" = the same without
  ``__enter__`` either (forking the writer, allocating the block rows): the overhead per step
  of a run long enough that the one-off costs (``fixed_s`` = enter + close) vanish, valid when
  the writer keeps up (a short close). ``rec.step`` = seconds inside
  ``rec.step`` over the run, of which ``flush`` is the time of the block-boundary flushes
  (building the block, checksums of lossy θ̂) and ``wait`` the time the loop was blocked
  handing blocks to the writer (backpressure); ``close`` = the time ``close()`` waited for the
  writer to finish.
* floor ("floor" lines): the same training with, after each step, only what any recorder must
  do on the training thread: one batched copy of θ and one of the optimizer state into rows
  allocated and touched before the loop (``run_floor``). Its ms/step is what ``rec.step``
  compares with; what lies above it is the recorder's own work (validation, ids, scalars,
  blocks); its "x paired" is the overhead of a recorder that did nothing else and whose
  writer cost nothing.
* writer time ("writer time" lines, from ``Recorder.stats``): writes and MB per kind of array
  (deltas, optimizer state, keyframes, the small per-step arrays), the seconds of creating the
  arrays, of the exact deltas (Δ and corrections from the block's θ rows), of the block's
  concurrent array writes and of the commits, and the rest of the writer's busy time. The
  writer is a forked process ("writer: process") unless the recorder fell back to a thread.
* write throughput: raw bytes handed to zarr (the writer's ``bytes_raw``: uncompressed, deltas,
  optimizer state, keyframes, ids, ...) per second the writer thread was busy, and per second of
  the whole recorded loop (training included).
* compression of the default codec, from ``historystore.meta.info.info``: dense delta bytes /
  stored delta bytes ("ratio Δ"), the same for the optimizer state arrays, and for the whole store.
* machine limits (``benchmarks/_machine.py``): fsync'd write, memcpy, sequential read with the
  page cache dropped and cached, and the default codec's single-thread encode/decode speed on
  real deltas of each workload.

``--scale`` adds an AdamW MLP 2048-4096-4096-1024-10 (29.4 M parameters) on generated data,
200 steps of batch 64, trained alone and recorded under ``compact`` (lossless would write
29.4 M x 12 bytes = 353 MB per step, 70 GB in all: more than this machine's disk and time);
it reports the peak memory (``Pss`` of this process and the writer process) in each quarter of
the run (bounded by the writer's queue, so flat),
the writer's MB/s, the overhead, and the bytes on disk every 25 steps with a linear fit.

``--profile`` adds one cProfile'd recorded run per workload (at most 60 steps; profiling only
inside ``rec.step``; its timings are not used elsewhere) and keeps the top functions in the JSON.

The report also gives the load average and the share of a core one busy thread got at the start
and the end (``_machine.cpu_share``): on a shared machine every time above is inflated by it.

Torch uses ``--threads`` threads (default 1): on a small shared machine more OpenMP threads
than free cores make the timings meaningless; the recorder's writer runs beside them.

--quick sizes every workload down (< 1 minute) and writes to a temporary folder unless --out is
given, so that the committed results stay as they are.
"""

CONFIGS: dict[str, hs.RecorderConfig] = {
    "default": hs.RecorderConfig(),
    "default-thread": hs.RecorderConfig(),
    "no-state": hs.RecorderConfig(optimizer_state="none"),
    "compact": hs.RecorderConfig.compact(),
}
#: the writer each config runs with (Recorder's ``writer=``); "auto" where not named
WRITER = {"default-thread": "thread"}


# ------------------------------------------------------------------------------------------
# workloads


@dataclass
class Workload:
    name: str
    title: str
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    x: torch.Tensor
    y: torch.Tensor
    steps: int
    batch: int
    repeats: int
    seed: int = 0

    def batches(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        return [torch.randperm(len(self.y), generator=g)[: self.batch] for _ in range(self.steps)]


def workloads(quick: bool, repeats: int | None) -> list[Workload]:
    from attribution.demo.data import load_digits
    from attribution.demo.model import DigitsCNN

    d = load_digits()
    cnn_steps, mlp_steps = (60, 20) if quick else (300, 150)
    dims = (256, 1024, 512, 10) if quick else (512, 2048, 1024, 10)
    mx, my = _machine.teacher_data(dims[0], 4096)
    r_cnn = repeats or (1 if quick else 3)
    r_mlp = repeats or (1 if quick else 2)

    def cnn() -> nn.Module:
        return DigitsCNN(channels=16, hidden=64)

    return [
        Workload(
            "cnn-sgdm",
            "DigitsCNN(16, 64), SGD lr 0.05 momentum 0.9",
            cnn,
            lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
            d.x_train,
            d.y_train,
            cnn_steps,
            32,
            r_cnn,
        ),
        Workload(
            "cnn-adamw",
            "DigitsCNN(16, 64), AdamW lr 2e-3 wd 0.01",
            cnn,
            lambda m: torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.01),
            d.x_train,
            d.y_train,
            cnn_steps,
            32,
            r_cnn,
        ),
        Workload(
            "mlp-adamw",
            f"MLP {'-'.join(map(str, dims))} on teacher data, AdamW lr 1e-3 wd 0.01",
            lambda: _machine.MLP(list(dims)),
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01),
            mx,
            my,
            mlp_steps,
            64,
            r_mlp,
        ),
    ]


# ------------------------------------------------------------------------------------------
# one run


class _Timed:
    """Wraps a bound method on an instance and sums the seconds spent in it."""

    def __init__(self, obj: Any, name: str) -> None:
        self.seconds = 0.0
        self.calls = 0
        orig = getattr(obj, name, None)
        if orig is None:
            return

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        setattr(obj, name, timed)


def _fingerprint(model: nn.Module) -> int:
    crc = 0
    for p in model.parameters():
        crc = zlib.crc32(p.detach().contiguous().numpy().tobytes(), crc)
    return crc


def _committed(path: Path) -> int:
    """Steps the store's commit record holds (the writer may be another process)."""
    return int(json.loads((path / "commit" / "zarr.json").read_text())["attributes"]["num_steps"])


def _cpu() -> float:
    """CPU seconds of this process and of its reaped children (the writer process)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def _train_step(
    w: Workload, model: nn.Module, opt: torch.optim.Optimizer, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on batch ``idx``; returns its labels and loss."""
    y = w.y[idx]
    loss = F.cross_entropy(model(w.x[idx]), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return y, loss


def run_once(
    w: Workload,
    config: hs.RecorderConfig | None,
    path: Path | None,
    profiler: cProfile.Profile | None = None,
    writer: str = "auto",
) -> dict[str, Any]:
    """Train ``w`` once, recorded into ``path`` under ``config`` (or not at all)."""
    batches = w.batches()
    torch.manual_seed(w.seed)
    model = w.make_model()
    opt = w.make_optimizer(model)
    out: dict[str, Any] = {}
    rec: hs.Recorder | None = None
    step_s = 0.0
    cpu0, t_start = _cpu(), time.perf_counter()
    if config is not None:
        assert path is not None
        rec = hs.Recorder(path, model, opt, config, overwrite=True, writer=writer)
        t0 = time.perf_counter()
        rec.__enter__()
        out["enter_s"] = time.perf_counter() - t0
        writer = getattr(rec, "_writer", None)
        flush = _Timed(rec, "_flush")
        wait = _Timed(writer, "submit")
    try:
        for idx in batches:
            y, loss = _train_step(w, model, opt, idx)
            if rec is not None:
                t0 = time.perf_counter()
                if profiler is not None:
                    profiler.enable()
                rec.step(idx, labels=y, loss=loss)
                if profiler is not None:
                    profiler.disable()
                step_s += time.perf_counter() - t0
    except BaseException:
        if rec is not None:
            rec.__exit__(*sys.exc_info())
        raise
    # the loop's time up to the last step: recording's cost while training runs, without the
    # one-off wait for the writer to finish the last block(s) at close
    out["loop_s"] = time.perf_counter() - t_start
    if rec is not None:
        flush_s, wait_s, nflush = flush.seconds, wait.seconds, flush.calls
        t0 = time.perf_counter()
        rec.close()
        out["close_s"] = time.perf_counter() - t0
        stats = rec.stats
        out |= {
            "step_s": step_s,
            "flush_s": flush_s,
            "wait_s": wait_s,
            "flushes": nflush,
            "bytes_raw": stats["bytes_raw"],
            "writer_s": stats["writer_seconds"],
            "steps_per_block": rec.steps_per_block,
            "writer": stats.get("writer", "thread"),
            "writer_parts": stats.get("parts", {}),
        }
    out["wall_s"] = time.perf_counter() - t_start
    out["cpu_s"] = _cpu() - cpu0
    out["final_crc"] = _fingerprint(model)
    return out


def run_floor(w: Workload, block_bytes: int = 16 << 20) -> dict[str, Any]:
    """Train ``w`` doing, after each step, the least any recorder must do on the training
    thread: copy θ and the optimizer state (one batched copy each) into host rows that are
    allocated and touched before the loop and reused every block (as many steps as fit in
    ``block_bytes``, 2 to 32, as the recorder's blocks), with their row views made once. No
    validation, no ids, no writer: the floor ``rec.step`` is measured against (the copies
    cost several times their hot cost right after a training step)."""
    batches = w.batches()
    torch.manual_seed(w.seed)
    model = w.make_model()
    opt = w.make_optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    slots = max(2, min(32, block_bytes // sum(p.numel() * p.element_size() for p in params)))
    rows = [torch.zeros((slots, *p.shape), dtype=p.dtype) for p in params]
    views = [[r[k] for r in rows] for k in range(slots)]
    state: list[torch.Tensor] = []
    state_views: list[list[torch.Tensor]] = []
    copy_s = 0.0
    t_start = time.perf_counter()
    for t, idx in enumerate(batches):
        _train_step(w, model, opt, idx)
        t0 = time.perf_counter()
        with torch.no_grad():
            torch._foreach_copy_(views[t % slots], params)
            if not state:  # the state appears at the first step
                state = [
                    v
                    for p in params
                    for v in opt.state[p].values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0
                ]
                srows = [torch.zeros((slots, *v.shape), dtype=v.dtype) for v in state]
                state_views = [[r[k] for r in srows] for k in range(slots)]
            if state:
                torch._foreach_copy_(state_views[t % slots], state)
        copy_s += time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    return {"wall_s": wall, "copy_s": copy_s, "final_crc": _fingerprint(model)}


# ------------------------------------------------------------------------------------------
# store contents


def _ratio(raw: float, stored: float) -> float:
    return raw / stored if stored else math.nan


def store_sizes(path: Path) -> dict[str, Any]:
    """Raw and stored bytes of the deltas, the optimizer state and the whole store."""
    summary = info(str(path))
    d_raw = sum(t["bytes_raw"] for t in summary["tensors"])
    d_stored = sum(t["bytes_stored"] for t in summary["tensors"])
    store = hs.open_store(str(path))
    s_raw = s_stored = 0
    for p, rows in committed_arrays(store).items():
        if p.startswith("optim/"):
            s_raw += rows * _row_bytes(store.group[p])
            s_stored += _machine.du(path / p)
    return {
        "delta_raw": d_raw,
        "delta_stored": d_stored,
        "ratio_delta": _ratio(d_raw, d_stored),
        "state_raw": s_raw,
        "state_stored": s_stored,
        "ratio_state": _ratio(s_raw, s_stored),
        "store_raw": summary["bytes_raw"],
        "store_stored": summary["bytes_stored"],
        "ratio_store": summary["ratio"],
        "num_replay_fixes": summary["num_replay_fixes"],
        "num_params": summary["num_parameters"],
    }


# ------------------------------------------------------------------------------------------
# profile


def profile_top(prof: cProfile.Profile, n: int = 15) -> dict[str, list[dict[str, Any]]]:
    """Inside ``rec.step``: top functions by own time, and historystore's by cumulative time."""
    st = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in st.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}" if line else file
        rows.append(
            {
                "function": f"{fn} ({where})",
                "calls": ncalls,
                "tottime": tottime,
                "cumtime": cumtime,
                "historystore": "historystore" in file,
            }
        )
    by_own = sorted(rows, key=lambda r: -r["tottime"])[:n]
    by_cum = sorted((r for r in rows if r["historystore"]), key=lambda r: -r["cumtime"])[:n]
    return {"top_tottime": by_own, "top_cumtime_historystore": by_cum}


# ------------------------------------------------------------------------------------------
# driver


def _med(runs: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in runs if key in r and not math.isnan(r[key])]
    return statistics.median(vals) if vals else math.nan


def bench_workload(
    w: Workload, tmp: Path, profile: bool, sample_bytes: int, log: Callable[[str], None]
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"train": [], **{c: [] for c in CONFIGS}}
    sizes: dict[str, Any] = {}
    res: dict[str, Any] = {
        "workload": w.name,
        "title": w.title,
        "steps": w.steps,
        "batch": w.batch,
        "repeats": w.repeats,
    }
    floor: list[dict[str, Any]] = []
    for r in range(w.repeats):
        runs["train"].append(run_once(w, None, None))
        floor.append(run_floor(w))
        for cname, cfg in CONFIGS.items():
            path = tmp / f"{w.name}-{cname}.zarr"
            runs[cname].append(run_once(w, cfg, path, writer=WRITER.get(cname, "auto")))
            if r == 0:
                sizes[cname] = store_sizes(path)
                if cname == "default":
                    sample, where = _machine.delta_sample(path, sample_bytes)
                    res["codec_on_deltas"] = {
                        "codec": cfg.codec,
                        "sample": where,
                        "sample_mb": sample.nbytes / MB,
                        **_machine.codec_speed(cfg.codec, sample),
                    }
            shutil.rmtree(path, ignore_errors=True)
        log(
            f"  {w.name} repeat {r + 1}/{w.repeats}: train {runs['train'][-1]['wall_s']:.1f} s, "
            + ", ".join(f"{c} {runs[c][-1]['wall_s']:.1f} s" for c in CONFIGS)
        )
    crcs = {r["final_crc"] for rs in [*runs.values(), floor] for r in rs}
    res["same_final_weights"] = len(crcs) == 1
    res["num_params"] = sizes["default"]["num_params"]
    train_wall, train_cpu = _med(runs["train"], "wall_s"), _med(runs["train"], "cpu_s")
    res["train"] = {"wall_s": train_wall, "cpu_s": train_cpu, "runs": runs["train"]}
    res["floor"] = {
        "wall_s": _med(floor, "wall_s"),
        "copy_s": _med(floor, "copy_s"),
        "copy_ms_per_step": 1e3 * _med(floor, "copy_s") / w.steps,
        "overhead_paired": statistics.median(
            f["wall_s"] / t["wall_s"] for f, t in zip(floor, runs["train"], strict=True)
        ),
        "runs": floor,
    }
    res["configs"] = {}
    for cname in CONFIGS:
        rs = runs[cname]
        m = {
            k: _med(rs, k)
            for k in (
                "wall_s",
                "loop_s",
                "cpu_s",
                "enter_s",
                "step_s",
                "flush_s",
                "wait_s",
                "close_s",
                "bytes_raw",
                "writer_s",
            )
        }
        m["steps_per_block"] = rs[0]["steps_per_block"]
        m["writer"] = rs[0]["writer"]
        m["flushes"] = rs[0]["flushes"]
        # a part can show up in some runs only (blocks written together: when the writer fell
        # behind); absent counts as 0 s. Bytes and calls are the first run's that has it.
        kinds = {k: r["writer_parts"][k] for r in reversed(rs) for k in r["writer_parts"]}
        m["writer_parts"] = {
            kind: {
                "seconds": statistics.median(
                    r["writer_parts"].get(kind, {}).get("seconds", 0.0) for r in rs
                ),
                "bytes": d["bytes"],
                "calls": d["calls"],
            }
            for kind, d in kinds.items()
        }
        m["writer_parts"]["other"] = {
            "seconds": m["writer_s"] - sum(d["seconds"] for d in m["writer_parts"].values())
        }
        m["overhead_wall"] = m["wall_s"] / train_wall
        m["overhead_loop"] = m["loop_s"] / train_wall
        m["overhead_cpu"] = m["cpu_s"] / train_cpu
        # per step while training runs, without the one-off costs (enter, the wait at close):
        # what a long run pays; valid while the writer keeps up (close stays short)
        m["overhead_steady"] = (m["loop_s"] - m["enter_s"]) / train_wall
        m["fixed_s"] = m["enter_s"] + m["close_s"]
        m["paired_overhead_wall"] = [
            r["wall_s"] / t["wall_s"] for r, t in zip(rs, runs["train"], strict=True)
        ]
        m["overhead_paired"] = statistics.median(m["paired_overhead_wall"])
        m["step_ms"] = 1e3 * m["step_s"] / w.steps
        m["writer_mbps"] = m["bytes_raw"] / m["writer_s"] / MB
        m["raw_per_wall_mbps"] = m["bytes_raw"] / m["wall_s"] / MB
        res["configs"][cname] = {**m, **sizes[cname], "runs": rs}
    if profile:
        last = tmp / f"{w.name}-profiled.zarr"
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        # fewer steps: cProfile slows rec.step, and the costs per step are what matters
        p = run_once(replace(w, steps=min(w.steps, 60)), CONFIGS["default"], last, prof)
        shutil.rmtree(last, ignore_errors=True)
        res["profile"] = {
            "config": "default",
            "steps": min(w.steps, 60),
            "step_s_profiled": p["step_s"],
            "wall_s_profiled": time.perf_counter() - t0,
            **profile_top(prof),
        }
        log(f"  {w.name}: profiled run {res['profile']['wall_s_profiled']:.1f} s")
    return res


def machine_limits(tmp: Path, quick: bool, samples: dict[str, Any]) -> dict[str, Any]:
    size = 128 if quick else 1024
    return {
        "fsync_write_mbps": _machine.fsync_write_mbps(tmp, 64 if quick else 256),
        "memcpy_mbps": _machine.memcpy_mbps(64 if quick else 256),
        "raw_read": _machine.raw_read_mbps(tmp, size, repeats=1 if quick else 3),
        "codec_on_deltas": samples,
    }


# ------------------------------------------------------------------------------------------
# scale: a >= 25 M-parameter model


class _RSS:
    """Samples the memory of this process and its children (the writer process) every 50 ms
    in a thread: the sum of their proportional set sizes (``Pss``: pages a forked writer
    shares with the trainer are counted once)."""

    def __init__(self) -> None:
        import threading

        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        pids = [os.getpid()]
        try:
            with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) * 1024
                            break
            except OSError:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.perf_counter(), self.now()))

    def __enter__(self) -> _RSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def bench_scale(tmp: Path, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Train an AdamW MLP of >= 25 M parameters on generated data plain and recorded (compact
    profile); peak RSS over the run's quarters, MB/s, overhead, bytes on disk per step."""
    dims = [512, 1024, 1024, 256, 10] if quick else [2048, 4096, 4096, 1024, 10]
    steps, batch, every = (24, 64, 4) if quick else (200, 64, 25)
    x, y = _machine.teacher_data(dims[0], 4096)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(y), generator=g)[:batch] for _ in range(steps)]
    # quick: short blocks, so that some commit before the end (the disk figures need them)
    cfg = hs.RecorderConfig.compact(steps_per_block=4) if quick else hs.RecorderConfig.compact()
    out: dict[str, Any] = {"dims": dims, "steps": steps, "batch": batch, "config": "compact"}

    def train(path: Path | None) -> dict[str, Any]:
        torch.manual_seed(0)
        model = _machine.MLP(dims)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        r: dict[str, Any] = {"num_params": sum(p.numel() for p in model.parameters())}
        disk: list[tuple[int, int]] = []
        step_s = 0.0
        rss0 = _RSS.now()
        with _RSS() as rss:
            t_start = time.perf_counter()
            rec = hs.Recorder(path, model, opt, cfg, overwrite=True) if path else None
            if rec is not None:
                rec.__enter__()
                writer = rec._writer
            marks = []
            for t, idx in enumerate(batches):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if rec is not None:
                    t0 = time.perf_counter()
                    rec.step(idx, labels=y[idx], loss=loss)
                    step_s += time.perf_counter() - t0
                    if (t + 1) % every == 0:
                        assert path is not None
                        disk.append((_committed(path), _machine.du(path)))
                marks.append(time.perf_counter())
            if rec is not None:
                rec.close()
            r["wall_s"] = time.perf_counter() - t_start
        r["rss_before_mb"] = rss0 / MB
        quarters = [marks[int(q * (steps - 1) / 4)] for q in range(5)]
        r["peak_rss_mb_by_quarter"] = [
            max((m for ts, m in rss.samples if a <= ts <= b), default=0) / MB
            for a, b in itertools.pairwise(quarters)
        ]
        r["peak_rss_mb"] = max((m for _, m in rss.samples), default=0) / MB
        if rec is not None:
            assert path is not None
            r |= {
                "rec_step_s": step_s,
                "bytes_raw": float(writer.bytes_raw),
                "writer_s": writer.seconds_busy,
                "writer_mbps": writer.bytes_raw / writer.seconds_busy / MB,
                "raw_per_wall_mbps": writer.bytes_raw / r["wall_s"] / MB,
                "steps_per_block": rec.steps_per_block,
                "disk_by_committed_steps": disk,
                "disk_bytes_final": _machine.du(path),
            }
            pts = np.array([(a, b) for a, b in disk if a > 0], dtype=np.float64)
            if len(pts) >= 2:
                slope, icept = np.polyfit(pts[:, 0], pts[:, 1], 1)
                fit = slope * pts[:, 0] + icept
                ss = ((pts[:, 1] - pts[:, 1].mean()) ** 2).sum()
                r["disk_bytes_per_step"] = float(slope)
                r["disk_linear_r2"] = float(1 - ((pts[:, 1] - fit) ** 2).sum() / ss) if ss else 1.0
                r["disk_bytes_per_param_step"] = float(slope) / r["num_params"]
        return r

    log(f"scale: MLP {'-'.join(map(str, dims))}, {steps} steps, training alone")
    out["train"] = train(None)
    log(f"scale: training alone {out['train']['wall_s']:.1f} s; recorded (compact)")
    path = tmp / "scale.zarr"
    out["recorded"] = train(path)
    shutil.rmtree(path, ignore_errors=True)
    out["num_params"] = out["train"]["num_params"]
    out["overhead_wall"] = out["recorded"]["wall_s"] / out["train"]["wall_s"]
    log(f"scale: recorded {out['recorded']['wall_s']:.1f} s")
    return out


def scale_table(sc: dict[str, Any]) -> str:
    r, t = sc["recorded"], sc["train"]
    q = ", ".join(f"{v:.0f}" for v in r["peak_rss_mb_by_quarter"])
    qt = ", ".join(f"{v:.0f}" for v in t["peak_rss_mb_by_quarter"])
    return (
        f"scale: MLP {'-'.join(map(str, sc['dims']))} ({sc['num_params'] / 1e6:.1f} M params, "
        f"AdamW), {sc['steps']} steps, {sc['config']} profile, {r['steps_per_block']} steps/block: "
        f"train {t['wall_s']:.1f} s, recorded {r['wall_s']:.1f} s (x{sc['overhead_wall']:.2f}), "
        f"rec.step {1e3 * r['rec_step_s'] / sc['steps']:.1f} ms/step; writer "
        f"{r['writer_mbps']:.0f} MB/s busy, {r['raw_per_wall_mbps']:.0f} MB/s of the run; "
        f"peak memory (Pss, trainer + writer process) per quarter of the run {q} MB "
        f"(training alone {qt} MB); disk "
        f"{r.get('disk_bytes_per_step', math.nan) / MB:.1f} MB/step = "
        f"{r.get('disk_bytes_per_param_step', math.nan):.2f} B/param/step, linear fit R² "
        f"{r.get('disk_linear_r2', math.nan):.4f}, {r['disk_bytes_final'] / MB:.0f} MB in all"
    )


# ------------------------------------------------------------------------------------------
# output

TIME_COLUMNS = [  # (header, key of the per-config dict, format, divisor)
    ("spb", "steps_per_block", "{}", None),
    ("rec s", "wall_s", "{:.2f}", None),
    ("x wall", "overhead_wall", "{:.2f}", None),
    ("x paired", "overhead_paired", "{:.2f}", None),
    ("x loop", "overhead_loop", "{:.2f}", None),
    ("x steady", "overhead_steady", "{:.2f}", None),
    ("x cpu", "overhead_cpu", "{:.2f}", None),
    ("enter s", "enter_s", "{:.2f}", None),
    ("rec.step s", "step_s", "{:.2f}", None),
    ("ms/step", "step_ms", "{:.2f}", None),
    ("flush s", "flush_s", "{:.2f}", None),
    ("wait s", "wait_s", "{:.2f}", None),
    ("close s", "close_s", "{:.2f}", None),
]
BYTES_COLUMNS = [
    ("raw MB", "bytes_raw", "{:.0f}", MB),
    ("writer busy s", "writer_s", "{:.2f}", None),
    ("writer MB/s", "writer_mbps", "{:.0f}", None),
    ("raw/rec s MB/s", "raw_per_wall_mbps", "{:.0f}", None),
    ("Δ MB stored", "delta_stored", "{:.1f}", MB),
    ("ratio Δ", "ratio_delta", "{:.2f}", None),
    ("ratio state", "ratio_state", "{:.2f}", None),
    ("ratio store", "ratio_store", "{:.2f}", None),
]


def _fmt(v: Any, f: str, scale: float | None = None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f.format(v / scale if scale else v)


def _grid(head: list[str], rows: list[list[str]], left: int) -> list[str]:
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(wd) if j < left else c.rjust(wd)
            for j, (c, wd) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(head), line(["-" * wd for wd in widths]), *map(line, rows)]


def table(report: dict[str, Any]) -> str:
    t_rows, b_rows = [], []
    for res in report["workloads"]:
        first = True
        for cname, m in res["configs"].items():
            run = res["workload"] if first else ""
            t_rows.append(
                [
                    run,
                    f"{res['num_params'] / 1e6:.2f} M" if first else "",
                    str(res["steps"]) if first else "",
                    _fmt(res["train"]["wall_s"], "{:.2f}") if first else "",
                    cname,
                    *[_fmt(m.get(k), f, s) for _, k, f, s in TIME_COLUMNS],
                ]
            )
            b_rows.append([run, cname, *[_fmt(m.get(k), f, s) for _, k, f, s in BYTES_COLUMNS]])
            first = False
    out = _grid(
        ["run", "params", "steps", "train s", "config", *[c[0] for c in TIME_COLUMNS]], t_rows, 5
    )
    out.append("")
    out += _grid(["run", "config", *[c[0] for c in BYTES_COLUMNS]], b_rows, 2)
    lim = report["machine_limits"]
    rr = lim["raw_read"]
    out.append("")
    out.append(
        f"machine: fsync'd write {lim['fsync_write_mbps']:.0f} MB/s, memcpy "
        f"{lim['memcpy_mbps']:.0f} MB/s, sequential read {rr['cold_mbps']:.0f} MB/s "
        f"(page cache {'dropped' if rr['cache_dropped'] else 'NOT dropped'}), "
        f"{rr['cached_mbps']:.0f} MB/s cached"
    )
    for name, c in lim["codec_on_deltas"].items():
        out.append(
            f"{c['codec']} on real Δ of {name} ({c['sample_mb']:.0f} MB, 1 thread): encode "
            f"{c['encode_mbps']:.0f} MB/s, decode {c['decode_mbps']:.0f} MB/s, ratio "
            f"{c['ratio']:.2f}"
        )
    f = report["machine"]
    out.append(
        f"{f['cpu_count']} CPUs, torch {f['torch']} ({report['torch_threads']} thread(s)), "
        f"zarr {f['zarr']}, CUDA {'yes' if f['cuda'] else 'no'}; load avg "
        f"{report['load_avg_start']:.1f} -> {report['load_avg_end']:.1f}, one busy thread got "
        f"{report['cpu_share_start']:.0%} -> {report['cpu_share_end']:.0%} of a core; "
        f"total {report['seconds_total']:.0f} s"
    )
    for res in report["workloads"]:  # the default config only (all of them in the JSON)
        for cname, m in list(res["configs"].items())[:1]:
            parts = ", ".join(
                f"{kind} {d['seconds']:.2f} s"
                if d["seconds"] > 0 or not d.get("calls")
                else f"{kind} {d['calls']} writes {d['bytes'] / MB:.0f} MB"
                for kind, d in m["writer_parts"].items()
            )
            out.append(f"writer time {res['workload']} {cname}: {parts}")
    for res in report["workloads"]:  # where the recorded run's extra seconds go
        enc = lim["codec_on_deltas"].get(res["workload"], {}).get("encode_mbps", math.nan)
        extra = []
        for cname, m in res["configs"].items():
            encode = m["bytes_raw"] / MB / enc if enc else math.nan
            extra.append(
                f"{cname} +{m['wall_s'] - res['train']['wall_s']:.2f} s: rec.step "
                f"{m['step_s']:.2f} s on the training thread (wait {m['wait_s']:.2f}), close "
                f"{m['close_s']:.2f}, writer busy {m['writer_s']:.2f} s beside training (encode "
                f"≈ {encode:.2f} s at the codec's 1-thread speed, the rest zarr and files)"
            )
        out.append(f"where the time goes, {res['workload']}: " + "; ".join(extra))
    for res in report["workloads"]:  # how far rec.step is from the least a recorder must do
        fl = res["floor"]
        m = next(iter(res["configs"].values()))
        out.append(
            f"floor {res['workload']}: copying θ and the state after each step (one batched "
            f"copy each, reused rows, nothing else) costs {fl['copy_ms_per_step']:.2f} ms/step "
            f"in the loop, x paired {fl['overhead_paired']:.2f}; the default's rec.step "
            f"{m['step_ms']:.2f} ms/step, x paired {m['overhead_paired']:.2f}"
        )
    same = all(r["same_final_weights"] for r in report["workloads"])
    out.append(f"recording leaves training unchanged (same final weights): {same}")
    for res in report["workloads"]:
        if "profile" in res:
            p = res["profile"]
            out.append(
                f"rec.step profile, {res['workload']} ({p['step_s_profiled']:.2f} s in rec.step "
                "under cProfile), top own time:"
            )
            for r in p["top_tottime"][:6]:
                out.append(f"  {r['tottime']:7.3f} s {r['calls']:>7}x  {r['function']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = _machine.arg_parser(__doc__, DETAILS, "small run (< 1 min)", "recording.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="override repeats per workload")
    ap.add_argument("--profile", action="store_true", help="cProfile rec.step once per workload")
    ap.add_argument("--tmp-dir", type=Path, default=None, help="where stores are written")
    ap.add_argument("--only", default=None, help="comma-separated workload names ('' for none)")
    ap.add_argument(
        "--scale", action="store_true", help="also record a >= 25 M-parameter model (~5 min)"
    )
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = _machine.results_dir(args.quick) / "recording.json"

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    share0 = _machine.cpu_share()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "benchmark": "recording",
        "quick": args.quick,
        "torch_threads": args.threads,
        "machine": _machine.machine_facts(),
        "configs": {k: v.to_json() | {"encodings": []} for k, v in CONFIGS.items()},
        "load_avg_start": load0,
        "cpu_share_start": share0,
        "workloads": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="hs-bench-recording-", dir=args.tmp_dir))
    try:
        wls = workloads(args.quick, args.repeats)
        if args.only is not None:
            keep = set(args.only.split(","))
            wls = [w for w in wls if w.name in keep]
        samples = {}
        for w in wls:
            log(f"{w.name}: {w.title}, {w.steps} steps x {w.repeats} repeats")
            res = bench_workload(w, tmp, args.profile, 8 << 20 if args.quick else 32 << 20, log)
            samples[w.name] = res.pop("codec_on_deltas")
            report["workloads"].append(res)
        if args.scale:
            report["scale"] = bench_scale(tmp, args.quick, log)
        log("machine limits")
        report["machine_limits"] = machine_limits(tmp, args.quick, samples)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["load_avg_end"] = os.getloadavg()[0]
    report["cpu_share_end"] = _machine.cpu_share()
    report["seconds_total"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_machine.plain_json(report), indent=1, allow_nan=False) + "\n")
    if report["workloads"]:
        print(table(report))
    if "scale" in report:
        print(scale_table(report["scale"]))
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
