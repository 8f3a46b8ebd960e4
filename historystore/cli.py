"""The ``historystore`` command line (click: subcommands, help and types for free)."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import HistoryStoreError


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="historystore")
def main() -> None:
    """Record a model's whole training history into a Zarr store and explain it."""


@main.command("info")
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info_cmd(store: str, as_json: bool) -> None:
    """Steps, tensors (shape, encoding, codec), keyframes and bytes raw vs stored."""
    from .inspect import info

    try:
        d = info(store)
    except HistoryStoreError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(d))
        return
    click.echo(
        f"{d['path']}: {d['num_steps']} steps, {d['num_parameters']:,} parameters in "
        f"{len(d['tensors'])} tensors, optimizer {d['optimizer']}"
    )
    click.echo(
        f"  stored {_mb(d['bytes_stored'])} of {_mb(d['bytes_raw'])} raw "
        f"(ratio {d['ratio']:.2f}); keyframes at {d['keyframe_steps']}; "
        f"{d['num_replay_fixes']:,} exact-replay fixes"
    )
    click.echo(f"  {'tensor':<28} {'shape':<18} {'encoding':<10} {'codec':<24} {'ratio':>6}")
    for t in d["tensors"]:
        click.echo(
            f"  {t['name']:<28} {'x'.join(map(str, t['shape'])):<18} "
            f"{t['encoding']:<10} {t['codec']:<24} {t['ratio']:>6.2f}"
        )
        if t["encoding_reason"] not in ("default", "default (lossless)"):
            click.echo(f"      ({t['encoding_reason']})")
        if "theta_rel_error_max" in t:
            click.echo(
                f"      lossy: Δ error mean {t['delta_rel_error_mean']:.2e}, "
                f"replayed θ error max {t['theta_rel_error_max']:.2e}"
            )
    if d["optimizer_state"]:
        keys = sorted({k for v in d["optimizer_state"].values() for k in v})
        click.echo(f"  optimizer state per step: {', '.join(keys)}")
    if d["num_nonfinite_steps"]:
        click.echo(
            f"  WARNING: {d['num_nonfinite_steps']} steps have NaN/inf deltas, first "
            f"{d['nonfinite_steps'][:5]}"
        )


@main.command("verify")
@click.argument("store", type=click.Path())
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def verify_cmd(store: str, progress: bool) -> None:
    """Checksums, metadata, and bit-exact replay to every keyframe and the last step.

    Exit status: 0 sound, 1 damaged, 3 sound but the run has NaN/inf deltas.
    """
    from .inspect import verify

    report = verify(store, progress=progress and sys.stderr.isatty())
    click.echo(report.summary)
    for note in report.notes:
        click.echo(f"note: {note}")
    for w in report.warnings:
        click.echo(f"WARNING: {w}")
    if not report.ok:
        sys.exit(1)
    if report.warnings:
        sys.exit(3)


@main.command("demo")
@click.option(
    "--out",
    "out",
    default="historystore-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the store and the report.",
)
@click.option(
    "--protocol",
    type=click.Choice(["single-class", "shuffled"]),
    default="single-class",
    show_default=True,
    help="The paper's single-class batches with ghost samples, or ordinary batches.",
)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--epochs", default=4, show_default=True, type=click.IntRange(1))
@click.option(
    "--test-points",
    default=10,
    show_default=True,
    type=click.IntRange(1),
    help="test #0 (planted duplicate) and the first test image of each other class",
)
@click.option("--top-k", default=8, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--progress/--no-progress", default=True)
def demo_cmd(
    out: str,
    protocol: str,
    optimizer: str,
    epochs: int,
    test_points: int,
    top_k: int,
    seed: int,
    device: str,
    progress: bool,
) -> None:
    """Record a small CNN on digits, explain test points, write OUT/report.html."""
    from .demo.run import run_demo
    from .demo.train import TrainConfig

    lr = 0.02 if optimizer == "sgd" else 2e-3
    cfg = TrainConfig(
        protocol=protocol,
        optimizer=optimizer,
        epochs=epochs,
        seed=seed,  # type: ignore[arg-type]
        lr=lr,
    )
    f = run_demo(
        out,
        cfg,
        test_points=test_points,
        top_k=top_k,
        progress=progress,
        device=None if device == "auto" else device,
    )
    click.echo(
        f"recorded {f['steps']} steps ({f['size on disk (MB)']:.1f} MB on disk, ratio "
        f"{f['compression ratio']:.2f}, recording overhead "
        f"{f['recording overhead (% of training)']:.1f} %), test accuracy "
        f"{f['test accuracy']:.3f}; explained {test_points} test points in "
        f"{f['seconds_explain']:.1f} s; total {f['seconds_total']:.0f} s"
    )
    click.echo(f"report: {f['report']}")


@main.command("explain")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--model",
    "model_spec",
    required=True,
    help="pkg.module:function returning the model (gets the run config if it "
    "takes an argument); weights come from the store.",
)
@click.option(
    "--test",
    "test_spec",
    required=True,
    help="pkg.module:function returning test inputs x, or (x, y).",
)
@click.option(
    "--data",
    "data_spec",
    default=None,
    help="pkg.module:function returning (x_train, y_train) indexed by the recorded "
    "example ids: shows training images in the report.",
)
@click.option(
    "--layers", default=None, help="Comma-separated module names (default: all supported layers)."
)
@click.option("--method", default="preactivation", show_default=True)
@click.option("--top-k", default=10, show_default=True, type=click.IntRange(1))
@click.option(
    "--limit", default=None, type=click.IntRange(1), help="Explain only the first N test points."
)
@click.option("--test-batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--scheduler",
    default="threads",
    show_default=True,
    help="threads, sync, or a dask.distributed scheduler address (tcp://...).",
)
@click.option(
    "--out", default="historystore-explain", show_default=True, type=click.Path(file_okay=False)
)
@click.option("--report/--no-report", default=True, show_default=True)
@click.option("--progress/--no-progress", default=True)
def explain_cmd(
    store: str,
    model_spec: str,
    test_spec: str,
    data_spec: str | None,
    layers: str | None,
    method: str,
    top_k: int,
    limit: int | None,
    test_batch_size: int,
    device: str,
    scheduler: str,
    out: str,
    report: bool,
    progress: bool,
) -> None:
    """Explain a model's predictions on test points from its recorded history."""
    from pathlib import Path

    import torch

    from .attribution import explain
    from .demo.factories import call_factory, load_factory
    from .reader import open_store

    try:
        st = open_store(store)
        run_config = st.meta.config
        model = call_factory(load_factory(model_spec), run_config)
        test = call_factory(load_factory(test_spec), run_config)
        x, y = test if isinstance(test, (tuple, list)) else (test, None)
        x = torch.as_tensor(x)
        y = None if y is None else torch.as_tensor(y)
        if limit is not None:
            x, y = x[:limit], None if y is None else y[:limit]
        layer_list = [s.strip() for s in layers.split(",")] if layers else None
        sched = None if scheduler == "threads" else scheduler
        result = explain(
            st,
            model,
            x,
            layers=layer_list,
            method=method,
            top_k=top_k,
            test_batch_size=test_batch_size,
            device=None if device == "auto" else device,
            scheduler=sched,
            progress=progress,
        )
    except (HistoryStoreError, ValueError, KeyError, TypeError) as e:
        raise click.ClickException(str(e)) from e
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.save(out_dir / "scores.npz")
    click.echo(f"scores: {out_dir / 'scores.npz'}")
    if report:
        from .demo.run import report_data
        from .report import render

        train_x = train_y = None
        if data_spec:
            train_x, train_y = call_factory(load_factory(data_spec), run_config)
            train_x, train_y = torch.as_tensor(train_x), torch.as_tensor(train_y)
        outputs = result.arrays["outputs"]
        n_classes = int(outputs.shape[1]) if outputs.ndim == 2 else 1
        data = report_data(
            result,
            title=f"historystore: explaining {Path(store).name}",
            summary={
                "store": store,
                "steps": st.num_steps,
                "method": result.method,
                "test points": len(x),
            },
            layers=result.layer_names,
            test_x=x,
            test_y=y,
            test_index=list(range(len(x))),
            train_x=train_x,
            train_y=train_y,
            num_classes=n_classes,
        )
        click.echo(f"report: {render(data, out_dir / 'report.html')}")
