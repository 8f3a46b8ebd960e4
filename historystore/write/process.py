"""The writer in a forked process: compression and zarr work off the trainer's GIL.

Why a process: on a small model a training step is mostly Python (module calls, autograd
bookkeeping), and a writer *thread* competes with it for the GIL for all of zarr's Python
work (the event loop, the codec pipeline, JSON): measured on the demo CNN, a writer thread
slowed training by 25-35 % while the same writes in a process cost it nothing measurable.

How: the block rows live in shared memory (:class:`SharedRows`: one ``memfd`` mapping per
buffer, its fd passed once over a Unix socket), so a block crosses to the writer as a few
offsets; only the small per-step arrays and keyframes are sent by value. The child is a
``fork`` of the trainer (no interpreter start-up, the store already open) and runs the same
:class:`~.writer.BlockWriter` code as the thread writer, so crash safety is unchanged: data
first, then the commit record. It dies with its parent (``PR_SET_PDEATHSIG``), as the thread
would, ignores Ctrl-C (the parent's ``close()`` drains it), and never touches CUDA.

Linux only; :func:`supported` says when the recorder may use it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import mmap
import os
import select
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing import connection, reduction
from typing import Any

import numpy as np
import torch

from ..errors import RecorderError
from ..meta.commit import Commit
from ..meta.layout import RunMeta
from .writer import Block, BlockWriter

_PR_SET_PDEATHSIG = 1


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create")


@dataclass(frozen=True)
class _Ref:
    """An array inside a shared segment (what crosses the socket instead of the data)."""

    segment: int
    offset: int
    shape: tuple[int, ...]
    dtype: str


class SharedRows:
    """Allocates host buffers the writer process maps too (parent side)."""

    def __init__(self, send: Callable[[int, int], None]) -> None:
        self._send = send  # (segment id, fd) -> the child maps it
        self._segments: list[tuple[int, int, mmap.mmap]] = []  # (start address, size, map)
        self._by_start: dict[int, int] = {}  # start address -> segment (block rows start there)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        size = max(1, int(np.prod(shape, dtype=np.int64)) * itemsize)
        fd = os.memfd_create("historystore-rows", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            # pages populated now, in one go: faulting them in one by one as rows are copied
            # in would cost the training loop far more
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            self._send(len(self._segments), fd)
        finally:
            os.close(fd)
        flat = torch.frombuffer(mm, dtype=torch.uint8)
        self._by_start[flat.data_ptr()] = len(self._segments)
        self._segments.append((flat.data_ptr(), size, mm))
        return flat[: int(np.prod(shape, dtype=np.int64)) * itemsize].view(dtype).view(shape)

    def ref(self, a: np.ndarray) -> _Ref | None:
        """``a`` as a reference if it lies in a shared segment (C-contiguous), else None."""
        if not a.flags.c_contiguous or a.nbytes == 0:
            return None
        addr = a.__array_interface__["data"][0]
        k = self._by_start.get(addr)
        if k is not None and a.nbytes <= self._segments[k][1]:
            return _Ref(k, 0, tuple(a.shape), a.dtype.str)
        for k, (start, size, _) in enumerate(self._segments):
            if start <= addr and addr + a.nbytes <= start + size:
                return _Ref(k, addr - start, tuple(a.shape), a.dtype.str)
        return None


#: Block fields that hold (nested dicts of) block rows: sent as references
_ROW_FIELDS = ("arrays", "thetas", "states")


def _pack(block: Block, rows: SharedRows) -> Block:
    def pack(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: pack(x) for k, x in v.items()}
        if isinstance(v, np.ndarray):
            r = rows.ref(v)
            return v if r is None else r
        return v

    return replace(block, release=None, **{f: pack(getattr(block, f)) for f in _ROW_FIELDS})


def _unpack(block: Block, maps: dict[int, mmap.mmap]) -> Block:
    def unpack(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: unpack(x) for k, x in v.items()}
        if isinstance(v, _Ref):
            return np.ndarray(v.shape, np.dtype(v.dtype), buffer=maps[v.segment], offset=v.offset)
        return v

    return replace(block, **{f: unpack(getattr(block, f)) for f in _ROW_FIELDS})


class ProcessWriter:
    """Same interface as :class:`~.writer.BlockWriter`, with the writing in a child process."""

    def __init__(
        self,
        group: Any,
        meta: RunMeta,
        commit: Commit,
        max_pending: int,
        init: Callable[[], None] | None = None,
    ) -> None:
        if not supported():
            raise RecorderError("the process writer needs Linux (memfd_create, fork)")
        self._max_pending = max_pending
        self._conn, child = connection.Pipe(duplex=True)
        for c in (self._conn, child):  # keyframes and ids cross by value: room for them
            s = socket.socket(fileno=os.dup(c.fileno()))
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.close()
        self._pending: collections.deque[Callable[[], None] | None] = collections.deque()
        self._error: str | None = None
        self._trace = ""
        self._stats: dict[str, Any] = {"bytes_raw": 0, "seconds_busy": 0.0, "parts": {}}
        writer = BlockWriter(group, meta, commit, max_pending, init, thread=False)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child (its results are tested)
            code = 1
            try:
                self._conn.close()
                _child(child, writer, parent)
                code = 0
            finally:
                os._exit(code)
        child.close()
        self.pid = pid
        self._cores = _Cores(torch.get_num_threads(), pid)
        # one poll object for the per-step check (Connection.poll builds a selector per call)
        self._poll = select.poll()
        self._poll.register(self._conn.fileno(), select.POLLIN)
        self.rows = SharedRows(self._send_fd)
        self._alive = True

    # -- parent side -------------------------------------------------------------------------
    def _send_fd(self, segment: int, fd: int) -> None:
        try:
            self._conn.send(("map", segment))
            reduction.send_handle(self._conn, fd, self.pid)
        except OSError:
            self._died()
            self.raise_if_failed()

    def submit(self, block: Block) -> None:
        """Hand a block over; waits while ``max_pending`` blocks are still being written."""
        self.raise_if_failed()
        if len(self._pending) > self._max_pending:
            self._cores.use(behind=True)  # the trainer waits: the writer may take its cores
            try:
                while len(self._pending) > self._max_pending:
                    self._receive()
            finally:
                self._cores.use(behind=False)
        self.raise_if_failed()
        try:
            self._conn.send(("block", _pack(block, self.rows)))
        except OSError:  # the writer is gone: say why
            self._died()
            self.raise_if_failed()
        self._pending.append(block.release)

    def raise_if_failed(self, poll: bool = True) -> None:
        """Raise the writer's error; ``poll``: first take the writer's messages (a system
        call: ``rec.step`` leaves it to the block's hand-over, which polls)."""
        while poll and self._alive and self._poll.poll(0):
            self._receive()
        if self._error is not None:
            cause = RuntimeError(f"in the writer process:\n{self._trace}")
            raise RecorderError(f"the background writer failed: {self._error}") from cause

    def _receive(self) -> None:
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._died()
            return
        self._handle(msg)

    def _handle(self, msg: tuple[str, Any, Any]) -> None:
        kind, stats, error = msg
        self._stats = stats
        if error is not None and self._error is None:
            self._error, self._trace = error
        if kind == "done" and self._pending:
            release = self._pending.popleft()
            if release is not None:
                release()
        if kind == "closed":
            # everything is written and committed: the process only has to exit, which takes
            # ~15 ms (unmapping the trainer's address space it shared); reap it in the
            # background instead of making close() wait
            self._alive = False
            threading.Thread(target=self._reap, name="historystore-reap", daemon=True).start()

    def _died(self) -> None:
        self._alive = False
        status = self._reap()
        if self._error is None:
            self._error = f"the writer process (pid {self.pid}) died unexpectedly ({status})"
        self._pending.clear()

    def _reap(self) -> str:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "already reaped"
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exit status {os.waitstatus_to_exitcode(status)}"

    def close(self) -> None:
        """Write what is queued, stop the process and raise any writer error."""
        if self._alive:
            try:
                with contextlib.suppress(OSError):  # a dead writer is reported below
                    self._conn.send(("close", None))
                self._cores.use(behind=True)
                while self._alive:
                    self._receive()
            finally:
                self._conn.close()
        self.raise_if_failed()

    @property
    def bytes_raw(self) -> int:
        return int(self._stats["bytes_raw"])

    @property
    def seconds_busy(self) -> float:
        return float(self._stats["seconds_busy"])

    @property
    def stats(self) -> dict[str, Any]:
        return self._stats


class _Cores:
    """The CPUs the writer process (all its threads: zarr's loop, the codec pool) runs on.

    Why: unpinned, the writer's codec threads ran on every core and preempted the training
    thread; on the 2-core CI machine the training loop itself ran 5-33 % slower while the
    writer worked, 0-7 % with the writer on the cores the trainer's torch threads leave free
    (at least one). While the trainer waits for the writer (backpressure in ``submit``, or
    ``close()``), the writer takes every core. The trainer's side switches it, at the moment
    it starts or stops waiting: a writer that switched itself when it *saw* blocks pile up
    also took the trainer's core while the trainer was still training (measured: the trainer
    lost ~0.2 s of CPU over a 1.5 s run)."""

    def __init__(self, trainer_threads: int, pid: int = 0) -> None:
        self.pid = pid  # 0: this process
        self.all: list[int] = []
        self.free: list[int] = []
        self.now: list[int] | None = None
        with contextlib.suppress(AttributeError, OSError):
            self.all = sorted(os.sched_getaffinity(0))
            keep = max(1, len(self.all) - max(1, trainer_threads))
            self.free = self.all[-keep:]

    def use(self, behind: bool) -> None:
        cpus = self.all if behind else self.free
        if cpus and cpus != self.now:
            self.now = cpus
            # sched_setaffinity moves one thread: every thread of the writer, by its id
            for tid in _threads(self.pid):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, cpus)


def _threads(pid: int) -> list[int]:
    """The thread ids of process ``pid`` (0: this one; [pid] where /proc is missing)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid or 'self'}/task")]
    except OSError:
        return [pid]


def _child(conn: connection.Connection, writer: BlockWriter, parent: int) -> None:
    """The writer process: map segments, write blocks, report after each one."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops training; close() drains us
    _Cores(torch.get_num_threads()).use(behind=False)  # (the trainer's setting, inherited)
    torch.set_num_threads(1)
    maps: dict[int, mmap.mmap] = {}

    def report(kind: str) -> None:
        err = writer._error
        error = None if err is None else (repr(err), "".join(traceback.format_exception(err)))
        conn.send((kind, writer.stats, error))

    def receive() -> tuple[str, Any]:
        kind, body = conn.recv()
        if kind == "map":  # a new shared buffer: mapped here once
            fd = reduction.recv_handle(conn)
            try:
                # the trainer populated the pages: mapping them all now costs ~3 ms per
                # 40 MB, faulting them in one by one as the block is read ~30 ms
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                maps[body] = mmap.mmap(fd, os.fstat(fd).st_size, flags=flags)
            finally:
                os.close(fd)
        return kind, body

    writer.run_init()
    closing = False
    while not closing:
        try:
            kind, body = receive()
            if kind != "block":
                closing = kind == "close"
                continue
            blocks = [_unpack(body, maps)]
            while writer.join and conn.poll(0):  # the blocks waiting now: written together
                kind, body = receive()
                if kind == "block":
                    blocks.append(_unpack(body, maps))
                elif kind == "close":
                    closing = True
                    break
        except (EOFError, OSError):
            return
        writer.run_blocks(blocks)
        for _ in blocks:
            report("done")
    report("closed")


__all__ = ["ProcessWriter", "SharedRows", "supported"]
