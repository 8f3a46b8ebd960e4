"""Background writer: compresses and writes blocks of steps, then commits them.

Why a thread and a bounded queue: compression (Blosc/zstd) releases the GIL, so writing
overlaps training; the bounded queue turns a slow disk into backpressure instead of unbounded
memory. Why the commit marker last: zarr's LocalStore replaces each chunk/shard file
atomically, but a block touches many files; readers trust only ``/commit``, which is rewritten
after all of a block's data, so a SIGKILL leaves every committed step intact and nothing
half-written visible. Object stores (s3://, gs://) have no rename, but each PUT of an object
is atomic and the commit record is one object (``commit/zarr.json``) written last: the same
order gives the same guarantee there. One writer per store (shards are never written
concurrently).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from .. import codecs, tensors
from ..encodings import get_encoding
from ..encodings.state import LOGRANGE, log8_rows
from ..errors import RecorderError
from ..meta import layout
from ..meta.commit import Commit
from ..meta.layout import RunMeta
from .chunks import ChunkRows
from .exact import Scratch, block_deltas
from .keyframes import Keyframe


@dataclass
class Block:
    """Host-side data of ``n`` consecutive steps starting at ``t0`` (plus keyframes)."""

    t0: int
    n: int
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # tensor -> encoded
    # lossless tensors: θ_{t0}, ..., θ_{t0+n} (n + 1 rows); the writer turns them into Δ rows,
    # exact-replay corrections and θ fingerprints (:func:`.exact.block_deltas`)
    thetas: dict[str, np.ndarray] = field(default_factory=dict)
    enc_error: np.ndarray | None = None  # [n, tensors, 2] relative error of Δ and of θ̂
    states: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    scalars: dict[str, np.ndarray] = field(default_factory=dict)
    hparams: dict[str, np.ndarray] = field(default_factory=dict)
    ids: np.ndarray | None = None
    labels: np.ndarray | None = None
    ghost_ids: np.ndarray | None = None
    fix_tensor: np.ndarray | None = None
    fix_index: np.ndarray | None = None
    fix_bits: np.ndarray | None = None
    theta_crc: np.ndarray | None = None  # [n, tensors]; the lossless ones filled by the writer
    keyframes: list[Keyframe] = field(default_factory=list)
    release: Callable[[], None] | None = None
    optim_state: dict[str, list[Any]] | None = None  # the state layout as of this block


class _Creation:
    """Arrays to create, then created concurrently on zarr's event loop: each creation is a
    few small metadata writes (mostly latency), and a new store has dozens of arrays."""

    def __init__(self) -> None:
        self._arrays: list[tuple[str, dict[str, Any]]] = []

    def add(
        self,
        path: str,
        row_shape: tuple[int, ...],
        dtype: str,
        *,
        chunk_rows: int,
        shard_rows: int | None,
        codec: str,
        description: str,
    ) -> None:
        dtype = layout.storage_dtype(dtype)
        kwargs: dict[str, Any] = {}
        if shard_rows is not None and shard_rows != chunk_rows:
            kwargs["shards"] = (shard_rows, *row_shape)
        kwargs |= dict(
            shape=(0, *row_shape),
            chunks=(chunk_rows, *row_shape),
            dtype=dtype,
            compressors=codecs.compressors(codec, np.dtype(dtype).itemsize),
            fill_value=0,
            attributes={"description": description},
            # every chunk is written, even all-zero ones: a missing chunk file means loss
            config={"write_empty_chunks": True},
        )
        self._arrays.append((path, kwargs))

    def run(self, group: zarr.Group) -> None:
        ag = group._async_group

        async def create_all() -> None:
            # parents first: two arrays of one tensor would otherwise race to create it
            parents = sorted({p.rpartition("/")[0] for p, _ in self._arrays} - {""})
            for parent in parents:
                await ag.require_group(parent)
            await asyncio.gather(*(ag.create_array(p, **kw) for p, kw in self._arrays))

        if self._arrays:
            sync(create_all())


def create_layout(group: zarr.Group, meta: RunMeta, steps_per_block: int) -> None:
    """Create every array that exists from the start (optimizer state comes with step 1)."""
    rc = meta.recorder
    new = _Creation()
    for t in meta.tensors:
        enc = get_encoding(t.encoding, t.shape, t.dtype, **t.encoding_params)
        for array, spec in enc.arrays().items():
            new.add(
                layout.param_path(t.name, array),
                spec.shape,
                spec.dtype,
                chunk_rows=t.chunk_steps,
                shard_rows=steps_per_block,
                codec=t.codec,
                description=f"encoding {t.encoding!r} array {array!r} of Δ_t = θ_(t+1) − θ_t "
                f"for parameter {t.name!r}, one row per step",
            )
        new.add(
            layout.keyframe_path(t.name),
            t.shape,
            t.dtype,
            chunk_rows=1,
            shard_rows=None,
            codec=rc["state_codec"],
            description=f"θ_t of {t.name!r} at the steps in /keyframe_steps (exact)",
        )
    for b in meta.buffers:
        new.add(
            layout.buffer_path(b.name),
            b.shape,
            b.dtype,
            chunk_rows=1,
            shard_rows=None,
            codec=rc["state_codec"],
            description=f"module buffer or untrained parameter {b.name!r} at the steps in "
            "/keyframe_steps",
        )
    new.add(
        "keyframe_steps",
        (),
        "int64",
        chunk_rows=layout.SCALAR_CHUNK,
        shard_rows=None,
        codec=codecs.DEFAULT_INT_CODEC,
        description="steps t at which keyframes hold θ_t (0 = initial weights)",
    )
    for name, (dtype, desc) in layout.STEP_SCALARS.items():
        new.add(
            f"steps/{name}",
            (),
            dtype,
            chunk_rows=layout.SCALAR_CHUNK,
            shard_rows=None,
            codec=codecs.DEFAULT_INT_CODEC,
            description=desc,
        )
    new.add(
        "steps/theta_crc",
        (len(meta.tensors),),
        "uint64",
        chunk_rows=layout.SCALAR_CHUNK,
        shard_rows=None,
        codec=codecs.DEFAULT_INT_CODEC,
        description="2**32 + crc32 of each tensor's θ_(t+1) bytes at the last step of every "
        "written block (0 elsewhere): verify checks replay against it",
    )
    new.add(
        "steps/encoding_error",
        (len(meta.tensors), 2),
        "float32",
        chunk_rows=layout.SCALAR_CHUNK,
        shard_rows=None,
        codec=codecs.DEFAULT_INT_CODEC,
        description="relative L2 error per tensor of the decoded Δ_t and of the replayed "
        "θ_(t+1) (NaN for lossless or undecodable encodings)",
    )
    new.add(
        "steps/nonfinite",
        (len(meta.tensors),),
        "int32",
        chunk_rows=layout.SCALAR_CHUNK,
        shard_rows=None,
        codec=codecs.DEFAULT_INT_CODEC,
        description="NaN/inf count of each tensor's delta per step (tensor order as in "
        "the 'tensors' table)",
    )
    for key in meta.hparam_keys:
        new.add(
            layout.hparam_path(key),
            (),
            "float64",
            chunk_rows=layout.SCALAR_CHUNK,
            shard_rows=None,
            codec=codecs.DEFAULT_INT_CODEC,
            description=f"optimizer hyperparameter {key} (param group.key) at each step",
        )
    for path, (dtype, desc) in layout.RAGGED.items():
        new.add(
            path,
            (),
            dtype,
            chunk_rows=layout.RAGGED_CHUNK,
            shard_rows=None,
            codec=codecs.DEFAULT_INT_CODEC,
            description=desc,
        )
    new.run(group)
    c = group.create_group("commit")
    c.update_attributes(
        {
            **Commit().__dict__,
            "description": "committed counts: readers trust "
            "only these; rewritten after each block's data",
        }
    )


def create_state_arrays(
    group: zarr.Group, meta: RunMeta, steps_per_block: int, chunk_bytes: int
) -> None:
    """Optimizer state arrays, created when the first step reveals the state's layout."""
    new = _Creation()
    for name, specs in meta.optim_state.items():
        for s in specs:
            path = layout.optim_path(name, s.name)
            if path in group:
                continue
            step_bytes = (
                int(np.prod(s.shape, dtype=np.int64))
                * np.dtype(layout.storage_dtype(s.dtype)).itemsize
            )
            new.add(
                path,
                s.shape,
                s.dtype,
                chunk_rows=layout.chunk_steps_for(step_bytes, steps_per_block, chunk_bytes),
                shard_rows=steps_per_block,
                codec=meta.recorder["state_codec"],
                description=f"optimizer state {s.name!r} of {name!r} after step t",
            )
    new.run(group)


class BlockWriter:
    """Writes blocks in a background thread; errors are re-raised in the caller's thread.

    With ``thread=False`` nothing runs in the background: :mod:`.process` drives
    :meth:`run_block` from a writer process instead.
    """

    def __init__(
        self,
        group: zarr.Group,
        meta: RunMeta,
        commit: Commit,
        max_pending: int,
        init: Callable[[], None] | None = None,
        *,
        thread: bool = True,
    ) -> None:
        """``init`` runs first in the writer (creating a new store's arrays)."""
        self.group = group
        self._init = init
        self.meta = meta
        self.commit = commit
        self._order = {t.name: i for i, t in enumerate(meta.tensors)}
        self._dtypes = {t.name: t.dtype for t in meta.tensors}
        self._scratch = Scratch()
        self._paths: dict[int, str] = {}  # id(array) -> its path in the store
        self.join = bool(meta.recorder.get("join_blocks", False))
        self._queue: queue.Queue[Block | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._puts: list[tuple[zarr.Array, int, np.ndarray]] = []
        self._chunks = ChunkRows()
        self.bytes_raw = 0
        self.seconds_busy = 0.0
        #: where the writer's time and bytes go: {part: {"seconds", "bytes", "calls"}}
        self.parts: dict[str, dict[str, float]] = {}
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(
                target=self._run, name="historystore-writer", daemon=True
            )
            self._thread.start()

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "bytes_raw": self.bytes_raw,
            "seconds_busy": self.seconds_busy,
            "parts": {k: dict(v) for k, v in self.parts.items()},
        }

    def _count(self, part: str, seconds: float = 0.0, nbytes: int = 0) -> None:
        d = self.parts.setdefault(part, {"seconds": 0.0, "bytes": 0, "calls": 0})
        d["seconds"] += seconds
        d["bytes"] += nbytes
        d["calls"] += 1

    # -- caller side -------------------------------------------------------------------------
    def submit(self, block: Block) -> None:
        """Queue a block; blocks the caller while ``max_pending`` blocks are waiting."""
        self.raise_if_failed()
        while True:
            try:
                self._queue.put(block, timeout=0.5)
                return
            except queue.Full:
                self.raise_if_failed()

    def raise_if_failed(self, poll: bool = True) -> None:
        """Raise the writer thread's error (``poll``: for the process writer's interface)."""
        if self._error is not None:
            raise RecorderError(f"the background writer failed: {self._error!r}") from self._error

    def close(self) -> None:
        """Drain the queue, stop the thread and raise any writer error."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.raise_if_failed()

    # -- writer side -------------------------------------------------------------------------
    def run_init(self) -> None:
        if self._init is not None:
            try:
                start = time.perf_counter()
                self._init()
                self._count("creating arrays", time.perf_counter() - start)
                self.seconds_busy += time.perf_counter() - start
            except BaseException as e:
                self._error = e

    def run_blocks(self, blocks: list[Block]) -> None:
        """Write the blocks that waited (one commit) unless an earlier write failed (then
        they are dropped)."""
        if self._error is not None:
            return
        try:
            start = time.perf_counter()
            if len(blocks) == 1:
                self.write(blocks[0])
            else:
                self.write_many(blocks)
                self._count("blocks written together", nbytes=len(blocks))
            self.seconds_busy += time.perf_counter() - start
        except BaseException as e:
            self._error = e

    def _run(self) -> None:
        self.run_init()
        done = False
        while not done:
            block = self._queue.get()
            if block is None:
                return
            blocks = [block]
            while self.join:  # the blocks waiting now: written together
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                    break
                blocks.append(more)
            try:
                self.run_blocks(blocks)
            finally:
                for b in blocks:
                    if b.release is not None:
                        b.release()

    def _array(self, path: str) -> zarr.Array:
        arr = self._arrays.get(path)
        if arr is None:
            # write all-zero chunks too (the setting is not persisted): verify relies on it
            arr = self._arrays[path] = self.group[path].with_config({"write_empty_chunks": True})
            self._paths[id(arr)] = path
        return arr

    def _put_rows(self, path: str, start: int, data: np.ndarray | None) -> None:
        """Queue rows ``start:start+len(data)`` of ``path``; :meth:`_flush` writes them."""
        if data is None or data.shape[0] == 0:
            return
        self._puts.append((self._array(path), start, data))
        self.bytes_raw += data.nbytes
        self._count(_kind(path), nbytes=data.nbytes)

    def _flush(self) -> None:
        """Write every queued put concurrently on zarr's event loop.

        Why: a block touches dozens of arrays, and each zarr write is mostly latency (metadata
        JSON for the resize, a read-modify-write of the edge chunk, a thread hop per codec
        call); awaiting them together overlaps that latency and the codecs' GIL-free work.
        """
        by_array: dict[int, list[tuple[zarr.Array, int, np.ndarray]]] = {}
        for put in self._puts:
            by_array.setdefault(id(put[0]), []).append(put)
        self._puts = []
        spb = int(self.meta.recorder["steps_per_block"])

        async def put_rows(puts: list[tuple[zarr.Array, int, np.ndarray]]) -> None:
            # puts to one array run in order (two concurrent resizes could shrink it again),
            # after one resize to the furthest row
            aa = puts[0][0]._async_array
            stop = max(start + data.shape[0] for _, start, data in puts)
            if aa.shape[0] < stop:
                rows = layout.capacity(self._paths[id(puts[0][0])], stop, spb)
                await aa.resize((rows, *aa.shape[1:]))
            direct = self._chunks.supports(aa)
            for _, start, data in _join(puts):
                if direct:
                    await self._chunks.put(aa, start, data)
                else:
                    await aa.setitem(slice(start, start + data.shape[0]), data)

        async def put_all() -> None:
            await asyncio.gather(*(put_rows(p) for p in by_array.values()))

        if by_array:
            start = time.perf_counter()
            sync(put_all())
            self._count("array writes (all kinds, concurrent)", time.perf_counter() - start)

    def _new_state_arrays(self, optim_state: dict[str, list[Any]], t0: int) -> None:
        """Create the state arrays a block brings (the first step's, or a tensor whose state
        appears later, e.g. unfrozen after a warm-up) and fill the rows before ``t0`` with
        zeros, one shard at a time, so that every committed row has its chunk file."""
        new = [
            (name, s)
            for name, specs in optim_state.items()
            for s in specs
            if layout.optim_path(name, s.name) not in self._arrays
            and layout.optim_path(name, s.name) not in self.group
        ]
        if not new:
            return
        # the block's snapshot, not the recorder's live (mutating) meta
        meta = replace(self.meta, optim_state={k: list(v) for k, v in optim_state.items()})
        spb = self.meta.recorder["steps_per_block"]
        create_state_arrays(self.group, meta, spb, self.meta.recorder["chunk_bytes"])
        self.group.update_attributes({layout.ATTR_KEY: meta.to_json()})
        for name, s in new:
            path = layout.optim_path(name, s.name)
            dtype = np.dtype(layout.storage_dtype(s.dtype))
            for r0 in range(0, t0, spb):
                rows = min(spb, t0 - r0)
                self._put_rows(path, r0, np.zeros((rows, *s.shape), dtype=dtype))
                self._flush()

    def write(self, block: Block) -> None:
        """Write one block's data, then its commit marker (the order matters)."""
        self.write_many([block])

    def write_many(self, blocks: list[Block]) -> None:
        """Write consecutive blocks' data, then one commit marker for all of them.

        Why: a block's fixed cost is mostly the small per-step arrays (each a read-modify-write
        of its last chunk) and the commit; when the writer falls behind, writing the blocks
        that wait together pays it once (:meth:`_flush` joins their rows per array)."""
        c = self.commit
        for k, block in enumerate(blocks):
            c = self._stage(block, c, k)
        self._flush()  # all data is on disk before the commit marker moves
        # one metadata write: zarr's ``attrs.update`` writes the JSON once per key, and a kill
        # between two of those writes would leave a commit that mixes two blocks' counts
        start = time.perf_counter()
        self.group["commit"].update_attributes({**c.__dict__, "updated": time.time()})
        self._count("commit", time.perf_counter() - start)
        self.commit = c

    def _stage(self, block: Block, c: Commit, k: int) -> Commit:
        """Queue one block's puts (``k``: its place in the batch); the counts after it."""
        t0, n = block.t0, block.n
        if t0 != c.num_steps:
            raise RecorderError(f"block starts at step {t0} but {c.num_steps} steps are committed")
        if n and block.optim_state is not None:
            self._new_state_arrays(block.optim_state, t0)
        if n and block.thetas:
            self._exact_deltas(block, k)
        if n:
            nonfinite = np.zeros((n, len(self.meta.tensors)), dtype=np.int32)
            for i, t in enumerate(self.meta.tensors):
                for array, data in block.arrays[t.name].items():
                    nonfinite[:, i] += _count_nonfinite(data)
                    self._put_rows(layout.param_path(t.name, array), t0, data)
            for name, states in block.states.items():
                for key, data in states.items():
                    if data.dtype != np.uint8 and _is_log8(block.optim_state, name, key):
                        data, ranges = self._log8_rows(name, data)
                        self._put_rows(layout.optim_path(name, key + LOGRANGE), t0, ranges)
                    self._put_rows(layout.optim_path(name, key), t0, data)
            for key, data in block.hparams.items():
                self._put_rows(layout.hparam_path(key), t0, data)
            for key, data in block.scalars.items():
                self._put_rows(f"steps/{key}", t0, data)
            self._put_rows("steps/nonfinite", t0, nonfinite)
            self._put_rows("steps/theta_crc", t0, block.theta_crc)
            self._put_rows("steps/encoding_error", t0, block.enc_error)
            self._put_rows("batch/ids", c.num_ids, block.ids)
            self._put_rows("batch/labels", c.num_ids, block.labels)
            self._put_rows("batch/ghost_ids", c.num_ghost_ids, block.ghost_ids)
            self._put_rows("fixes/tensor", c.num_fixes, block.fix_tensor)
            self._put_rows("fixes/index", c.num_fixes, block.fix_index)
            self._put_rows("fixes/bits", c.num_fixes, block.fix_bits)
        for k, kf in enumerate(block.keyframes):
            row = c.num_keyframes + k
            for name, value in kf.params.items():
                self._put_rows(layout.keyframe_path(name), row, value[None])
            for name, value in kf.buffers.items():
                self._put_rows(layout.buffer_path(name), row, value[None])
            self._put_rows("keyframe_steps", row, np.array([kf.step], dtype=np.int64))
        return Commit(
            num_steps=t0 + n,
            num_ids=c.num_ids + (0 if block.ids is None else len(block.ids)),
            num_ghost_ids=c.num_ghost_ids
            + (0 if block.ghost_ids is None else len(block.ghost_ids)),
            num_fixes=c.num_fixes + (0 if block.fix_index is None else len(block.fix_index)),
            num_keyframes=c.num_keyframes + len(block.keyframes),
        )

    def _log8_rows(self, name: str, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A LOG8 key's raw v rows (the recorder on the CPU defers its coding to here)."""
        start = time.perf_counter()
        v = tensors.from_numpy(data, self._dtypes[name])
        codes, ranges = log8_rows(v)
        self._count("log8 coding of v", time.perf_counter() - start)
        return codes.numpy(), ranges.numpy()

    def _exact_deltas(self, block: Block, k: int) -> None:
        """Δ rows, corrections and θ fingerprints of the block's lossless tensors (``k``: the
        block's place in the batch, whose deltas stay alive until the batch is written)."""
        start = time.perf_counter()
        d = block_deltas(block.thetas, self._order, self._dtypes, self._scratch, k)
        for name, delta in d.deltas.items():
            block.arrays[name] = {"delta": delta}
        assert block.theta_crc is not None
        for name, crc in d.crc.items():
            block.theta_crc[block.n - 1, self._order[name]] = crc
        block.scalars["num_fixes"] = d.counts
        block.fix_tensor, block.fix_index, block.fix_bits = d.tensor, d.index, d.bits
        self._count("exact deltas", time.perf_counter() - start)


#: rows of consecutive puts to one array are joined into one write up to this size (the
#: small per-step arrays: one read-modify-write of their last chunk instead of one per block)
JOIN_BYTES = 4 << 20


def _join(
    puts: list[tuple[zarr.Array, int, np.ndarray]],
) -> list[tuple[zarr.Array, int, np.ndarray]]:
    out: list[tuple[zarr.Array, int, np.ndarray]] = []
    for arr, start, data in puts:
        if out:
            a0, s0, d0 = out[-1]
            if s0 + d0.shape[0] == start and d0.nbytes + data.nbytes <= JOIN_BYTES:
                out[-1] = (a0, s0, np.concatenate([d0, data]))
                continue
        out.append((arr, start, data))
    return out


def _is_log8(optim_state: dict[str, list[Any]] | None, name: str, key: str) -> bool:
    """Whether state ``key`` of ``name`` is stored as log8 codes (it has a range array)."""
    return any(s.name == key + LOGRANGE for s in (optim_state or {}).get(name, ()))


def _kind(path: str) -> str:
    if path.startswith("optim/"):
        return "optimizer state"
    if path.startswith("params/"):
        return "keyframes" if path.endswith("/keyframes") else "deltas"
    if path.startswith("buffers/") or path == "keyframe_steps":
        return "keyframes"
    return "steps, batch, fixes"


def _count_nonfinite(block: np.ndarray) -> np.ndarray:
    """Per-step NaN/inf counts; a cheap per-step sum screens out the (usual) finite steps."""
    n = block.shape[0]
    out = np.zeros(n, dtype=np.int32)
    if block.dtype.kind != "f":
        return out
    flat = block.reshape(n, -1)
    with np.errstate(all="ignore"):
        sums = flat.sum(axis=1)
    for i in np.flatnonzero(~np.isfinite(sums)):
        out[i] = int((~np.isfinite(flat[i])).sum())
    return out
