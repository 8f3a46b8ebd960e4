"""Exact replay: lossless deltas plus the sparse corrections that make replay bit-exact.

Δ_t is taken against the recorder's copy of θ_t, and wherever ``fl(θ_t + Δ_t)`` misses θ_{t+1}
bit for bit (about 1 element in 2,000 in float32, when the subtraction rounds), the exact bits
of θ_{t+1} are stored as a sparse correction. The reader replays ``θ_{t+1} = fix(θ_t + Δ_t)``,
which equals the trained weights bit for bit at every t.

Why one flat buffer per dtype: the check costs a handful of whole-model tensor ops per step
(gather θ, subtract, add back, compare bits, one ``any``) instead of five small ops and a
device sync per tensor, which dominated ``rec.step`` for models of many small tensors. On CUDA
the deltas go to the pinned block rows through :class:`~.transfer.HostCopier` (a side
stream), so the training stream never waits for a device→host copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import tensors
from .transfer import HostCopier


@dataclass
class Fixes:
    """Exact-replay corrections of the steps of one block, in step order."""

    tensor: list[np.ndarray] = field(default_factory=list)
    index: list[np.ndarray] = field(default_factory=list)
    bits: list[np.ndarray] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # corrections per step

    def mark(self) -> tuple[int, int]:
        return len(self.index), len(self.counts)

    def rollback(self, mark: tuple[int, int]) -> None:
        """Drop what a failed step added (the steps before it stay valid)."""
        del self.tensor[mark[0] :], self.index[mark[0] :], self.bits[mark[0] :]
        del self.counts[mark[1] :]

    def add(self, tensor: np.ndarray, index: np.ndarray, bits: np.ndarray) -> None:
        """Corrections of the newest step (its count is ``counts[-1]``)."""
        self.tensor.append(tensor)
        self.index.append(index)
        self.bits.append(bits.astype(np.uint64) & _mask(bits.dtype))
        self.counts[-1] += len(index)


class _Group:
    """The lossless tensors of one dtype, gathered into flat buffers."""

    def __init__(self, members: list[int], params: list[torch.Tensor]) -> None:
        self.members = members
        self.sizes = [params[i].numel() for i in members]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        first = params[members[0]]
        self.int_dtype = tensors.int_view_dtype(first.dtype)
        self.prev = torch.cat([params[i].detach().reshape(-1) for i in members])
        self.cur = torch.empty_like(self.prev)
        # CPU: one reused delta buffer; CUDA: a fresh one per step (the side stream's copy of
        # it may still run; the caching allocator recycles it after that copy)
        self.delta = torch.empty_like(self.prev) if first.device.type == "cpu" else None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None


class ExactDeltas:
    """Writes lossless Δ_t rows and collects the corrections, all lossless tensors at once."""

    def __init__(
        self, params: list[torch.Tensor], lossless: list[bool], copier: HostCopier
    ) -> None:
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (p, ok) in enumerate(zip(params, lossless, strict=True)):
            if ok:
                by_dtype.setdefault(p.dtype, []).append(i)
        self._groups = [_Group(m, params) for m in by_dtype.values()]
        self._copier = copier

    def record(
        self, params: list[torch.Tensor], rows: list[torch.Tensor | None], fixes: Fixes
    ) -> None:
        """Δ_t of every lossless tensor into ``rows[i]`` (its block row), and its corrections
        into ``fixes`` (a new entry in ``fixes.counts``).

        On CUDA the check of step t is read one step later (or at :meth:`finish`), so that
        the host never waits for the step it has just queued: the GPU is then one step ahead.
        """
        self.finish(fixes)
        fixes.counts.append(0)
        for g in self._groups:
            if g.delta is None:  # CUDA: θ_{t+1} must outlive this step for the late check
                cur = torch.cat([params[i].detach().reshape(-1) for i in g.members])
                delta = cur - g.prev
            else:
                cur = torch.cat([params[i].detach().reshape(-1) for i in g.members], out=g.cur)
                delta = torch.sub(cur, g.prev, out=g.delta)
            recon = g.prev.add_(delta)  # θ_t is not needed any more: fl(θ_t + Δ_t) in place
            bad = recon.view(g.int_dtype).ne(cur.view(g.int_dtype))
            dst = [rows[i] for i in g.members]
            srcs = [
                delta[int(a) : int(a) + s].view(r.shape)  # type: ignore[union-attr]
                for a, s, r in zip(g.offsets[:-1], g.sizes, dst, strict=True)
            ]
            self._copier.copy(dst, srcs, snapshot=False)  # type: ignore[arg-type]
            g.prev, g.cur = cur, g.prev  # θ_{t+1} is the next step's θ_t
            # on CUDA read at the start of the next step, before prev (= cur) is updated
            g.pending = (bad, cur)
            if g.delta is not None:
                self._check(g, fixes)

    def finish(self, fixes: Fixes) -> None:
        """Collect the corrections of a step whose check is still pending (CUDA)."""
        for g in self._groups:
            if g.pending is not None:
                self._check(g, fixes)

    @staticmethod
    def _check(g: _Group, fixes: Fixes) -> None:
        assert g.pending is not None
        bad, cur = g.pending
        g.pending = None
        if bad.any():
            idx = bad.nonzero().view(-1)
            bits = cur[idx].view(g.int_dtype).cpu().numpy()
            flat = idx.cpu().numpy().astype(np.int64)
            which = np.searchsorted(g.offsets, flat, side="right") - 1
            fixes.add(np.asarray(g.members, dtype=np.int32)[which], flat - g.offsets[which], bits)

    def theta(self, i: int) -> torch.Tensor | None:
        """The recorder's θ_t of lossless tensor ``i`` (flat, on the device), else None."""
        for g in self._groups:
            if i in g.members:
                j = g.members.index(i)
                a = int(g.offsets[j])
                return g.prev[a : a + g.sizes[j]]
        return None


def _mask(dtype: np.dtype) -> np.uint64:
    return np.uint64((1 << (8 * np.dtype(dtype).itemsize)) - 1)
