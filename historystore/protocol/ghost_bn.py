r"""Batch normalisation with ghost samples (Pfahler & Morik, AAAI 2022, Algorithm 2).

With single-class minibatches (see :mod:`historystore.protocol.sampler`) the batch statistics
of an ordinary batch-norm layer would describe one class only. The protocol appends ghost
examples drawn from all classes; the layer input is ``torch.cat([real, ghost])`` and the layer
normalises *both* parts with statistics of a mixture in which **each ghost example and the
real batch as a whole weigh the same** ("the same-class batch weighs as one ghost example").
The caller computes the loss on the first ``n_real`` rows only.

Statistics (per channel)
------------------------
Let ``B = n_real`` real examples and ``G = |g|`` ghost examples, each example holding ``m``
values per channel (``m = 1`` for ``(N, C)`` input, ``L`` for ``(N, C, L)``, ``H·W`` for
``(N, C, H, W)``). "One example" is one row of the input with all its ``m`` positions, so the
weights are per *example*, not per position: every ghost row has total weight 1 (``1/m`` per
value) and the whole real batch has total weight 1 (``1/(B·m)`` per value). With
``μ_b, σ²_b`` the plain (biased) mean/variance over the ``B·m`` real values and ``μ_g, σ²_g``
those over the ``G·m`` ghost values, the mixture has

    μ  = (G·μ_g + μ_b) / (1+G)              = μ_g + (μ_b − μ_g)/(1+G)
    σ² = (G·σ²_g + σ²_b) / (1+G) + G·(μ_g − μ_b)² / (1+G)²
       = c·σ²_g + (1−c)·σ²_b + c·(1−c)·(μ_g − μ_b)²,      c = G/(1+G)

(law of total variance: weighted within-part variances plus the variance of the part means).
Both are exactly the weighted mean and weighted biased variance of all ``(B+G)·m`` values with
the per-value weights above, which is what the tests check against.

Correction with respect to the paper
------------------------------------
The formulas as transcribed from the paper are ``μ = μ_g + (μ_g − μ_b)/(1+|g|)`` and
``σ² = c·σ²_g + σ²_b + c·(μ_g − μ_b)²/(1+|g|)``. They do not match the weighting the paper
itself describes. (1) The mean correction has the wrong sign: the mixture mean lies between
``μ_g`` and ``μ_b`` at ``μ_g + (μ_b − μ_g)/(1+|g|)``; the transcribed one moves *away* from
the real batch. (2) The real batch's within-variance ``σ²_b`` must carry its mixture weight
``1/(1+|g|)``; unweighted, the within-part weights sum to ``(1+2|g|)/(1+|g|)`` instead of 1,
so even when the ghosts and the real batch have identical values the variance comes out
``(1+2|g|)/(1+|g|)`` times too large (almost doubled). The between-part term
``c·(μ_g − μ_b)²/(1+|g|) = |g|(μ_g − μ_b)²/(1+|g|)²`` is already correct. This module
implements the mixture-consistent formulas above.

Normalisation uses the biased ``σ²`` (as ``nn.BatchNorm`` does). The running variance is
updated with an unbiased estimate, like ``nn.BatchNorm``, using Bessel's correction for
weighted samples with the Kish effective sample size of the per-value weights,

    n_eff = (Σw)² / Σw² = m·(1+G)² / (G + 1/B)
    running_mean ← (1−f)·running_mean + f·μ
    running_var  ← (1−f)·running_var  + f·σ²·n_eff/(n_eff − 1)

with ``f = momentum`` (or ``1/num_batches_tracked`` for ``momentum=None``). ``n_eff`` reduces
to ``nn.BatchNorm``'s ``n = B·m`` when there are no ghosts, and for ``B = 1`` (one real
example weighs like one ghost, all values weigh the same) the layer is exactly
``nn.BatchNorm`` over all ``(1+G)·m`` values.
Momentum semantics (including ``momentum=None``, a cumulative average) and
``num_batches_tracked`` are exactly those of ``nn.BatchNorm``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "convert_batchnorm",
    "ghost_split",
    "mixture_stats",
    "set_ghost_split",
]


def mixture_stats(x: torch.Tensor, n_real: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel mixture mean, biased variance and effective sample size of ``x``.

    ``x`` is ``(N, C, *)`` with the first ``n_real`` rows real and the rest ghosts; see the
    module docstring for the formulas. Differentiable with respect to ``x``.
    """
    n = x.shape[0]
    if not 1 <= n_real < n:
        raise ValueError(f"need 1 <= n_real < batch size {n} for ghost statistics, got {n_real}")
    g = n - n_real
    m = 1
    for s in x.shape[2:]:
        m *= s
    dims = [0, *range(2, x.dim())]
    var_b, mean_b = torch.var_mean(x[:n_real], dim=dims, correction=0)
    var_g, mean_g = torch.var_mean(x[n_real:], dim=dims, correction=0)
    c = g / (1 + g)
    diff = mean_g - mean_b
    mean = mean_g - diff / (1 + g)  # = μ_g + (μ_b − μ_g)/(1+G)
    var = c * var_g + (1 - c) * var_b + c * (1 - c) * diff * diff
    n_eff = m * (1 + g) ** 2 / (g + 1 / n_real)
    return mean, var, n_eff


class _GhostBatchNormMixin:
    """Shared forward of :class:`GhostBatchNorm1d` / :class:`GhostBatchNorm2d`.

    ``ghost_n_real`` (set via :func:`set_ghost_split` / :func:`ghost_split`) says how many
    leading rows of the input are the real batch; ``None`` means plain ``nn.BatchNorm``.
    ``detach_ghost_stats=True`` treats ``μ_g, σ²_g`` as constants in backward, so no gradient
    reaches the ghost rows (the update then depends on ghosts only through the forward
    normalisation); the default differentiates through the full mixture like ``nn.BatchNorm``
    does through its batch statistics.
    """

    ghost_n_real: int | None
    detach_ghost_stats: bool

    def _init_ghost(self, detach_ghost_stats: bool) -> None:
        self.ghost_n_real = None
        self.detach_ghost_stats = bool(detach_ghost_stats)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        n_real = self.ghost_n_real
        uses_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        if n_real is None or not uses_batch_stats or n_real == input.shape[0]:
            return nn.modules.batchnorm._BatchNorm.forward(bn, input)  # plain nn.BatchNorm
        bn._check_input_dim(input)
        if n_real > input.shape[0]:
            raise ValueError(f"ghost split n_real={n_real} exceeds the batch size {input.shape[0]}")

        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average, as in nn.BatchNorm
                factor = 1.0 / float(bn.num_batches_tracked)

        compute_dtype = torch.promote_types(input.dtype, torch.float32)
        x = input.to(compute_dtype)
        # Optionally cut the backward path through the ghost statistics.
        x_stats = torch.cat([x[:n_real], x[n_real:].detach()]) if self.detach_ghost_stats else x
        mean, var, n_eff = mixture_stats(x_stats, n_real)

        if (
            bn.training
            and bn.track_running_stats
            and bn.running_mean is not None
            and bn.running_var is not None
        ):
            with torch.no_grad():
                unbiased = var * (n_eff / (n_eff - 1.0))
                rm, rv = bn.running_mean, bn.running_var
                rm.mul_(1.0 - factor).add_(mean.to(rm.dtype), alpha=factor)
                rv.mul_(1.0 - factor).add_(unbiased.to(rv.dtype), alpha=factor)

        shape = (1, -1) + (1,) * (input.dim() - 2)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(compute_dtype)
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(compute_dtype)
        out = x * scale.view(shape) + shift.view(shape)
        return out.to(input.dtype)


class GhostBatchNorm1d(_GhostBatchNormMixin, nn.BatchNorm1d):
    """Drop-in ``nn.BatchNorm1d`` that mixes a real batch with ghost rows (see module doc).

    Same constructor, parameters, buffers and state_dict as ``nn.BatchNorm1d`` (and an
    instance of it); identical to it unless a ghost split is set and batch statistics are used.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        detach_ghost_stats: bool = False,
    ) -> None:
        nn.BatchNorm1d.__init__(
            self, num_features, eps, momentum, affine, track_running_stats, device, dtype
        )
        self._init_ghost(detach_ghost_stats)


class GhostBatchNorm2d(_GhostBatchNormMixin, nn.BatchNorm2d):
    """Drop-in ``nn.BatchNorm2d`` that mixes a real batch with ghost rows (see module doc).

    Statistics are over ``(N, H, W)``; one "example" is one image (all its ``H·W`` positions).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        detach_ghost_stats: bool = False,
    ) -> None:
        nn.BatchNorm2d.__init__(
            self, num_features, eps, momentum, affine, track_running_stats, device, dtype
        )
        self._init_ghost(detach_ghost_stats)


_GhostBN = (GhostBatchNorm1d, GhostBatchNorm2d)


def set_ghost_split(model: nn.Module, n_real: int | None) -> int:
    """Tell every ghost batch-norm layer in ``model`` that the first ``n_real`` rows are real.

    ``None`` clears the split (plain batch norm). Returns the number of layers set, so a
    caller can notice a model without ghost layers (0).
    """
    if n_real is not None and (isinstance(n_real, bool) or int(n_real) != n_real or n_real < 1):
        raise ValueError(f"n_real must be a positive int or None, got {n_real!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, _GhostBN):
            module.ghost_n_real = None if n_real is None else int(n_real)
            count += 1
    return count


@contextmanager
def ghost_split(model: nn.Module, n_real: int) -> Iterator[nn.Module]:
    """Context manager: :func:`set_ghost_split` on entry, restore the previous splits on exit."""
    previous = [(m, m.ghost_n_real) for m in model.modules() if isinstance(m, _GhostBN)]
    set_ghost_split(model, n_real)
    try:
        yield model
    finally:
        for module, value in previous:
            module.ghost_n_real = value


def _convert_one(bn: nn.BatchNorm1d | nn.BatchNorm2d, detach_ghost_stats: bool) -> nn.Module:
    cls = GhostBatchNorm1d if type(bn) is nn.BatchNorm1d else GhostBatchNorm2d
    new = cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        detach_ghost_stats=detach_ghost_stats,
    )
    # Share (not copy) parameters and buffers: an optimiser built before the conversion keeps
    # updating the same tensors, and device/dtype carry over.
    for name, p in bn._parameters.items():
        new._parameters[name] = p
    for name, b in bn._buffers.items():
        new._buffers[name] = b
    new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
    new.train(bn.training)
    return new


def convert_batchnorm(model: nn.Module, *, detach_ghost_stats: bool = False) -> nn.Module:
    """Replace every ``nn.BatchNorm1d``/``nn.BatchNorm2d`` in ``model`` by its ghost version.

    Works in place on submodules and returns ``model`` (or the replacement, if ``model`` itself
    is a batch-norm layer). Only exact ``nn.BatchNorm1d/2d`` instances are replaced (not
    subclasses, ghost layers included); parameters and buffers are shared with the new layers,
    so outputs are unchanged until a ghost split is set. Hooks on the replaced layers are lost.
    """
    if type(model) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return _convert_one(model, detach_ghost_stats)  # type: ignore[arg-type]
    converted: dict[int, nn.Module] = {}  # a layer used in two places stays one layer
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
                if id(child) not in converted:
                    converted[id(child)] = _convert_one(child, detach_ghost_stats)  # type: ignore[arg-type]
                setattr(parent, name, converted[id(child)])
    return model
