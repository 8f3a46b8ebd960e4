"""Explain benchmark: wall time to explain B = 1..512 test points by streaming a recorded history
(default codec, and no codec) vs the published baseline of one ``torch.save`` file per step, beside
the machine's limits on the same files: raw sequential read (page cache dropped), zarr read+decode.

    python -m benchmarks.explain           # full, ~2-5 min: writes benchmarks/results/explain.json
    python -m benchmarks.explain --quick   # < 1 min, writes to a temp folder (or --out PATH)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

import historystore as hs
from attribution import Engine, adapter_for
from historystore.meta import layout

try:  # run as a module (python -m benchmarks.explain) or as a script
    from benchmarks import _machine
except ImportError:  # pragma: no cover
    import _machine  # type: ignore[no-redef]

MB = _machine.MB

DETAILS = """\
Records a run large enough that the store holds hundreds of MB (a CNN front end + a wide
Linear layer, a few million parameters, on generated data) in a temporary directory, and
alongside it the baseline of the published code: one ``torch.save`` file of Δ_t per step. Then,
for each test batch size B, it measures in the same run:

* scan: ``attribution`` explaining B test points (one pass over the store;
  prefetching scan, steps batched into one GEMM/conv per block; dask threads over ranges),
* baseline: the same decomposition from the per-step ``torch.save`` files, one step at a
  time (load a file, compute that step),

next to the machine's limits: raw sequential read of the store's files and zarr read+decode of
the same arrays with no compute. Before every measured pass the files are dropped from the page
cache with ``posix_fadvise(DONTNEED)`` (after fsync) where the OS has it; otherwise the figures
are marked "cached". Prints a table and writes JSON (--quick: to a temporary folder unless --out
is given, so that the committed results stay as they are).
"""


@dataclass(frozen=True)
class Config:
    name: str
    steps: int
    channels: int  # conv output channels (the Linear after it has channels*16*16 inputs)
    hidden: int  # width of the big Linear layer
    train_size: int
    batch: int
    batch_sizes: tuple[int, ...]
    keyframe_every: int


FULL = Config("full", 160, 32, 192, 8192, 64, (1, 8, 64, 512), 64)
QUICK = Config("quick", 32, 16, 64, 2048, 32, (1, 8, 64, 512), 16)


class BenchNet(nn.Module):
    """conv(3→C, 3x3) → ReLU → Linear(C·16·16 → hidden) → ReLU → Linear(hidden → 10)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.fc1 = nn.Linear(channels * 16 * 16, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


# -- recording ---------------------------------------------------------------------------------
def record(tmp: Path, cfg: Config) -> dict[str, Any]:
    """Train on generated data, recording to a store and to per-step torch.save files."""
    torch.manual_seed(0)
    n = cfg.train_size
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    x = torch.randn(n + 512, 3, 16, 16)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    model = BenchNet(cfg.channels, cfg.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    store_path, raw_path, base_dir = tmp / "run.zarr", tmp / "run-nocodec.zarr", tmp / "torchsave"
    base_dir.mkdir()
    g = torch.Generator().manual_seed(0)
    rec_cfg = hs.RecorderConfig(keyframe_every=cfg.keyframe_every, optimizer_state="none")
    raw_cfg = replace(rec_cfg, codec="none")
    t_rec = t_rec_raw = t_base = 0.0
    t0 = time.perf_counter()
    with (
        hs.Recorder(store_path, model, opt, rec_cfg, overwrite=True) as rec,
        hs.Recorder(raw_path, model, opt, raw_cfg, overwrite=True) as rec_raw,
    ):
        for t in range(cfg.steps):
            idx = torch.randperm(n, generator=g)[: cfg.batch]
            before = {k: p.detach().clone() for k, p in model.named_parameters()}
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            t1 = time.perf_counter()
            rec.step(idx, labels=y[idx], loss=loss)
            t2 = time.perf_counter()
            rec_raw.step(idx, labels=y[idx], loss=loss)
            t3 = time.perf_counter()
            deltas = {k: p.detach() - before[k] for k, p in model.named_parameters()}
            torch.save({"deltas": deltas, "ids": idx, "labels": y[idx]}, base_dir / f"{t:06d}.pt")
            t_base += time.perf_counter() - t3
            t_rec += t2 - t1
            t_rec_raw += t3 - t2
        t1 = time.perf_counter()
    t_close = time.perf_counter() - t1
    store = hs.open_store(store_path)
    params = sum(p.numel() for p in model.parameters())
    stored = _machine.du(store_path)
    return {
        "store": store_path,
        "store_nocodec": raw_path,
        "bytes_stored_nocodec": _machine.du(raw_path),
        "baseline_dir": base_dir,
        "x_test": x[n:],
        "params": params,
        "steps": store.num_steps,
        "steps_per_block": store.steps_per_block,
        "bytes_raw": params * 4 * store.num_steps,
        "bytes_stored": stored,
        "bytes_baseline": _machine.du(base_dir),
        "seconds_total": time.perf_counter() - t0,
        "seconds_rec_step": t_rec,
        "seconds_rec_step_nocodec": t_rec_raw,
        "seconds_close_both": t_close,
        "seconds_torch_save": t_base,
    }


# -- machine limits ----------------------------------------------------------------------------
def delta_arrays(store: hs.HistoryStore) -> list[Path]:
    return [Path(store.path) / layout.param_path(n, "delta") for n in store.tensor_names]


def raw_read(paths: list[Path], cold: bool) -> tuple[float, int]:
    """Sequential read of the files, 16 MB at a time (the floor for any reader)."""
    if cold:
        _machine.drop_from_page_cache(*paths)
    t0 = time.perf_counter()
    total = _machine.read_files(paths, 16 << 20)
    return time.perf_counter() - t0, total


def zarr_decode(store: hs.HistoryStore, cold: bool, threads: int) -> float:
    """Read + decode every delta array block by block with zarr alone (no compute), with as
    many blocks in flight as the scan's prefetch keeps (``threads``)."""
    arrays = [zarr.open_array(str(p), mode="r") for p in delta_arrays(store)]
    if cold:
        _machine.drop_from_page_cache(*delta_arrays(store))

    def read(r: tuple[int, int]) -> None:
        for arr in arrays:
            arr[r[0] : r[1]]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as ex:
        list(ex.map(read, store.block_ranges()))
    return time.perf_counter() - t0


# -- the baseline: per-step torch.save files ---------------------------------------------------
def baseline_explain(
    files: list[Path], model: nn.Module, x: torch.Tensor, layers: list[str], grid_size: int = 201
) -> dict[str, np.ndarray]:
    """The same decomposition (γ, ‖c_t‖, example scores, class KDE) one step file at a time."""
    mods = dict(model.named_modules())
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        mods[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, (a[0], o)))
        for n in layers
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    b = len(x)
    grid = torch.linspace(-1, 1, grid_size)
    z = {n: got[n][1].flatten(1) for n in layers}
    zn = {n: z[n].norm(dim=1) for n in layers}
    gamma = {n: torch.zeros(b, len(files)) for n in layers}
    examples = {n: torch.zeros(b, 0, dtype=torch.float64) for n in layers}
    kde = {n: torch.zeros(10, b, grid_size, dtype=torch.float64) for n in layers}
    for t, f in enumerate(files):
        d = torch.load(f, weights_only=True)
        ids = d["ids"]
        for n in layers:
            m = mods[n]
            c = adapter_for(m).contributions(m, d["deltas"][f"{n}.weight"][None], got[n][0])[:, 0]
            c = c + d["deltas"][f"{n}.bias"].view(-1, *([1] * (c.dim() - 2)))  # [B, *out]
            c = c.flatten(1)
            gt = (c * z[n]).sum(1)
            nt = c.norm(dim=1)
            gamma[n][:, t] = gt
            cos = torch.where(nt > 0, gt / (zn[n] * nt), torch.zeros_like(gt))
            k = torch.exp(-0.5 * ((grid[None] - cos[:, None]) / 0.1) ** 2) * nt[:, None]
            for cl in d["labels"].unique():
                kde[n][cl] += k.double()
            need = int(ids.max()) + 1
            if examples[n].shape[1] < need:
                pad = torch.zeros(b, need - examples[n].shape[1], dtype=torch.float64)
                examples[n] = torch.cat([examples[n], pad], 1)
            examples[n].index_add_(1, ids, (gt.double() / len(ids))[:, None].expand(-1, len(ids)))
    return {n: gamma[n].numpy() for n in layers}


# -- main --------------------------------------------------------------------------------------
def limits(store: hs.HistoryStore, raw_bytes: int, cold: bool) -> dict[str, float]:
    """Raw sequential read and zarr read+decode of the store's delta arrays."""
    files = _machine.files_under(*delta_arrays(store))
    t_raw, nbytes = raw_read(files, cold)
    t_cached, _ = raw_read(files, False)
    t_dec1 = zarr_decode(store, cold, 1)
    t_dec = zarr_decode(store, cold, 2)  # = the scan's default prefetch
    return {
        "bytes_stored": float(nbytes),
        "raw_read_MBps": nbytes / t_raw / MB,
        "raw_read_cached_MBps": nbytes / t_cached / MB,
        "zarr_decode_1thread_steps_per_s": store.num_steps / t_dec1,
        "zarr_decode_steps_per_s": store.num_steps / t_dec,
        "zarr_decode_MBps_stored": nbytes / t_dec / MB,
        "zarr_decode_MBps_raw": raw_bytes / t_dec / MB,
    }


def time_scan(
    store: hs.HistoryStore, model: nn.Module, layers: list[str], x: torch.Tensor, **kw: Any
) -> tuple[float, Any]:
    """Cold-cache wall time of explaining ``x`` in one test batch (engine set up beforehand:
    restore and index are per store, not per test batch)."""
    engine = Engine(store, model, layers, progress=False, **kw)
    _machine.drop_from_page_cache(*delta_arrays(store))
    t0 = time.perf_counter()
    res = engine.explain(x, test_batch_size=len(x))
    return time.perf_counter() - t0, res


def main(argv: list[str] | None = None) -> int:
    ap = _machine.arg_parser(__doc__, DETAILS, "small run (< 1 min)", "explain.json")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temp run is recorded")
    ap.add_argument("--device", default=None, help="explain device (default: CUDA if present)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = _machine.results_dir(args.quick) / "explain.json"
    cfg = QUICK if args.quick else FULL
    torch.manual_seed(0)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="hs-bench-") as tmpdir:
        tmp = Path(tmpdir)
        print(f"recording {cfg.name} run in {tmp} ...", flush=True)
        run = record(tmp, cfg)
        store = hs.open_store(run["store"])
        store_nc = hs.open_store(run["store_nocodec"])
        can_drop = hasattr(os, "posix_fadvise")
        raw_bytes = run["bytes_raw"]
        print(
            f"  {run['params']:,} params, {run['steps']} steps, store "
            f"{run['bytes_stored'] / MB:,.0f} MB ({raw_bytes / MB:,.0f} MB raw), torch.save files "
            f"{run['bytes_baseline'] / MB:,.0f} MB; recording took {run['seconds_total']:.1f} s",
            flush=True,
        )
        lim = limits(store, raw_bytes, can_drop)
        lim_nc = limits(store_nc, raw_bytes, can_drop)
        base_files = _machine.files_under(run["baseline_dir"])
        t_base_raw, base_bytes = raw_read(base_files, can_drop)
        lim_base = {"raw_read_MBps": base_bytes / t_base_raw / MB}
        layers = ["conv", "fc1", "fc2"]
        x_all = run["x_test"]
        model = BenchNet(cfg.channels, cfg.hidden)
        # warm-up (imports, thread pools, kernels), not timed
        Engine(store, model, layers, progress=False, scheduler="sync").explain(x_all[:8])
        Engine(store, model, layers, progress=False, num_workers=2).explain(x_all[:8])
        rows = []
        for b in cfg.batch_sizes:
            x = x_all[:b]
            t_sync, res = time_scan(store, model, layers, x, scheduler="sync", device=args.device)
            t_thr, _ = time_scan(store, model, layers, x, num_workers=2, device=args.device)
            t_nc, _ = time_scan(store_nc, model, layers, x, scheduler="sync", device=args.device)
            _machine.drop_from_page_cache(*base_files)
            t0 = time.perf_counter()
            base = baseline_explain(base_files, model, x, layers)  # model holds θ_T now
            t_base = time.perf_counter() - t0
            best = min(t_sync, t_thr)
            row = {
                "B": b,
                "scan_sync_s": t_sync,
                "scan_threads2_s": t_thr,
                "scan_steps_per_s": run["steps"] / best,
                "scan_MBps_stored": lim["bytes_stored"] / best / MB,
                "scan_MBps_raw": raw_bytes / best / MB,
                "scan_share_of_decode_limit": run["steps"] / best / lim["zarr_decode_steps_per_s"],
                "nocodec_scan_s": t_nc,
                "nocodec_steps_per_s": run["steps"] / t_nc,
                "baseline_s": t_base,
                "baseline_steps_per_s": run["steps"] / t_base,
                "speedup_vs_baseline": t_base / best,
                "nocodec_speedup_vs_baseline": t_base / t_nc,
                "max_decomposition_error": float(
                    max(res.decomposition_error(n).max() for n in layers)
                ),
                "baseline_max_rel_gamma_diff": float(
                    max(
                        np.abs(base[n] - res[n]["gamma"]).max()
                        / max(np.abs(res[n]["gamma"]).max(), 1e-30)
                        for n in layers
                    )
                ),
            }
            rows.append(row)
            print(
                f"  B={b:<4} scan {best:6.2f} s, no-codec scan {t_nc:6.2f} s, "
                f"baseline {t_base:6.2f} s",
                flush=True,
            )
        facts = _machine.machine_facts()
        result = {
            "config": asdict(cfg),
            "machine": {
                "cpu_count": facts["cpu_count"],
                "torch_threads": facts["torch_threads"],
                "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "platform": facts["platform"],
                "python": facts["python"],
                "torch": facts["torch"],
                "zarr": facts["zarr"],
                "device": str(args.device or ("cuda" if facts["cuda"] else "cpu")),
                "filesystem": _machine.filesystem(tmp),
                "reads": "cold (posix_fadvise DONTNEED after fsync)"
                if can_drop
                else "cached (no posix_fadvise)",
            },
            "run": {
                k: v
                for k, v in run.items()
                if k not in ("store", "store_nocodec", "baseline_dir", "x_test")
            },
            "limits": {"store": lim, "store_nocodec": lim_nc, "torch_save_files": lim_base},
            "rows": rows,
            "seconds_benchmark": time.perf_counter() - t_start,
        }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    run, m = r["run"], r["machine"]
    lim, nc, tb = (
        r["limits"]["store"],
        r["limits"]["store_nocodec"],
        r["limits"]["torch_save_files"],
    )
    load = m["load_average"]
    print()
    print(
        f"{r['config']['name']} run: {run['params'] / 1e6:.2f} M params, {run['steps']} steps, "
        f"{run['steps_per_block']} steps/block; store {run['bytes_stored'] / MB:,.0f} MB "
        f"(default codec), {run['bytes_stored_nocodec'] / MB:,.0f} MB (no codec), torch.save "
        f"files {run['bytes_baseline'] / MB:,.0f} MB"
    )
    print(
        f"machine: {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), device "
        f"{m['device']}, {m['filesystem']}, reads {m['reads']}"
        + (f", load average {load[0]:.1f}" if load else "")
    )
    for name, d in (("default codec", lim), ("no codec", nc)):
        print(
            f"limits, {name}: raw read {d['raw_read_MBps']:,.0f} MB/s (page cache "
            f"{d['raw_read_cached_MBps']:,.0f}); zarr read+decode "
            f"{d['zarr_decode_steps_per_s']:,.1f} steps/s = "
            f"{d['zarr_decode_MBps_stored']:,.0f} MB/s stored, "
            f"{d['zarr_decode_MBps_raw']:,.0f} MB/s raw (1 thread: "
            f"{d['zarr_decode_1thread_steps_per_s']:,.1f} steps/s)"
        )
    print(f"limits, torch.save files: raw read {tb['raw_read_MBps']:,.0f} MB/s")
    head = (
        f"{'B':>4} | {'sync s':>7} {'2thr s':>7} {'steps/s':>8} {'MB/s st':>8} {'MB/s raw':>8} "
        f"{'%limit':>6} | {'nocodec s':>9} {'steps/s':>8} | {'base s':>7} {'steps/s':>8} | "
        f"{'speedup':>7} {'nocodec':>7} | {'decomp err':>10}"
    )
    print(head)
    print("-" * len(head))
    for w in r["rows"]:
        print(
            f"{w['B']:>4} | {w['scan_sync_s']:>7.2f} {w['scan_threads2_s']:>7.2f} "
            f"{w['scan_steps_per_s']:>8.1f} {w['scan_MBps_stored']:>8.0f} "
            f"{w['scan_MBps_raw']:>8.0f} "
            f"{100 * w['scan_share_of_decode_limit']:>5.0f}% | {w['nocodec_scan_s']:>9.2f} "
            f"{w['nocodec_steps_per_s']:>8.1f} | {w['baseline_s']:>7.2f} "
            f"{w['baseline_steps_per_s']:>8.1f} | {w['speedup_vs_baseline']:>6.1f}x "
            f"{w['nocodec_speedup_vs_baseline']:>6.1f}x | {w['max_decomposition_error']:>10.1e}"
        )
    print(
        "sync = one prefetching scan; 2thr = dask threads, 2 step ranges at once; steps/s, MB/s "
        "and speedup use the faster of the two; %limit = share of zarr read+decode alone; "
        "nocodec = the same run stored without compression; base = one torch.save file per "
        "step, loaded and computed step by step (γ agrees to "
        f"{max(w['baseline_max_rel_gamma_diff'] for w in r['rows']):.1e} relative)"
    )
    print(f"benchmark took {r['seconds_benchmark']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
