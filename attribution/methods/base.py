"""The interface of attribution methods and what the engine hands them.

A method is configuration plus four functions over an explicit *state* (its running
aggregates), so that the engine can run disjoint step ranges anywhere (threads, dask workers)
and merge the partial states afterwards::

    method.prepare(ctx)                      # once per test batch, on the driver
    s = method.begin(ctx, start, stop)       # per step range
    method.update(s, block, ctx)             # per block of steps (deltas decoded on device)
    s = method.merge(s_a, s_b)               # adjacent ranges, in step order
    arrays = method.finalize(s, ctx)         # -> {layer: {key: np.ndarray with leading B}}

``update`` must be deterministic given the block, and ``merge`` associative, so that the
parallel result equals the sequential one within floating-point tolerance.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from historystore.read.store import StepBlock

from ..layers import LayerAdapter


@dataclass
class LayerSpec:
    """One explained layer: module path, adapter, and the recorded tensors it depends on.

    ``bias`` is the recorded bias tensor's name; a bias that exists but was not recorded (not
    trained) is constant and enters only the initialisation term.
    """

    name: str
    module: nn.Module
    adapter: LayerAdapter
    weight: str
    bias: str | None
    weight_encoding: str = "full"  # the store's encoding of the weight's deltas

    @property
    def tensors(self) -> list[str]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]


@dataclass
class StoreIndex:
    """Facts about the whole run that every test batch needs (one pass over the batch ids)."""

    num_steps: int
    num_train: int  # 1 + largest example id (accumulators are [B, num_train])
    num_classes: int  # 1 + largest label (labels < 0 are "unknown" and ignored)
    seen: np.ndarray  # [num_train] bool: the id occurs in at least one batch
    class_steps: np.ndarray  # [num_classes] number of steps whose batch holds the class


@dataclass
class ExplainContext:
    """One test batch: captured inputs a and real outputs z of each layer, θ_0 of its tensors.

    ``theta0[layer]`` is (W_0, b_0) with b_0 the recorded initial bias, the constant bias of a
    layer whose bias was not trained, or None. ``extra`` holds what ``method.prepare`` computed.
    """

    layers: list[LayerSpec]
    inputs: dict[str, torch.Tensor]  # [B, ...] layer inputs a
    outputs: dict[str, torch.Tensor]  # [B, *out] real preactivations z of the final model
    theta0: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    index: StoreIndex
    device: torch.device
    batch_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> ExplainContext:
        """A copy with every tensor on ``device`` (for a worker on another machine/device)."""
        dev = torch.device(device)

        def mv(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(dev)
            if isinstance(x, dict):
                return {k: mv(v) for k, v in x.items()}
            if isinstance(x, tuple):
                return tuple(mv(v) for v in x)
            return x

        return replace(
            self,
            inputs=mv(self.inputs),
            outputs=mv(self.outputs),
            theta0=mv(self.theta0),
            extra=mv(self.extra),
            device=dev,
        )


class AttributionMethod(ABC):
    """Base class of attribution methods (see the module docstring for the protocol)."""

    name: ClassVar[str]

    def tensor_names(self, ctx: ExplainContext) -> list[str]:
        """Recorded tensors the scan must decode (default: the layers' weights and biases)."""
        return [n for spec in ctx.layers for n in spec.tensors]

    def raw_tensors(self, ctx: ExplainContext) -> list[str]:
        """Tensors whose native encoded arrays (``block.raw``, e.g. per-example factors) the
        method reads besides the dense deltas; the scan then hands them over too."""
        return []

    def prepare(self, ctx: ExplainContext) -> None:  # noqa: B027 (optional hook)
        """Per test batch, on the driver, before the scan (store results in ``ctx.extra``)."""

    @abstractmethod
    def begin(self, ctx: ExplainContext, start: int, stop: int) -> Any:
        """A fresh state for the steps [start, stop)."""

    @abstractmethod
    def update(self, state: Any, block: StepBlock, ctx: ExplainContext) -> None:
        """Fold one block of steps into ``state`` (in place)."""

    @abstractmethod
    def merge(self, a: Any, b: Any) -> Any:
        """Combine the states of two disjoint step ranges (``a`` before ``b``)."""

    @abstractmethod
    def finalize(self, state: Any, ctx: ExplainContext) -> dict[str, dict[str, np.ndarray]]:
        """Per-layer result arrays for the test batch, each with a leading axis of size B."""

    def state_to(self, state: Any, device: str | torch.device) -> Any:
        """Move a state's tensors to ``device`` (to ship it back from a remote worker)."""
        return state

    def global_arrays(self) -> dict[str, np.ndarray]:
        """Arrays that do not depend on the test point (e.g. a KDE grid)."""
        return {}

    def attrs(self) -> dict[str, Any]:
        """JSON-able settings recorded in the result."""
        return {}


_METHODS: dict[str, type[AttributionMethod]] = {}


def register_method(cls: type[AttributionMethod]) -> type[AttributionMethod]:
    """Class decorator: make a method available by ``cls.name`` to :func:`explain`."""
    _METHODS[cls.name] = cls
    return cls


def get_method(method: str | AttributionMethod, **options: Any) -> AttributionMethod:
    """A method instance from its registered name (with options) or the instance itself."""
    if isinstance(method, AttributionMethod):
        if options:
            raise ValueError("options are only accepted with a method name, not an instance")
        return method
    try:
        cls = _METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown attribution method {method!r}; known: {sorted(_METHODS)}"
        ) from None
    return cls(**options)


def method_names() -> list[str]:
    return sorted(_METHODS)


def topk(
    scores: torch.Tensor, seen: torch.Tensor, k: int, largest: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Top (or bottom) k example ids per row among ids that occur in the run. A k larger than
    the number of such examples is clamped to it (every seen example, ranked): ids that never
    occur have no score, and placeholder ids would pass for real training examples."""
    k = min(k, int(seen.sum()))
    if k == 0:
        return np.zeros((scores.shape[0], 0), np.int64), np.zeros((scores.shape[0], 0))
    fill = -math.inf if largest else math.inf
    masked = torch.where(seen[None, :], scores, torch.full_like(scores, fill))
    v, i = torch.topk(masked, k, dim=1, largest=largest)
    return i.cpu().numpy().astype(np.int64), v.cpu().numpy().astype(np.float64)


def assemble(
    segments: list[tuple[int, Any]], b: int, t_total: int, dtype: Any, what: str = "the scan"
) -> np.ndarray:
    """Stitch per-block [B, S] (or [S]) segments into [B, T] (or [T]); checks the tiling."""
    out = np.zeros((b, t_total) if b else (t_total,), dtype=dtype)
    covered = 0
    for start, seg in sorted(segments, key=lambda x: x[0]):
        arr = seg.cpu().numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)
        n = arr.shape[-1]
        out[..., start : start + n] = arr
        covered += n
    if covered != t_total:
        raise RuntimeError(f"{what} covered {covered} of {t_total} steps")
    return out
