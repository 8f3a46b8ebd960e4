"""The writer's direct chunk writes (historystore.write.chunks) against zarr's own setitem."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.core.sync import sync

from historystore import codecs
from historystore.write.chunks import ChunkRows


def _array(
    group: zarr.Group, name: str, rows: tuple[int, ...], dtype: str, **kw: object
) -> zarr.Array:
    return group.create_array(
        name,
        shape=(40, *rows),
        chunks=(16, *rows),
        dtype=dtype,
        compressors=codecs.compressors("blosc-zstd1-shuffle", np.dtype(dtype).itemsize),
        fill_value=0,
        config={"write_empty_chunks": True},
        **kw,
    )


def _files(root: Path, name: str) -> dict[str, bytes]:
    return {
        str(p.relative_to(root / name)): p.read_bytes()
        for p in sorted((root / name).rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


@pytest.mark.parametrize(
    ("rows", "dtype"), [((), "float64"), ((3,), "uint64"), ((2, 3), "float32"), ((), "int32")]
)
def test_chunk_files_are_what_zarr_writes(
    tmp_path: Path, rows: tuple[int, ...], dtype: str
) -> None:
    """Writes of uneven lengths, within and across chunks, and whole chunks: the same chunk
    files byte for byte as zarr's setitem, the same values read back, zeros where unwritten."""
    g = zarr.open_group(tmp_path, mode="w")
    ref, direct = _array(g, "ref", rows, dtype), _array(g, "direct", rows, dtype)
    rng = np.random.default_rng(0)
    data = (rng.random((37, *rows)) * 1e6).astype(dtype)
    cuts = [0, 5, 6, 16, 32, 35, 37]  # ends mid-chunk, crosses, fills one exactly
    w = ChunkRows()
    assert w.supports(direct._async_array)
    for a, b in itertools.pairwise(cuts):
        ref[a:b] = data[a:b]
        sync(w.put(direct._async_array, a, data[a:b]))
    assert _files(tmp_path, "direct") == _files(tmp_path, "ref")
    got = zarr.open_array(tmp_path / "direct", mode="r")[:]
    np.testing.assert_array_equal(got[:37], data)
    assert not got[37:].any()


def test_a_new_writer_keeps_the_rows_already_in_a_chunk(tmp_path: Path) -> None:
    """Resume: a writer that starts mid-chunk reads that chunk's rows first."""
    g = zarr.open_group(tmp_path, mode="w")
    a = _array(g, "a", (2,), "int64")
    first = np.arange(20, dtype=np.int64).reshape(10, 2)
    sync(ChunkRows().put(a._async_array, 0, first))
    second = -np.arange(20, dtype=np.int64).reshape(10, 2) - 1
    sync(ChunkRows().put(a._async_array, 10, second))
    np.testing.assert_array_equal(a[:20], np.concatenate([first, second]))


def test_sharded_arrays_keep_zarrs_path(tmp_path: Path) -> None:
    g = zarr.open_group(tmp_path, mode="w")
    a = _array(g, "s", (), "float32", shards=(32,))
    assert not ChunkRows().supports(a._async_array)


def test_rows_outside_the_array_are_refused(tmp_path: Path) -> None:
    """Rows past the array's shape would land in a chunk file no reader looks at."""
    g = zarr.open_group(tmp_path, mode="w")
    a = _array(g, "a", (), "float64")  # 40 rows
    with pytest.raises(ValueError, match="outside the array's 40 rows"):
        sync(ChunkRows().put(a._async_array, 38, np.zeros(5)))
    assert not (tmp_path / "a" / "c").exists()


def test_other_stores_get_the_chunks_through_zarr() -> None:
    """Local stores are written directly (a temporary file renamed over the chunk); any other
    store through its own ``set``: the same values read back."""
    g = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    a = _array(g, "m", (3,), "float32")
    data = np.arange(60, dtype=np.float32).reshape(20, 3)
    w = ChunkRows()
    sync(w.put(a._async_array, 0, data[:7]))
    sync(w.put(a._async_array, 7, data[7:]))
    np.testing.assert_array_equal(a[:20], data)
