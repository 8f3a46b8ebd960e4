"""Optimizer state: its layout (discovered at the first step that has it) and its capture.

The layout is the optimizer's own per-parameter state (``exp_avg``, ``step``, ...), found when
it first appears: at the first step, or later for a parameter without a gradient until then
(frozen during a warm-up), whose earlier rows read as zeros. The storage plan of the profile
(:mod:`historystore.encodings.state`) drops keys the reader derives and narrows others
(bfloat16); ``meta.optim_state`` lists what is *stored*. Per step the capture is one batched
copy of every state tensor into its block row (no Python work per element, one call for all
tensors), with the layout checked only by each state's key count.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from .. import tensors
from ..encodings.state import BF16, DERIVED, LOG8, LOGRANGE, log8_encode, log8_shape
from ..errors import RecorderError
from ..meta.layout import ArrayInfo, RunMeta
from .transfer import HostCopier

_Value = torch.Tensor | int | float


class StateCapture:
    def __init__(
        self,
        names: list[str],
        params: list[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        meta: RunMeta,
        plan: dict[str, str],
        steps_per_block: int,
        copier: HostCopier,
        alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor],
        workspace: tensors.Workspace | None = None,
    ) -> None:
        self.names = names
        self.params = params
        self.optimizer = optimizer
        self.meta = meta
        self.plan = plan
        self.spb = steps_per_block
        self.copier = copier
        self.alloc = alloc  # block rows: shared with a writer process, or pinned on CUDA
        # with a writer process, LOG8 keys go to the block raw and the writer codes them per
        # block (encodings.state.log8_rows), off the training thread; otherwise they are coded
        # here (on CUDA on the device) and the block holds uint8 codes. The recorder sets it.
        self.defer_log8 = False
        self._log8: set[str] = set()  # stored names of LOG8 keys
        # per tensor: [(optimizer key, stored name)] of the stored keys, and the key count
        self._keys: list[list[tuple[Any, str]] | None] = [None] * len(params)
        self._count: list[int] = [0] * len(params)
        # LOG8 keys: this block's codes of the previous step and range, per (tensor, key)
        self._ref: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        # log8 scratch, shared by the tensors in turn (and with the recorder's lossy coding,
        # which runs before the state capture in each step)
        self._work = workspace or tensors.Workspace()
        self._plan: _Plan | None = None  # the copies of the last step, while they still hold

    @staticmethod
    def _values(state: dict[Any, Any]) -> dict[Any, _Value]:
        return {k: v for k, v in state.items() if isinstance(v, (torch.Tensor, int, float))}

    def _layout(self, i: int, state: dict[Any, Any]) -> None:
        """Learn (or check) tensor ``i``'s state layout; new keys extend ``meta.optim_state``."""
        name = self.names[i]
        values = self._values(state)
        stored = [(k, str(k).replace("/", "_")) for k in values if self.plan.get(str(k)) != DERIVED]
        self._log8 |= {sname for k, sname in stored if self.plan.get(str(k)) == LOG8}
        specs = self.meta.optim_state.get(name)
        if specs is None:
            specs = []
            for k, sname in stored:
                v = values[k]
                how = self.plan.get(str(k)) if isinstance(v, torch.Tensor) else None
                if how is not None and (not v.is_floating_point() or v.dim() == 0):
                    raise RecorderError(f"state {k!r} of {name!r} cannot be stored as {how}")
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else ()
                if not isinstance(v, torch.Tensor):
                    dtype = "float64"
                elif how in (BF16, LOG8):
                    dtype = BF16 if how == BF16 else "uint8"
                else:
                    dtype = tensors.dtype_name(v.dtype)
                specs.append(ArrayInfo(sname, shape, dtype))
                if how == LOG8:
                    specs.append(ArrayInfo(sname + LOGRANGE, log8_shape(shape), "float32"))
            self.meta.optim_state[name] = specs
        elif sorted(s.name for s in specs if not s.name.endswith(LOGRANGE)) != sorted(
            sname for _, sname in stored
        ):
            raise RecorderError(
                f"the optimizer state of {name!r} changed its keys during recording "
                f"({sorted(map(str, state))} vs {[s.name for s in specs]})"
            )
        self._keys[i] = stored
        self._count[i] = len(values)

    def capture(self, states: dict[str, dict[str, torch.Tensor]], slot: int) -> None:
        """The state after this step into row ``slot`` of the block's ``states`` buffers."""
        plan = self._plan
        if plan is not None and plan.holds(self.optimizer.state):
            views = plan.views.get(id(states))
            if views is not None:
                dst = views[slot]
                if dst is None:  # row views made once per pooled buffer and slot
                    dst = views[slot] = [r[slot] for r in plan.rows[id(states)]]
                self.copier.copy(dst, plan.src, snapshot=True)
                return
        self._capture(states, slot)

    def _capture(self, states: dict[str, dict[str, torch.Tensor]], slot: int) -> None:
        """:meth:`capture` key by key (layout checks, allocation, coding); it leaves a
        :class:`_Plan` for the next steps when every stored key is a plain tensor copy."""
        ostate = self.optimizer.state
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        simple = True  # only plain copies: the plan can repeat them
        checks: list[tuple[torch.Tensor, dict[Any, Any], int, list[tuple[Any, torch.Tensor]]]] = []
        missing: list[torch.Tensor] = []
        coded_dst: list[torch.Tensor] = []  # narrowed on the device: fresh tensors
        coded_src: list[torch.Tensor] = []
        for i, p in enumerate(self.params):
            st = ostate.get(p)
            if not st:
                if self._keys[i]:
                    raise RecorderError(
                        f"the optimizer state of {self.names[i]!r} disappeared during recording"
                    )
                missing.append(p)
                continue
            if self._keys[i] is None or len(st) != self._count[i]:
                self._layout(i, st)
            bufs = states.setdefault(self.names[i], {})
            same: list[tuple[Any, torch.Tensor]] = []
            checks.append((p, st, len(st), same))
            for k, sname in self._keys[i] or ():
                v = st[k]
                buf = bufs.get(sname)
                if buf is None:
                    buf = bufs[sname] = self._alloc(i, sname, slot)
                if not isinstance(v, torch.Tensor):
                    buf[slot] = float(v)
                    simple = False
                elif self.plan.get(str(k)) == LOG8 and not self.defer_log8:
                    simple = False
                    rname = sname + LOGRANGE
                    rbuf = bufs.get(rname)
                    if rbuf is None:
                        rbuf = bufs[rname] = self._alloc(i, rname, slot)
                    ref = self._ref.get((i, sname)) if slot else None
                    shape, dev = (v.numel(),), v.device
                    work = (
                        self._work.get(shape, torch.float32, dev, 0),
                        self._work.get(shape, torch.float32, dev, 1),
                    )
                    codes, rng, intra = log8_encode(
                        v.detach(), None if ref is None else ref[1], work
                    )
                    stored = codes if intra else codes - ref[0]  # uint8: wraps mod 256
                    self._ref[(i, sname)] = (codes, rng)
                    coded_dst += [buf[slot], rbuf[slot]]
                    coded_src += [stored, rng]
                elif v.device.type != self.copier.device.type:  # e.g. Adam's CPU step count
                    buf[slot].copy_(v.detach())
                    simple = False
                else:
                    dst.append(buf[slot])
                    src.append(v.detach())
                    rows.append(buf)
                    same.append((k, v))
        self.copier.copy(dst, src, snapshot=True)
        self.copier.copy(coded_dst, coded_src, snapshot=False)
        if not simple:
            self._plan = None
            return
        plan = self._plan
        # the same state tensors (not their detached views, new objects at every call): keep
        # the plan, and with it the row views of the other pooled block buffers
        if plan is None or plan.held != _Plan.held_ids(checks):
            plan = self._plan = _Plan(src, checks, missing)
        plan.rows[id(states)] = rows
        plan.views[id(states)] = [None] * self.spb

    def _alloc(self, i: int, sname: str, slot: int) -> torch.Tensor:
        spec = next(s for s in self.meta.optim_state[self.names[i]] if s.name == sname)
        dtype = tensors.torch_dtype(spec.dtype)
        if self.defer_log8 and sname in self._log8:
            dtype = self.params[i].dtype  # raw v: the writer stores its codes
        buf = self.alloc((self.spb, *spec.shape), dtype)
        buf[:slot] = 0  # the rows before a late first state read as zeros
        return buf


class _Plan:
    """The state copies of a step, repeated while the optimizer keeps the same tensors.

    Why: optimizers update their state in place, so after the first step a capture is the
    same list of copies; checking that costs a few identity tests per tensor, where the key
    by key walk (layout checks, a view per row) cost ~0.2 ms per step on a small model."""

    def __init__(
        self,
        src: list[torch.Tensor],
        checks: list[tuple[torch.Tensor, dict[Any, Any], int, list[tuple[Any, torch.Tensor]]]],
        missing: list[torch.Tensor],
    ) -> None:
        self.src = src
        self.held = self.held_ids(checks)  # the state tensors (not detached views of them)
        self.missing = missing  # params without state yet: a state appearing ends the plan
        self.rows: dict[int, list[torch.Tensor]] = {}  # id(block states) -> buffer per src
        self.views: dict[int, list[list[torch.Tensor] | None]] = {}  # ... -> row views per slot
        # checks (param, its state dict, its key count, [(key, tensor)]) as flat lists, tested
        # with map(): C loops (a Python loop over every tensor and key cost ~30 µs per step
        # right after a training step). Optimizer state is a dict per param (torch's contract).
        self._params = [p for p, _, _, _ in checks]
        self._dicts = [st for _, st, _, _ in checks]
        self._lens = [n for _, _, n, _ in checks]
        self._key_dicts = [st for _, st, _, same in checks for _ in same]
        self._keys = [k for _, _, _, same in checks for k, _ in same]
        self._tensors = [v for _, _, _, same in checks for _, v in same]

    @staticmethod
    def held_ids(checks: list[tuple[Any, Any, Any, list[tuple[Any, torch.Tensor]]]]) -> list[int]:
        return [id(v) for _, _, _, same in checks for _, v in same]

    def holds(self, ostate: Any) -> bool:
        if self.missing and any(map(ostate.get, self.missing)):
            return False
        return (
            all(map(operator.is_, map(ostate.get, self._params), self._dicts))
            and list(map(len, self._dicts)) == self._lens
            and all(map(operator.is_, map(dict.get, self._key_dicts, self._keys), self._tensors))
        )
