"""Validate a store's metadata before any of its data is read.

Why: zarr trusts every ``zarr.json`` it opens, so a truncated file, an ``object`` dtype, an
unknown codec or a shape of 10^15 surfaces as a bare ``JSONDecodeError``/``ValueError`` deep
in a read, or as an allocation sized by the damaged number. Here every piece of metadata a
reader will use is checked first, as raw JSON against the layout the root attributes
describe: types of the root attributes, a known schema version, and for every array its
dtype and codecs (from an allow-list), shape and chunk shape (consistent with the tensor table
and the recorder's block size), and the committed counts (no larger than the arrays, and for
the arrays read on open, no larger than the chunk files that exist). Errors are
:class:`~historystore.errors.MetadataError` naming the file (``key``) and the entry
(``field``); nothing is allocated by a size that has not been checked.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .. import codecs
from .._version import __version__
from ..encodings import encoding_names, get_encoding
from ..errors import MetadataError, NotAStoreError, SchemaVersionError
from . import layout
from .commit import Commit
from .layout import RunMeta

#: dtypes a historystore writes (bfloat16 is stored as uint16)
ARRAY_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16"}
    | {"uint32", "uint64", "bool"}
)
TENSOR_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
#: codecs a historystore writes: core zarr v3 only, no pickle, nothing that runs code
CODECS = frozenset({"bytes", "blosc", "zstd", "crc32c", "sharding_indexed"})
_BLOSC_CNAMES = frozenset({"zstd", "lz4", "lz4hc", "zlib", "blosclz", "snappy"})
_BLOSC_SHUFFLES = frozenset({"noshuffle", "shuffle", "bitshuffle"})
MAX_JSON_BYTES = 64 << 20
MAX_DIMS = 32
_COMMIT_FIELDS = tuple(Commit.__dataclass_fields__)


@dataclass(frozen=True)
class ExpectedArray:
    """What the root attributes say one array must look like."""

    path: str
    row_shape: tuple[int, ...]
    dtype: str  # storage dtype
    rows: int  # committed rows
    chunk_rows: int | None  # rows per (inner) chunk; None: any divisor of the block
    shard_rows: int | None  # rows per shard file, None when not sharded
    max_rows: int | None = None  # a writer never leaves more (its last batch of blocks)

    @property
    def rows_per_file(self) -> int:
        return self.shard_rows or self.chunk_rows or 1


def _fail(key: str, field: str, msg: str) -> MetadataError:
    where = f"{key}: {field}" if field else key
    return MetadataError(f"{where}: {msg}", key=key, field=field)


def _isin(x: Any, allowed: Any) -> bool:
    """``x in allowed`` for untrusted JSON (a list or dict is unhashable, never allowed)."""
    return isinstance(x, str) and x in allowed


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(x: Any, key: str, field: str, min_value: int = 0) -> tuple[int, ...]:
    if not isinstance(x, list) or len(x) > MAX_DIMS:
        raise _fail(key, field, f"expected a list of at most {MAX_DIMS} integers, got {x!r:.80}")
    if not all(_is_int(v) and min_value <= v < 2**53 for v in x):
        raise _fail(key, field, f"expected integers >= {min_value}, got {x!r:.80}")
    return tuple(x)


def _typed(
    d: dict[str, Any], name: str, kind: type | tuple[type, ...], key: str, where: str
) -> Any:
    field = f"{where}.{name}" if where else name
    if name not in d:
        raise _fail(key, field, "is missing")
    v = d[name]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _fail(key, field, f"expected {want}, got {type(v).__name__} {v!r:.80}")
    return v


def _path_safe(name: str) -> bool:
    """A name used as a path component: never leaves its folder (no '/', '.', '..')."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _memory_limit() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 40


class _Reader:
    """Raw keys of a zarr store (bounded reads, listings)."""

    def __init__(self, path: str, store: Any | None = None) -> None:
        self.path = path
        self.store = store if store is not None else zarr.storage.LocalStore(path, read_only=True)
        fs = getattr(self.store, "fs", None)  # an fsspec filesystem (object stores)
        if fs is not None:
            # fsspec shares one filesystem per set of options and caches its listings: another
            # handle may have written since, and a stale listing would report live chunks lost
            fs.invalidate_cache()

    def json(self, key: str, missing: Callable[[], Exception]) -> dict[str, Any]:
        try:
            size = sync(self.store.getsize(key))
        except (FileNotFoundError, NotADirectoryError):
            raise missing() from None
        except OSError as e:
            raise _fail(key, "", f"cannot be read ({e})") from e
        if size > MAX_JSON_BYTES:
            raise _fail(
                key, "", f"is {size:,} bytes, more than metadata can be ({MAX_JSON_BYTES:,})"
            )
        buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
        if buf is None:
            raise missing()
        try:
            d = json.loads(buf.to_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise _fail(key, "", f"is not valid JSON (truncated or overwritten?): {e}") from e
        if not isinstance(d, dict):
            raise _fail(key, "", f"expected a JSON object, got {type(d).__name__}")
        return d

    def list_dir(self, prefix: str, limit: int) -> list[str]:
        async def go() -> list[str]:
            out: list[str] = []
            async for name in self.store.list_dir(prefix):
                out.append(name)
                if len(out) > limit:
                    break
            return out

        try:
            return sync(go())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, key: str) -> bool:
        return bool(sync(self.store.exists(key)))


# -- root attributes -------------------------------------------------------------------------
def check_root(raw: dict[str, Any], key: str = "zarr.json", where: str = "") -> dict[str, Any]:
    """The ``historystore`` attributes of a root ``zarr.json`` (types checked)."""
    where = where or key
    if raw.get("zarr_format") != 3 or raw.get("node_type") != "group":
        raise NotAStoreError(
            f"{where} is not a historystore: not a zarr v3 group (zarr_format "
            f"{raw.get('zarr_format')!r:.20}, node_type {raw.get('node_type')!r:.20})"
        )
    attrs = raw.get("attributes", {})
    if not isinstance(attrs, dict):
        raise _fail(key, "attributes", f"expected an object, got {type(attrs).__name__}")
    hs = attrs.get(layout.ATTR_KEY)
    if hs is None:
        raise NotAStoreError(
            f"{where} is a zarr group but not a historystore (no '{layout.ATTR_KEY}' attrs)"
        )
    field = f"attributes.{layout.ATTR_KEY}"
    if not isinstance(hs, dict):
        raise _fail(key, field, f"expected an object, got {type(hs).__name__} {hs!r:.60}")
    if hs.get("format") != "historystore":
        raise NotAStoreError(
            f"{where} is not a historystore ({field}.format is {hs.get('format')!r:.40})"
        )
    version = hs.get("schema_version")
    if not _is_int(version) or version < 1:
        raise _fail(
            key,
            f"{field}.schema_version",
            f"{version!r:.40} is not a schema version (1..{layout.SCHEMA_VERSION})",
        )
    if version > layout.SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has schema version {version}; this historystore {__version__} reads up to "
            f"{layout.SCHEMA_VERSION}: upgrade historystore to read it"
        )
    return hs


def check_meta(hs: dict[str, Any], key: str = "zarr.json") -> RunMeta:
    """Type-check the root attributes field by field and build the RunMeta."""
    w = f"attributes.{layout.ATTR_KEY}"
    tensors = _typed(hs, "tensors", list, key, w)
    if not tensors:
        raise _fail(key, f"{w}.tensors", "is empty")
    rec = _typed(hs, "recorder", dict, key, w)
    spb = _typed(rec, "steps_per_block", int, key, f"{w}.recorder")
    kfe = _typed(rec, "keyframe_every", int, key, f"{w}.recorder")
    if not 1 <= spb <= 1 << 20 or kfe < 1 or kfe % spb:
        raise _fail(
            key,
            f"{w}.recorder",
            f"steps_per_block {spb} must be >= 1 and divide keyframe_every {kfe}",
        )
    for k in ("chunk_bytes", "max_pending_blocks"):
        if _typed(rec, k, int, key, f"{w}.recorder") < 1:
            raise _fail(key, f"{w}.recorder.{k}", "must be >= 1")
    for c in ("codec", "state_codec"):
        _codec_name(_typed(rec, c, str, key, f"{w}.recorder"), key, f"{w}.recorder.{c}")
    names: set[str] = set()
    known = set(encoding_names())
    for i, t in enumerate(tensors):
        f = f"{w}.tensors[{i}]"
        if not isinstance(t, dict):
            raise _fail(key, f, f"expected an object, got {type(t).__name__}")
        extra = set(t) - set(layout.TensorInfo.__dataclass_fields__)
        if extra:
            raise _fail(key, f, f"unknown fields {sorted(extra)}")
        name = _typed(t, "name", str, key, f)
        if name in names or not _path_safe(name):
            raise _fail(key, f"{f}.name", f"{name!r:.60} is repeated or not a valid tensor name")
        names.add(name)
        _shape(_typed(t, "shape", list, key, f), key, f"{f}.shape")
        if _typed(t, "dtype", str, key, f) not in TENSOR_DTYPES:
            raise _fail(
                key, f"{f}.dtype", f"{t['dtype']!r:.40} is not one of {sorted(TENSOR_DTYPES)}"
            )
        if _typed(t, "encoding", str, key, f) not in known:
            raise _fail(
                key,
                f"{f}.encoding",
                f"unknown encoding {t['encoding']!r:.40}; known: {sorted(known)}",
            )
        _typed(t, "encoding_params", dict, key, f)
        _typed(t, "encoding_reason", str, key, f)
        _codec_name(_typed(t, "codec", str, key, f), key, f"{f}.codec")
        cs = _typed(t, "chunk_steps", int, key, f)
        if cs < 1 or spb % cs:
            raise _fail(
                key, f"{f}.chunk_steps", f"{cs} must be >= 1 and divide steps_per_block {spb}"
            )
    for i, b in enumerate(_typed(hs, "buffers", list, key, w)):
        _array_info(b, key, f"{w}.buffers[{i}]")
    opt = _typed(hs, "optimizer", dict, key, w)
    _typed(opt, "class", str, key, f"{w}.optimizer")
    groups = _typed(opt, "groups", list, key, f"{w}.optimizer")
    for i, g in enumerate(groups):
        if not isinstance(g, list) or not all(isinstance(n, str) and n in names for n in g):
            raise _fail(
                key, f"{w}.optimizer.groups[{i}]", "expected a list of recorded tensor names"
            )
    for name, specs in _typed(hs, "optim_state", dict, key, w).items():
        f = f"{w}.optim_state[{name!r}]"
        if name not in names or not isinstance(specs, list):
            raise _fail(key, f, "expected a list of state arrays of a recorded tensor")
        for j, s in enumerate(specs):
            _array_info(s, key, f"{f}[{j}]")
    hk = _typed(hs, "hparam_keys", list, key, w)
    if not all(isinstance(k, str) and _path_safe(k) for k in hk):
        raise _fail(key, f"{w}.hparam_keys", "expected a list of names")
    _typed(hs, "config", dict, key, w)
    _typed(hs, "library_version", str, key, w)
    _typed(hs, "created", (int, float), key, w)
    try:
        meta = RunMeta.from_json(hs)
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(key, w, f"malformed ({e!r})") from e
    for i, t in enumerate(meta.tensors):
        try:
            get_encoding(t.encoding, t.shape, t.dtype, **t.encoding_params)
        except Exception as e:  # the encoding's own checks: any failure is a bad parameter
            raise _fail(
                key, f"{w}.tensors[{i}].encoding_params", f"rejected by {t.encoding!r}: {e}"
            ) from e
    return meta


def _array_info(d: Any, key: str, f: str) -> None:
    if not isinstance(d, dict):
        raise _fail(key, f, f"expected an object, got {type(d).__name__}")
    if not _path_safe(_typed(d, "name", str, key, f)):
        raise _fail(key, f"{f}.name", f"{d['name']!r:.60} is not a valid name")
    _shape(_typed(d, "shape", list, key, f), key, f"{f}.shape")
    if _typed(d, "dtype", str, key, f) not in ARRAY_DTYPES | TENSOR_DTYPES:
        raise _fail(key, f"{f}.dtype", f"{d['dtype']!r:.40} is not an allowed dtype")


def _codec_name(name: str, key: str, field: str) -> None:
    try:
        codecs.validate(name)
    except ValueError as e:
        raise _fail(key, field, str(e)) from e


def check_commit(raw: dict[str, Any], key: str = "commit/zarr.json") -> Commit:
    if raw.get("node_type") != "group":
        raise _fail(key, "node_type", "the commit record must be a zarr group")
    attrs = raw.get("attributes", {})
    if not isinstance(attrs, dict):
        raise _fail(key, "attributes", f"expected an object, got {type(attrs).__name__}")
    counts = {}
    for f in _COMMIT_FIELDS:
        v = attrs.get(f)
        if not _is_int(v) or not 0 <= v < 2**53:
            raise _fail(key, f"attributes.{f}", f"expected a count >= 0, got {v!r:.40}")
        counts[f] = v
    c = Commit(**counts)
    if c.num_keyframes == 0:
        raise _fail(
            key,
            "attributes.num_keyframes",
            "no keyframe is committed (the recorder stopped before θ_0 was written): the store "
            "holds nothing to read; record the run again with overwrite=True",
        )
    return c


# -- arrays ----------------------------------------------------------------------------------
def expected_arrays(meta: RunMeta, commit: Commit) -> dict[str, ExpectedArray]:
    """Every array the root attributes describe, with its committed rows and chunking."""
    spb = int(meta.recorder["steps_per_block"])
    # a writer that falls behind writes the blocks waiting for it together, under one commit:
    # a kill leaves at most max_pending_blocks + 1 blocks beyond the commit
    joined = meta.recorder.get("join_blocks") is True
    ahead = spb * (int(meta.recorder.get("max_pending_blocks", 0)) + 1 if joined else 1)
    T, K = commit.num_steps, commit.num_keyframes
    out: dict[str, ExpectedArray] = {}

    def add(path: str, shape: tuple[int, ...], dtype: str, rows: int, chunk: int | None,
            shard: int | None = None) -> None:  # fmt: skip
        sd = layout.storage_dtype(dtype)
        if path in layout.RAGGED:
            most = None
        elif layout.is_keyframe_array(path):
            most = layout.capacity(path, rows + ahead + 2, spb)
        else:  # the writer grows arrays several blocks at a time (layout.capacity)
            most = layout.capacity(path, rows + ahead, spb)
        out[path] = ExpectedArray(path, tuple(shape), sd, rows, chunk, shard, most)

    n = len(meta.tensors)
    for t in meta.tensors:
        enc = get_encoding(t.encoding, t.shape, t.dtype, **t.encoding_params)
        for a, spec in enc.arrays().items():
            shard = spb if spb != t.chunk_steps else None
            add(layout.param_path(t.name, a), spec.shape, spec.dtype, T, t.chunk_steps, shard)
        add(layout.keyframe_path(t.name), t.shape, t.dtype, K, 1)
    for b in meta.buffers:
        add(layout.buffer_path(b.name), b.shape, b.dtype, K, 1)
    add("keyframe_steps", (), "int64", K, layout.SCALAR_CHUNK)
    for name, specs in meta.optim_state.items():
        for s in specs:
            add(layout.optim_path(name, s.name), s.shape, s.dtype, T, None, spb)
    for k, (dtype, _) in layout.STEP_SCALARS.items():
        add(f"steps/{k}", (), dtype, T, layout.SCALAR_CHUNK)
    add("steps/nonfinite", (n,), "int32", T, layout.SCALAR_CHUNK)
    add("steps/theta_crc", (n,), "uint64", T, layout.SCALAR_CHUNK)
    add("steps/encoding_error", (n, 2), "float32", T, layout.SCALAR_CHUNK)
    for k in meta.hparam_keys:
        add(layout.hparam_path(k), (), "float64", T, layout.SCALAR_CHUNK)
    for path, (dtype, _) in layout.RAGGED.items():
        add(path, (), dtype, commit.ragged_count(path), layout.RAGGED_CHUNK)
    return out


def check_array(raw: dict[str, Any], spec: ExpectedArray, key: str, mem_limit: int) -> None:
    """One array's ``zarr.json`` against what the layout expects of it."""
    if raw.get("zarr_format") != 3 or raw.get("node_type") != "array":
        raise _fail(key, "node_type", f"expected a zarr v3 array, got {raw.get('node_type')!r:.30}")
    dtype = raw.get("data_type")
    if not isinstance(dtype, str) or dtype not in ARRAY_DTYPES:
        raise _fail(
            key, "data_type", f"{dtype!r:.40} is not an allowed dtype ({sorted(ARRAY_DTYPES)})"
        )
    if dtype != spec.dtype:
        raise _fail(key, "data_type", f"{dtype!r} but the layout stores {spec.dtype!r} here")
    shape = _shape(raw.get("shape"), key, "shape")
    if shape[1:] != spec.row_shape or len(shape) != 1 + len(spec.row_shape):
        raise _fail(
            key,
            "shape",
            f"{list(shape)} does not match the root attributes' row shape "
            f"{list(spec.row_shape)} (one of the two was edited or is damaged)",
        )
    if shape[0] < spec.rows:
        raise _fail(key, "shape", f"holds {shape[0]} rows but {spec.rows} are committed")
    if spec.max_rows is not None and shape[0] > spec.max_rows:
        raise _fail(
            key,
            "shape",
            f"holds {shape[0]:,} rows but {spec.rows} are committed: a writer leaves at most "
            "its last batch of blocks uncommitted, so this shape is damaged",
        )
    grid = raw.get("chunk_grid")
    if not (
        isinstance(grid, dict)
        and grid.get("name") == "regular"
        and isinstance(grid.get("configuration"), dict)
    ):
        raise _fail(key, "chunk_grid", f"expected a regular chunk grid, got {grid!r:.80}")
    outer = _shape(grid["configuration"].get("chunk_shape"), key, "chunk_grid.chunk_shape", 1)
    cke = raw.get("chunk_key_encoding")
    if not (isinstance(cke, dict) and cke.get("name") == "default"
            and cke.get("configuration", {"separator": "/"}) == {"separator": "/"}):  # fmt: skip
        raise _fail(
            key, "chunk_key_encoding", f"expected the default '/' encoding, got {cke!r:.80}"
        )
    if raw.get("storage_transformers", []) != []:
        raise _fail(key, "storage_transformers", "a historystore uses none")
    if not isinstance(raw.get("attributes", {}), dict):
        raise _fail(key, "attributes", "expected an object")
    fill = raw.get("fill_value")
    if not isinstance(fill, (int, float, str)):
        raise _fail(key, "fill_value", f"expected a number, got {fill!r:.40}")
    codec_list = raw.get("codecs")
    if not isinstance(codec_list, list) or not codec_list:
        raise _fail(key, "codecs", f"expected a non-empty list, got {codec_list!r:.80}")
    inner = outer
    first = codec_list[0]
    if isinstance(first, dict) and first.get("name") == "sharding_indexed":
        if len(codec_list) != 1:
            raise _fail(key, "codecs", "sharding must be the only top-level codec")
        cfg = first.get("configuration")
        if not isinstance(cfg, dict):
            raise _fail(key, "codecs[0].configuration", "expected an object")
        inner = _shape(cfg.get("chunk_shape"), key, "codecs[0].configuration.chunk_shape", 1)
        _check_chain(cfg.get("codecs"), key, "codecs[0].configuration.codecs")
        _check_chain(cfg.get("index_codecs"), key, "codecs[0].configuration.index_codecs")
        if not _isin(cfg.get("index_location", "end"), ("start", "end")):
            raise _fail(key, "codecs[0].configuration.index_location", "must be 'start' or 'end'")
        if len(inner) != len(shape) or any(o % i for o, i in zip(outer, inner, strict=True)):
            raise _fail(
                key,
                "codecs[0].configuration.chunk_shape",
                f"{list(inner)} must divide the shard shape {list(outer)}",
            )
    else:
        _check_chain(codec_list, key, "codecs")
    sharded = inner is not outer
    if len(outer) != len(shape) or outer[1:] != spec.row_shape or inner[1:] != spec.row_shape:
        raise _fail(
            key,
            "chunk_grid.chunk_shape",
            f"{list(outer)} does not match the array shape {list(shape)}",
        )
    if spec.chunk_rows is None:  # optimizer state: a whole block per file, chunks divide it
        ok = outer[0] == spec.shard_rows and (spec.shard_rows or 1) % inner[0] == 0
    elif spec.shard_rows:
        ok = sharded and outer[0] == spec.shard_rows and inner[0] == spec.chunk_rows
    else:
        ok = not sharded and outer[0] == spec.chunk_rows
    if not ok:
        per_chunk = spec.chunk_rows or f"a divisor of {spec.shard_rows}"
        raise _fail(
            key,
            "chunk_grid.chunk_shape",
            f"chunks of {inner[0]} rows in files of {outer[0]} do not match the layout "
            f"({per_chunk} rows per chunk, {spec.shard_rows or spec.chunk_rows} per file)",
        )
    chunk_bytes = math.prod(inner) * np.dtype(dtype).itemsize
    if chunk_bytes > mem_limit:
        raise _fail(
            key,
            "chunk_grid.chunk_shape",
            f"one chunk decodes to {chunk_bytes:,} bytes, more than this machine's memory "
            f"({mem_limit:,})",
        )
    try:  # last word to zarr's own parser: what passes here opens without surprises
        from zarr.core.metadata.v3 import ArrayV3Metadata

        ArrayV3Metadata.from_dict(dict(raw))
    except Exception as e:
        raise _fail(key, "", f"zarr cannot parse it: {e}") from e


def _check_chain(chain: Any, key: str, field: str) -> None:
    if not isinstance(chain, list) or not chain:
        raise _fail(key, field, f"expected a non-empty list of codecs, got {chain!r:.80}")
    for i, c in enumerate(chain):
        f = f"{field}[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise _fail(key, f, f"expected a codec object, got {c!r:.80}")
        name, cfg = c["name"], c.get("configuration", {})
        if name not in CODECS or name == "sharding_indexed":
            raise _fail(
                key,
                f"{f}.name",
                f"codec {name!r:.40} is not allowed (allowed: bytes, blosc, zstd, crc32c)",
            )
        if not isinstance(cfg, dict):
            raise _fail(key, f"{f}.configuration", "expected an object")
        if (i == 0) != (name == "bytes"):
            raise _fail(key, f"{f}.name", "the chain must start with 'bytes' and use it once")
        bad = None
        if name == "bytes":
            bad = not _isin(cfg.get("endian", "little"), ("little", "big"))
        elif name == "blosc":
            bad = not (
                _isin(cfg.get("cname"), _BLOSC_CNAMES)
                and _is_int(cfg.get("clevel"))
                and 0 <= cfg["clevel"] <= 9
                and _isin(cfg.get("shuffle"), _BLOSC_SHUFFLES)
                and _is_int(cfg.get("typesize", 1))
                and 1 <= cfg.get("typesize", 1) <= 16
                and _is_int(cfg.get("blocksize", 0))
                and 0 <= cfg.get("blocksize", 0) < 2**31
            )
        elif name == "zstd":
            bad = not (
                _is_int(cfg.get("level", 0))
                and -131072 <= cfg.get("level", 0) <= 22
                and isinstance(cfg.get("checksum", False), bool)
            )
        elif name == "crc32c":
            bad = bool(cfg)
        if bad:
            raise _fail(key, f"{f}.configuration", f"invalid {name} settings {cfg!r:.80}")


def check_chunk_files(reader: _Reader, spec: ExpectedArray, raw: dict[str, Any]) -> None:
    """Every chunk file of the committed rows exists (zarr reads a missing one as zeros).

    The listing bounds the work by the files that exist, not by the (untrusted) counts."""
    if spec.rows == 0:
        return
    per_file = int(raw["chunk_grid"]["configuration"]["chunk_shape"][0])
    need = math.ceil(spec.rows / per_file)
    # the listing (in no particular order) also holds the files a writer may leave beyond the
    # commit (its last batch) and the temporary files of writes a kill cut short: room for
    # those, or a committed file could fall outside the listing
    beyond = math.ceil(((spec.max_rows or spec.rows) - spec.rows) / per_file) + 1
    names = set(reader.list_dir(f"{spec.path}/c", limit=need + beyond + 64))
    tail = "".join("/0" for _ in spec.row_shape)
    for i in range(need):
        key = f"{spec.path}/c/{i}{tail}"
        if str(i) not in names or (tail and not reader.exists(key)):
            lo, hi = i * per_file, min(spec.rows, (i + 1) * per_file)
            raise MetadataError(
                f"array {spec.path!r}: chunk file {key.split('/c/', 1)[1]!r} "
                f"(rows {lo}-{hi - 1}) is missing: the store is truncated",
                key=f"{spec.path}/c/{i}",
                field="",
            )


@dataclass
class Validated:
    meta: RunMeta
    commit: Commit
    arrays: dict[str, ExpectedArray]


#: arrays read in full when a store is opened: their chunk files bound the committed counts
_READ_ON_OPEN = ("keyframe_steps", "steps/")


def validate_store(path: str, store: Any | None = None, *, all_files: bool = False) -> Validated:
    """Check the root attributes, the commit record and every array's ``zarr.json``.

    ``all_files`` also checks that every committed chunk file exists (verify); otherwise only
    those of the arrays a reader loads on open (keyframe steps and per-step scalars)."""
    try:
        return _validate(path, _Reader(path, store), all_files)
    except MetadataError as e:
        raise MetadataError(f"{path}/{e}", key=e.key, field=e.field) from None


def _validate(path: str, reader: _Reader, all_files: bool) -> Validated:

    def not_a_store() -> Exception:
        return NotAStoreError(f"{path} is not a historystore (no zarr.json: not a zarr v3 group)")

    hs = check_root(reader.json("zarr.json", not_a_store), where=path)
    meta = check_meta(hs)

    def missing(what: str) -> Callable[[], Exception]:
        return lambda: MetadataError(f"{what} is missing", key=what, field="")

    commit = check_commit(reader.json("commit/zarr.json", missing("the commit marker /commit")))
    arrays = expected_arrays(meta, commit)
    groups = {"/".join(p.split("/")[:i]) for p in arrays for i in range(1, p.count("/") + 1)}
    for g in sorted(groups):
        raw = reader.json(f"{g}/zarr.json", missing(f"group {g!r}"))
        if raw.get("zarr_format") != 3 or raw.get("node_type") != "group":
            raise _fail(f"{g}/zarr.json", "node_type", "expected a zarr v3 group")
        if not isinstance(raw.get("attributes", {}), dict):
            raise _fail(f"{g}/zarr.json", "attributes", "expected an object")
    limit = _memory_limit()
    for p, spec in arrays.items():
        key = f"{p}/zarr.json"
        raw = reader.json(
            key, lambda p=p: MetadataError(f"array {p!r} is missing", key=f"{p}/zarr.json")
        )
        check_array(raw, spec, key, limit)
        if all_files or p.startswith(_READ_ON_OPEN):
            check_chunk_files(reader, spec, raw)
    return Validated(meta, commit, arrays)
