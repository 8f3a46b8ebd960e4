"""Read side: ``open_store`` and ``HistoryStore`` (random access and a prefetching scan).

Readers trust only the committed counts in ``/commit``: anything a killed writer left beyond
them is invisible. θ_t is rebuilt from the nearest keyframe ≤ t by replaying the stored deltas
and the sparse exact-replay corrections, so lossless stores replay bit for bit (that replay is in
:mod:`.replay`; putting a recorded state back into a model and optimizer is in :mod:`.restore`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from .. import tensors
from ..encodings import Encoding, get_encoding
from ..encodings import state as optim_state
from ..errors import CorruptStoreError, NotAStoreError
from ..meta import layout
from ..meta.commit import Commit
from ..meta.layout import RunMeta, TensorInfo
from ..meta.validate import validate_store
from . import replay as _replay
from . import restore as _restore


@dataclass(frozen=True)
class Batch:
    """The recorded batch of one step (``lr``: param group 0's learning rate; ``hparams`` holds
    every group's hyperparameters as ``g<i>.<key>``)."""

    step: int
    ids: np.ndarray
    labels: np.ndarray
    ghost_ids: np.ndarray
    loss: float
    lr: float
    hparams: dict[str, float]


@dataclass
class StepBlock:
    """A block of consecutive steps [start, stop) as the scan yields it.

    ``deltas[name]`` is ``[steps, *shape]`` on the scan's device; ``ids``/``labels`` are the
    concatenated example ids with ``offsets`` (``ids[offsets[i]:offsets[i+1]]`` is step
    start+i); ``lr[name]`` the learning rate of each step for that tensor's param group.
    """

    start: int
    stop: int
    deltas: dict[str, torch.Tensor]
    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    lr: dict[str, np.ndarray]
    loss: np.ndarray
    raw: dict[str, dict[str, torch.Tensor]] | None = None
    ghost_ids: np.ndarray | None = None  # ghost examples, ``ghost_offsets`` like ``offsets``
    ghost_offsets: np.ndarray | None = None
    # with ``scan(params=True)``: θ_start ... θ_stop, ``[steps + 1, *shape]`` (exact replay)
    params: dict[str, torch.Tensor] | None = None
    # with ``scan(optim=True)``: optimizer state after each step, ``{name: {key: [steps, ...]}}``
    optim: dict[str, dict[str, torch.Tensor]] | None = None

    @property
    def num_steps(self) -> int:
        return self.stop - self.start

    def step_ids(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]


class HistoryStore:
    """A recorded training history (read-only)."""

    def __init__(
        self,
        path: str,
        group: zarr.Group,
        meta: RunMeta,
        commit: Commit,
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.storage_options = storage_options
        self.group = group
        self.meta = meta
        self.commit = commit
        self.num_steps = commit.num_steps
        self._present: set[str] = set()
        self._chunks = layout.ChunkIndex(group)
        self.tensor_names = [t.name for t in meta.tensors]
        self._index = {t.name: i for i, t in enumerate(meta.tensors)}
        self.encodings: dict[str, Encoding] = {
            t.name: get_encoding(t.encoding, t.shape, t.dtype, **t.encoding_params)
            for t in meta.tensors
        }
        T = self.num_steps
        self._scalars = {k: self._read(f"steps/{k}", 0, T) for k in layout.STEP_SCALARS}
        self.keyframe_steps = self._read("keyframe_steps", 0, commit.num_keyframes)
        self._batch_off = _offsets(self._scalars["batch_size"])
        self._ghost_off = _offsets(self._scalars["ghost_size"])
        self._fix_off = _offsets(self._scalars["num_fixes"])
        self._check_counts()
        self._hparams = {k: self._read(layout.hparam_path(k), 0, T) for k in meta.hparam_keys}
        self._group_of = {n: i for i, names in enumerate(meta.optimizer["groups"]) for n in names}

    # -- low level ---------------------------------------------------------------------------
    def _array(self, path: str) -> zarr.Array:
        try:
            arr = self.group[path]
        except KeyError:
            raise CorruptStoreError(f"{self.path}: array {path!r} is missing") from None
        if not isinstance(arr, zarr.Array):
            raise CorruptStoreError(f"{self.path}: {path!r} is not an array")
        return arr

    def _read(self, path: str, start: int, stop: int) -> np.ndarray:
        arr = self._array(path)
        if arr.shape[0] < stop:
            raise CorruptStoreError(
                f"{self.path}: array {path!r} holds {arr.shape[0]} rows but {stop} are committed"
            )
        if stop > start:
            self._check_present(path, arr, start, stop)
        try:
            return arr[start:stop]
        except (ValueError, RuntimeError, OSError) as e:
            raise CorruptStoreError(
                f"{self.path}: reading {path!r} rows {start}:{stop} failed ({e})"
            ) from e

    def _check_present(self, path: str, arr: zarr.Array, start: int, stop: int) -> None:
        """zarr reads a missing chunk file as zeros; a truncated store must fail loudly."""
        per_file = arr.shards[0] if arr.shards else arr.chunks[0]
        tail = "".join("/0" for _ in arr.shape[1:])
        for i in range(start // per_file, (stop - 1) // per_file + 1):
            key = f"{path}/c/{i}{tail}"
            if key in self._present:
                continue
            if not self._chunks.exists(path, key[len(path) + 1 :]):
                raise CorruptStoreError(
                    f"{self.path}: chunk file {key!r} (rows {i * per_file}-"
                    f"{(i + 1) * per_file - 1}) is missing: the store is truncated"
                )
            self._present.add(key)

    def _check_counts(self) -> None:
        c = self.commit
        for name, total in (
            ("batch_size", c.num_ids),
            ("ghost_size", c.num_ghost_ids),
            ("num_fixes", c.num_fixes),
        ):
            if int(self._scalars[name].sum()) != total:
                raise CorruptStoreError(
                    f"{self.path}: /steps/{name} sums to {int(self._scalars[name].sum())} but "
                    f"the commit says {total}"
                )
        kf = self.keyframe_steps
        if len(kf) == 0 or kf[0] != 0 or np.any(np.diff(kf) <= 0) or kf[-1] > self.num_steps:
            raise CorruptStoreError(f"{self.path}: keyframe steps {kf.tolist()} are inconsistent")

    def _check_step(self, t: int, upto: int) -> int:
        t = int(t)
        if not 0 <= t <= upto:
            raise IndexError(f"step {t} is out of range [0, {upto}] of {self.path}")
        return t

    def _names(self, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return list(self.tensor_names)
        for n in names:
            if n not in self._index:
                raise KeyError(f"no recorded tensor {n!r}; recorded: {self.tensor_names}")
        return list(names)

    # -- properties --------------------------------------------------------------------------
    @property
    def tensors(self) -> list[TensorInfo]:
        return list(self.meta.tensors)

    @property
    def steps_per_block(self) -> int:
        return int(self.meta.recorder["steps_per_block"])

    @property
    def loss(self) -> np.ndarray:
        return self._scalars["loss"]

    def scalars(self, name: str) -> np.ndarray:
        """A per-step scalar array (loss, timestamp, duration, batch_size, ...)."""
        return self._scalars[name]

    def hparam(self, key: str) -> np.ndarray:
        """A per-step hyperparameter ``g<group>.<key>`` (NaN where the optimizer has none)."""
        return self._hparams.get(key, np.full(self.num_steps, np.nan))

    def group_of(self, name: str) -> int:
        """The param group index of recorded tensor ``name``."""
        return self._group_of[name]

    def lr(self, name: str | None = None) -> np.ndarray:
        """Learning rate per step for tensor ``name``'s param group (group 0 by default)."""
        g = self._group_of[name] if name is not None else 0
        return self._hparams.get(f"g{g}.lr", np.full(self.num_steps, np.nan))

    # -- random access -----------------------------------------------------------------------
    def encoded(
        self, name: str, start: int, stop: int, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The encoding's native arrays of steps [start, stop) (factors, sketches, ...)."""
        enc = self.encodings[name]
        out = {}
        for a, spec in enc.arrays().items():
            x = tensors.from_numpy(self._read(layout.param_path(name, a), start, stop), spec.dtype)
            dev = torch.device(device)
            if dev.type == "cuda":
                x = x.pin_memory().to(dev, non_blocking=True)
            out[a] = x
        return out

    def _dense(
        self, name: str, start: int, stop: int, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Dense deltas, decoded on ``device`` (fewer bytes cross to a GPU for compact forms)."""
        enc = self.encodings[name]
        enc.require("dense")
        return enc.decode_block(self.encoded(name, start, stop, device))

    def delta(self, t: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Δ_t = θ_{t+1} − θ_t as stored (dense), keyed like ``model.named_parameters()``."""
        t = self._check_step(t, self.num_steps - 1)
        return {n: self._dense(n, t, t + 1)[0] for n in self._names(names)}

    def keyframe(self, k: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """θ at keyframe row ``k`` (step ``keyframe_steps[k]``)."""
        out = {}
        for n in self._names(names):
            t = self.meta.tensor(n)
            out[n] = tensors.from_numpy(self._read(layout.keyframe_path(n), k, k + 1)[0], t.dtype)
        return out

    def _keyframe_index(self, t: int) -> int:
        """Row of the last keyframe ≤ t."""
        return int(np.searchsorted(self.keyframe_steps, t, side="right") - 1)

    def buffers_at(self, t: int) -> dict[str, torch.Tensor]:
        """Module buffers (e.g. BatchNorm statistics) at the last keyframe ≤ t."""
        k = self._keyframe_index(t)
        return {
            b.name: tensors.from_numpy(self._read(layout.buffer_path(b.name), k, k + 1)[0], b.dtype)
            for b in self.meta.buffers
        }

    def fixes(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Exact-replay corrections of steps [start, stop): (offsets, tensor, index, bits)."""
        return _replay.fixes(self, start, stop)

    def params_at(
        self, t: int, names: Sequence[str] | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """θ_t (``params_at(0)`` initial, ``params_at(num_steps)`` final weights)."""
        return _replay.params_at(self, t, names, device)

    def replay(self, theta: dict[str, torch.Tensor], start: int, stop: int) -> None:
        """Advance ``theta`` (θ_start, in place) to θ_stop, exactly for lossless tensors."""
        _replay.replay(self, theta, start, stop)

    def optimizer_state(self, t: int) -> dict[str, dict[str, torch.Tensor]]:
        """The optimizer's per-parameter state after step t (0 ≤ t < num_steps).

        Under the compact profile the state is served as the optimizer held it: narrowed
        keys (Adam's ``exp_avg_sq``) decoded to the parameter's dtype, and derived keys
        (Adam's ``exp_avg``) computed from Δ_t, θ_t and v_t (see
        :mod:`historystore.encodings.state`; approximate, its error is measured there).
        The same code as ``read_block(t, t + 1, optim=True)``, one row of it."""
        t = self._check_step(t, self.num_steps - 1)
        names = [n for n in self.tensor_names if n in self.meta.optim_state]
        states = self._optim_block(names, t, t + 1, torch.device("cpu"))
        if self._derives(states):
            theta = self.params_at(t, self._derived_names(states))
            deltas = {n: self._dense(n, t, t + 1) for n in theta}
            self._derive(states, t, deltas, {n: th[None] for n, th in theta.items()})
        return {n: {k: v[0] for k, v in st.items()} for n, st in states.items()}

    # -- optimizer state of a block of steps (one implementation for a step and a block) -----
    @property
    def _plan(self) -> dict[str, str]:
        return dict(self.meta.recorder.get("state_plan", {}))

    def _optim_block(
        self, names: Sequence[str], start: int, stop: int, device: torch.device
    ) -> dict[str, dict[str, torch.Tensor]]:
        """The state of ``names`` after steps [start, stop), ``{name: {key: [steps, ...]}}``
        on ``device``: as stored without a plan; under the compact profile decoded (LOG8 code
        differences chained from their block's first step, read from before ``start`` when
        the block begins earlier), with derived keys still absent (see :meth:`_derive`)."""
        plan = self._plan
        out: dict[str, dict[str, torch.Tensor]] = {}
        for n in names:
            if n not in self.meta.optim_state:
                continue
            specs = self.meta.optim_state[n]
            stored = {
                a.name: tensors.from_numpy(
                    self._read(layout.optim_path(n, a.name), start, stop), a.dtype
                ).to(device)
                for a in specs
            }
            if plan:
                stored = optim_state.decode_stored(
                    stored, plan, self.meta.tensor(n).dtype, self._history(n, start, stored)
                )
            out[n] = stored
        return out

    def _history(
        self, name: str, start: int, stored: dict[str, torch.Tensor]
    ) -> Any:  # Callable[[str], torch.Tensor]
        """``history(key)`` for :func:`~historystore.encodings.state.decode_stored`: the rows
        of ``key`` from the intra row at or before ``start`` (at most a block back) through
        the rows read. Nothing more is read when ``start``'s own row starts a range (a block
        read from its first step)."""

        def history(key: str) -> torch.Tensor:
            base = key.removesuffix(optim_state.LOGRANGE)
            rng = stored[base + optim_state.LOGRANGE]
            intra = bool(rng[0].reshape(-1, 3)[0, 2] > 0)
            h0 = start if intra else max(0, start - self.steps_per_block + 1)
            if h0 == start:
                return stored[key]
            before = torch.from_numpy(self._read(layout.optim_path(name, key), h0, start))
            return torch.cat([before.to(stored[key].device), stored[key]])

        return history

    def _derives(self, states: dict[str, dict[str, torch.Tensor]]) -> bool:
        plan = self._plan
        return any(optim_state.derives(plan, st) for st in states.values())

    def _derived_names(self, states: dict[str, dict[str, torch.Tensor]]) -> list[str]:
        plan = self._plan
        return [n for n, st in states.items() if optim_state.derives(plan, st)]

    def _derive(
        self,
        states: dict[str, dict[str, torch.Tensor]],
        start: int,
        deltas: dict[str, torch.Tensor],
        theta: dict[str, torch.Tensor],
    ) -> None:
        """Add the derived keys (Adam's m) to ``states`` of steps [start, start + steps) in
        place, from Δ_t and θ_t (``[steps, *shape]``; θ may hold one row more)."""
        plan = self._plan
        for n, st in states.items():
            if not optim_state.derives(plan, st):
                continue
            s = st["step"].shape[0]
            states[n] = optim_state.with_derived(
                st,
                plan,
                lambda n=n, s=s: {
                    "delta": deltas[n][:s],
                    "theta": theta[n][:s],
                    "hparams": self._adam_hparams(n, start, start + s),
                },
                name=n,
                first=start,
            )

    def _adam_hparams(self, name: str, start: int, stop: int) -> dict[str, Any]:
        """Per-step Adam hyperparameters of ``name``'s group for steps [start, stop)."""
        g = self._group_of[name]
        hp = self._hparams
        return {
            "lr": hp[f"g{g}.lr"][start:stop],
            "betas": (hp[f"g{g}.betas.0"][start:stop], hp[f"g{g}.betas.1"][start:stop]),
            "eps": hp[f"g{g}.eps"][start:stop],
            "weight_decay": hp[f"g{g}.weight_decay"][start:stop],
            "decoupled": optim_state.decoupled(
                self.meta.optimizer["class"], self.meta.optimizer["static"][g]
            ),
        }

    def batch(self, t: int) -> Batch:
        t = self._check_step(t, self.num_steps - 1)
        a, b = int(self._batch_off[t]), int(self._batch_off[t + 1])
        ga, gb = int(self._ghost_off[t]), int(self._ghost_off[t + 1])
        hp = {k: float(v[t]) for k, v in self._hparams.items()}
        return Batch(
            step=t,
            ids=self._read("batch/ids", a, b),
            labels=self._read("batch/labels", a, b),
            ghost_ids=self._read("batch/ghost_ids", ga, gb),
            loss=float(self._scalars["loss"][t]),
            lr=hp.get("g0.lr", float("nan")),
            hparams=hp,
        )

    def batches(
        self, start: int = 0, stop: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, labels, offsets) of steps [start, stop), concatenated."""
        stop = self.num_steps if stop is None else stop
        a, b = int(self._batch_off[start]), int(self._batch_off[stop])
        return (
            self._read("batch/ids", a, b),
            self._read("batch/labels", a, b),
            self._batch_off[start : stop + 1] - a,
        )

    def ghost_batches(
        self, start: int = 0, stop: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ghost ids, offsets) of steps [start, stop), concatenated."""
        stop = self.num_steps if stop is None else stop
        a, b = int(self._ghost_off[start]), int(self._ghost_off[stop])
        return self._read("batch/ghost_ids", a, b), self._ghost_off[start : stop + 1] - a

    # -- streaming ---------------------------------------------------------------------------
    def block_ranges(
        self, start: int = 0, stop: int | None = None, block_steps: int | None = None
    ) -> list[tuple[int, int]]:
        """Step ranges aligned to the store's blocks (whole shards are read once)."""
        stop = self.num_steps if stop is None else stop
        bs = block_steps or self.steps_per_block
        out, t = [], start
        while t < stop:
            end = min(stop, (t // bs + 1) * bs)
            out.append((t, end))
            t = end
        return out

    def read_block(
        self,
        start: int,
        stop: int,
        names: Sequence[str] | None = None,
        device: str | torch.device | None = "cpu",
        dense: bool = True,
        raw: bool = False,
        optim: bool = False,
    ) -> StepBlock:
        """Read and decode steps [start, stop) of the chosen tensors (``optim``: and their
        optimizer state after each step, as :meth:`optimizer_state` serves it: under the
        compact profile decoded, Adam's m derived from θ_t, which this rebuilds from the
        keyframe ≤ start; :meth:`scan` carries θ from block to block instead)."""
        block = self._read_block(start, stop, names, device, dense, raw, optim)
        if block.optim and self._derives(block.optim):
            deltas = self._block_deltas(block, self._derived_names(block.optim))
            dev = block_device(block) if block.deltas else tensors.auto_device(device)
            theta = self.params_at(start, list(deltas), dev)
            rows = _replay.params_along(self, dataclasses.replace(block, deltas=deltas), theta)
            self._derive(block.optim, start, deltas, rows)
        return block

    def _block_deltas(self, block: StepBlock, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Dense deltas of ``names`` in ``block`` (decoded from its raw arrays if the block
        was read without ``dense``)."""
        out = {}
        for n in names:
            if n in block.deltas:
                out[n] = block.deltas[n]
            else:
                assert block.raw is not None
                self.encodings[n].require("dense")
                out[n] = self.encodings[n].decode_block(block.raw[n])
        return out

    def _read_block(
        self,
        start: int,
        stop: int,
        names: Sequence[str] | None,
        device: str | torch.device | None,
        dense: bool,
        raw: bool,
        optim: bool,
    ) -> StepBlock:
        """:meth:`read_block` without the derived optimizer state (the scan adds it once it
        has θ_t)."""
        names = self._names(names)
        dev = tensors.auto_device(device)
        ids, labels, offsets = self.batches(start, stop)
        deltas: dict[str, torch.Tensor] = {}
        raws: dict[str, dict[str, torch.Tensor]] = {}
        for n in names:
            if dense:
                self.encodings[n].require("dense")
            arrays = self.encoded(n, start, stop, dev)
            if raw or not dense:
                raws[n] = arrays
            if dense:
                deltas[n] = self.encodings[n].decode_block(arrays)
        lr = {n: self.lr(n)[start:stop] for n in names}
        states = self._optim_block(names, start, stop, torch.device(dev)) if optim else None
        return StepBlock(
            start,
            stop,
            deltas,
            ids,
            labels,
            offsets,
            lr,
            self._scalars["loss"][start:stop],
            raws if raws else None,
            *self.ghost_batches(start, stop),
            optim=states,
        )

    def scan(
        self,
        start: int = 0,
        stop: int | None = None,
        names: Sequence[str] | None = None,
        *,
        block_steps: int | None = None,
        device: str | torch.device | None = "cpu",
        prefetch: int = 2,
        dense: bool = True,
        raw: bool = False,
        params: bool = False,
        optim: bool = False,
    ) -> Iterator[StepBlock]:
        """Yield blocks of steps in order, reading the next ``prefetch`` blocks in background
        threads while the caller computes on the current one.

        ``params``: each block also carries θ_t of its steps (``block.params``), rebuilt from
        θ_start (read once, replayed from the keyframe ≤ start) plus the decoded deltas and the
        exact-replay fixes, so methods that need θ_t along the path read nothing twice.
        ``optim``: each block also carries the optimizer state after each of its steps
        (``block.optim``), as :meth:`optimizer_state` serves it (under the compact profile
        decoded, Adam's m derived from the same θ_t)."""
        blocks = self._scan(start, stop, names, block_steps, device, prefetch, dense, raw, optim)
        theta: dict[str, torch.Tensor] | None = None
        for block in blocks:
            derive = bool(block.optim) and self._derives(block.optim)  # type: ignore[arg-type]
            if not params and not derive:
                yield block
                continue
            deltas = self._block_deltas(block, list(block.deltas) if params else [])
            if derive:
                assert block.optim is not None
                deltas.update(self._block_deltas(block, self._derived_names(block.optim)))
            src = dataclasses.replace(block, deltas=deltas)
            if theta is None:
                theta = self.params_at(block.start, list(deltas), block_device(src))
            rows = _replay.params_along(self, src, theta)
            if derive:
                assert block.optim is not None
                self._derive(block.optim, block.start, deltas, rows)
            if params:
                block.params = rows
            theta = {n: p[-1].clone() for n, p in rows.items()}
            yield block

    def _scan(
        self,
        start: int,
        stop: int | None,
        names: Sequence[str] | None,
        block_steps: int | None,
        device: str | torch.device | None,
        prefetch: int,
        dense: bool,
        raw: bool,
        optim: bool,
    ) -> Iterator[StepBlock]:
        ranges = self.block_ranges(start, stop, block_steps)
        if prefetch < 1:
            for a, b in ranges:
                yield self._read_block(a, b, names, device, dense, raw, optim)
            return
        with ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="historystore-scan") as ex:
            pending: list[Future[StepBlock]] = []
            it = iter(ranges)
            for a, b in it:
                pending.append(ex.submit(self._read_block, a, b, names, device, dense, raw, optim))
                if len(pending) > prefetch:
                    break
            while pending:
                fut = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(
                        ex.submit(
                            self._read_block, nxt[0], nxt[1], names, device, dense, raw, optim
                        )
                    )
                yield fut.result()

    # -- models (see restore.py) -------------------------------------------------------------
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ModelMismatchError unless the model has the recorded tensors."""
        _restore.check_model(self, model)

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        step: int | None = None,
    ) -> None:
        """Load θ_step (default: the last step) and buffers into ``model``; with an optimizer,
        also its recorded state and hyperparameters after step-1 (to resume training)."""
        _restore.restore(self, model, optimizer, step)

    def encoding_error(self) -> np.ndarray:
        """[steps, tensors, 2] relative error of each decoded Δ_t and of the replayed θ_(t+1)
        (NaN for lossless tensors and for encodings that cannot be decoded)."""
        return self._read("steps/encoding_error", 0, self.num_steps)

    def nonfinite(self) -> np.ndarray:
        """[steps, tensors] NaN/inf counts of the deltas."""
        return self._read("steps/nonfinite", 0, self.num_steps)

    def to_xarray(self, names: Sequence[str] | None = None) -> Any:
        """The history as a lazy ``xarray.Dataset`` with named dimensions (``step``,
        ``keyframe``, ``sample``, ``<tensor>.dim<i>``): ``delta.<tensor>``,
        ``keyframe.<tensor>``, ``optim.<tensor>.<key>``, per-step scalars, ids and labels,
        cut to the committed steps (needs the ``xarray`` extra)."""
        from .views import to_xarray

        return to_xarray(self, None if names is None else list(names))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as (path, storage_options): a dask worker reopens the store itself."""
        return (_reopen, (self.path, self.storage_options))

    def __repr__(self) -> str:
        return (
            f"HistoryStore({self.path!r}, steps={self.num_steps}, "
            f"tensors={len(self.meta.tensors)}, keyframes={self.keyframe_steps.tolist()})"
        )


def block_device(block: StepBlock) -> torch.device:
    """The device a block's tensors are on (CPU for a block without tensors)."""
    for d in block.deltas.values():
        return d.device
    return torch.device("cpu")


def _reopen(path: str, storage_options: dict[str, Any] | None) -> HistoryStore:
    return open_store(path, storage_options=storage_options)


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def open_store(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> HistoryStore:
    """Open a historystore for reading (raises NotAStoreError / SchemaVersionError).

    ``path``: a local path or any zarr store URL (``s3://bucket/run.zarr``, ``gs://…``,
    ``memory://…``); ``storage_options`` go to the URL's fsspec filesystem (credentials,
    ``client_kwargs={"endpoint_url": ...}``).
    """
    path = layout.local_path(path)
    if layout.is_local(path) and not os.path.exists(path):
        raise NotAStoreError(f"{path} does not exist")
    # every zarr.json a reader uses is checked before zarr parses it or data is read
    checked = validate_store(path, layout.read_only_store(path, storage_options))
    group = layout.open_group(path, mode="r", storage_options=storage_options)
    return HistoryStore(path, group, checked.meta, checked.commit, storage_options=storage_options)
