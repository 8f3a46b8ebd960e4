"""Layer adapters: how a layer's preactivation depends on the one weight tensor it is linear in.

The preactivation decomposition needs, for a block of S weight deltas Δ_1..Δ_S and a batch of
B captured layer inputs a, the per-step contributions f(Δ_s, a_b) where the layer computes
z = f(W, a) + bias(b) with f linear in W. An adapter computes exactly that for one module type,
for all S steps at once (one GEMM or one convolution, not S small calls), so the engine never
needs to know the layer's algebra.

Layout: contributions are ``[B, S, *out_shape]`` (batch-major), the layout a GEMM against the
stacked deltas and a convolution with S·out output channels produce without a copy; the
inner products over the output that follow are then contiguous batched matmuls.

Built in: ``nn.Linear`` (any leading dims) and ``nn.Conv1d/2d/3d`` (stride, dilation, groups,
every padding mode). Other modules are added with :func:`register_adapter`::

    class ScaleAdapter(LayerAdapter):          # y = x * w + b, elementwise
        bias_dim = -1
        def contributions(self, module, weights, inputs):
            return inputs[:, None] * weights[None]      # [B, S, features]

    register_adapter(Scale, ScaleAdapter())
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class LayerAdapter(ABC):
    """How to decompose one module type's preactivation. Subclass and register an instance.

    ``weight``/``bias`` name the module's parameters (``bias`` may be absent on a module);
    ``bias_dim`` is the axis of the per-example output (without the batch axis) along which the
    bias is added (-1 for features-last layers, 0 for channels-first convolutions).
    """

    weight: str = "weight"
    bias: str | None = "bias"
    bias_dim: int = -1

    @abstractmethod
    def contributions(
        self, module: nn.Module, weights: torch.Tensor, inputs: torch.Tensor
    ) -> torch.Tensor:
        """f(W_s, a_b) for a stack of weights ``[S, *weight_shape]`` and inputs ``[B, ...]``:
        a tensor ``[B, S, *out_shape]`` without the bias (the module's own parameters are not
        used; ``module`` only supplies hyperparameters such as stride)."""

    def bias_contributions(
        self, module: nn.Module, biases: torch.Tensor, out_shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The bias term for a stack of biases ``[S, *bias_shape]``: a tensor broadcastable to
        ``[B, S, *out_shape]`` (by default the bias vector is added along ``bias_dim``)."""
        s = biases.shape[0]
        shape = [1, s] + [1] * len(out_shape)
        dim = self.bias_dim % len(out_shape)
        shape[2 + dim] = out_shape[dim]
        return biases.reshape(shape)

    def step_contributions(
        self,
        module: nn.Module,
        weights: torch.Tensor,
        biases: torch.Tensor | None,
        inputs: torch.Tensor,
    ) -> torch.Tensor:
        """c_s = f(W_s, a_b) + bias(b_s) as ``[B, S, *out_shape]`` (biases may be None).
        Override to fuse the bias into the main call; the default adds it afterwards."""
        c = self.contributions(module, weights, inputs)
        if biases is None:
            return c
        return c + self.bias_contributions(module, biases, tuple(c.shape[2:]))

    def input_of(self, args: tuple[Any, ...]) -> torch.Tensor:
        """The input a the preactivation is linear in, from the module's forward arguments."""
        return args[0]

    def describe(self) -> str:
        return type(self).__name__


class _FusedBiasAdapter(LayerAdapter):
    """Adapters whose one call computes f(W_s, a) + b_s: the bias-free form is that call."""

    def contributions(
        self, module: nn.Module, weights: torch.Tensor, inputs: torch.Tensor
    ) -> torch.Tensor:
        return self.step_contributions(module, weights, None, inputs)


class LinearAdapter(_FusedBiasAdapter):
    """``nn.Linear``: z = a Wᵀ + b; a block is one GEMM ``[B·L, in] × [in, S·out]`` with the
    bias fused in (addmm)."""

    bias_dim = -1

    def step_contributions(
        self,
        module: nn.Module,
        weights: torch.Tensor,
        biases: torch.Tensor | None,
        inputs: torch.Tensor,
    ) -> torch.Tensor:
        s, out_f, in_f = weights.shape
        b, lead = inputs.shape[0], inputs.shape[1:-1]
        a = inputs.reshape(-1, in_f)
        w = weights.reshape(s * out_f, in_f).T  # a view: BLAS reads it transposed
        y = a @ w if biases is None else torch.addmm(biases.reshape(1, s * out_f), a, w)
        if not lead:
            return y.view(b, s, out_f)
        # [B, L..., S, out] -> [B, S, L..., out]
        y = y.view(b, -1, s, out_f).transpose(1, 2)
        return y.reshape(b, s, *lead, out_f)


class ConvAdapter(_FusedBiasAdapter):
    """``nn.Conv1d/2d/3d``: the block's S deltas become S·out output channels of one conv call
    (reordered group-major so that grouped convolutions stay correct), bias fused in."""

    bias_dim = 0

    def step_contributions(
        self,
        module: nn.Module,
        weights: torch.Tensor,
        biases: torch.Tensor | None,
        inputs: torch.Tensor,
    ) -> torch.Tensor:
        if not isinstance(module, nn.modules.conv._ConvNd):
            raise TypeError(f"ConvAdapter needs a convolution, got {type(module).__name__}")
        s, out_ch = weights.shape[0], weights.shape[1]
        g = module.groups

        def group_major(t: torch.Tensor) -> torch.Tensor:
            # [S, g, out/g, ...] -> [g, S, out/g, ...]: output channel block j stays in group j
            if g == 1:
                return t.reshape(s * out_ch, *t.shape[2:])
            rest = t.shape[2:]
            return t.reshape(s, g, out_ch // g, *rest).transpose(0, 1).reshape(-1, *rest)

        w = group_major(weights)
        bias = group_major(biases) if biases is not None else None
        # _conv_forward applies the module's stride/padding/dilation/groups and padding_mode
        y = module._conv_forward(inputs, w, bias)  # type: ignore[operator]
        b, spatial = y.shape[0], y.shape[2:]
        if g == 1:
            return y.view(b, s, out_ch, *spatial)
        y = y.view(b, g, s, out_ch // g, *spatial).transpose(1, 2)
        return y.reshape(b, s, out_ch, *spatial)


_ADAPTERS: dict[type[nn.Module], LayerAdapter] = {}


def register_adapter(module_type: type[nn.Module], adapter: LayerAdapter) -> None:
    """Make modules of ``module_type`` (and its subclasses) explainable with ``adapter``."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(adapter, LayerAdapter):
        raise TypeError(f"adapter must be a LayerAdapter instance, got {adapter!r}")
    _ADAPTERS[module_type] = adapter


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of the nearest registered class in ``module``'s MRO, or None."""
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


def registered_types() -> list[str]:
    return sorted(t.__name__ for t in _ADAPTERS)


register_adapter(nn.Linear, LinearAdapter())
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_adapter(_conv, ConvAdapter())
