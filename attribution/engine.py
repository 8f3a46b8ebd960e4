"""The explanation engine: one streaming pass over the store per batch of test points.

For each batch of B test points the engine captures every explained layer's input a and real
output z with forward hooks on the final model (θ_T and buffers restored from the store, eval
mode), then streams the recorded deltas block by block: a block is read and decoded once (the
store's scan prefetches the next blocks in background threads) and handed to the method, which
folds it into running aggregates for all B points at once. Memory is bounded by the block size,
B and the layer sizes, never by the number of steps (apart from the [B, T] per-step scores the
result holds).

The scan needs only the stored deltas, never a replayed θ_t, so step ranges are independent:
ranges between keyframes (split further at block boundaries when there are fewer ranges than
workers) run in parallel under dask — local threads by default, or a ``dask.distributed``
cluster — and their partial aggregates are merged in step order.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn
from tqdm.auto import tqdm

from historystore.errors import EncodingError
from historystore.read.store import HistoryStore, open_store
from historystore.tensors import auto_device

from .layers import adapter_for, registered_types
from .methods.base import (
    AttributionMethod,
    ExplainContext,
    LayerSpec,
    StoreIndex,
    get_method,
)
from .results import AttributionResult, concat_layers

Scheduler = Any  # None | "threads" | "sync" | dask.distributed.Client | scheduler address
# on_scores(layer, kind ("gamma", "cosine", ...), scores [b, num_train], first test row)
ScoresCallback = Callable[[str, str, np.ndarray, int], None]
_INDEX_CHUNK = 1 << 16  # steps per read of the batch ids when indexing the run


# -- layers ------------------------------------------------------------------------------------
def supported_layers(model: nn.Module, store: HistoryStore | None = None) -> list[str]:
    """Module paths that have an adapter (and, with a store, whose weight was recorded)."""
    recorded = set(store.tensor_names) if store is not None else None
    out = []
    for name, m in model.named_modules():
        ad = adapter_for(m)
        if not name or ad is None or getattr(m, ad.weight, None) is None:
            continue
        if recorded is None or f"{name}.{ad.weight}" in recorded:
            out.append(name)
    return out


def resolve_layers(
    model: nn.Module, store: HistoryStore, layers: Sequence[str] | None
) -> list[LayerSpec]:
    """LayerSpecs for the requested module paths (None: every supported, recorded layer)."""
    modules = dict(model.named_modules())
    recorded = set(store.tensor_names)
    names = supported_layers(model, store) if layers is None else list(layers)
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of module paths, not the string {layers!r}")
    specs = []
    for name in names:
        m = modules.get(name) if name else None
        if m is None:
            raise KeyError(
                f"the model has no submodule {name!r}; explainable layers: "
                f"{supported_layers(model, store)}"
            )
        ad = adapter_for(m)
        if ad is None:
            raise TypeError(
                f"layer {name!r} is a {type(m).__name__}, which has no adapter (registered: "
                f"{registered_types()}); add one with historystore.attribution.register_adapter"
            )
        weight = f"{name}.{ad.weight}"
        if weight not in recorded:
            raise ValueError(
                f"layer {name!r}: its weight {weight!r} was not recorded in {store.path} "
                "(frozen, or not in the optimizer), so it has no history to decompose"
            )
        bias = None
        if ad.bias is not None and getattr(m, ad.bias, None) is not None:
            b = f"{name}.{ad.bias}"
            bias = b if b in recorded else None
        specs.append(LayerSpec(name, m, ad, weight, bias, store.meta.tensor(weight).encoding))
    if not specs:
        raise ValueError(
            f"no layer to explain: the model has no recorded layer of a supported type "
            f"({registered_types()})"
        )
    return specs


# -- the run's index ---------------------------------------------------------------------------
def index_store(store: HistoryStore) -> StoreIndex:
    """Number of training examples and classes, which ids occur, steps per class (one chunked
    pass over the batch ids, so the accumulators can be sized before the scan)."""
    t_total = store.num_steps
    uniq: list[np.ndarray] = []
    pair_labels: list[np.ndarray] = []
    for a in range(0, t_total, _INDEX_CHUNK):
        b = min(t_total, a + _INDEX_CHUNK)
        ids, labels, off = store.batches(a, b)
        if len(ids) and ids.min() < 0:
            raise ValueError(f"{store.path}: negative example ids in steps {a}-{b - 1}")
        uniq.append(np.unique(ids))
        step = np.repeat(np.arange(b - a), np.diff(off))
        ok = labels >= 0
        if ok.any():
            pairs = np.unique(np.stack([step[ok], labels[ok]], axis=1), axis=0)
            pair_labels.append(pairs[:, 1])
    all_ids = np.concatenate(uniq) if uniq else np.zeros(0, np.int64)
    num_train = int(all_ids.max()) + 1 if len(all_ids) else 0
    seen = np.zeros(num_train, dtype=bool)
    seen[all_ids] = True
    labs = np.concatenate(pair_labels) if pair_labels else np.zeros(0, np.int64)
    num_classes = int(labs.max()) + 1 if len(labs) else 0
    class_steps = np.bincount(labs, minlength=num_classes).astype(np.int64)
    return StoreIndex(t_total, num_train, num_classes, seen, class_steps)


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
    """Fold the steps [start, stop) into a fresh state of ``method``."""
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


WEIGHTS = ("store", "model")


# -- path methods (TracIn, EPK): θ_t along the scan and the training data -------------------
def _is_path_method(method: AttributionMethod) -> bool:
    """Methods that walk θ_t along the path (they need keyframe-aligned ranges and data)."""
    return bool(getattr(method, "needs_params", False))


def _scan_options(method: AttributionMethod, ctx: ExplainContext) -> dict[str, bool]:
    """Extra scan arguments a method asks for (``params=True``: θ_t per step; ``optim``)."""
    opts = getattr(method, "scan_options", None)
    return dict(opts(ctx)) if opts is not None else {}


def _keyframe_ranges(store: HistoryStore) -> list[tuple[int, int]]:
    """Step ranges between keyframes: a range that starts at a keyframe reads θ_start once and
    rebuilds every θ_t from its deltas (no replay of earlier blocks)."""
    t_total = store.num_steps
    kf = [int(k) for k in store.keyframe_steps if 0 < k < t_total]
    return list(itertools.pairwise(sorted({0, t_total, *kf}))) if t_total else [(0, 0)]


def _bind_path_method(
    engine: Engine, train_data: Any, loss_fn: Callable[..., torch.Tensor] | None
) -> None:
    """Hand a path method the store, model and training data (it validates them); refuse
    training data for methods that do not use it."""
    if _is_path_method(engine.method):
        if engine.weights != "store":
            raise ValueError(
                f"method {engine.method.name!r} walks the recorded path θ_0 -> θ_T, so the "
                "explained output is the store's final model: use weights='store'"
            )
        bind = engine.method.bind  # type: ignore[attr-defined]
        bind(engine.store, engine.model, train_data, loss_fn, engine.index)
    elif train_data is not None or loss_fn is not None:
        raise ValueError(
            f"method {engine.method.name!r} does not use train_data/loss_fn (path methods do: "
            "'tracin', 'epk')"
        )


class Engine:
    """Explains test points of one store and model; reusable for several test sets.

    ``weights="store"`` (default): ``store.restore(model)`` loads θ_T and the buffers into
    ``model`` (in place). ``weights="model"``: the model keeps its own weights and buffers (e.g.
    a randomised copy, for a model-randomisation sanity check); they give the test-side
    quantities (each layer's input a and output z) while the history (θ_0 and every Δ_t) still
    comes from the store. Either way a model whose parameters do not match the store raises
    :class:`~historystore.errors.ModelMismatchError`.
    """

    def __init__(
        self,
        store: HistoryStore | str | os.PathLike[str],
        model: nn.Module,
        layers: Sequence[str] | None = None,
        method: str | AttributionMethod = "preactivation",
        *,
        device: str | torch.device | None = None,
        block_steps: int | None = None,
        scheduler: Scheduler = None,
        num_workers: int | None = None,
        prefetch: int = 2,
        progress: bool = True,
        weights: str = "store",
        train_data: Any = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        storage_options: dict[str, Any] | None = None,
        **method_options: Any,
    ) -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        self.store = (
            store
            if isinstance(store, HistoryStore)
            else open_store(store, storage_options=storage_options)
        )
        self.model = model
        self.weights = weights
        if weights == "store":
            self.store.restore(model)
        else:
            self.store.check_model(model)
        self.method = get_method(method, **method_options)
        self._device_arg = device
        self.device = auto_device(device)
        if block_steps is not None and block_steps < 1:
            raise ValueError(f"block_steps must be >= 1, got {block_steps}")
        self.block_steps = block_steps
        self.scheduler = "threads" if scheduler is None else scheduler
        if (
            isinstance(self.scheduler, str)
            and self.scheduler not in ("threads", "sync")
            and ":" not in self.scheduler
        ):
            raise ValueError(
                f"scheduler must be 'threads', 'sync', a dask.distributed.Client or a "
                f"scheduler address, got {self.scheduler!r}"
            )
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.progress = progress
        self._auto_layers = layers is None
        # path methods attribute the whole model's output: no layers to resolve
        path = _is_path_method(self.method)
        if path and layers is not None:
            raise ValueError(
                f"method {self.method.name!r} explains the model's output through all recorded "
                "tensors; it takes no layers (see the result's param_scores per tensor)"
            )
        self.layers = [] if path else resolve_layers(model, self.store, layers)
        self._check_encodings()
        self.index = index_store(self.store)
        self._theta0 = self._initial_terms()
        self.stats: dict[str, float] = {}
        self.skipped: dict[str, str] = {}  # auto-selected layers that could not be explained
        self._out_shapes: dict[str, tuple[int, ...]] = {}
        _bind_path_method(self, train_data, loss_fn)

    def _check_encodings(self) -> None:
        for spec in self.layers:
            for n in spec.tensors:
                enc = self.store.encodings[n]
                if "dense" not in enc.capabilities:
                    raise EncodingError(
                        f"layer {spec.name!r}: tensor {n!r} is stored with encoding "
                        f"{enc.name!r}, which cannot give dense deltas; the preactivation "
                        "decomposition needs them"
                    )

    def _initial_terms(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """(W_0, b_0) per layer; a bias that was not recorded is constant, so b_0 = b_T (the
        store's value, which the model holds after a restore)."""
        names = [n for s in self.layers for n in s.tensors]
        theta0 = self.store.params_at(0, names)
        fixed = self.store.buffers_at(0) if self.weights == "model" else {}
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for s in self.layers:
            b0: torch.Tensor | None = None
            if s.bias is not None:
                b0 = theta0[s.bias]
            elif s.adapter.bias is not None:
                const = fixed.get(f"{s.name}.{s.adapter.bias}")
                if const is None:
                    const = getattr(s.module, s.adapter.bias, None)
                b0 = const.detach().cpu().clone() if isinstance(const, torch.Tensor) else None
            out[s.name] = (theta0[s.weight], b0)
        return out

    # -- forward pass ------------------------------------------------------------------------
    def _capture(
        self, x: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
        """Inputs a and outputs z of every explained layer on the final model."""
        got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        calls: dict[str, int] = {}

        def hook(spec: LayerSpec, _m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            calls[spec.name] = calls.get(spec.name, 0) + 1
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"layer {spec.name!r} returned {type(out).__name__}, not a tensor")
            got[spec.name] = (spec.adapter.input_of(args).detach(), out.detach())

        handles = [s.module.register_forward_hook(functools.partial(hook, s)) for s in self.layers]
        param = next(self.model.parameters(), None)
        if param is not None:  # e.g. float64 numpy test data for a float32 model
            x = x.to(param.device, param.dtype if x.is_floating_point() else x.dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                y = self._forward(x)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        bad = {
            s.name: "not called by the model's forward pass"
            if s.name not in calls
            else f"called {calls[s.name]} times per forward pass (shared weights: its "
            "preactivation is not one map)"
            for s in self.layers
            if calls.get(s.name, 0) != 1
        }
        if bad:
            if not self._auto_layers or len(bad) == len(self.layers):
                raise ValueError(
                    "cannot explain " + "; ".join(f"layer {n!r}: {why}" for n, why in bad.items())
                )
            self.skipped.update(bad)  # e.g. MultiheadAttention's out_proj, tied layers
            self.layers = [s for s in self.layers if s.name not in bad]
        missing = set(bad)
        inputs = {n: a.to(self.device) for n, (a, _) in got.items() if n not in missing}
        outputs = {n: z.to(self.device) for n, (_, z) in got.items() if n not in missing}
        self._out_shapes = {n: tuple(z.shape[1:]) for n, z in outputs.items()}
        return inputs, outputs, y

    def _forward(self, x: torch.Tensor) -> Any:
        """The model's forward pass; an error inside it names the module that raised it and
        that module's input shapes (a test batch of the wrong shape otherwise surfaces as a bare
        matmul or conv error)."""
        entered: list[tuple[str, nn.Module, tuple[Any, ...]]] = []
        done: list[tuple[str, Any]] = []

        def pre(name: str, m: nn.Module, args: tuple[Any, ...]) -> None:
            entered.append((name, m, args))

        def post(name: str, _m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            entered.pop()
            done[:] = [(name, out)]

        handles = []
        for name, m in self.model.named_modules():
            handles.append(m.register_forward_pre_hook(functools.partial(pre, name)))
            handles.append(m.register_forward_hook(functools.partial(post, name)))
        try:
            return self.model(x)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            if not entered:
                raise
            name, m, args = entered[-1]
            got = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            if name:
                where = f"layer {name!r} ({type(m).__name__}({m.extra_repr()})) failed on "
                where += f"its input of shape {got}"
            else:
                where = "the model's forward pass failed outside its submodules"
                if done and isinstance(done[0][1], torch.Tensor):
                    where += f", after layer {done[0][0]!r} returned {tuple(done[0][1].shape)}"
            raise ValueError(
                f"test_x of shape {tuple(x.shape)} does not fit the model: {where}: {e}"
            ) from e
        finally:
            for h in handles:
                h.remove()

    def _context(self, x: torch.Tensor) -> tuple[ExplainContext, Any]:
        inputs, outputs, y = self._capture(x)
        theta0 = {
            s.name: tuple(
                v.to(self.device) if v is not None else None for v in self._theta0[s.name]
            )
            for s in self.layers
        }
        ctx = ExplainContext(
            layers=self.layers,
            inputs=inputs,
            outputs=outputs,
            theta0=theta0,  # type: ignore[arg-type]
            index=self.index,
            device=self.device,
            batch_size=len(x),
        )
        if _is_path_method(self.method):
            ctx.extra["test_x"] = x.to(self.device)
        self.method.prepare(ctx)
        return ctx, y

    # -- step ranges -------------------------------------------------------------------------
    def ranges(self, workers: int) -> list[tuple[int, int]]:
        """Independent step ranges: between keyframes, split at block boundaries when there
        are fewer ranges than ``workers`` (the scan never replays θ, so blocks are independent
        too)."""
        if _is_path_method(self.method):
            return _keyframe_ranges(self.store)
        t_total = self.store.num_steps
        kf = [int(k) for k in self.store.keyframe_steps if 0 < k < t_total]
        bounds = sorted({0, t_total, *kf}) if t_total else [0]
        ranges = list(itertools.pairwise(bounds))
        if len(ranges) >= workers:
            return ranges
        blocks = self.store.block_ranges(0, t_total, self.block_steps)
        if len(blocks) <= len(ranges):
            return ranges
        per = math.ceil(len(blocks) / workers)
        return [
            (blocks[i][0], blocks[min(i + per, len(blocks)) - 1][1])
            for i in range(0, len(blocks), per)
        ]

    def _workers(self) -> int:
        """Ranges run at once: the user's ``num_workers``; on a GPU a few (to overlap decode,
        copies and kernels); on CPU the cores that torch's own thread pool leaves free (the
        scan already decodes the next blocks in parallel, and two torch pools on the same
        cores only slow each other down)."""
        if self.num_workers is not None:
            return max(1, int(self.num_workers))
        cpus = os.cpu_count() or 1
        if self.device.type == "cuda":
            return min(4, cpus)
        return max(1, cpus // max(1, torch.get_num_threads()))

    def _run(self, ctx: ExplainContext, bar: tqdm) -> Any:
        names = self.method.tensor_names(ctx)
        t_total = self.store.num_steps
        if t_total == 0:
            return self.method.begin(ctx, 0, 0)
        if self.scheduler == "threads":
            workers = self._workers()
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

    # -- public ------------------------------------------------------------------------------
    def explain(
        self,
        test_x: torch.Tensor | np.ndarray,
        test_batch_size: int = 64,
        scores_path: str | os.PathLike[str] | None = None,
        on_scores: ScoresCallback | None = None,
        *,
        keep_arrays: bool = True,
    ) -> AttributionResult:
        """Explain every test point; one pass over the store per batch of test points.

        The method's full per-example scores (preactivation: ``keep_scores=True``) go to
        ``scores_path`` (a zarr group: array ``<layer>`` for γ, ``<layer>@cosine`` for the
        cosine) and/or to ``on_scores(layer, kind, scores [b, num_train], first_row)``, one test
        batch at a time; they are never held for all test points at once. ``keep_arrays=False``
        drops each batch's other arrays too (the result then has no layers): memory stays
        bounded by one test batch however many points stream through, e.g. a training set.
        """
        x = torch.as_tensor(test_x)
        if x.dim() == 0 or len(x) == 0:
            raise ValueError("test_x must hold at least one test point (leading batch axis)")
        if test_batch_size < 1:
            raise ValueError(f"test_batch_size must be >= 1, got {test_batch_size}")
        n = len(x)
        batches = [(i, min(n, i + test_batch_size)) for i in range(0, n, test_batch_size)]
        t_total = self.store.num_steps
        parts: list[dict[str, dict[str, np.ndarray]]] = []
        outputs: list[np.ndarray] = []
        scores: dict[str, zarr.Array] = {}
        t0 = time.perf_counter()
        bar = tqdm(
            total=t_total * len(batches),
            unit="step",
            desc=f"explain ({self.method.name})",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            for b0, b1 in batches:
                ctx, y = self._context(x[b0:b1])
                if keep_arrays and isinstance(y, torch.Tensor):
                    outputs.append(y.detach().float().cpu().numpy())
                state = self._run(ctx, bar)
                arrays = self.method.finalize(state, ctx)
                got = False
                for layer, d in arrays.items():
                    for key in [k for k in d if k.startswith("example_scores")]:
                        s, got = d.pop(key), True
                        kind = key.removeprefix("example_scores").lstrip("_") or "gamma"
                        if on_scores is not None:
                            on_scores(layer, kind, s, b0)
                        if scores_path is not None:
                            name = layer if kind == "gamma" else f"{layer}@{kind}"
                            self._write_scores(scores, scores_path, name, s, b0, n, test_batch_size)
                if (scores_path is not None or on_scores is not None) and not got:
                    where = scores_path if scores_path is not None else "on_scores"
                    raise ValueError(
                        f"method {self.method.name!r} produced no per-example scores for "
                        f"{where} (for the preactivation method: keep_scores=True)"
                    )
                if keep_arrays:
                    parts.append(arrays)
                del state, ctx, arrays
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        self.stats = {
            "seconds": seconds,
            "steps_per_s": t_total * len(batches) / seconds if seconds > 0 else math.inf,
            "test_batches": float(len(batches)),
        }
        glob = dict(self.method.global_arrays())
        if keep_arrays and outputs and len(outputs) == len(batches):
            glob["outputs"] = np.concatenate(outputs)
        attrs = {
            **self.method.attrs(),
            "store": self.store.path,
            "num_steps": t_total,
            "num_train": self.index.num_train,
            "num_classes": self.index.num_classes,
            "class_steps": self.index.class_steps.tolist(),
            "layers": {
                s.name: {
                    "type": type(s.module).__name__,
                    "weight": s.weight,
                    "bias": s.bias,
                    "out_shape": list(self._out_shapes.get(s.name, ())),
                }
                for s in self.layers
            },
            "skipped_layers": dict(self.skipped),
            "weights": self.weights,
            "device": str(self.device),
            "scheduler": self.scheduler if isinstance(self.scheduler, str) else "distributed",
            "test_batch_size": test_batch_size,
            "seconds": seconds,
            "scores_path": os.fspath(scores_path) if scores_path is not None else None,
        }
        return AttributionResult(self.method.name, concat_layers(parts), glob, attrs)

    def _write_scores(
        self,
        arrays: dict[str, zarr.Array],
        path: str | os.PathLike[str],
        layer: str,
        s: np.ndarray,
        row: int,
        n: int,
        batch: int,
    ) -> None:
        """Full per-example scores, written test batch by test batch into a zarr array
        ``<path>/<layer>`` [n_test, num_train] (never held for all test points at once)."""
        if layer not in arrays:
            group = zarr.open_group(os.fspath(path), mode="w" if not arrays else "a", zarr_format=3)
            group.attrs["description"] = (
                "per-example attribution scores: row = test point, column = training example id"
            )
            nt = self.index.num_train
            arrays[layer] = group.create_array(
                layer,
                shape=(n, nt),
                dtype="float32",
                chunks=(min(batch, n), max(1, min(nt, 1 << 16))),
            )
        arrays[layer][row : row + len(s)] = s

    def self_influence(
        self,
        train_x: torch.Tensor | np.ndarray,
        ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        *,
        score: str = "gamma",
        test_batch_size: int = 64,
    ) -> dict[str, np.ndarray]:
        """Each training example's score on itself, per layer [n] (float64); high = suspicious.

        Row i of ``train_x`` is training example ``ids[i]`` (default: i, the recorded id).
        The value is the *negated* score of example i's own updates on its own final
        preactivation: −Σ_t (its share of γ_t at x_i), or of γ̄_t with ``score="cosine"``.
        Updates from an example whose label disagrees with what the rest of the data taught
        the model push its preactivation away from where it ends up, so such examples (wrong
        labels, atypical examples) rank first, as TracIn's self-influence ranks them; examples
        the model fits well score negative. An id that never occurs in the run scores 0. The
        method must return full per-example scores (preactivation: ``keep_scores=True``; the
        module-level :func:`self_influence` sets it). One pass over the store per
        ``test_batch_size`` training examples.
        """
        x = torch.as_tensor(train_x)
        if x.dim() == 0 or len(x) == 0:
            raise ValueError("train_x must hold at least one training example (leading axis)")
        rows = np.arange(len(x)) if ids is None else np.asarray(torch.as_tensor(ids).cpu())
        if rows.shape != (len(x),) or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(
                f"ids must be {len(x)} integers (one per row of train_x), got shape "
                f"{rows.shape} {rows.dtype}"
            )
        if len(rows) and rows.min() < 0:
            raise ValueError(f"ids must be >= 0, got {int(rows.min())}")
        out: dict[str, np.ndarray] = {}
        inside = rows < self.index.num_train

        def take(layer: str, kind: str, s: np.ndarray, row: int) -> None:
            if kind != score:
                return
            d = out.setdefault(layer, np.zeros(len(x), dtype=np.float64))
            r = rows[row : row + len(s)]
            ok = inside[row : row + len(s)]
            d[row : row + len(s)][ok] = -s[np.flatnonzero(ok), r[ok]].astype(np.float64)

        self.explain(x, test_batch_size=test_batch_size, on_scores=take, keep_arrays=False)
        if not out:
            raise ValueError(
                f"method {self.method.name!r} gave no per-example {score!r} scores "
                "(preactivation: scores=('gamma', 'cosine') chooses them)"
            )
        return out


def explain(
    store: HistoryStore | str | os.PathLike[str],
    model: nn.Module,
    test_x: torch.Tensor | np.ndarray,
    layers: Sequence[str] | None = None,
    method: str | AttributionMethod = "preactivation",
    top_k: int = 10,
    test_batch_size: int = 64,
    device: str | torch.device | None = None,
    block_steps: int | None = None,
    scheduler: Scheduler = None,
    progress: bool = True,
    *,
    scores_path: str | os.PathLike[str] | None = None,
    num_workers: int | None = None,
    prefetch: int = 2,
    method_options: dict[str, Any] | None = None,
    weights: str = "store",
    train_data: Any = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> AttributionResult:
    """Explain the model's predictions on ``test_x`` from the recorded training history.

    store: a path, a store URL (``s3://bucket/run.zarr``; ``storage_options`` go to its fsspec
    filesystem) or an open :class:`HistoryStore`. model: the trained architecture; its
    weights are replaced in place by the store's θ_T and buffers, and a model that does not
    match the store raises :class:`~historystore.errors.ModelMismatchError`.
    weights: "store" (as just said) or "model": keep the model's own weights and buffers for
    the test side (layer inputs a, outputs z) while θ_0 and the deltas come from the store;
    then ``total`` is the store's final layer applied to the model's inputs and
    ``decomposition_error`` measures how far the model's layer is from the recorded one.
    layers: module paths to explain (None: every supported layer whose weight was recorded and
    that the forward pass calls once; the others are listed in ``attrs["skipped_layers"]``).
    method: a registered method name or an :class:`AttributionMethod` instance; ``top_k`` and
    ``method_options`` configure a named method.
    device: None/"auto" picks CUDA when present. block_steps: steps per scanned block (default:
    the store's blocks). scheduler: None/"threads" runs independent step ranges on dask threads
    (``num_workers`` at once; default: a few on a GPU, on CPU the cores torch's own pool
    leaves free, which on most machines means one prefetching scan), "sync" one sequential
    scan, or a ``dask.distributed.Client`` / scheduler address (workers must reach the store's
    path or URL). train_data/loss_fn: the training set by recorded id (a torch Dataset or a
    callable ids -> (x, y)) and the training loss (default cross-entropy), for the path methods
    ("tracin", "epk"). scores_path: also write the full per-example scores [n_test,
    num_train] of each layer to this zarr group (γ as ``<layer>``, the cosine as
    ``<layer>@cosine``), one test batch at a time.
    """
    options = dict(method_options or {})
    if isinstance(method, str):
        options.setdefault("top_k", top_k)
        if scores_path is not None:
            options.setdefault("keep_scores", True)
    engine = Engine(
        store,
        model,
        layers,
        method,
        device=device,
        block_steps=block_steps,
        scheduler=scheduler,
        num_workers=num_workers,
        prefetch=prefetch,
        progress=progress,
        weights=weights,
        train_data=train_data,
        loss_fn=loss_fn,
        storage_options=storage_options,
        **options,
    )
    return engine.explain(test_x, test_batch_size=test_batch_size, scores_path=scores_path)


def self_influence(
    store: HistoryStore | str | os.PathLike[str],
    model: nn.Module,
    train_x: torch.Tensor | np.ndarray,
    ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    layers: Sequence[str] | None = None,
    method: str | AttributionMethod = "preactivation",
    *,
    score: str = "gamma",
    test_batch_size: int = 64,
    device: str | torch.device | None = None,
    block_steps: int | None = None,
    scheduler: Scheduler = None,
    num_workers: int | None = None,
    prefetch: int = 2,
    progress: bool = True,
    weights: str = "store",
    method_options: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Self-influence of training examples: {layer: [n] float64}, high = suspicious.

    Row i of ``train_x`` is the training example with recorded id ``ids[i]`` (default: i).
    Sign convention (as TracIn's): the negated score of an example's own updates on its own
    final preactivation, so examples with wrong labels rank first (see
    :meth:`Engine.self_influence`). ``score``: "gamma" or "cosine" (each step's share
    normalised by ‖z‖ ‖c_t‖). Costs one pass over the store per ``test_batch_size`` examples.
    """
    options = dict(method_options or {})
    if isinstance(method, str):
        options.setdefault("keep_scores", True)
        options.setdefault("top_k", 0)
        if method == "preactivation":
            options.setdefault("scores", (score,))
    engine = Engine(
        store,
        model,
        layers,
        method,
        device=device,
        block_steps=block_steps,
        scheduler=scheduler,
        num_workers=num_workers,
        prefetch=prefetch,
        progress=progress,
        weights=weights,
        storage_options=storage_options,
        **options,
    )
    return engine.self_influence(train_x, ids, score=score, test_batch_size=test_batch_size)
