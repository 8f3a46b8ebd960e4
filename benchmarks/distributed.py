"""Distributed benchmark: explaining one store with a dask.distributed LocalCluster of 1 vs 2
worker processes, the store on local disk and on an S3-compatible server on 127.0.0.1, beside
one in-process scan and the machine's limits.

    python -m benchmarks.distributed           # full, ~3-5 min: benchmarks/results/distributed.json
    python -m benchmarks.distributed --quick   # < 1 min, writes to a temp folder (or --out PATH)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import historystore as hs
from attribution import explain

try:  # run as a module (python -m benchmarks.distributed) or as a script
    from benchmarks import _machine
except ImportError:  # pragma: no cover
    import _machine  # type: ignore[no-redef]

MB = _machine.MB

DETAILS = """\
Records an MLP trained on generated data (teacher labels) to a local store and uploads the
store to an S3-compatible server (moto, started in this process on 127.0.0.1; the ``test-s3``
extra). Then explains B test points on layers fc1..fcN from each copy:

* sync: one prefetching scan in this process (torch's own thread pool),
* cluster-1 / cluster-2: a dask.distributed LocalCluster of 1 / 2 worker processes with one
  thread each; the engine hands each worker a range of steps between keyframes, the worker
  reopens the store by its path or URL and the partial results are merged here.

Each setting runs once untimed (worker imports, connections), then is timed (median of the
repeats). Beside them: the CPUs usable, the share of a core a busy thread gets now (the machine
is shared), zarr read+decode of the deltas in this process, and the S3 server's GET throughput.
The S3 server runs in this process on the same cores as the workers. Prints a table and writes
JSON (--quick: to a temporary folder unless --out is given).
"""


@dataclass(frozen=True)
class Config:
    name: str
    dims: tuple[int, ...]  # MLP layer widths, input first
    steps: int
    keyframe_every: int
    batch: int
    test_points: int
    repeats: int


FULL = Config("full", (512, 256, 10), 256, 32, 64, 64, 2)
QUICK = Config("quick", (256, 256, 10), 64, 16, 32, 16, 1)
BUCKET = "bench"


def record(path: Path, cfg: Config) -> dict[str, Any]:
    torch.manual_seed(0)
    x, y = _machine.teacher_data(cfg.dims[0], 4096 + cfg.test_points)
    model = _machine.MLP(list(cfg.dims))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rc = hs.RecorderConfig(keyframe_every=cfg.keyframe_every, optimizer_state="none")
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with hs.Recorder(path, model, opt, rc) as rec:
        for _ in range(cfg.steps):
            idx = torch.randperm(4096, generator=g)[: cfg.batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, labels=y[idx], loss=loss)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "bytes_stored": _machine.du(path),
        "bytes_raw_deltas": cfg.steps * sum(p.numel() * 4 for p in model.parameters()),
        "seconds_record": time.perf_counter() - t0,
        "x_test": x[4096:],
    }


def start_s3() -> tuple[Any, dict[str, Any]]:
    """moto's S3 server on a free port of 127.0.0.1 and the storage_options reaching it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    ).create_bucket(Bucket=BUCKET)
    opts = {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    return server, opts


def s3_get_mbps(opts: dict[str, Any], prefix: str) -> float:
    """GET throughput of the server: every object under ``prefix``, one request at a time."""
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    keys = [k for k in fs.find(prefix) if "/c/" in k]
    t0 = time.perf_counter()
    total = sum(len(fs.cat_file(k)) for k in keys)
    return total / (time.perf_counter() - t0) / MB


def zarr_decode_steps_per_s(store: hs.HistoryStore) -> float:
    """Read and decode every delta array of the store in this process, no compute."""
    t0 = time.perf_counter()
    for a, b in store.block_ranges():
        store.read_block(a, b, device="cpu")
    return store.num_steps / (time.perf_counter() - t0)


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    fn()  # untimed: imports, worker start-up of the store, connections
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main(argv: list[str] | None = None) -> int:
    ap = _machine.arg_parser(__doc__, DETAILS, "small run (< 1 min)", "distributed.json")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temp run is recorded")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = _machine.results_dir(args.quick) / "distributed.json"
    cfg = QUICK if args.quick else FULL
    from distributed import Client, LocalCluster

    t_start = time.perf_counter()
    server, opts = start_s3()
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="hs-bench-") as tmpdir:
            local = Path(tmpdir) / "run.zarr"
            print(f"recording {cfg.name} run in {local} ...", flush=True)
            run = record(local, cfg)
            import s3fs

            url = f"s3://{BUCKET}/run.zarr"
            s3fs.S3FileSystem(**opts).put(str(local), f"{BUCKET}/run.zarr", recursive=True)
            x = run.pop("x_test")
            layers = [f"fc{i + 1}" for i in range(len(cfg.dims) - 1)]
            print(
                f"  {run['params']:,} params, {cfg.steps} steps, store "
                f"{run['bytes_stored'] / MB:,.1f} MB; uploaded to {url}",
                flush=True,
            )
            limits = {
                "cpu_share_of_one_core": _machine.cpu_share(),
                "zarr_decode_steps_per_s_local": zarr_decode_steps_per_s(hs.open_store(local)),
                "zarr_decode_steps_per_s_s3": zarr_decode_steps_per_s(
                    hs.open_store(url, storage_options=opts)
                ),
                "s3_server_get_MBps": s3_get_mbps(opts, f"{BUCKET}/run.zarr"),
            }
            rows: list[dict[str, Any]] = []
            ref: dict[str, Any] = {}

            def run_one(where: str, setting: str, scheduler: Any) -> None:
                path = url if where == "s3" else str(local)
                so = opts if where == "s3" else None

                def go() -> Any:
                    model = _machine.MLP(list(cfg.dims))
                    return explain(
                        path, model, x, layers=layers, scheduler=scheduler, progress=False,
                        test_batch_size=len(x), storage_options=so,
                    )  # fmt: skip

                secs, res = timed(go, cfg.repeats)
                if setting == "sync":
                    ref[where] = res
                diff = max(
                    float(
                        np.abs(res[n]["gamma"] - ref[where][n]["gamma"]).max()
                        / max(np.abs(ref[where][n]["gamma"]).max(), 1e-30)
                    )
                    for n in layers
                )
                rows.append(
                    {
                        "store": where,
                        "setting": setting,
                        "seconds": secs,
                        "steps_per_s": cfg.steps / secs,
                        "max_rel_gamma_diff_vs_sync": diff,
                    }
                )
                print(f"  {where:<5} {setting:<10} {secs:7.2f} s", flush=True)

            for where in ("local", "s3"):
                run_one(where, "sync", "sync")
            for n in (1, 2):
                with (
                    LocalCluster(
                        n_workers=n, processes=True, threads_per_worker=1, dashboard_address=None
                    ) as cluster,
                    Client(cluster) as client,
                ):
                    for where in ("local", "s3"):
                        run_one(where, f"cluster-{n}", client)
    finally:
        server.stop()
    by = {(r["store"], r["setting"]): r for r in rows}
    scaling = {
        where: by[(where, "cluster-2")]["steps_per_s"] / by[(where, "cluster-1")]["steps_per_s"]
        for where in ("local", "s3")
    }
    facts = _machine.machine_facts()
    result = {
        "config": asdict(cfg),
        "machine": {
            k: facts[k]
            for k in ("cpu_count", "cpus_usable", "torch_threads", "platform", "python", "torch")
        }
        | {"load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "run": run,
        "limits": limits,
        "rows": rows,
        "scaling_2_vs_1_workers": scaling,
        "seconds_benchmark": time.perf_counter() - t_start,
    }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_machine.plain_json(result), indent=2))
    print(f"saved {args.out}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    m, lim, run = r["machine"], r["limits"], r["run"]
    load = m["load_average"]
    print()
    print(
        f"{r['config']['name']} run: {run['params'] / 1e6:.2f} M params, "
        f"{r['config']['steps']} steps, store {run['bytes_stored'] / MB:,.1f} MB; "
        f"{r['config']['test_points']} test points"
    )
    print(
        f"machine: {m['cpus_usable']} usable CPUs, a busy thread gets "
        f"{lim['cpu_share_of_one_core']:.2f} of a core"
        + (f", load average {load[0]:.1f}" if load else "")
    )
    print(
        f"limits: zarr read+decode {lim['zarr_decode_steps_per_s_local']:,.1f} steps/s (disk), "
        f"{lim['zarr_decode_steps_per_s_s3']:,.1f} steps/s (S3); S3 server GET "
        f"{lim['s3_server_get_MBps']:,.0f} MB/s"
    )
    head = f"{'store':<6} {'setting':<10} {'seconds':>8} {'steps/s':>8} {'vs sync':>10}"
    print(head)
    print("-" * len(head))
    for w in r["rows"]:
        print(
            f"{w['store']:<6} {w['setting']:<10} {w['seconds']:>8.2f} {w['steps_per_s']:>8.1f} "
            f"{w['max_rel_gamma_diff_vs_sync']:>10.1e}"
        )
    s = r["scaling_2_vs_1_workers"]
    print(
        f"2 vs 1 worker processes: {s['local']:.2f}x (disk), {s['s3']:.2f}x (S3); vs sync = "
        "largest relative γ difference from the in-process scan"
    )
    print(f"benchmark took {r['seconds_benchmark']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
