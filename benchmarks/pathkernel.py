"""Exact path kernel: ours (streamed from the store) side by side with ExPLAIND's `explaind`.

Trains a small MLP on scikit-learn digits (log-softmax outputs, NLL loss = cross-entropy:
the setting ExPLAIND's kernel assumes) under AdamW and under SGD with momentum, records it,
and runs our EPK and explaind 0.1.0's ExactPathKernelModel on the same run and test points.
Each side runs in its own subprocess (one torch thread each) so that peak memory is its own.
Reported per optimizer: completeness/prediction error per test point, wall time, peak RSS, and
the Spearman correlation of the per-example scores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks._machine import arg_parser, cpu_share, machine_facts, plain_json, results_dir

FAST_RTOLS = (1e-3, 2e-3)  # looser quadrature tolerances: the error/time trade-off
WINDOW = 64  # momentum_window: attribute what momentum carries per example, as explaind does
DETAILS = """
How the two are compared (what explaind computes and how we read it):
* explaind gets the run as its own wrappers want it: ModelPath with θ_0..θ_T (from the same
  training loop), SGDOptimizerPath / AdamWOptimizerPath with the recorded lr, weight decay and
  (AdamW) the recorded exp_avg/exp_avg_sq per step, and a DataPath stand-in that returns each
  step's recorded batch (X, y, ids) in the recorded order. Its defaults otherwise:
  integral_eps=0.1 (10 midpoint nodes per step), early_integral_eps=0.001 (1000 nodes for the
  first 4 steps); evaluate_predictions=False (it only prints), keep_param_wise_kernel=True
  (without it predict() fails on a None dict at step 0); SGD buffer in float32
  (buffer_float16=False; the default float16 buffer only loses precision).
* its per-example score of test point b is overall_pred_kernel summed over tensors at
  [b, 0, target_b, i], divided by the batch size (its kernel matrix accumulates lr·K without
  the 1/|B| that predict() applies); it is indexed by the recorded ids (we hand it the batches
  in recorded order, so its per-sample kernel is not permuted as with a shuffled full batch).
  Its overall_reg_term carries an extra factor lr (accumulated as lr·(−lr·term)); we divide
  by the constant lr before comparing it with our weight-decay term.
* explaind keeps a per-sample momentum buffer [num_train × params] (SGD) / first moment
  (AdamW), so its per-example scores include what momentum carries from earlier batches. Ours
  by default attribute a step's own batch per example and keep the carried part as the
  momentum term; with momentum_window=64 (= the keyframe interval here) the carried part of
  the last 64 batches goes to their examples too, as in explaind (bounded memory: 64 × batch ×
  params). The Spearman correlation compares the per-example scores as they are.
"""


class LogMLP(nn.Module):
    """64 -> hidden -> 10, ReLU, log-softmax outputs (ExPLAIND's kernel wants output = −loss
    gradient direction: NLL on log-probabilities)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.fc2(torch.relu(self.fc1(x.flatten(1)))), dim=1)


def _data(n_train: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from attribution.demo.data import load_digits

    d = load_digits()
    return d.x_train[:n_train].flatten(1), d.y_train[:n_train], d.x_test.flatten(1)


def _train(run_dir: Path, kind: str, n_train: int, steps: int, batch: int, hidden: int) -> dict:
    """Train + record; keep θ_t, batches and (AdamW) moments as plain arrays for explaind."""
    import historystore as hs

    x, y, _ = _data(n_train)
    torch.manual_seed(0)
    model = LogMLP(hidden)
    if kind == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=2e-3, weight_decay=0.01
        )
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    names = [n for n, _ in model.named_parameters()]
    thetas = {n: [p.detach().clone().numpy()] for n, p in model.named_parameters()}
    moments: dict[str, list[np.ndarray]] = {}
    ids_all = []
    with hs.Recorder(run_dir / "run.zarr", model, opt, hs.RecorderConfig(keyframe_every=64)) as rec:
        for _ in range(steps):
            ids = torch.randperm(len(y), generator=g)[:batch]
            loss = nn.functional.nll_loss(model(x[ids]), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(ids, labels=y[ids], loss=loss)
            ids_all.append(ids.numpy())
            for n, p in model.named_parameters():
                thetas[n].append(p.detach().clone().numpy())
            if kind == "adamw":
                for n, p in model.named_parameters():
                    st = opt.state[p]
                    for k in ("exp_avg", "exp_avg_sq"):
                        moments.setdefault(f"{k}/{n}", []).append(st[k].detach().clone().numpy())
    arrays = {f"theta/{n}": np.stack(v) for n, v in thetas.items()}
    arrays.update({k: np.stack(v) for k, v in moments.items()})
    np.savez(run_dir / "history.npz", ids=np.stack(ids_all), **arrays)
    lr = opt.param_groups[0]["lr"]
    meta = {
        "kind": kind,
        "names": names,
        "lr": lr,
        "weight_decay": opt.param_groups[0]["weight_decay"],
        "momentum": opt.param_groups[0].get("momentum", 0.0),
        "betas": list(opt.param_groups[0].get("betas", (0.9, 0.999))),
        "eps": opt.param_groups[0].get("eps", 1e-8),
        "n_train": n_train,
        "steps": steps,
        "batch": batch,
        "hidden": hidden,
        "params": sum(p.numel() for p in model.parameters()),
    }
    (run_dir / "meta.json").write_text(json.dumps(meta))
    return meta


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- workers (one per subprocess) --------------------------------------------------------------
def _ours(run_dir: Path, meta: dict, b: int, rtol: float | None, window: int, tag: str) -> dict:
    import zarr

    from attribution import explain

    x, y, x_test = _data(meta["n_train"])
    model = LogMLP(meta["hidden"])
    base = _rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    res = explain(
        run_dir / "run.zarr",
        model,
        x_test[:b],
        method="epk",
        train_data=torch.utils.data.TensorDataset(x, y),
        loss_fn=nn.functional.nll_loss,
        scheduler="sync",
        progress=False,
        test_batch_size=b,
        scores_path=run_dir / f"{tag}_scores.zarr",
        method_options={"rtol": rtol, "momentum_window": window},
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    d = res["model"]
    rows = np.asarray(zarr.open_group(str(run_dir / f"{tag}_scores.zarr"), mode="r")["model"][...])
    np.save(run_dir / f"{tag}_rows.npy", rows)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mb": _rss_mb(),
        "baseline_rss_mb": base,
        "completeness_error": d["completeness_error"].tolist(),
        "quadrature_error": d["quadrature_error"].tolist(),
        "target": d["target"].tolist(),
        "f_final": d["f_final"].tolist(),
        "f_init": d["f_init"].tolist(),
        "weight_decay": d["weight_decay"].tolist(),
        "momentum": d["momentum"].tolist(),
        "examples": d["examples"].tolist(),
        "residual": d["residual"].tolist(),
        "nodes_per_step_mean": float(d["nodes"][0].mean()),
        "nodes_per_step_max": int(d["nodes"][0].max()),
    }


class _DataPathStandIn:
    """What ExactPathKernelModel reads of a DataPath: the dataset size and each step's batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, ids: np.ndarray) -> None:
        self.dataloader = argparse.Namespace(dataset=torch.utils.data.TensorDataset(x, y))
        self.ids = ids
        self.x, self.y = x, y

    def get_checkpoint(self, t: int) -> dict[str, torch.Tensor]:
        i = torch.from_numpy(self.ids[t])
        return {"X": self.x[i], "y": self.y[i], "indices": i}


def _explaind(run_dir: Path, meta: dict, b: int, target: list[int]) -> dict:
    import contextlib
    import io

    from explaind.epk_model import ExactPathKernelModel
    from explaind.model_paths import ModelPath
    from explaind.optimizer_paths import AdamWOptimizerPath, SGDOptimizerPath

    x, y, x_test = _data(meta["n_train"])
    h = np.load(run_dir / "history.npz")
    names, steps = meta["names"], meta["steps"]
    checkpoints = [
        {n: torch.from_numpy(h[f"theta/{n}"][t]) for n in names} for t in range(steps + 1)
    ]
    model = ModelPath(LogMLP(meta["hidden"]), device="cpu", checkpoints=checkpoints, output_dim=10)
    if meta["kind"] == "adamw":
        zero = {f"model.{n}": torch.zeros_like(checkpoints[0][n]) for n in names}
        ocp = [{"exp_avg_sq": zero, "exp_avg": zero}] + [
            {
                k: {f"model.{n}": torch.from_numpy(h[f"{k}/{n}"][t]) for n in names}
                for k in ("exp_avg_sq", "exp_avg")
            }
            for t in range(steps)
        ]
        opt = AdamWOptimizerPath(
            model,
            lr=meta["lr"],
            betas=tuple(meta["betas"]),
            eps=meta["eps"],
            weight_decay=meta["weight_decay"],
            checkpoints=ocp,
            device="cpu",
        )
    else:
        opt = SGDOptimizerPath(
            model,
            lr=meta["lr"],
            weight_decay=meta["weight_decay"],
            momentum=meta["momentum"],
            checkpoints=[
                {"lr": meta["lr"], "weight_decay": meta["weight_decay"]} for _ in range(steps + 1)
            ],
            buffer_float16=False,
            device="cpu",
        )
    data = _DataPathStandIn(x, y, h["ids"])
    epk = ExactPathKernelModel(
        model,
        opt,
        nn.CrossEntropyLoss(),
        data,  # type: ignore[arg-type]
        evaluate_predictions=False,
        keep_param_wise_kernel=True,
        device="cpu",
    )
    base = _rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        pred, init, kernel, reg, _ = epk.predict(x_test[:b], keep_kernel_matrices=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tgt = torch.tensor(target)
    rows_b = torch.arange(b)
    k = sum(v[:, 0].detach() for v in kernel.values())  # [B, C, N]
    scores = (k[rows_b, tgt] / meta["batch"]).numpy()
    np.save(run_dir / "explaind_rows.npy", scores)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mb": _rss_mb(),
        "baseline_rss_mb": base,
        "prediction": pred[rows_b, tgt].detach().double().tolist(),
        "initial": init[rows_b, tgt].detach().double().tolist(),
        "reg_term_over_lr": (reg[rows_b, tgt].detach().double() / meta["lr"]).tolist(),
    }


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    run_dir = Path(args.run)
    meta = json.loads((run_dir / "meta.json").read_text())
    tag = _tag(args.worker, args.rtol, args.window)
    if args.worker == "ours":
        out = _ours(run_dir, meta, args.points, args.rtol, args.window, tag)
    else:
        target = json.loads((run_dir / "ours.json").read_text())["target"]
        out = _explaind(run_dir, meta, args.points, target)
    (run_dir / f"{tag}.json").write_text(json.dumps(out))


def _tag(worker: str, rtol: float | None, window: int) -> str:
    return worker + (f"-{rtol:g}" if rtol is not None else "") + (f"-w{window}" if window else "")


def _spawn(
    worker: str, run_dir: Path, points: int, rtol: float | None = None, window: int = 0
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.pathkernel", "--worker", worker]
    cmd += ["--run", str(run_dir), "--points", str(points), "--window", str(window)]
    tag = _tag(worker, rtol, window)
    if rtol is not None:
        cmd += ["--rtol", str(rtol)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads((run_dir / f"{tag}.json").read_text())


def _compare(
    run_dir: Path, meta: dict, ours: dict, theirs: dict, tag: str = "ours"
) -> dict[str, Any]:
    from scipy.stats import spearmanr

    ids = np.load(run_dir / "history.npz")["ids"]
    seen = np.unique(ids)
    f_t, f_0 = np.array(ours["f_final"]), np.array(ours["f_init"])
    scale = np.maximum(np.abs(f_t), np.abs(f_t - f_0))
    out: dict[str, Any] = {
        "ours_completeness_error_max": float(np.max(ours["completeness_error"])),
        "ours_completeness_error_median": float(np.median(ours["completeness_error"])),
        "ours_wall_s_per_point": ours["wall_s"] / len(f_t),
    }
    if "error" in theirs:
        out["explaind_error"] = theirs["error"]
        return out
    err = np.abs(np.array(theirs["prediction"]) - f_t) / scale
    a, b = np.load(run_dir / f"{tag}_rows.npy"), np.load(run_dir / "explaind_rows.npy")
    rho = [float(spearmanr(a[i, seen], b[i, seen]).statistic) for i in range(len(a))]
    top = [
        len(set(np.argsort(-a[i, seen])[:10]) & set(np.argsort(-b[i, seen])[:10])) / 10
        for i in range(len(a))
    ]
    ours_wd = np.array(ours["weight_decay"])
    out.update(
        {
            "explaind_prediction_error_max": float(err.max()),
            "explaind_prediction_error_median": float(np.median(err)),
            "explaind_wall_s_per_point": theirs["wall_s"] / len(f_t),
            "speedup_per_point": theirs["wall_s"] / ours["wall_s"],
            "speedup_cpu": theirs["cpu_s"] / ours["cpu_s"],
            "spearman_per_example_mean": float(np.mean(rho)),
            "spearman_per_example_min": float(np.min(rho)),
            "top10_overlap_mean": float(np.mean(top)),
            "reg_term_rel_diff_median": float(
                np.median(
                    np.abs(np.array(theirs["reg_term_over_lr"]) - ours_wd)
                    / np.maximum(np.abs(ours_wd), 1e-30)
                )
            ),
        }
    )
    return out


def main() -> None:
    ap = arg_parser(
        __doc__,
        DETAILS,
        "small run (2 x 20 steps, 256 examples) written under /tmp",
        "pathkernel.json",
    )
    ap.add_argument("--points", type=int, default=8, help="test points B (one test batch)")
    ap.add_argument("--worker", choices=["ours", "explaind"], help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--rtol", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--window", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    n_train, steps, batch, hidden = (256, 20, 32, 32) if args.quick else (1024, 100, 32, 64)
    out_path = args.out or results_dir(args.quick) / "pathkernel.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    facts["cpu_share"] = cpu_share()
    results: dict[str, Any] = {
        "setting": {
            "data": "scikit-learn digits",
            "model": f"MLP 64-{hidden}-10, ReLU, log-softmax; NLL loss",
            "n_train": n_train,
            "steps": steps,
            "batch": batch,
            "test_points": args.points,
            "torch_threads_per_side": 1,
        },
        "machine": facts,
        "runs": {},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("adamw", "sgd-momentum"):
            run_dir = Path(tmp) / kind
            run_dir.mkdir()
            meta = _train(run_dir, kind.split("-")[0], n_train, steps, batch, hidden)
            ours = _spawn("ours", run_dir, args.points)
            if "error" in ours:
                raise SystemExit(f"our EPK failed: {ours['error']}")
            theirs = _spawn("explaind", run_dir, args.points)
            cmp = _compare(run_dir, meta, ours, theirs)
            results["runs"][kind] = {"meta": meta, "ours": ours, "explaind": theirs, **cmp}
            rows.append((kind, "ours (default rtol)", ours, theirs, cmp))
            print(_row(kind, ours, theirs, cmp))
            for rtol in FAST_RTOLS:
                fast = _spawn("ours", run_dir, args.points, rtol)
                cmp_fast = _compare(run_dir, meta, fast, theirs, _tag("ours", rtol, 0))
                results["runs"][kind][f"ours_rtol_{rtol:g}"] = {**fast, **cmp_fast}
                rows.append((kind, f"ours (rtol {rtol:g})", fast, theirs, cmp_fast))
                print(_row(f"{kind}, rtol {rtol:g}", fast, theirs, cmp_fast))
            win = _spawn("ours", run_dir, args.points, None, WINDOW)
            cmp_win = _compare(run_dir, meta, win, theirs, _tag("ours", None, WINDOW))
            results["runs"][kind][f"ours_momentum_window_{WINDOW}"] = {**win, **cmp_win}
            rows.append((kind, f"ours (momentum window {WINDOW})", win, theirs, cmp_win))
            print(_row(f"{kind}, momentum window {WINDOW}", win, theirs, cmp_win))
    out_path.write_text(json.dumps(plain_json(results), indent=1))
    md = out_path.with_suffix(".md")
    md.write_text(_markdown(results, rows))
    print(f"saved {out_path} and {md}")


def _row(kind: str, ours: dict, theirs: dict, cmp: dict) -> str:
    s = (
        f"{kind}: ours completeness max {cmp['ours_completeness_error_max']:.2e}, "
        f"{ours['wall_s']:.1f} s, {ours['peak_rss_mb']:.0f} MB"
    )
    if "error" in theirs:
        return s + f"; explaind failed: {theirs['error']}"
    return s + (
        f"; explaind error max {cmp['explaind_prediction_error_max']:.2e}, "
        f"{theirs['wall_s']:.1f} s, {theirs['peak_rss_mb']:.0f} MB; "
        f"speed-up {cmp['speedup_per_point']:.1f}x (cpu {cmp['speedup_cpu']:.1f}x), "
        f"Spearman {cmp['spearman_per_example_mean']:.3f}"
    )


def _markdown(results: dict, rows: list) -> str:
    s, m = results["setting"], results["machine"]
    lines = [
        "# Exact path kernel: historystore vs explaind 0.1.0",
        "",
        f"{s['model']}, {s['data']} ({s['n_train']} training examples), {s['steps']} steps of "
        f"batch {s['batch']}, {s['test_points']} test points in one batch, one torch thread per "
        f"side, each side in its own process (peak RSS includes Python + torch, baseline "
        f"shown). Machine: {m['cpu_count']} CPUs, load {m['load_avg_1m']:.1f}, cpu share "
        f"{m['cpu_share']:.2f}.",
        "",
        "| optimizer | side | rel. error max (median) | wall s (per point) | cpu s | peak RSS MB "
        "(baseline) | nodes/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, side, ours, theirs, cmp in rows:
        lines.append(
            f"| {kind} | {side} | {cmp['ours_completeness_error_max']:.1e} "
            f"({cmp['ours_completeness_error_median']:.1e}) | {ours['wall_s']:.1f} "
            f"({cmp['ours_wall_s_per_point']:.2f}) | {ours['cpu_s']:.1f} | "
            f"{ours['peak_rss_mb']:.0f} "
            f"({ours['baseline_rss_mb']:.0f}) | {ours['nodes_per_step_mean']:.1f} "
            f"(max {ours['nodes_per_step_max']}) |"
        )
        if "error" in theirs:
            lines.append(f"| {kind} | explaind | failed: {theirs['error']} | | | | |")
            continue
        if side != "ours (default rtol)":
            continue
        lines.append(
            f"| {kind} | explaind | {cmp['explaind_prediction_error_max']:.1e} "
            f"({cmp['explaind_prediction_error_median']:.1e}) | {theirs['wall_s']:.1f} "
            f"({cmp['explaind_wall_s_per_point']:.2f}) | {theirs['cpu_s']:.1f} | "
            f"{theirs['peak_rss_mb']:.0f} "
            f"({theirs['baseline_rss_mb']:.0f}) | 10 (1000 in steps 0-3) |"
        )
    lines += [
        "",
        "| optimizer | ours | speed-up wall (cpu) | Spearman per-example "
        "(mean, min) | top-10 overlap | weight-decay term rel. diff (median) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, side, _ours, theirs, cmp in rows:
        if "error" in theirs:
            continue
        lines.append(
            f"| {kind} | {side} | {cmp['speedup_per_point']:.1f}x ({cmp['speedup_cpu']:.1f}x) | "
            f"{cmp['spearman_per_example_mean']:.3f}, {cmp['spearman_per_example_min']:.3f} | "
            f"{cmp['top10_overlap_mean']:.2f} | {cmp['reg_term_rel_diff_median']:.1e} |"
        )
    lines += ["", "Error: ours = completeness error |f_0 + Σ terms − f_T| / max(|f_T|, "
              "|f_T − f_0|); explaind = the same for its predict() output.", "",
              DETAILS.strip(), ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
