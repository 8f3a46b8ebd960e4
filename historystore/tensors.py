"""Small torch <-> numpy helpers shared by the recorder and the reader."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from .errors import HistoryStoreError

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise HistoryStoreError(f"unknown dtype {name!r} in store metadata")
    return dt


def int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    """The same-width integer dtype, used to compare floats bit for bit (NaN, ±0 included)."""
    try:
        return _INT_VIEW[dtype]
    except KeyError:
        raise HistoryStoreError(f"dtype {dtype} is not a supported floating dtype") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """CPU numpy copy of a tensor; bfloat16 becomes its uint16 bits (zarr has no bfloat16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy().view(np.uint16).copy()
    return t.cpu().numpy().copy()


def from_numpy(a: np.ndarray, dtype_str: str) -> torch.Tensor:
    """Tensor from stored data (undoing the bfloat16-as-uint16 storage)."""
    a = np.asarray(a)
    a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray turns 0-d into 1-d
    if dtype_str == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def host_view(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch view (no copy) of a host numpy buffer holding ``dtype`` values."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def auto_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_numpy_view(t: torch.Tensor) -> np.ndarray:
    """Numpy view (no copy) of a CPU tensor; bfloat16 becomes uint16 bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def crc_marker(t: torch.Tensor) -> int:
    """2**32 + crc32 of a tensor's bytes: a cheap fingerprint of θ that verify can recompute
    from the replayed weights (the 2**32 bit marks the row as holding a fingerprint)."""
    a = to_numpy(t) if t.device.type != "cpu" or t.dtype == torch.bfloat16 else t.detach().numpy()
    return (1 << 32) | zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


class Workspace:
    """Scratch tensors reused from step to step: one flat buffer per (device, dtype, role),
    grown to the largest request and viewed to each shape.

    Why: on CPU a fresh full-size temporary costs a page fault per 4 KiB, more than the
    arithmetic on it; and since tensors are coded one after another, one buffer per role
    serves them all (memory of the largest tensor, not of the model). A view is valid until
    the next ``get`` of the same role."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}

    def get(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, role: int = 0
    ) -> torch.Tensor:
        n = int(np.prod(shape, dtype=np.int64))
        key = (torch.device(device), dtype, role)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def like(self, t: torch.Tensor, role: int = 0) -> torch.Tensor:
        return self.get(tuple(t.shape), t.dtype, t.device, role)
