"""Write side: ``Recorder`` snapshots every optimizer step into blocks for the writer.

Why so little on the training thread: ``rec.step`` only copies θ_{t+1} and the optimizer
state into the block's rows (one batched copy each); the deltas, their exact-replay
corrections and the compact profile's v codes are computed by the writer, once per block.

Its parts live beside it: creating a store or reopening one to resume in :mod:`.open`, the
exact-replay deltas and corrections in :mod:`.exact`, the optimizer-state layout and capture in
:mod:`.state`, the keyframe policy in :mod:`.keyframes`, device→host copies in
:mod:`.transfer`, and the background writer in :mod:`.writer` (a thread) or :mod:`.process`
(a forked process).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .. import tensors
from ..config import RecorderConfig
from ..encodings import Encoding, StepContext, get_encoding
from ..errors import EncodingError, NotAStoreError, RecorderError
from ..meta import layout
from . import process
from .keyframes import keyframe_due, make_keyframe
from .lock import writer_lock
from .open import HparamReader, create_new, named_trainable, open_existing
from .state import StateCapture
from .transfer import HostCopier
from .writer import Block, BlockWriter

WRITERS = ("auto", "process", "thread")
#: "auto" keeps the thread writer when the trainer holds more private memory than this when
#: recording starts: the forked writer shares those pages copy-on-write, so each one training
#: rewrites afterwards (the weights, at least) is duplicated, while the GIL the process avoids
#: matters little for the large models that hold that much (long steps spent in kernels)
PROCESS_WRITER_MAX_MEMORY = 1 << 30
#: and for models with more parameter bytes than this (their steps are long and spent in
#: kernels; their blocks, in shared memory, would hold raw optimizer state). Measured on 2
#: cores: the 38 K-param CNN records at 1.3-1.6x its training time with the process vs
#: 1.8-2.4x with the thread; the 3.2 M-param (12.6 MB) MLP with AdamW at 5.0x vs 4.2x (its
#: writer is the limit, and the thread's zarr writes ran faster). The crossover in between
#: is not measured.
PROCESS_WRITER_MAX_PARAM_BYTES = 8 << 20

IdsLike = torch.Tensor | np.ndarray | Sequence[int]


#: ids of a step without ghosts (shared: never written to)
_NO_IDS = torch.zeros(0, dtype=torch.int64)


def _as_ids(x: IdsLike | None, what: str) -> torch.Tensor:
    """1-D int64 ids on the CPU, as a torch tensor. Why torch: ``rec.step`` runs right after
    a training step, when torch's dispatch is in the CPU's caches and numpy's is not (a
    numpy ``min`` of 32 ids cost ~30 µs there, 2 µs hot); the block's ids become one numpy
    array at flush."""
    if x is None:
        return _NO_IDS
    if isinstance(x, torch.Tensor):
        if x.dtype is torch.int64 and x.is_cpu and x.dim() == 1:  # the usual case, quickly
            return x.clone()  # a copy: the caller may reuse its tensor before the flush
        t = x.detach()
        if t.dim() != 1 or (
            t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
        ):
            raise ValueError(
                f"{what} must be a 1-D sequence of integers, got shape {tuple(t.shape)} "
                f"dtype {t.dtype}"
            )
        return t.to("cpu", torch.int64, copy=True)
    a = np.asarray(x)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(
            f"{what} must be a 1-D sequence of integers, got shape {a.shape} dtype {a.dtype}"
        )
    return torch.from_numpy(np.array(a, dtype=np.int64))  # a copy: writable, not aliased


def _smallest(ids: torch.Tensor) -> int:
    """``int(ids.min())``; a batch's worth through a Python list, which right after a training
    step cost ~18 µs vs ~30 µs for torch's reduction (both ~3 µs hot)."""
    return min(ids.tolist()) if len(ids) <= 1024 else int(ids.min())


class _BufferPool:
    """Recycled host buffers for blocks: memory stays bounded, no allocation per step."""

    def __init__(self, make: Any, size: int) -> None:
        self._make = make
        self._free: list[Any] = []
        self._size = size

    def get(self) -> Any:
        return self._free.pop() if self._free else self._make()

    def put(self, item: Any) -> None:
        if len(self._free) < self._size:
            self._free.append(item)


class Recorder:
    """Records a training run into a historystore.

    Usage (three added lines)::

        with historystore.Recorder("run.zarr", model, optimizer) as rec:
            for ids, x, y in loader:
                ...; loss.backward(); optimizer.step()
                rec.step(ids, labels=y, loss=loss)

    ``rec.step`` must follow every ``optimizer.step()`` exactly once. ``resume=True`` appends
    to an existing store; restore the model and optimizer first with
    ``open_store(path).restore(model, optimizer)``. ``path`` may be a store URL
    (``s3://bucket/run.zarr``, ``memory://run``); ``storage_options`` go to its fsspec
    filesystem.

    ``writer``: where compression and zarr writes run. "process" forks a writer process
    (Linux, local stores, CPU training: :mod:`.process`), which keeps zarr's Python work off
    the training loop's GIL; "thread" a background thread; "auto" (default) the process
    where it can run, the trainer holds under 1 GiB of private memory (the fork shares it
    copy-on-write) and the parameters under 64 MiB (small models, where the GIL matters),
    else the thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: RecorderConfig | None = None,
        *,
        run_config: dict[str, Any] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        writer: str = "auto",
    ) -> None:
        if writer not in WRITERS:
            raise ValueError(f"writer must be one of {WRITERS}, got {writer!r}")
        self.writer_kind = writer
        self.path = layout.local_path(path)
        self.storage_options = storage_options
        self.model = model
        self.optimizer = optimizer
        self.config = config or RecorderConfig()
        self.run_config = dict(run_config or {})
        self.resume = resume
        self.overwrite = overwrite
        self._writer: BlockWriter | process.ProcessWriter | None = None
        self._closed_writer: BlockWriter | process.ProcessWriter | None = None
        self._init_layout: Callable[[], None] | None = None
        self._hook: Any = None
        self._io: dict[int, _IOCapture] = {}
        self._opt_steps = 0
        self._last_keyframe = -1  # step of the newest keyframe, committed or buffered
        self._entered = False
        self._broken: BaseException | None = None

    # -- setup -------------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        if self._entered:
            raise RecorderError("a Recorder can be entered only once")
        self._entered = True
        self._lock = writer_lock(self.path).acquire()  # one writer per store, named on conflict
        try:
            return self._enter()
        except BaseException:
            # a failed start leaves nothing behind: no hooks on the user's optimizer and model,
            # no writer thread, no lock (a retry in the same process must be able to start)
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):
                self._teardown(writer)
            raise

    def _enter(self) -> Recorder:
        self._params = named_trainable(self.model, self.optimizer)
        trained = {id(p) for _, p in self._params}
        # buffers (BatchNorm statistics) and parameters the optimizer does not train (a frozen
        # backbone): no deltas, but saved at every keyframe so that restore() rebuilds θ whole
        self._buffers = [
            (n, b)
            for n, b in self.model.named_buffers()
            if b.is_floating_point() or n.endswith("num_batches_tracked")
        ] + [(n, p) for n, p in self.model.named_parameters() if id(p) not in trained]
        self.device = self._params[0][1].device
        self._cuda = self.device.type == "cuda"
        if self.resume:
            opened = open_existing(
                self.path, self.storage_options, self.optimizer, self._params, self._buffers
            )
        else:
            opened = create_new(
                self.path,
                self.storage_options,
                self.model,
                self.optimizer,
                self._params,
                self._buffers,
                self.config,
                self.run_config,
                overwrite=self.overwrite,
            )
        self.meta, self._group, self._commit = opened.meta, opened.group, opened.commit
        self._buffers, self._init_layout = opened.buffers, opened.init_layout
        self._last_keyframe = opened.last_keyframe
        self._group_of = self._param_groups()
        self._keyframe_every = self.config_keyframe_every
        self._hparams = HparamReader(self.optimizer, self.meta.hparam_keys)
        self._state_every_step = self.meta.recorder["optimizer_state"] == "every_step"
        self._encs: list[Encoding] = [
            get_encoding(t.encoding, t.shape, t.dtype, **t.encoding_params)
            for t in self.meta.tensors
        ]
        self._copier = HostCopier(self.device)
        self._lossless = [i for i, e in enumerate(self._encs) if e.lossless]
        # lossy tensors: θ as the reader will replay it: θ̂ (feedback encodings: _prev itself),
        # a separate running sum of decoded deltas (other dense encodings), or none
        self._prev = [
            None if e.lossless else p.detach().clone()
            for e, (_, p) in zip(self._encs, self._params, strict=True)
        ]
        self._recon = [
            p.detach().clone()
            if not e.lossless and not e.feedback and "dense" in e.capabilities
            else None
            for e, (_, p) in zip(self._encs, self._params, strict=True)
        ]
        modules = dict(self.model.named_modules())
        self._io = {
            i: _IOCapture(modules[n.rpartition(".")[0]])
            for i, ((n, _), e) in enumerate(zip(self._params, self._encs, strict=True))
            if e.needs_io
        }
        self._lossy = [i for i, e in enumerate(self._encs) if not e.lossless]
        # scratch reused every step: lossy tensors' Δ and decoded Δ (CPU), then log8 of v
        self._work = tensors.Workspace()
        self._state = StateCapture(
            [n for n, _ in self._params],
            [p for _, p in self._params],
            self.optimizer,
            self.meta,
            self.meta.recorder.get("state_plan", {}),
            self.steps_per_block,
            self._copier,
            self._empty,
            self._work,
        )
        self._writer = self._start_writer()
        # v codes: made by a writer process (off the GIL) when the block can hold raw v within
        # block_bytes, else on the training side (the block then holds 1-byte codes)
        self._state.defer_log8 = self._rows is not None and self._raw_block_bytes() <= int(
            self.meta.recorder["block_bytes"]
        )
        # blocks alive at once: the queued ones, the one being written, the one being filled
        self._pool = _BufferPool(self._alloc_block, self.meta.recorder["max_pending_blocks"] + 2)
        self._hook = self.optimizer.register_step_post_hook(self._on_optimizer_step)
        self._last_time = time.time()
        self._start_block(self._commit.num_steps)
        if not self.resume:  # θ_0 as the first keyframe, committed before training starts
            self._block.keyframes.append(self._keyframe(0))
            self._flush(force=True)
        return self

    def _use_process(self) -> bool:
        if self.writer_kind == "thread":
            return False
        why = None
        if not process.supported():
            why = "it needs Linux"
        elif not layout.is_local(self.path):
            why = "it writes local stores only"
        elif self._cuda:
            why = "it does not map CUDA's pinned buffers"
        if why is None or self.writer_kind == "auto":
            small = (
                _private_memory() <= PROCESS_WRITER_MAX_MEMORY
                and sum(p.numel() * p.element_size() for _, p in self._params)
                <= PROCESS_WRITER_MAX_PARAM_BYTES
            )
            return why is None and (self.writer_kind == "process" or small)
        raise RecorderError(f'writer="process" is not available here: {why}')

    def _start_writer(self) -> BlockWriter | process.ProcessWriter:
        max_pending = self.meta.recorder["max_pending_blocks"]
        if self._use_process():
            w = process.ProcessWriter(
                self._group, self.meta, self._commit, max_pending, init=self._init_layout
            )
            self._rows: process.SharedRows | None = w.rows
            return w
        self._rows = None
        return BlockWriter(
            self._group, self.meta, self._commit, max_pending, init=self._init_layout
        )

    def _raw_block_bytes(self) -> int:
        """A block's bytes with the compact plan's v raw (rows of θ or codes, and v)."""
        rows = 0
        for enc, (_, p) in zip(self._encs, self._params, strict=True):
            rows += sum(
                int(np.prod(a.shape, dtype=np.int64))
                * torch.empty(0, dtype=tensors.torch_dtype(a.dtype)).element_size()
                for a in enc.arrays().values()
            )
            if self.meta.recorder.get("state_plan"):
                rows += p.numel() * p.element_size()
        return self.steps_per_block * rows

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A block buffer: shared with the writer process, pinned on CUDA, else plain."""
        if self._rows is not None:
            return self._rows.empty(shape, dtype)
        return torch.empty(shape, dtype=dtype, pin_memory=self._cuda)

    def _param_groups(self) -> list[int]:
        return [
            next(
                i
                for i, g in enumerate(self.optimizer.param_groups)
                if any(p is q for q in g["params"])
            )
            for _, p in self._params
        ]

    # -- blocks ------------------------------------------------------------------------------
    @property
    def steps_per_block(self) -> int:
        return int(self.meta.recorder["steps_per_block"])

    @property
    def num_steps(self) -> int:
        """Steps recorded so far (committed or buffered)."""
        return self._t

    def _alloc_block(self) -> dict[str, Any]:
        """Rows of one block: θ_{t0..t0+spb} of lossless tensors (the writer takes their
        deltas), the encoded rows of lossy ones, and (later) the optimizer state's."""
        spb = self.steps_per_block
        arrays: list[dict[str, torch.Tensor]] = []
        for enc, (_, p) in zip(self._encs, self._params, strict=True):
            if enc.lossless:
                arrays.append({"theta": self._empty((spb + 1, *p.shape), p.dtype)})
            else:
                arrays.append(
                    {
                        a: self._empty((spb, *spec.shape), tensors.torch_dtype(spec.dtype))
                        for a, spec in enc.arrays().items()
                    }
                )
        return {"arrays": arrays, "states": {}}

    def _start_block(self, t0: int, bufs: dict[str, Any] | None = None) -> None:
        self._t = t0
        self._block = Block(t0=t0, n=0)
        self._bufs = self._pool.get() if bufs is None else bufs
        self._theta_rows = [self._bufs["arrays"][i]["theta"] for i in self._lossless]
        self._theta_views: list[list[torch.Tensor] | None] = self._bufs.setdefault(
            "theta_views", [None] * (self.steps_per_block + 1)
        )
        self._lossless_params = [self._params[i][1] for i in self._lossless]
        with torch.no_grad():  # row 0: θ_{t0}, the base of the block's first delta
            self._copier.copy([r[0] for r in self._theta_rows], self._lossless_params, True)
        self._slot = 0
        self._ids: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._ghosts: list[torch.Tensor] = []
        self._losses: list[Any] = []
        self._scalar_rows: dict[str, list[float]] = {
            "timestamp": [],
            "duration": [],
            "batch_size": [],
            "ghost_size": [],
        }
        self._hparam_rows: dict[str, list[float]] = {k: [] for k in self.meta.hparam_keys}
        self._hparam_list = [self._hparam_rows[k] for k in self.meta.hparam_keys]
        self._err_rows: list[np.ndarray | None] = []
        self._block_end = (t0 // self.steps_per_block + 1) * self.steps_per_block

    def _keyframe(self, step: int) -> Any:
        self._last_keyframe = step
        return make_keyframe(step, self._params, self._buffers)

    def _flush(self, force: bool = False) -> None:
        b = self._block
        n = self._slot
        if n == 0 and not b.keyframes and not force:
            return
        self._copier.synchronize()
        bufs = self._bufs
        b.n = n
        b.arrays = {
            name: {a: tensors.to_numpy_view(v[:n]) for a, v in bufs["arrays"][i].items()}
            for i, (name, _) in enumerate(self._params)
            if not self._encs[i].lossless
        }
        if n:
            b.thetas = {
                self._params[i][0]: tensors.to_numpy_view(bufs["arrays"][i]["theta"][: n + 1])
                for i in self._lossless
            }
        b.enc_error = np.full((n, len(self._params), 2), np.nan, dtype=np.float32)
        for k, e in enumerate(self._err_rows):
            if e is not None:
                b.enc_error[k] = e
        b.states = {
            name: {k: tensors.to_numpy_view(v[:n]) for k, v in st.items()}
            for name, st in bufs["states"].items()
        }
        b.hparams = {k: np.asarray(v, dtype=np.float64) for k, v in self._hparam_rows.items()}
        losses = [float("nan") if x is None else float(x) for x in self._losses]
        b.scalars = {"loss": np.asarray(losses, dtype=np.float64)}
        for k, v in self._scalar_rows.items():
            b.scalars[k] = np.asarray(v, dtype=layout.STEP_SCALARS[k][0])
        b.scalars["num_fixes"] = np.zeros(n, dtype=np.int32)  # the writer counts them
        b.ids = _cat(self._ids)
        b.labels = _cat(self._labels)
        b.ghost_ids = _cat(self._ghosts)
        b.fix_tensor = np.zeros(0, dtype=np.int32)
        b.fix_index = np.zeros(0, dtype=np.int64)
        b.fix_bits = np.zeros(0, dtype=np.uint64)
        b.theta_crc = np.zeros((n, len(self._params)), dtype=np.uint64)
        if n:  # the writer adds the lossless tensors' fingerprints
            b.theta_crc[n - 1, self._lossy] = [self._theta_crc(i) for i in self._lossy]
        b.optim_state = {k: list(v) for k, v in self.meta.optim_state.items()}
        # a block of keyframes only holds no rows of the buffers: the next block keeps them
        # (a new buffer would be allocated and populated, ~20 ms per 20 MB, for nothing)
        b.release = None if n == 0 else (lambda bufs=bufs: self._pool.put(bufs))
        assert self._writer is not None
        self._writer.submit(b)
        self._start_block(b.t0 + n, bufs if n == 0 else None)

    def _theta_crc(self, i: int) -> int:
        """Fingerprint of lossy θ̂ as the reader replays it (0 for undecodable encodings)."""
        if "dense" not in self._encs[i].capabilities:
            return 0
        theta = self._recon[i] if self._recon[i] is not None else self._prev[i]
        assert theta is not None
        return tensors.crc_marker(theta)

    # -- hot path ----------------------------------------------------------------------------
    def _on_optimizer_step(self, *_: Any) -> None:
        self._opt_steps += 1

    def skip(self) -> None:
        """Forget a training iteration whose optimizer step did not run (e.g. a GradScaler
        found inf/NaN gradients and skipped it): nothing is recorded, and the activations
        captured for per-example factors in that iteration are dropped."""
        if self._opt_steps:
            raise RecorderError("skip(): optimizer.step() did run; record it with rec.step()")
        for cap in self._io.values():
            cap.take()

    def step(
        self,
        example_ids: IdsLike,
        labels: IdsLike | None = None,
        loss: float | torch.Tensor | None = None,
        ghost_ids: IdsLike | None = None,
    ) -> None:
        """Record the optimizer step that just ran: Δ_t, optimizer state, batch and loss.

        ``example_ids`` are dataset indices of the batch (stored instead of inputs);
        ``labels`` their labels; ``ghost_ids`` examples used only for batch-norm statistics.
        """
        if self._writer is None:
            raise RecorderError(
                "use the Recorder as a context manager: `with Recorder(...) as rec:`"
            )
        self._writer.raise_if_failed(poll=False)  # (a writer process is polled at flush)
        if self._opt_steps != 1:
            n, self._opt_steps = self._opt_steps, 0
            if n == 0:
                raise RecorderError(
                    "rec.step() was called but optimizer.step() has not run since the last "
                    "recorded step (call rec.step() right after optimizer.step(); call rec.skip() "
                    "instead when the step was skipped, e.g. by a GradScaler)"
                )
            # the weights moved by unrecorded steps: the store cannot follow them any more
            self._broken = RecorderError(f"optimizer.step() ran {n} times between two rec.step()")
            raise RecorderError(
                f"optimizer.step() ran {n} times since the last rec.step(); record every step "
                "(the steps before are in the store; the recorder records no further step)"
            )
        # validate before consuming the step: a bad call can then be repeated correctly
        ids = _as_ids(example_ids, "example_ids")
        if labels is not None:
            lab = _as_ids(labels, "labels")
        else:
            lab = torch.full((len(ids),), -1, dtype=torch.int64)
        if len(lab) != len(ids):
            raise ValueError(f"got {len(lab)} labels for {len(ids)} example ids")
        ghosts = _as_ids(ghost_ids, "ghost_ids")
        for what, a in (("example_ids", ids), ("ghost_ids", ghosts)):
            if len(a) and _smallest(a) < 0:
                raise ValueError(
                    f"{what} must be dataset indices >= 0, got {int(a.min())} at position "
                    f"{int(a.argmin())} (step {self._t}; the step was not recorded: call "
                    "rec.step() again with valid ids)"
                )
        hp = self._hparams.read()
        if self._broken is not None:
            raise RecorderError(
                f"the recorder stopped at step {self._t} after an error ({self._broken!r}); "
                "steps before it are in the store"
            )
        self._opt_steps = 0

        slot = self._slot
        bufs = self._bufs
        errors: np.ndarray | None = None  # lossy tensors' errors (NaN rows at flush if none)
        grad = torch.is_grad_enabled()
        # grad mode off without torch.no_grad's Python context manager (its enter and exit
        # cost more than the θ copy's dispatch right after a training step)
        torch._C._set_grad_enabled(False)
        try:
            # θ_{t+1} into the block: the writer takes the deltas (and the exact-replay
            # corrections) for the whole block at once
            views = self._theta_views[slot + 1]
            if views is None:  # row views made once per pooled buffer and slot
                views = self._theta_views[slot + 1] = [r[slot + 1] for r in self._theta_rows]
            self._copier.copy(views, self._lossless_params, True)
            self._norms: list[tuple[int, torch.Tensor]] = []
            for i in self._lossy:
                self._record_lossy(i, self._params[i][1].detach(), bufs["arrays"][i], slot)
            if self._norms:
                errors = np.full((len(self._params), 2), np.nan, dtype=np.float32)
                norms = torch.stack([n for _, n in self._norms]).cpu().numpy()
                rows = [i for i, _ in self._norms]
                with np.errstate(divide="ignore", invalid="ignore"):
                    errors[rows, 0] = np.where(norms[:, 1] > 0, norms[:, 0] / norms[:, 1], 0)
                    errors[rows, 1] = np.where(norms[:, 3] > 0, norms[:, 2] / norms[:, 3], 0)
            if self._state_every_step:
                self._state.capture(bufs["states"], slot)
        except BaseException as e:
            # part of this step's state was consumed: refuse to record further steps (the
            # block's rows up to the previous step are intact and commit cleanly)
            self._broken = e
            raise
        finally:
            torch._C._set_grad_enabled(grad)
        now = time.time()
        self._scalar_rows["timestamp"].append(now)
        self._scalar_rows["duration"].append(now - self._last_time)
        self._scalar_rows["batch_size"].append(len(ids))
        self._scalar_rows["ghost_size"].append(len(ghosts))
        self._last_time = now
        for row, v in zip(self._hparam_list, hp, strict=True):
            row.append(v)
        self._err_rows.append(errors)
        self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        self._ids.append(ids)
        self._labels.append(lab)
        self._ghosts.append(ghosts)
        self._slot += 1
        self._t += 1
        keyframe = keyframe_due(self._t, self._keyframe_every)
        if keyframe:
            self._block.keyframes.append(self._keyframe(self._t))
        if self._t == self._block_end:
            self._flush()
        if keyframe:  # readers restart lossy replay from the exact keyframe
            for i in self._lossy:
                p = self._params[i][1].detach()
                self._prev[i].copy_(p)  # type: ignore[union-attr]
                if self._recon[i] is not None:
                    self._recon[i].copy_(p)  # type: ignore[union-attr]

    def _record_lossy(
        self,
        i: int,
        cur: torch.Tensor,
        rows: dict[str, torch.Tensor],
        slot: int,
    ) -> None:
        """Encode Δ_t (against θ̂_t for feedback encodings) and track the replayed θ̂."""
        enc, prev = self._encs[i], self._prev[i]
        assert prev is not None
        # Δ and the decoded Δ in buffers kept from step to step on CPU: fresh full-size
        # temporaries cost a page fault per 4 KiB each (on a 3.2 M-param MLP, ~40 % of this
        # method's time). Not on CUDA, where the side stream may still copy arrays aliasing Δ
        ws = None if self._cuda else self._work
        delta = torch.sub(cur, prev) if ws is None else torch.sub(cur, prev, out=ws.like(cur, 0))
        ctx = StepContext(lr=float(self.optimizer.param_groups[self._group_of[i]]["lr"]))
        if i in self._io:
            ctx.inputs, ctx.grad_outputs = self._io[i].take()
        try:
            arrays = enc.encode_step(delta, ctx)
        except EncodingError as e:
            name = self._params[i][0]
            where = f"step {self._t}" + ("" if repr(name) in str(e) else f", tensor {name!r}")
            raise EncodingError(f"{where}: {e}") from e
        self._copier.copy([rows[a][slot] for a in arrays], list(arrays.values()), snapshot=False)
        if "dense" not in enc.capabilities:
            prev.copy_(cur)
            return
        dec = enc.decode_step(arrays, torch.empty_like(cur) if ws is None else ws.like(cur, 1))
        # norms stay on the device; step() reads them all at once (one sync per step). The
        # temporaries are reused in place (a fresh full-size one costs a page fault per 4 KiB)
        n_delta, n_cur = delta.float().norm(), cur.float().norm()
        if enc.feedback:
            theta = prev.add_(dec)  # θ̂_{t+1}
        else:
            recon = self._recon[i]
            assert recon is not None
            theta = recon.add_(dec)
            prev.copy_(cur)
        n_resid = dec.sub_(delta).float().norm()  # decoded − true Δ
        # θ̂_{t+1} − θ_{t+1}, float rounding of θ̂ included
        n_theta = torch.sub(theta, cur, out=delta).float().norm()
        self._norms.append((i, torch.stack([n_resid, n_delta, n_theta, n_cur])))

    @property
    def config_keyframe_every(self) -> int:
        return int(self.meta.recorder["keyframe_every"])

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Flush buffered steps, write the final keyframe, and wait for the writer."""
        if self._writer is None:
            return
        try:
            # a final keyframe only if the weights are θ_t (no unrecorded or failed step)
            if (
                self._broken is None
                and self._opt_steps == 0
                and self._t != self._last_keyframe  # e.g. a resume that recorded nothing
            ):
                self._block.keyframes.append(self._keyframe(self._t))
            self._flush()
        finally:
            writer, self._writer = self._writer, None
            self._teardown(writer)

    def _teardown(self, writer: BlockWriter | process.ProcessWriter | None) -> None:
        """Remove the hooks, wait for the writer, release the lock (whatever fails first)."""
        try:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            for cap in self._io.values():
                cap.remove()
            if writer is not None:
                self._closed_writer = writer
                writer.close()
        finally:
            self._lock.release()

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None and self._writer is not None:
            # keep what was recorded (it is valid), but never mask the training error
            with contextlib.suppress(Exception):
                self.close()
            return
        self.close()

    @property
    def stats(self) -> dict[str, Any]:
        """Writer statistics: raw bytes written, seconds the writer was busy, and where they
        went (``parts``); kept after ``close()``."""
        w = self._writer or self._closed_writer
        if w is None:
            return {"bytes_raw": math.nan, "writer_seconds": math.nan, "parts": {}}
        st = w.stats
        return {
            "bytes_raw": float(st["bytes_raw"]),
            "writer_seconds": float(st["seconds_busy"]),
            "parts": st["parts"],
            "writer": "process" if isinstance(w, process.ProcessWriter) else "thread",
        }


class _IOCapture:
    """Forward/backward hooks on a Linear that collect its inputs and output gradients
    between two recorded steps (the rows of per-example factors)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.grads: dict[int, torch.Tensor] = {}
        self._handle = module.register_forward_hook(self._forward)

    def _forward(
        self, module: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> None:
        if not (module.training and torch.is_grad_enabled() and out.requires_grad):
            return
        k = len(self.inputs)
        self.inputs.append(inp[0].detach().reshape(-1, inp[0].shape[-1]))

        def on_grad(g: torch.Tensor) -> None:
            self.grads[k] = g.detach().reshape(-1, g.shape[-1])

        out.register_hook(on_grad)

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        ks = [k for k in range(len(self.inputs)) if k in self.grads]
        if not ks:
            self.inputs, self.grads = [], {}
            return None, None
        a = torch.cat([self.inputs[k] for k in ks])
        g = torch.cat([self.grads[k] for k in ks])
        self.inputs, self.grads = [], {}
        return a, g

    def remove(self) -> None:
        self._handle.remove()


def _private_memory() -> int:
    """This process's anonymous resident memory (what a fork shares copy-on-write)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cat(parts: list[torch.Tensor]) -> np.ndarray:
    """A block's ids (int64 tensors, one per step) as one numpy array."""
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.int64)


__all__ = ["NotAStoreError", "Recorder", "RecorderConfig"]
