"""The explanation engine: one streaming pass over the store per batch of test points.

For each batch of B test points the engine captures every explained layer's input a and real
output z with forward hooks on the final model (θ_T and buffers restored from the store, eval
mode), then streams the recorded deltas block by block: a block is read and decoded once (the
store's scan prefetches the next blocks in background threads) and handed to the method, which
folds it into running aggregates for all B points at once. Memory is bounded by the block size,
B and the layer sizes, never by the number of steps (apart from the [B, T] per-step scores the
result holds).

Its parts live beside it: which layers are explained and the forward hooks that capture their
inputs and outputs in :mod:`.capture`; the independent step ranges and running them inline, on
local threads or on a ``dask.distributed`` cluster in :mod:`.schedule`.
"""

from __future__ import annotations

import math
import os
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

from .capture import capture_layers, resolve_layers
from .methods.base import (
    AttributionMethod,
    ExplainContext,
    StoreIndex,
    get_method,
)
from .results import AttributionResult, concat_layers
from .schedule import Runner, Scheduler, is_path_method

# on_scores(layer, kind ("gamma", "cosine", ...), scores [b, num_train], first test row)
ScoresCallback = Callable[[str, str, np.ndarray, int], None]
_INDEX_CHUNK = 1 << 16  # steps per read of the batch ids when indexing the run


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


WEIGHTS = ("store", "model")


# -- path methods (TracIn, EPK): θ_t along the scan and the training data -------------------
def _bind_path_method(
    engine: Engine, train_data: Any, loss_fn: Callable[..., torch.Tensor] | None
) -> None:
    """Hand a path method the store, model and training data (it validates them); refuse
    training data for methods that do not use it."""
    if is_path_method(engine.method):
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
        path = is_path_method(self.method)
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

    # -- forward pass (see capture.py) -------------------------------------------------------
    def _capture(
        self, x: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
        """Inputs a and outputs z of every explained layer on the final model."""
        cap = capture_layers(self.model, self.layers, x, self.device, auto_layers=self._auto_layers)
        if cap.skipped:  # e.g. MultiheadAttention's out_proj, tied layers
            self.skipped.update(cap.skipped)
            self.layers = [s for s in self.layers if s.name not in cap.skipped]
        self._out_shapes = {n: tuple(z.shape[1:]) for n, z in cap.outputs.items()}
        return cap.inputs, cap.outputs, cap.y

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
        if is_path_method(self.method):
            ctx.extra["test_x"] = x.to(self.device)
        self.method.prepare(ctx)
        return ctx, y

    # -- step ranges (see schedule.py) -------------------------------------------------------
    def ranges(self, workers: int) -> list[tuple[int, int]]:
        """Independent step ranges: between keyframes, split at block boundaries when there
        are fewer ranges than ``workers`` (the scan never replays θ, so blocks are independent
        too)."""
        return self._runner().ranges(workers)

    def _runner(self) -> Runner:
        return Runner(
            self.store,
            self.method,
            scheduler=self.scheduler,
            num_workers=self.num_workers,
            block_steps=self.block_steps,
            device=self.device,
            device_arg=self._device_arg,
            prefetch=self.prefetch,
        )

    def _run(self, ctx: ExplainContext, bar: tqdm) -> Any:
        return self._runner().run(ctx, bar)

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


def per_example_options(
    method: str | AttributionMethod, score: str, method_options: dict[str, Any] | None
) -> dict[str, Any]:
    """Options of a built-in method that hands out full per-example rows of one score kind and
    keeps no top-k (self-influence and the quanda adapter read only those rows)."""
    options = dict(method_options or {})
    if isinstance(method, str):
        options.setdefault("keep_scores", True)
        options.setdefault("top_k", 0)
        if method == "preactivation":
            options.setdefault("scores", (score,))
    return options


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
    options = per_example_options(method, score, method_options)
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
