"""One writer per store: a lock the recorder holds from ``__enter__`` to ``close``.

Why: two recorders on one store interleave blocks and commit records, and a second
``overwrite=True`` deletes the files under the first; both end in a store that fails verify.
The lock makes the second writer fail at once with an error naming the holder.

Local stores use an OS advisory lock (``fcntl.flock``) on ``<store>.lock`` beside the store
(beside, not inside: ``overwrite`` deletes the store directory, and the lock must outlive
that). The kernel drops the lock when its process dies, so a writer killed by SIGKILL never
leaves a lock that blocks the next one (forked children such as DataLoader workers close their
copy of the lock file, so they do not keep it held). The holder's pid, host and start time are
written into the lock file, a clean release deletes the file, and a file still naming a holder
when the lock is taken again marks a writer that ended without closing (reported as a warning).
Works on local disks and on network filesystems with lock support (NFSv4, Lustre).

Object stores (``s3://``, ``gs://``, ...) get no lock: they offer no lock primitive that
dies with the process, and a lease needs conditional overwrites that zarr's store API does
not expose. One writer per object store is the user's responsibility (README, "Reliability").
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
import warnings
import weakref
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from typing import Any

from ..errors import RecorderError, StoreLockedError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_MAX_HOLDER_BYTES = 4096


class WriterLock(ABC):
    """A store's writer lock. ``acquire`` raises :class:`StoreLockedError` naming the holder."""

    #: holder record left by a writer that ended without releasing (set by ``acquire``)
    stale_holder: dict[str, Any] | None = None

    @abstractmethod
    def acquire(self) -> WriterLock: ...

    @abstractmethod
    def release(self) -> None: ...

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holder_record() -> dict[str, Any]:
    now = time.time()
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "since_unix": now,
        "argv": " ".join(sys.argv)[:200],
    }


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "another process (it has not written its details yet)"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host', '?')} "
        f"since {holder.get('since', '?')}" + (f" ({holder['argv']})" if holder.get("argv") else "")
    )


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder record in an open lock file ({} when empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, _MAX_HOLDER_BYTES)
        d = json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


class LocalWriterLock(WriterLock):
    """``flock`` on ``<store>.lock``; the holder record is the lock file's content."""

    def __init__(self, store_path: str) -> None:
        self.store_path = os.path.normpath(os.path.abspath(store_path))
        self.lock_path = self.store_path + ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> LocalWriterLock:
        if self._fd is not None:
            return self
        try:
            os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
        except OSError as e:
            raise RecorderError(f"cannot create the folder of {self.store_path}: {e}") from e
        for _ in range(100):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RecorderError(
                    f"cannot open the writer lock file {self.lock_path} of {self.store_path} "
                    f"(the lock lives beside the store, so its folder must be writable): {e}"
                ) from e
            try:
                if not _try_lock(fd):
                    holder = _read_holder(fd)
                    raise StoreLockedError(
                        f"{self.store_path} is being written by {describe_holder(holder)}: "
                        "one writer per store (wait for it to finish, or stop it; a killed "
                        f"writer releases the lock by itself). Lock file: {self.lock_path}",
                        holder,
                    )
                # a releasing holder unlinks the file: our descriptor may name a dead inode
                if not _same_file(fd, self.lock_path):
                    os.close(fd)
                    continue
                previous = _read_holder(fd)
                record = json.dumps(_holder_record()).encode()
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, record)
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd = fd
            _HELD.add(self)
            self.stale_holder = previous or None
            if previous:
                warnings.warn(
                    f"{self.store_path}: the previous writer ({describe_holder(previous)}) "
                    "ended without closing the recorder (killed?); its lock is taken over. "
                    "Committed steps are intact; steps after the last commit are lost",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return self
        raise StoreLockedError(f"{self.lock_path} keeps changing; cannot lock {self.store_path}")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(self)
        try:
            # unlink while still holding: a contender that opened the old inode re-checks it
            with contextlib.suppress(FileNotFoundError):
                if _same_file(fd, self.lock_path):
                    os.unlink(self.lock_path)
            _unlock(fd)
        finally:
            os.close(fd)

    def __del__(self) -> None:  # a recorder that is never closed: the fd goes with it
        with contextlib.suppress(Exception):
            self.release()


#: locks held by this process: a forked child (a DataLoader worker) closes its copies, so that
#: the lock dies with the recorder's process, not with the last of its children
_HELD: weakref.WeakSet[LocalWriterLock] = weakref.WeakSet()


def _close_in_child() -> None:
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closes the child's reference only; the parent keeps the lock
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class UnlockedObjectStore(WriterLock):
    """Object stores: no lock (see the module docstring); warns once per store."""

    def __init__(self, url: str) -> None:
        self.url = url

    def acquire(self) -> UnlockedObjectStore:
        warnings.warn(
            f"{self.url}: object stores have no writer lock; make sure that only one "
            "process records into this store",
            UserWarning,
            stacklevel=3,
        )
        return self

    def release(self) -> None:
        pass


def writer_lock(path: str | os.PathLike[str]) -> WriterLock:
    """The lock for a store path or URL (not yet acquired)."""
    p = os.fspath(path)
    if "://" in p and not p.startswith("file://"):
        return UnlockedObjectStore(p)
    return LocalWriterLock(p.removeprefix("file://"))


def lock_holder(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder record of a local store's writer lock when a writer seems alive, else None.

    Reads the lock file without locking it (a probe lock could make a starting writer fail);
    on this host a holder whose pid is gone is reported as None."""
    lock = writer_lock(path)
    if not isinstance(lock, LocalWriterLock):
        return None
    try:
        fd = os.open(lock.lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder = _read_holder(fd)
    finally:
        os.close(fd)
    if not holder or not isinstance(holder.get("pid"), int):
        return None
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass
    return holder


def _try_lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover - Windows: a byte-range lock on byte 0
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _unlock(fd: int) -> None:
    if fcntl is None:  # pragma: no cover - Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)
