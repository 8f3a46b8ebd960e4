"""The store's layout: array paths, metadata schema and chunking (checked by ``validate``).

One Zarr v3 group. Every array grows along a leading step axis (or a flat ragged axis with
per-step counts) and carries a ``description`` attribute, so the store explains itself to
anyone who opens it with plain ``zarr.open_group``::

    /                          attrs["historystore"]: RunMeta (schema, tensors, optimizer, config)
    /commit                    attrs: committed counts; written after the data (readers trust it)
    /params/<name>/<array>     [T, *shape]  the encoding's arrays for Δ_t (``delta`` for full)
    /params/<name>/keyframes   [K, *shape]  θ_t at the steps in /keyframe_steps
    /buffers/<name>            [K, *shape]  module buffers (BatchNorm statistics) and parameters
                                            the optimizer does not train, at keyframes
    /keyframe_steps            [K]
    /optim/<name>/<key>        [T, *shape]  optimizer state after step t
    /steps/<scalar>            [T]          loss, timestamp, duration, batch_size, ...
    /steps/hparams/<g>.<key>   [T]          param-group hyperparameters (lr, betas, ...)
    /steps/nonfinite           [T, n]       count of NaN/inf per tensor's delta
    /steps/theta_crc           [T, n]       crc32 of θ_(t+1) at the end of each written block
    /batch/ids, labels         [N]          example ids (ragged, sizes in /steps/batch_size)
    /batch/ghost_ids           [G]          ghost-sample ids (sizes in /steps/ghost_size)
    /fixes/tensor,index,bits   [F]          exact replay corrections (sizes in /steps/num_fixes)
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.core.sync import sync

from .._version import __version__
from ..errors import NotAStoreError

SCHEMA_VERSION = 1
ATTR_KEY = "historystore"

STEP_SCALARS: dict[str, tuple[str, str]] = {
    "loss": ("float64", "training loss of the step (NaN when not given)"),
    "timestamp": ("float64", "unix time when rec.step() recorded the step"),
    "duration": ("float64", "wall-clock seconds since the previous recorded step"),
    "batch_size": ("int32", "number of example ids of the step in /batch/ids"),
    "ghost_size": ("int32", "number of ghost-sample ids of the step in /batch/ghost_ids"),
    "num_fixes": ("int32", "number of exact-replay corrections of the step in /fixes"),
}
RAGGED: dict[str, tuple[str, str]] = {
    "batch/ids": ("int64", "example ids of every step, concatenated (see /steps/batch_size)"),
    "batch/labels": ("int64", "labels of the examples in /batch/ids (-1 when not given)"),
    "batch/ghost_ids": ("int64", "ghost-sample ids (batch-norm only), see /steps/ghost_size"),
    "fixes/tensor": ("int32", "index into the tensor table of each replay correction"),
    "fixes/index": ("int64", "flat element index of each replay correction"),
    "fixes/bits": ("uint64", "exact bits of θ_{t+1} at that element (zero-extended)"),
}
#: ragged array -> the per-step count array that splits it into steps
RAGGED_COUNTS = {
    "batch/ids": "batch_size",
    "batch/labels": "batch_size",
    "batch/ghost_ids": "ghost_size",
    "fixes/tensor": "num_fixes",
    "fixes/index": "num_fixes",
    "fixes/bits": "num_fixes",
}
RAGGED_CHUNK = 1 << 16
SCALAR_CHUNK = 1 << 12
#: per-step arrays grow by this many blocks at a time (ragged ones by RAGGED_CHUNK rows): a
#: resize rewrites the array's zarr.json, and once per array per block that was ~30 % of the
#: writer's array time on a small model. Readers trust the commit record, never the shape.
GROW_BLOCKS = 8
#: arrays with one row per keyframe grow this many rows at a time (same reason)
GROW_KEYFRAMES = 4

INT_VIEW = {"float32": np.int32, "float64": np.int64, "float16": np.int16, "bfloat16": np.int16}


@dataclass(frozen=True)
class TensorInfo:
    """One recorded parameter tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str = "full"
    encoding_params: dict[str, Any] = field(default_factory=dict)
    encoding_reason: str = "default"
    codec: str = ""
    chunk_steps: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(storage_dtype(self.dtype)).itemsize


@dataclass(frozen=True)
class ArrayInfo:
    """A buffer or optimizer-state array: name, shape (without step axis), dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class RunMeta:
    """Everything about a run that is fixed when recording starts (root attributes)."""

    tensors: list[TensorInfo]
    buffers: list[ArrayInfo]
    optimizer: dict[str, Any]
    optim_state: dict[str, list[ArrayInfo]]
    hparam_keys: list[str]
    config: dict[str, Any]
    recorder: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    library_version: str = __version__
    created: float = field(default_factory=time.time)

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"no recorded tensor {name!r}; recorded: {[t.name for t in self.tensors]}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = "historystore"
        d["description"] = __doc__
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunMeta:
        return cls(
            tensors=[_tensor_info(t) for t in d["tensors"]],
            buffers=[_array_info(b) for b in d["buffers"]],
            optimizer=d["optimizer"],
            optim_state={k: [_array_info(a) for a in v] for k, v in d["optim_state"].items()},
            hparam_keys=list(d["hparam_keys"]),
            config=d["config"],
            recorder=d["recorder"],
            schema_version=d["schema_version"],
            library_version=d["library_version"],
            created=d["created"],
        )


def _tensor_info(d: dict[str, Any]) -> TensorInfo:
    return TensorInfo(**{**d, "shape": tuple(d["shape"])})


def _array_info(d: dict[str, Any]) -> ArrayInfo:
    return ArrayInfo(d["name"], tuple(d["shape"]), d["dtype"])


def storage_dtype(dtype: str) -> str:
    """bfloat16 is not a zarr dtype: it is stored as its uint16 bits."""
    return "uint16" if dtype == "bfloat16" else dtype


def param_path(name: str, array: str) -> str:
    return f"params/{name}/{array}"


def keyframe_path(name: str) -> str:
    return f"params/{name}/keyframes"


def buffer_path(name: str) -> str:
    return f"buffers/{name}"


def optim_path(name: str, key: str) -> str:
    return f"optim/{name}/{key}"


def hparam_path(key: str) -> str:
    return f"steps/hparams/{key}"


def is_keyframe_array(path: str) -> bool:
    """Arrays with one row per keyframe (not per step)."""
    return path == "keyframe_steps" or path.startswith("buffers/") or path.endswith("/keyframes")


def capacity(path: str, rows: int, steps_per_block: int) -> int:
    """Rows the writer sizes ``path`` to when it must hold ``rows``: rounded up to the array's
    growth step, so that most blocks write rows without a resize."""
    if path in RAGGED:
        step = RAGGED_CHUNK
    elif is_keyframe_array(path):
        step = GROW_KEYFRAMES
    else:
        step = max(1, steps_per_block) * GROW_BLOCKS
    return -(-rows // step) * step


def chunk_steps_for(step_bytes: int, steps_per_block: int, chunk_bytes: int) -> int:
    """Steps per chunk: the largest divisor of the block whose chunk stays under chunk_bytes.

    Blocks are whole shards, so a chunk must divide the block; small tensors get one chunk
    per block (no sharding), large ones several chunks inside one shard file.
    """
    best = 1
    for d in range(1, steps_per_block + 1):
        if steps_per_block % d == 0 and d * max(step_bytes, 1) <= chunk_bytes:
            best = d
    return best


StorageOptions = dict[str, Any] | None


def is_url(path: str) -> bool:
    """True for an fsspec URL (``s3://``, ``gs://``, ``memory://``, chained ``a::b``): zarr's
    own rule for choosing FsspecStore over LocalStore."""
    return "://" in path or "::" in path


def local_path(path: str | os.PathLike[str]) -> str:
    """``file:///x`` becomes ``/x``: the local filesystem is opened with zarr's LocalStore,
    which replaces each file atomically (fsspec's local filesystem writes in place)."""
    path = os.fspath(path)
    if path.startswith("file://") and "::" not in path:
        return path[len("file://") :]
    return path


def is_local(path: str | os.PathLike[str]) -> bool:
    return not is_url(local_path(path))


def open_group(
    path: str | os.PathLike[str], mode: str = "r", storage_options: StorageOptions = None
) -> zarr.Group:
    """Open a zarr v3 group at a local path or a store URL, turning 'nothing there' into
    NotAStoreError.

    URLs go through zarr's FsspecStore (``storage_options`` reach the fsspec filesystem:
    credentials, ``client_kwargs={"endpoint_url": ...}``); local paths use LocalStore.
    """
    path = local_path(path)
    if storage_options and not is_url(path):
        raise ValueError(
            f"storage_options are for store URLs (s3://, gs://, memory://, ...), not the "
            f"local path {path!r}"
        )
    kwargs = {"storage_options": storage_options} if is_url(path) else {}
    try:
        group = zarr.open_group(path, mode=mode, zarr_format=3, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, TypeError) as e:
        raise NotAStoreError(
            f"{path} is not a historystore (cannot open a zarr v3 group: {e})"
        ) from e
    except ImportError as e:  # e.g. s3fs / gcsfs not installed
        raise NotAStoreError(f"{path}: no filesystem for this URL ({e})") from e
    return group


def exists(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> bool:
    """Whether anything is stored at ``path`` (a non-empty directory, a file, or any key under
    the URL's prefix)."""
    path = local_path(path)
    if not is_url(path):
        p = Path(path)
        return any(p.iterdir()) if p.is_dir() else p.exists()
    store = _fsspec_store(path, storage_options)
    return not sync(store.is_empty(""))


def _fsspec_store(
    path: str, storage_options: StorageOptions, read_only: bool = False
) -> zarr.storage.FsspecStore:
    try:
        return zarr.storage.FsspecStore.from_url(
            path, storage_options=storage_options, read_only=read_only
        )
    except ImportError as e:
        raise NotAStoreError(f"{path}: no filesystem for this URL ({e})") from e


def read_only_store(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> Any:
    """The raw zarr store under a path or URL, read-only (metadata validation reads keys from
    it before zarr parses anything)."""
    path = local_path(path)
    if is_url(path):
        return _fsspec_store(path, storage_options, read_only=True)
    return zarr.storage.LocalStore(path, read_only=True)


def _key(group: zarr.Group, key: str) -> str:
    root = group.store_path.path
    return f"{root}/{key}" if root else key


class ChunkIndex:
    """Which chunk files/objects of a group's arrays are stored (zarr reads a missing chunk as
    zeros, so truncation checks must ask the store).

    On disk: one ``stat`` per chunk file. On an object store: one listing per array (a HEAD
    request per chunk would double the requests of a scan), listed again when a chunk is not
    in it; stores that cannot list (e.g. HTTP) are asked for each chunk by name.
    """

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        self._local = isinstance(group.store, zarr.storage.LocalStore)
        self._listed: dict[str, frozenset[str]] = {}

    def exists(self, array: str, chunk: str) -> bool:
        """Whether chunk key ``chunk`` (e.g. ``c/3/0``) of the array at ``array`` is stored."""
        key = _key(self.group, f"{array}/{chunk}")
        if self._local:
            return os.path.exists(os.path.join(self.group.store.root, key))
        if chunk in self._listed.get(array, ()):
            return True
        self._listed[array] = listed = self._list(_key(self.group, f"{array}/"))
        if listed:  # a fresh listing (it holds the array's zarr.json at least) is the truth
            return chunk in listed
        return bool(sync(self.group.store.exists(key)))  # a store that cannot list

    def _list(self, prefix: str) -> frozenset[str]:
        async def keys() -> list[str]:
            return [k async for k in self.group.store.list_prefix(prefix)]

        try:
            return frozenset(k[len(prefix) :] for k in sync(keys()) if k.startswith(prefix))
        except (NotImplementedError, OSError, ValueError):
            return frozenset()


def disk_usage(path: str | os.PathLike[str]) -> int:
    """Bytes in the files below a local path."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def stored_bytes(group: zarr.Group, prefix: str = "") -> int:
    """Bytes stored under ``prefix`` of the group (disk usage, or object sizes in a bucket)."""
    store = group.store
    key = _key(group, prefix).rstrip("/")
    if isinstance(store, zarr.storage.LocalStore):
        return disk_usage(os.path.join(store.root, key))
    if isinstance(store, zarr.storage.FsspecStore):  # one listing with sizes, not a HEAD per key
        found = sync(store.fs._find(f"{store.path}/{key}".rstrip("/"), detail=True, withdirs=False))
        return sum(int(v.get("size") or 0) for v in found.values())
    return int(sync(store.getsize_prefix(key)))
