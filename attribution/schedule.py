"""Scheduling the scan: independent step ranges, run inline, on threads or on a cluster.

The scan needs only the stored deltas, never a replayed θ_t, so step ranges are independent:
ranges between keyframes (split further at block boundaries when there are fewer ranges than
workers) run in parallel under dask — local threads by default, or a ``dask.distributed``
cluster — and their partial aggregates are merged in step order. Path methods (θ_t along the
scan) get keyframe ranges only, so each range reads θ_start once from its keyframe.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from historystore.read.store import HistoryStore, open_store
from historystore.tensors import auto_device

from .methods.base import AttributionMethod, ExplainContext

Scheduler = Any  # None | "threads" | "sync" | dask.distributed.Client | scheduler address


def is_path_method(method: AttributionMethod) -> bool:
    """Methods that walk θ_t along the path (they need keyframe-aligned ranges and data)."""
    return bool(getattr(method, "needs_params", False))


def _scan_options(method: AttributionMethod, ctx: ExplainContext) -> dict[str, bool]:
    """Extra scan arguments a method asks for (``params=True``: θ_t per step; ``optim``)."""
    opts = getattr(method, "scan_options", None)
    return dict(opts(ctx)) if opts is not None else {}


# -- one step range (runs in a thread, a dask worker, or inline) -------------------------------
def _scan_range(
    store: HistoryStore | str,
    method: AttributionMethod,
    ctx: ExplainContext,
    start: int,
    stop: int,
    names: list[str],
    block_steps: int | None,
    device: str | torch.device | None,
    prefetch: int,
    on_block: Callable[[int], None] | None = None,
    to_cpu: bool = False,
) -> Any:
    """Fold the steps [start, stop) into a fresh state of ``method`` (dask names its tasks
    after this function: ``_scan_range-<hash>``)."""
    st = open_store(store) if isinstance(store, str) else store
    dev = auto_device(device)
    if ctx.device != dev:
        ctx = ctx.to(dev)
    state = method.begin(ctx, start, stop)
    raw = bool(method.raw_tensors(ctx))
    for block in st.scan(
        start,
        stop,
        names,
        block_steps=block_steps,
        device=dev,
        prefetch=prefetch,
        raw=raw,
        **_scan_options(method, ctx),
    ):
        method.update(state, block, ctx)
        if on_block is not None:
            on_block(block.num_steps)
    return method.state_to(state, "cpu") if to_cpu else state


# -- step ranges -------------------------------------------------------------------------------
def keyframe_ranges(store: HistoryStore) -> list[tuple[int, int]]:
    """Step ranges between keyframes: a range that starts at a keyframe reads θ_start once and
    rebuilds every θ_t from its deltas (no replay of earlier blocks)."""
    t_total = store.num_steps
    kf = [int(k) for k in store.keyframe_steps if 0 < k < t_total]
    return list(itertools.pairwise(sorted({0, t_total, *kf}))) if t_total else [(0, 0)]


def step_ranges(
    store: HistoryStore, workers: int, block_steps: int | None, *, path: bool
) -> list[tuple[int, int]]:
    """Independent step ranges: between keyframes, split at block boundaries when there are
    fewer ranges than ``workers`` (the scan never replays θ, so blocks are independent too);
    keyframe ranges only for path methods (``path``)."""
    if path:
        return keyframe_ranges(store)
    t_total = store.num_steps
    kf = [int(k) for k in store.keyframe_steps if 0 < k < t_total]
    bounds = sorted({0, t_total, *kf}) if t_total else [0]
    ranges = list(itertools.pairwise(bounds))
    if len(ranges) >= workers:
        return ranges
    blocks = store.block_ranges(0, t_total, block_steps)
    if len(blocks) <= len(ranges):
        return ranges
    per = math.ceil(len(blocks) / workers)
    return [
        (blocks[i][0], blocks[min(i + per, len(blocks)) - 1][1]) for i in range(0, len(blocks), per)
    ]


def default_workers(num_workers: int | None, device: torch.device) -> int:
    """Ranges run at once: the user's ``num_workers``; on a GPU a few (to overlap decode,
    copies and kernels); on CPU the cores that torch's own thread pool leaves free (the
    scan already decodes the next blocks in parallel, and two torch pools on the same
    cores only slow each other down)."""
    if num_workers is not None:
        return max(1, int(num_workers))
    cpus = os.cpu_count() or 1
    if device.type == "cuda":
        return min(4, cpus)
    return max(1, cpus // max(1, torch.get_num_threads()))


# -- running them ------------------------------------------------------------------------------
class Runner:
    """Runs one method's scan over a store under a scheduler and merges the ranges' states."""

    def __init__(
        self,
        store: HistoryStore,
        method: AttributionMethod,
        *,
        scheduler: Scheduler,
        num_workers: int | None,
        block_steps: int | None,
        device: torch.device,
        device_arg: str | torch.device | None,
        prefetch: int,
    ) -> None:
        self.store = store
        self.method = method
        self.scheduler = scheduler
        self.num_workers = num_workers
        self.block_steps = block_steps
        self.device = device
        self._device_arg = device_arg  # as the user gave it: each dask worker picks its own
        self.prefetch = prefetch

    def ranges(self, workers: int) -> list[tuple[int, int]]:
        return step_ranges(self.store, workers, self.block_steps, path=is_path_method(self.method))

    def run(self, ctx: ExplainContext, bar: tqdm) -> Any:
        """The method's state after every recorded step, on ``device``."""
        names = self.method.tensor_names(ctx)
        t_total = self.store.num_steps
        if t_total == 0:
            return self.method.begin(ctx, 0, 0)
        if self.scheduler == "threads":
            workers = default_workers(self.num_workers, self.device)
            ranges = self.ranges(workers)
            if workers > 1 and len(ranges) > 1:
                states = self._run_threads(ctx, ranges, names, workers, bar)
                return self._merge(states)
        elif self.scheduler != "sync":
            return self._merge(self._run_distributed(ctx, names, bar))
        # one sequential scan: the prefetch runs on across keyframes
        return _scan_range(
            self.store,
            self.method,
            ctx,
            0,
            t_total,
            names,
            self.block_steps,
            self.device,
            self.prefetch,
            bar.update,
        )

    def _merge(self, states: list[Any]) -> Any:
        state = functools.reduce(self.method.merge, states)  # in step order
        return self.method.state_to(state, self.device)

    def _run_threads(
        self,
        ctx: ExplainContext,
        ranges: list[tuple[int, int]],
        names: list[str],
        workers: int,
        bar: tqdm,
    ) -> list[Any]:
        import dask

        lock = threading.Lock()

        def on_block(n: int) -> None:
            with lock:
                bar.update(n)

        fn = functools.partial(
            _scan_range,
            self.store,
            self.method,
            ctx,
            names=names,
            block_steps=self.block_steps,
            device=self.device,
            prefetch=self.prefetch,
            on_block=on_block,
        )
        tasks = [dask.delayed(fn, pure=False)(a, b) for a, b in ranges]
        return list(
            dask.compute(*tasks, scheduler="threads", num_workers=min(workers, len(ranges)))
        )

    def _run_distributed(self, ctx: ExplainContext, names: list[str], bar: tqdm) -> list[Any]:
        """Ranges as tasks on a dask.distributed cluster; workers reopen the store by its path
        or URL (a HistoryStore pickles as path + storage_options) and pick their own device;
        partial states come back on the CPU."""
        from distributed import Client, as_completed

        own = not isinstance(self.scheduler, Client)
        client = Client(self.scheduler) if own else self.scheduler
        try:
            workers = self.num_workers or max(1, sum(client.nthreads().values()))
            ranges = self.ranges(workers)
            ctx_f = client.scatter(ctx.to("cpu"), broadcast=True)
            futures = [
                client.submit(
                    _scan_range,
                    self.store,
                    self.method,
                    ctx_f,
                    a,
                    b,
                    names,
                    self.block_steps,
                    self._device_arg,
                    self.prefetch,
                    None,
                    True,
                    pure=False,
                )
                for a, b in ranges
            ]
            steps = {f.key: b - a for f, (a, b) in zip(futures, ranges, strict=True)}
            for f in as_completed(futures):
                bar.update(steps[f.key])
            return list(client.gather(futures))
        finally:
            if own:
                client.close()
