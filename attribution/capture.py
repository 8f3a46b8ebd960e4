"""Which layers are explained, and their inputs and outputs on the test points.

:func:`resolve_layers` turns module paths into :class:`LayerSpec` (adapter, recorded weight
and bias); :func:`capture_layers` runs the final model once, in eval mode without gradients,
with forward hooks that keep each explained layer's input a and real output z. A layer the
forward pass does not call exactly once cannot be explained (it is skipped when the layers were
chosen automatically); an error inside the forward pass names the module that raised it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from historystore.read.store import HistoryStore

from .layers import adapter_for, registered_types
from .methods.base import LayerSpec


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
                f"{registered_types()}); add one with attribution.register_adapter"
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


@dataclass
class Captured:
    """One forward pass: each explained layer's input a and output z (on the engine's device),
    the model's output y, and the layers that could not be explained (name -> why)."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    y: Any
    skipped: dict[str, str]


def capture_layers(
    model: nn.Module,
    layers: list[LayerSpec],
    x: torch.Tensor,
    device: torch.device,
    *,
    auto_layers: bool,
) -> Captured:
    """Inputs a and outputs z of every explained layer on the final model. A layer not called
    exactly once raises, unless the layers were chosen automatically (``auto_layers``) and
    others remain: then it is reported in ``skipped``."""
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    calls: dict[str, int] = {}

    def hook(spec: LayerSpec, _m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        calls[spec.name] = calls.get(spec.name, 0) + 1
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"layer {spec.name!r} returned {type(out).__name__}, not a tensor")
        got[spec.name] = (spec.adapter.input_of(args).detach(), out.detach())

    handles = [s.module.register_forward_hook(functools.partial(hook, s)) for s in layers]
    param = next(model.parameters(), None)
    if param is not None:  # e.g. float64 numpy test data for a float32 model
        x = x.to(param.device, param.dtype if x.is_floating_point() else x.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = forward(model, x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    bad = {
        s.name: "not called by the model's forward pass"
        if s.name not in calls
        else f"called {calls[s.name]} times per forward pass (shared weights: its "
        "preactivation is not one map)"
        for s in layers
        if calls.get(s.name, 0) != 1
    }
    if bad and (not auto_layers or len(bad) == len(layers)):
        raise ValueError(
            "cannot explain " + "; ".join(f"layer {n!r}: {why}" for n, why in bad.items())
        )
    inputs = {n: a.to(device) for n, (a, _) in got.items() if n not in bad}
    outputs = {n: z.to(device) for n, (_, z) in got.items() if n not in bad}
    return Captured(inputs, outputs, y, bad)


def forward(model: nn.Module, x: torch.Tensor) -> Any:
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
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(functools.partial(pre, name)))
        handles.append(m.register_forward_hook(functools.partial(post, name)))
    try:
        return model(x)
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
