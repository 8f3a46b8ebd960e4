"""Stores on object storage: a real S3-compatible server (moto's, started here on 127.0.0.1)
reached through s3fs and zarr's FsspecStore; record, verify, bit-exact replay, explain, a block
cut off mid-write, a lost object, and a dask LocalCluster of worker processes reading the bucket.

s3fs comes with the ``s3`` extra, moto and flask with ``test-s3`` (both in ``dev``): without
them these tests fail at import instead of being skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import s3fs
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner
from distributed import Client, LocalCluster, get_task_stream
from moto.server import ThreadedMotoServer

import historystore as hs
from attribution import AttributionResult, explain
from attribution.cli import main
from attribution.demo.data import Digits
from attribution.demo.model import DigitsCNN
from historystore.meta.info import info
from historystore.meta.verify import verify
from historystore.write import writer

BUCKET = "runs"
CFG = hs.RecorderConfig(keyframe_every=16, steps_per_block=16)


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    """A real S3 API on a local port; yields the storage_options that reach it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(
        Bucket=BUCKET
    )
    yield {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    server.stop()


def _record(
    path: str | Path,
    digits: Digits,
    steps: int,
    config: hs.RecorderConfig = CFG,
    storage_options: dict[str, Any] | None = None,
) -> tuple[DigitsCNN, list[dict[str, torch.Tensor]]]:
    """A small real run (SGD on digits); returns the model and θ_t for every t."""
    torch.manual_seed(0)
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    snaps = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    with hs.Recorder(path, model, opt, config, storage_options=storage_options) as rec:
        for _ in range(steps):
            idx = torch.randperm(len(digits.y_train), generator=g)[:32]
            loss = F.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, labels=digits.y_train[idx], loss=loss)
            snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return model, snaps


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _assert_results_equal(a: AttributionResult, b: AttributionResult, exact: bool) -> None:
    assert a.layer_names == b.layer_names
    for layer in a.layer_names:
        assert a[layer].keys() == b[layer].keys()
        for key, v in a[layer].items():
            w = b[layer][key]
            if exact or key.endswith("_ids"):
                np.testing.assert_array_equal(v, w, err_msg=f"{layer}/{key}")
            else:  # another split of the steps sums in another order
                scale = max(float(np.nanmax(np.abs(v))), 1e-30) if v.size else 1.0
                np.testing.assert_allclose(v, w, rtol=1e-5, atol=1e-6 * scale, err_msg=key)


@pytest.fixture(scope="module")
def runs(
    s3: dict[str, Any], digits: Digits, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The same run recorded to the bucket and to a local directory, and its explanation of a
    few test points from the bucket (one sequential scan)."""
    local = tmp_path_factory.mktemp("remote") / "run.zarr"
    url = f"s3://{BUCKET}/runs/run.zarr"
    _, snaps = _record(url, digits, 32, CFG, s3)
    _record(local, digits, 32)
    model = DigitsCNN(channels=8, hidden=32)
    x = digits.x_test[:4]
    result = explain(url, model, x, scheduler="sync", progress=False, storage_options=s3)
    return {"url": url, "local": str(local), "snaps": snaps, "x": x, "model": model, "seq": result}


def test_s3_round_trip_is_bit_exact_and_explains_like_local(
    s3: dict[str, Any], runs: dict[str, Any]
) -> None:
    url, local, snaps = runs["url"], runs["local"], runs["snaps"]
    fs = s3fs.S3FileSystem(**s3)
    assert fs.exists(f"{BUCKET}/runs/run.zarr/commit/zarr.json")  # really in the bucket
    report = verify(url, storage_options=s3)
    assert report.ok, report.problems
    assert report.keyframes_checked == 2 and report.checkpoints_checked == 2
    store = hs.open_store(url, storage_options=s3)
    assert store.num_steps == 32 and store.keyframe_steps.tolist() == [0, 16, 32]
    for t in (0, 7, 16, 29, 32):  # from a keyframe, between keyframes, the last step
        theta = store.params_at(t)
        for n, want in snaps[t].items():
            assert _bits_equal(theta[n], want), (t, n)
    loc = hs.open_store(local)
    np.testing.assert_array_equal(store.batch(11).ids, loc.batch(11).ids)
    remote_view, local_view = store.to_xarray(["fc1.weight"]), loc.to_xarray(["fc1.weight"])
    for var in ("delta.fc1.weight", "keyframe.fc1.weight", "ids", "loss"):  # streamed lazily
        np.testing.assert_array_equal(remote_view[var].values, local_view[var].values)
    # the objects in the bucket are the files on disk, byte for byte in size
    remote_info, local_info = info(url, storage_options=s3), info(local)
    for r, lo in zip(remote_info["tensors"], local_info["tensors"], strict=True):
        assert r["bytes_stored"] == lo["bytes_stored"] > 0, r["name"]
    assert abs(remote_info["bytes_stored"] - local_info["bytes_stored"]) < 2000  # timestamps
    from_disk = explain(
        local, DigitsCNN(channels=8, hidden=32), runs["x"], scheduler="sync", progress=False
    )
    _assert_results_equal(runs["seq"], from_disk, exact=True)
    for n, p in runs["model"].named_parameters():  # explain restored θ_T from the bucket
        assert _bits_equal(p.detach(), snaps[-1][n]), n


def test_cli_reads_s3_with_credentials_from_the_environment(
    s3: dict[str, Any], runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["client_kwargs"]["endpoint_url"])
    out = CliRunner().invoke(main, ["info", runs["url"]])
    assert out.exit_code == 0 and out.output.startswith(f"{runs['url']}: 32 steps"), out.output


def test_memory_and_file_urls(digits: Digits, tmp_path: Path) -> None:
    _, snaps = _record("memory://historystore-test/run.zarr", digits, 10, CFG)
    store = hs.open_store("memory://historystore-test/run.zarr")
    final = store.params_at(10)
    assert all(_bits_equal(final[n], v) for n, v in snaps[-1].items())
    assert verify("memory://historystore-test/run.zarr").ok
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with hs.Recorder("memory://historystore-test/run.zarr", model, opt, CFG, overwrite=True) as rec:
        for _ in range(3):  # a new run replaces every object of the old one
            loss = model(digits.x_train[:8]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(torch.arange(8), loss=loss)
    store = hs.open_store("memory://historystore-test/run.zarr")
    assert store.num_steps == 3 and store.keyframe_steps.tolist() == [0, 3]
    assert verify("memory://historystore-test/run.zarr").ok
    _record(f"file://{tmp_path}/run.zarr", digits, 10, CFG)  # file:// is the local LocalStore
    assert (tmp_path / "run.zarr" / "commit" / "zarr.json").is_file()
    assert verify(f"file://{tmp_path}/run.zarr").ok
    with pytest.raises(ValueError, match="storage_options"):
        hs.open_store(tmp_path / "run.zarr", storage_options={"anon": True})
    with pytest.raises(hs.NotAStoreError):
        hs.open_store("memory://historystore-test/nothing-here.zarr")


def test_a_block_cut_off_mid_write_on_s3_is_invisible_and_resumable(
    s3: dict[str, Any], digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Object stores have no rename: each PUT of an object is atomic, and the commit record is
    one object written after all of a block's data. A writer that dies half way through a
    block's PUTs (here: the store fails on the 15th object of the third block) leaves objects
    beyond the commit that no reader sees; the store verifies and resumes."""
    url = f"s3://{BUCKET}/cut/run.zarr"
    real_set = zarr.storage.FsspecStore.set
    puts: dict[str, Any] = {"n": 0, "armed": False, "written": []}

    async def failing_set(self: zarr.storage.FsspecStore, key: str, value: Any) -> None:
        if puts["armed"] and not key.endswith("zarr.json"):
            puts["n"] += 1
            if puts["n"] == 15:  # after the PUTs in flight beside it went through
                await asyncio.sleep(0.5)
                raise OSError("connection reset by peer")
            await real_set(self, key, value)
            puts["written"].append(key)
            return
        await real_set(self, key, value)

    real_write = writer.BlockWriter.write

    def write(self: writer.BlockWriter, block: writer.Block) -> None:
        puts["armed"] = block.t0 == 8
        real_write(self, block)

    monkeypatch.setattr(zarr.storage.FsspecStore, "set", failing_set)
    monkeypatch.setattr(writer.BlockWriter, "write", write)
    torch.manual_seed(0)
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # one commit per block: the cut hits exactly the block that starts at step 8
    cfg = hs.RecorderConfig(keyframe_every=16, steps_per_block=4, join_blocks=False)
    snaps = []
    with (
        pytest.raises(hs.RecorderError, match="connection reset"),
        hs.Recorder(url, model, opt, cfg, storage_options=s3) as rec,
    ):
        for t in range(20):
            idx = torch.arange(16 * t, 16 * t + 16)
            loss = F.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, labels=digits.y_train[idx], loss=loss)
            snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
            time.sleep(0.02)
    monkeypatch.undo()
    assert puts["n"] >= 15
    fs = s3fs.S3FileSystem(**s3)
    fs.invalidate_cache()
    # the cut block's objects PUT before the failure are there (which ones depends on the
    # order the concurrent PUTs ran in), past the commit
    assert puts["written"]
    assert all(fs.exists(f"{BUCKET}/cut/run.zarr/{k}") for k in puts["written"])
    store = hs.open_store(url, storage_options=s3)
    assert store.num_steps == 8
    report = verify(url, storage_options=s3)
    assert report.ok, report.problems
    theta = store.params_at(8)
    assert all(_bits_equal(theta[n], v) for n, v in snaps[7].items())
    # resume from the committed steps: restore θ_8, train on, overwrite 8-11
    model = DigitsCNN(channels=8, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    store.restore(model, opt)
    with hs.Recorder(url, model, opt, resume=True, storage_options=s3) as rec:
        for _ in range(4):
            idx = torch.arange(16)
            loss = F.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, loss=loss)
    store = hs.open_store(url, storage_options=s3)
    assert store.num_steps == 12 and store.keyframe_steps.tolist() == [0, 12]
    final = store.params_at(12)
    assert all(_bits_equal(final[n], p.detach()) for n, p in model.named_parameters())
    with pytest.raises(hs.RecorderError, match="already exists"):
        hs.Recorder(url, model, opt, storage_options=s3).__enter__()
    # a lost object (zarr would read it as zeros) is found by verify and by the reader
    fs.rm(f"{BUCKET}/cut/run.zarr/params/conv1.bias/delta/c/1/0")
    report = verify(url, storage_options=s3)
    assert not report.ok and "conv1.bias" in report.problems[0] and "missing" in report.problems[0]
    with pytest.raises(hs.CorruptStoreError, match="missing"):
        hs.open_store(url, storage_options=s3).delta(5)


def test_local_cluster_of_processes_reading_s3_equals_sync(
    s3: dict[str, Any], runs: dict[str, Any]
) -> None:
    """Two worker processes reopen the store from the bucket (a HistoryStore pickles as URL +
    storage_options) and explain a step range each; the merged result equals one scan."""
    url, x = runs["url"], runs["x"]
    with (
        LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
        with get_task_stream(client) as tasks:
            dist = explain(
                url, DigitsCNN(channels=8, hidden=32), x, scheduler=client, progress=False,
                storage_options=s3,
            )  # fmt: skip
        assert dist.attrs["scheduler"] == "distributed"
        scans = [t for t in tasks.data if "_scan_range" in str(t["key"])]
        assert len(scans) >= 2  # the run was cut into step ranges, each a task on the cluster
        # which worker runs which range is dask's choice (under load it may pick one for all):
        # every worker process must be able to reopen the store from the bucket by itself
        steps = client.run(lambda: hs.open_store(url, storage_options=s3).num_steps)
        assert sorted(steps) == sorted(pids) and set(steps.values()) == {32}
    _assert_results_equal(runs["seq"], dist, exact=False)
