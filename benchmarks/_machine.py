"""The machine's own limits, measured the same way by every benchmark.

Every speed is in MB/s with MB = 10**6 bytes, the median of a few repeats. The machines this
project runs on are shared and noisy: read the numbers as orders of magnitude, and measure them
in the same run as the figures they are compared with.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

MB = 1e6
_CHUNK = 8 << 20  # bytes written / read per call


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _payload() -> bytes:
    # incompressible, so that no layer below (filesystem, virtual disk) can shortcut it
    return np.random.default_rng(0).integers(0, 256, _CHUNK, dtype=np.uint8).tobytes()


def _write_file(path: Path, size_mb: int, payload: bytes) -> int:
    n = max(1, round(size_mb * MB / len(payload)))
    with open(path, "wb", buffering=0) as f:
        for _ in range(n):
            f.write(payload)
        os.fsync(f.fileno())
    return n * len(payload)


def drop_from_page_cache(path: str | os.PathLike[str]) -> bool:
    """fsync the file and ask the kernel to drop its pages (POSIX_FADV_DONTNEED).

    False where posix_fadvise does not exist. Only this guest's page cache is dropped: on a
    virtual machine the host may still hold the data, so "cold" can read faster than a disk.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _read_all(path: Path) -> None:
    buf = bytearray(_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


@contextlib.contextmanager
def _scratch_file(path_dir: str | os.PathLike[str], name: str) -> Iterator[Path]:
    path = Path(path_dir) / f".machine-{os.getpid()}-{name}.bin"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def raw_read_mbps(path_dir: str | os.PathLike[str], size_mb: int = 1024, repeats: int = 3) -> dict:
    """Sequential read of a ``size_mb`` file in ``path_dir``: page cache dropped, and cached.

    Returns ``{"cold_mbps", "cached_mbps", "cache_dropped", "size_mb"}``; "cold" is only as cold
    as ``drop_from_page_cache`` can make it.
    """
    with _scratch_file(path_dir, "read") as path:
        size = _write_file(path, size_mb, _payload())
        cold, dropped = [], False
        for _ in range(max(1, repeats)):
            dropped = drop_from_page_cache(path)
            cold.append(_median_time(lambda: _read_all(path), 1))
        _read_all(path)  # now surely cached
        cached = _median_time(lambda: _read_all(path), repeats)
    return {
        "cold_mbps": size / statistics.median(cold) / MB,
        "cached_mbps": size / cached / MB,
        "cache_dropped": dropped,
        "size_mb": size / MB,
    }


def fsync_write_mbps(
    path_dir: str | os.PathLike[str], size_mb: int = 256, repeats: int = 3
) -> float:
    """Sequential write of ``size_mb`` into a new file in ``path_dir``, fsync included."""
    payload = _payload()
    speeds = []
    for _ in range(max(1, repeats)):
        with _scratch_file(path_dir, "write") as path:
            t0 = time.perf_counter()
            size = _write_file(path, size_mb, payload)
            speeds.append(size / (time.perf_counter() - t0) / MB)
    return statistics.median(speeds)


def memcpy_mbps(size_mb: int = 256, repeats: int = 5) -> float:
    """numpy copy of a ``size_mb`` buffer into another (MB/s of bytes copied, one thread)."""
    src = np.ones(int(size_mb * MB) // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    return src.nbytes / _median_time(lambda: np.copyto(dst, src), repeats) / MB


def numcodecs_codec(codec_name: str) -> Any:
    """The numcodecs codec equivalent to a historystore codec preset (checksum left out)."""
    from numcodecs import Blosc, Zstd

    from historystore import codecs

    chain = codecs.compressors(codec_name, 4)[:-1]  # drop the trailing crc32c
    if not chain:
        return None
    c = chain[0]
    if type(c).__name__ == "BloscCodec":
        shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE}.get(
            str(getattr(c.shuffle, "value", c.shuffle)), Blosc.BITSHUFFLE
        )
        cname = str(getattr(c.cname, "value", c.cname))
        return Blosc(cname=cname, clevel=c.clevel, shuffle=shuffle, blocksize=c.blocksize)
    return Zstd(level=c.level)


@contextlib.contextmanager
def _single_blosc_thread() -> Iterator[None]:
    from numcodecs import blosc

    old = blosc.get_nthreads()
    old_use = blosc.use_threads
    blosc.set_nthreads(1)
    blosc.use_threads = False
    try:
        yield
    finally:
        blosc.set_nthreads(old)
        blosc.use_threads = old_use


def codec_speed(codec_name: str, sample: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Encode and decode MB/s (of raw bytes, one thread) and ratio of a preset on ``sample``."""
    codec = numcodecs_codec(codec_name)
    sample = np.ascontiguousarray(sample)
    if codec is None:
        return {"encode_mbps": float("inf"), "decode_mbps": float("inf"), "ratio": 1.0}
    with _single_blosc_thread():
        blob = codec.encode(sample)
        out = np.empty_like(sample)
        enc = _median_time(lambda: codec.encode(sample), repeats)
        dec = _median_time(lambda: codec.decode(blob, out=out), repeats)
    if not np.array_equal(out.view(np.uint8), sample.view(np.uint8)):
        raise AssertionError(f"{codec_name} did not round-trip the sample")
    return {
        "encode_mbps": sample.nbytes / enc / MB,
        "decode_mbps": sample.nbytes / dec / MB,
        "ratio": sample.nbytes / len(blob),
    }


def decode_mbps(codec_name: str, sample: np.ndarray, repeats: int = 3) -> float:
    """Decode speed (MB/s of decoded bytes, one thread) of a codec preset on real data."""
    return codec_speed(codec_name, sample, repeats)["decode_mbps"]


def cpu_share(seconds: float = 1.0) -> float:
    """Fraction of one core a busy Python thread gets (about 1.0 on an otherwise idle machine).

    Below 1 the machine is shared with other work, and every timing taken now is slower than
    the machine could do.
    """
    t0, c0 = time.perf_counter(), time.thread_time()
    while time.perf_counter() - t0 < seconds:
        pass
    return (time.thread_time() - c0) / (time.perf_counter() - t0)


def machine_facts() -> dict[str, Any]:
    """CPU count, library versions, CUDA presence and the load at the time of the call."""
    import numcodecs
    import torch
    import zarr

    cuda = torch.cuda.is_available()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
        "cuda": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
    }


__all__ = [
    "MB",
    "codec_speed",
    "cpu_share",
    "decode_mbps",
    "drop_from_page_cache",
    "fsync_write_mbps",
    "machine_facts",
    "memcpy_mbps",
    "numcodecs_codec",
    "raw_read_mbps",
]
