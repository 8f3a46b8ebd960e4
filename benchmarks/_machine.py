"""The machine's own limits, measured the same way by every benchmark, and the helpers the
benchmarks share (files and the page cache, real delta samples, generated data, the command
line, plain JSON).

Every speed is in MB/s with MB = 10**6 bytes, the median of a few repeats. The machines this
project runs on are shared and noisy: read the numbers as orders of magnitude, and measure them
in the same run as the figures they are compared with.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# bytes on disk below a path: the same walk ``historystore.meta.info.info`` reports as "stored"
from historystore.meta.layout import disk_usage as du

MB = 1e6
_CHUNK = 8 << 20  # bytes written / read per call
#: where full runs write their results (committed, read by people and the README)
RESULTS = Path(__file__).parent / "results"
#: where --quick runs write theirs unless told otherwise (so that smoke runs leave RESULTS be)
QUICK_RESULTS = Path(tempfile.gettempdir()) / "historystore-benchmarks"


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


def files_under(*paths: str | os.PathLike[str]) -> list[Path]:
    """Every file below each of ``paths`` (sorted within each)."""
    return [f for p in paths for f in sorted(q for q in Path(p).rglob("*") if q.is_file())]


def drop_from_page_cache(*paths: str | os.PathLike[str]) -> bool:
    """fsync each file (every file below a directory) and ask the kernel to drop its pages
    (POSIX_FADV_DONTNEED; dirty pages cannot be dropped, hence the fsync).

    False where posix_fadvise does not exist. Only this guest's page cache is dropped: on a
    virtual machine the host may still hold the data, so "cold" can read faster than a disk.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        for f in files_under(path) if Path(path).is_dir() else [Path(path)]:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def read_files(paths: Iterable[str | os.PathLike[str]], chunk: int = _CHUNK) -> int:
    """Read the files sequentially, ``chunk`` bytes a call (the floor for any reader); the
    number of bytes read."""
    buf = bytearray(chunk)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def filesystem(path: str | os.PathLike[str]) -> str:
    """The filesystem type of ``path`` from /proc/mounts (tmpfs would make every read a memory
    read); "unknown" where that cannot be told."""
    best, kind = "", "unknown"
    target = str(Path(path).resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mount = parts[1] if len(parts) > 2 else ""
                if target.startswith(mount) and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


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
            cold.append(_median_time(lambda: read_files([path]), 1))
        read_files([path])  # now surely cached
        cached = _median_time(lambda: read_files([path]), repeats)
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


def codec_speed(codec: str | Any, sample: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Encode and decode MB/s (of raw bytes, one thread) and ratio of a codec on ``sample``.

    ``codec`` is a historystore codec preset, or a numcodecs codec (for settings no preset
    has, e.g. an explicit Blosc block size).
    """
    c = numcodecs_codec(codec) if isinstance(codec, str) else codec
    sample = np.ascontiguousarray(sample)
    if c is None:
        return {"encode_mbps": float("inf"), "decode_mbps": float("inf"), "ratio": 1.0}
    with _single_blosc_thread():
        blob = c.encode(sample)
        out = np.empty_like(sample)
        enc = _median_time(lambda: c.encode(sample), repeats)
        dec = _median_time(lambda: c.decode(blob, out=out), repeats)
    if not np.array_equal(out.view(np.uint8), sample.view(np.uint8)):
        raise AssertionError(f"{codec} did not round-trip the sample")
    return {
        "encode_mbps": sample.nbytes / enc / MB,
        "decode_mbps": sample.nbytes / dec / MB,
        "ratio": sample.nbytes / len(blob),
    }


def decode_mbps(codec_name: str, sample: np.ndarray, repeats: int = 3) -> float:
    """Decode speed (MB/s of decoded bytes, one thread) of a codec preset on real data."""
    return codec_speed(codec_name, sample, repeats)["decode_mbps"]


def delta_sample(path: str | os.PathLike[str], max_bytes: int) -> tuple[np.ndarray, str]:
    """Real deltas of the largest tensor of a lossless store, about ``max_bytes`` of them from
    the middle of the run, and where they come from (for ``codec_speed``)."""
    from historystore import open_store

    store = open_store(str(path))
    t = max(store.tensors, key=lambda t: t.numel)
    steps = max(1, min(store.num_steps, max_bytes // t.nbytes))
    s0 = store.num_steps // 2 - steps // 2
    d = np.asarray(store.encoded(t.name, s0, s0 + steps)["delta"])
    return d, f"{t.name} {list(t.shape)} steps {s0}-{s0 + steps - 1}"


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


# -- shared by the benchmarks -------------------------------------------------------------------
class MLP(torch.nn.Module):
    """Flatten, then Linear layers fc1..fcN with ReLU between them."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.names = [f"fc{i + 1}" for i in range(len(dims) - 1)]
        for name, d_in, d_out in zip(self.names, dims[:-1], dims[1:], strict=True):
            setattr(self, name, torch.nn.Linear(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, name in enumerate(self.names):
            x = getattr(self, name)(x)
            if i < len(self.names) - 1:
                x = torch.relu(x)
        return x


def teacher_data(dim: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a random two-layer teacher network (10 classes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 256, generator=g) / math.sqrt(dim)
    w2 = torch.randn(256, 10, generator=g) / math.sqrt(256)
    return x, (torch.relu(x @ w1) @ w2).argmax(1)


def arg_parser(
    doc: str | None, details: str, quick_help: str, output: str, out_dir: bool = False
) -> argparse.ArgumentParser:
    """The benchmarks' command line: the module docstring above the options, the details below,
    ``--quick`` (a small run) and where the results go: ``--out FILE`` (``--out-dir DIR`` where
    ``out_dir``) for ``output``, by default under ``RESULTS``, with --quick ``QUICK_RESULTS``
    (see ``results_dir``), so that smoke runs leave the committed results be."""
    ap = argparse.ArgumentParser(
        description=doc, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help=quick_help)
    if out_dir:
        where = f"default {RESULTS}, with --quick {QUICK_RESULTS}"
        ap.add_argument("--out-dir", type=Path, default=None, help=f"folder of {output} ({where})")
    else:
        where = f"default {RESULTS / output}, with --quick {QUICK_RESULTS / output}"
        ap.add_argument("--out", type=Path, default=None, help=f"the JSON file ({where})")
    return ap


def results_dir(quick: bool) -> Path:
    """``QUICK_RESULTS`` for a --quick run, else ``RESULTS``."""
    return QUICK_RESULTS if quick else RESULTS


def plain_json(x: Any) -> Any:
    """Plain JSON: NaN/inf become null, numpy scalars Python numbers, tuples lists."""
    if isinstance(x, dict):
        return {str(k): plain_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_json(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


__all__ = [
    "MB",
    "QUICK_RESULTS",
    "RESULTS",
    "arg_parser",
    "codec_speed",
    "cpu_share",
    "decode_mbps",
    "delta_sample",
    "drop_from_page_cache",
    "du",
    "files_under",
    "filesystem",
    "fsync_write_mbps",
    "machine_facts",
    "memcpy_mbps",
    "numcodecs_codec",
    "plain_json",
    "raw_read_mbps",
    "read_files",
    "results_dir",
    "teacher_data",
]
