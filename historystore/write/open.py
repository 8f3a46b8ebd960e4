"""Opening a store for recording: create a new one, or reopen one to resume.

A new store gets its run metadata (tensors with their resolved encodings and chunking, buffers,
optimizer groups and hyperparameter keys, the recorder's config); its arrays are created later
by the writer (thread or process), so training starts meanwhile. Resuming checks that the model
and optimizer are the ones recorded and that the weights are the store's last θ, before a step
is appended.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from .. import tensors
from ..config import RecorderConfig
from ..encodings import get_encoding, resolve
from ..encodings.state import state_plan
from ..errors import ModelMismatchError, RecorderError
from ..meta import layout
from ..meta.commit import Commit
from ..meta.layout import ArrayInfo, RunMeta, TensorInfo
from .writer import create_layout

Named = list[tuple[str, torch.Tensor]]


@dataclass
class OpenedStore:
    """What a recorder writes into: the store's metadata, group and commit record."""

    meta: RunMeta
    group: zarr.Group
    commit: Commit
    buffers: Named  # buffers and untrained parameters, in the store's order
    init_layout: Callable[[], None] | None = None  # creates the arrays (run by the writer)
    last_keyframe: int = -1  # step of the newest committed keyframe (-1: none yet)


def numeric_hparams(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Numeric per-group hyperparameters, flattened to ``g<i>.<key>[.<j>]``."""
    out: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key == "params" or isinstance(value, bool):
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float)):
                out[f"g{i}.{key}"] = float(value)
            elif (
                isinstance(value, (tuple, list))
                and value
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                for j, v in enumerate(value):
                    out[f"g{i}.{key}.{j}"] = float(v)
    return out


class HparamReader:
    """Reads :func:`numeric_hparams`' values at every step, in ``keys`` order, without
    rebuilding the dict: the (group, key, index) of each value is found once and reused while
    every param group is the same dict with the same number of keys (right after a training
    step ``numeric_hparams`` cost ~23 µs, this ~9 µs). Raises :class:`RecorderError` when the
    groups' numeric keys no longer match ``keys``."""

    def __init__(self, optimizer: torch.optim.Optimizer, keys: list[str]) -> None:
        self.optimizer = optimizer
        self.keys = keys
        self._groups: list[tuple[dict[str, Any], int]] = []
        self._where: list[tuple[dict[str, Any], str, int]] = []  # index -1: a scalar

    def read(self) -> list[float]:
        groups = self.optimizer.param_groups
        if len(groups) == len(self._groups) and all(
            g is h and len(g) == n for g, (h, n) in zip(groups, self._groups, strict=True)
        ):
            try:
                return [float(g[k] if j < 0 else g[k][j]) for g, k, j in self._where]
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError):
                pass  # a value changed kind: the general path says how
        hp = numeric_hparams(self.optimizer)
        if sorted(hp) != self.keys:
            raise RecorderError(
                "the optimizer's param groups changed during recording (a group was added or "
                "its keys changed); start a new store for the new optimizer"
            )
        self._groups = [(g, len(g)) for g in groups]
        self._where = []
        for name in self.keys:  # g<i>.<key>[.<j>]; keys may hold dots, indices never do
            gi, _, rest = name[1:].partition(".")
            g = groups[int(gi)]
            key, _, j = rest.rpartition(".")
            if key in g and j.isdigit() and isinstance(g[key], (tuple, list)):
                self._where.append((g, key, int(j)))
            else:
                self._where.append((g, rest, -1))
        return [hp[k] for k in self.keys]


def _static_hparams(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    out = []
    for group in optimizer.param_groups:
        out.append(
            {
                k: v
                for k, v in group.items()
                if k != "params" and (isinstance(v, (bool, str)) or v is None)
            }
        )
    return out


def named_trainable(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's parameters the optimizer trains, in the model's order."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in in_opt]
    known = {id(p) for _, p in named}
    stray = [p for p in in_opt if p not in known]
    if stray:
        raise ModelMismatchError(
            f"the optimizer holds {len(stray)} tensors that are not parameters of the model"
        )
    if not named:
        raise ModelMismatchError("the optimizer holds none of the model's parameters")
    for n, p in named:
        if not p.is_floating_point():
            raise ModelMismatchError(f"parameter {n!r} has non-float dtype {p.dtype}")
    return named


def create_new(
    path: str,
    storage_options: dict[str, Any] | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    params: Named,
    buffers: Named,
    config: RecorderConfig,
    run_config: dict[str, Any],
    *,
    overwrite: bool,
) -> OpenedStore:
    """Write a new store's metadata (replacing an existing store only with ``overwrite``)."""
    if layout.exists(path, storage_options):
        if not overwrite:
            raise RecorderError(
                f"{path} already exists; pass resume=True to append to it or "
                "overwrite=True to replace it"
            )
        p = Path(path)
        if layout.is_local(path):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        # a URL: zarr's mode "w" below deletes every key under the prefix
    cfg = config
    plan = state_plan(cfg.profile, optimizer)
    infos = []
    modules = dict(model.named_modules())
    step_bytes = 0  # host bytes one step takes in a block: the encodings' arrays + state
    row_bytes: list[int] = []
    for n, p in params:
        dtype = tensors.dtype_name(p.dtype)
        enc_name, enc_params, reason = resolve(
            cfg.delta_rules(), n, p, modules.get(n.rpartition(".")[0]), optimizer
        )
        enc = get_encoding(enc_name, tuple(p.shape), dtype, **enc_params)
        nbytes = sum(
            int(np.prod(a.shape, dtype=np.int64)) * np.dtype(layout.storage_dtype(a.dtype)).itemsize
            for a in enc.arrays().values()
        )
        step_bytes += nbytes
        if cfg.optimizer_state == "every_step":  # Adam-like: two state tensors, or v codes
            # (as stored: a small model's writer process gets raw v, 4x that, in its blocks)
            step_bytes += p.numel() if plan else 2 * p.numel() * p.element_size()
        infos.append(
            TensorInfo(
                name=n,
                shape=tuple(p.shape),
                dtype=dtype,
                encoding=enc_name,
                encoding_params=enc.params(),
                encoding_reason=reason,
                codec=cfg.codec,
            )
        )
        row_bytes.append(nbytes)
    spb = cfg.resolve_steps_per_block(step_bytes)
    infos = [
        replace(t, chunk_steps=layout.chunk_steps_for(nb, spb, cfg.chunk_bytes))
        for t, nb in zip(infos, row_bytes, strict=True)
    ]
    meta = RunMeta(
        tensors=infos,
        buffers=[ArrayInfo(n, tuple(b.shape), tensors.dtype_name(b.dtype)) for n, b in buffers],
        optimizer={
            "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "groups": [
                [n for n, p in params if any(p is q for q in g["params"])]
                for g in optimizer.param_groups
            ],
            "static": _static_hparams(optimizer),
        },
        optim_state={},
        hparam_keys=sorted(numeric_hparams(optimizer)),
        config=run_config,
        recorder={
            **cfg.to_json(),
            "steps_per_block": spb,
            "state_plan": state_plan(cfg.profile, optimizer),
        },
    )
    group = layout.open_group(path, "w", storage_options)
    group.update_attributes({layout.ATTR_KEY: meta.to_json()})
    # the arrays are created by the writer before its first block (~40 zarr.json
    # writes, 0.1-0.2 s): training starts meanwhile
    return OpenedStore(
        meta, group, Commit(), buffers, init_layout=lambda: create_layout(group, meta, spb)
    )


def open_existing(
    path: str,
    storage_options: dict[str, Any] | None,
    optimizer: torch.optim.Optimizer,
    params: Named,
    buffers: Named,
) -> OpenedStore:
    """Reopen a store to append to it, after checking that the model, the optimizer and the
    weights are the ones it recorded last."""
    from ..read.store import open_store

    store = open_store(path, storage_options=storage_options)
    meta = store.meta
    recorded = [(t.name, t.shape, t.dtype) for t in meta.tensors]
    current = [(n, tuple(p.shape), tensors.dtype_name(p.dtype)) for n, p in params]
    if recorded != current:
        raise ModelMismatchError(
            f"the model does not match the store {path}: {_first_difference(recorded, current)}"
        )
    cls = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    if cls != meta.optimizer["class"]:
        raise ModelMismatchError(
            f"the store was recorded with {meta.optimizer['class']}, not {cls}"
        )
    if sorted(numeric_hparams(optimizer)) != meta.hparam_keys:
        raise ModelMismatchError("the optimizer's param groups differ from the recorded ones")
    t = store.num_steps
    last = store.params_at(t)
    for n, p in params:
        if not torch.equal(
            p.detach().cpu().view(tensors.int_view_dtype(p.dtype)),
            last[n].view(tensors.int_view_dtype(p.dtype)),
        ):
            raise ModelMismatchError(
                f"parameter {n!r} differs from the store's θ_{t}: restore the model first "
                "with open_store(path).restore(model, optimizer)"
            )
    stored = {b.name: b for b in meta.buffers}
    current_bufs = dict(buffers)
    missing = sorted(set(stored) - set(current_bufs))
    if missing:
        raise ModelMismatchError(
            f"the model lacks the recorded buffers/untrained parameters {missing}"
        )
    return OpenedStore(
        meta,
        layout.open_group(path, "r+", storage_options),
        store.commit,
        [(n, current_bufs[n]) for n in stored],  # the store's list decides
        last_keyframe=int(store.keyframe_steps[-1]),
    )


def _first_difference(a: list[Any], b: list[Any]) -> str:
    names_a = {x[0]: x for x in a}
    names_b = {x[0]: x for x in b}
    for name in names_a:
        if name not in names_b:
            return f"parameter {name!r} is recorded but not in the model"
    for name in names_b:
        if name not in names_a:
            return f"parameter {name!r} is in the model but not recorded"
    for name, x in names_a.items():
        if x != names_b[name]:
            return f"parameter {name!r}: store has shape/dtype {x[1:]}, model {names_b[name][1:]}"
    return "parameter order differs"
