"""Putting a recorded state back into live objects: ``check_model`` and ``restore``.

``restore`` loads θ_step and the keyframe's buffers into a model and, to resume training, the
optimizer's recorded state and hyperparameters after step-1. :class:`~.store.HistoryStore`
exposes both as methods.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from .. import tensors
from ..errors import ModelMismatchError

if TYPE_CHECKING:
    from .store import HistoryStore


def check_model(store: HistoryStore, model: torch.nn.Module) -> None:
    """Raise ModelMismatchError unless the model has the recorded tensors."""
    params = dict(model.named_parameters())
    for t in store.meta.tensors:
        p = params.get(t.name)
        if p is None:
            raise ModelMismatchError(
                f"the model has no parameter {t.name!r} recorded in {store.path}"
            )
        if tuple(p.shape) != t.shape or tensors.dtype_name(p.dtype) != t.dtype:
            raise ModelMismatchError(
                f"parameter {t.name!r}: store has {t.shape} {t.dtype}, model has "
                f"{tuple(p.shape)} {tensors.dtype_name(p.dtype)}"
            )


def restore(
    store: HistoryStore,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
) -> None:
    """Load θ_step (default: the last step) and buffers into ``model``; with an optimizer,
    also its recorded state and hyperparameters after step-1 (to resume training)."""
    step = store.num_steps if step is None else store._check_step(step, store.num_steps)
    check_model(store, model)
    theta = store.params_at(step)
    params = dict(model.named_parameters())
    # buffers and untrained parameters are saved at keyframes only
    targets = {**params, **dict(model.named_buffers())}
    kf = int(store.keyframe_steps[store._keyframe_index(step)])
    if kf != step and store.meta.buffers:
        warnings.warn(
            f"{store.path}: no keyframe at step {step} (the recorder did not close cleanly, "
            f"or step is between keyframes): buffers such as BatchNorm statistics come from "
            f"step {kf}",
            stacklevel=3,  # the caller of HistoryStore.restore
        )
    with torch.no_grad():
        for n, v in theta.items():
            params[n].copy_(v)
        for n, v in store.buffers_at(step).items():
            if n in targets:
                targets[n].copy_(v)
    if optimizer is not None and step > 0:
        _restore_optimizer(store, optimizer, params, step - 1)


def _restore_optimizer(
    store: HistoryStore,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    t: int,
) -> None:
    state = store.optimizer_state(t) if store.meta.optim_state else {}
    for name, st in state.items():
        p = params[name]
        dst = optimizer.state[p]
        for k, v in st.items():
            dst[k] = v.to(p.device).clone() if v.dim() or k != "step" else v.clone()
    hp = {k: float(v[t]) for k, v in store._hparams.items()}
    for i, g in enumerate(optimizer.param_groups):
        for key, value in list(g.items()):
            if key == "params":
                continue
            if f"g{i}.{key}" in hp:
                g[key] = (
                    type(value)(hp[f"g{i}.{key}"])
                    if isinstance(value, (int, float))
                    else hp[f"g{i}.{key}"]
                )
            elif isinstance(value, tuple) and f"g{i}.{key}.0" in hp:
                g[key] = tuple(hp[f"g{i}.{key}.{j}"] for j in range(len(value)))
