"""Exact replay: θ_t rebuilt from the nearest keyframe ≤ t.

The stored deltas are added in step order and then the step's sparse exact-replay corrections
(the fixes: the exact bits of the elements float32 addition got wrong) are written over them, so
lossless tensors come back bit for bit. :class:`~.store.HistoryStore` exposes this as
``params_at``, ``replay`` and ``fixes``; the scan uses :func:`params_along`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import tensors
from ..errors import EncodingError

if TYPE_CHECKING:
    from .store import HistoryStore, StepBlock


def fixes(
    store: HistoryStore, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact-replay corrections of steps [start, stop): (offsets, tensor, index, bits)."""
    a, b = int(store._fix_off[start]), int(store._fix_off[stop])
    off = store._fix_off[start : stop + 1] - a
    return (
        off,
        store._read("fixes/tensor", a, b),
        store._read("fixes/index", a, b),
        store._read("fixes/bits", a, b),
    )


def params_at(
    store: HistoryStore,
    t: int,
    names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """θ_t (``params_at(0)`` initial, ``params_at(num_steps)`` final weights)."""
    t = store._check_step(t, store.num_steps)
    names = store._names(names)
    k = store._keyframe_index(t)
    if t != store.keyframe_steps[k]:
        for n in names:
            enc = store.encodings[n]
            if "dense" not in enc.capabilities:
                raise EncodingError(
                    f"θ_{t} of {n!r} cannot be rebuilt: its encoding {enc.name!r} cannot be "
                    f"decoded, so θ is known only at keyframes {store.keyframe_steps.tolist()}"
                )
    theta = {n: v.to(device) for n, v in store.keyframe(k, names).items()}
    replay(store, theta, int(store.keyframe_steps[k]), t)
    return theta


def replay(store: HistoryStore, theta: dict[str, torch.Tensor], start: int, stop: int) -> None:
    """Advance ``theta`` (θ_start, in place) to θ_stop, exactly for lossless tensors."""
    if stop <= start:
        return
    spb = store.steps_per_block
    b0 = start
    while b0 < stop:  # block-aligned reads; ``start`` may sit inside a block
        b1 = min(stop, (b0 // spb + 1) * spb)
        off, ften, fidx, fbits = fixes(store, b0, b1)
        deltas = {n: store._dense(n, b0, b1, theta[n].device) for n in theta}
        for i in range(b1 - b0):
            for n, th in theta.items():
                th.add_(deltas[n][i])
            lo, hi = int(off[i]), int(off[i + 1])
            if hi > lo:
                apply_fixes(theta, store.tensor_names, ften[lo:hi], fidx[lo:hi], fbits[lo:hi])
        b0 = b1


def params_along(
    store: HistoryStore, block: StepBlock, theta: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """[steps + 1, *shape] θ_t of one block, exactly as :func:`params_at` rebuilds them: a
    lossy tensor's row at a keyframe step is the keyframe (the recorder's error feedback
    restarts from it there), as replaying from that keyframe would give."""
    out = {}
    for n, th in theta.items():
        p = torch.empty((block.num_steps + 1, *th.shape), dtype=th.dtype, device=th.device)
        p[0] = th
        out[n] = p
    lossy = [n for n in out if not store.encodings[n].lossless]
    kf = {int(k) for k in store.keyframe_steps} if lossy else set()
    off, ften, fidx, fbits = fixes(store, block.start, block.stop)
    for i in range(block.num_steps):
        for n, p in out.items():
            torch.add(p[i], block.deltas[n][i], out=p[i + 1])
        lo, hi = int(off[i]), int(off[i + 1])
        if hi > lo:
            row = {n: p[i + 1] for n, p in out.items()}
            apply_fixes(row, store.tensor_names, ften[lo:hi], fidx[lo:hi], fbits[lo:hi])
        if block.start + i + 1 in kf:
            k = store._keyframe_index(block.start + i + 1)
            for n, v in store.keyframe(k, lossy).items():
                out[n][i + 1].copy_(v)
    return out


def apply_fixes(
    theta: dict[str, torch.Tensor],
    names: list[str],
    ften: np.ndarray,
    fidx: np.ndarray,
    fbits: np.ndarray,
) -> None:
    """Write the recorded exact bits over the elements one step's addition got wrong."""
    for ti in np.unique(ften):
        name = names[int(ti)]
        th = theta.get(name)
        if th is None:
            continue
        sel = ften == ti
        it = tensors.int_view_dtype(th.dtype)
        np_it = {torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}[it]
        bits = torch.from_numpy(fbits[sel].astype(np_it)).to(th.device)
        idx = torch.from_numpy(fidx[sel]).to(th.device)
        th.view(-1).view(it)[idx] = bits
