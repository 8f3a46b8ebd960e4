"""The full ``historystore`` command line: the store's commands plus ``demo`` and ``explain``.

The store's CLI (``historystore.cli``: info, verify) knows nothing of attribution; this module
adds the commands that need the engine to the same click group, and the console script points
here, so the store stays importable and usable without the engine.
"""

from __future__ import annotations

import click

from historystore.cli import main
from historystore.errors import HistoryStoreError

__all__ = ["main"]


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
@click.argument("store")  # a local path or a store URL (s3://..., credentials from the env)
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
@click.option(
    "--method",
    type=click.Choice(["gamma", "preactivation", "tracin", "epk"]),
    default="gamma",
    show_default=True,
    help="gamma (= preactivation): Pfahler & Morik's decomposition; tracin: TracIn on the "
    "recorded batches; epk: the exact path kernel. tracin and epk need --data.",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A method option (repeatable; VALUE as JSON, else a string), e.g. variant=checkpoints.",
)
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
    options: tuple[str, ...],
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

    from historystore import open_store

    from . import explain
    from .demo.factories import call_factory, load_factory

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
        method = "preactivation" if method == "gamma" else method
        train = None
        if method in ("tracin", "epk"):
            if not data_spec:
                raise click.UsageError(f"--method {method} needs --data (the training set)")
            tx, ty = call_factory(load_factory(data_spec), run_config)
            train = torch.utils.data.TensorDataset(torch.as_tensor(tx), torch.as_tensor(ty))
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
            method_options=_parse_options(options),
            train_data=train,
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
        summary = {
            "store": store,
            "steps": st.num_steps,
            "method": result.method,
            "test points": len(x),
        }
        if "model" in result.layers and "completeness_error" in result["model"]:
            summary["max completeness error"] = float(result["model"]["completeness_error"].max())
        if result.method in ("tracin", "epk"):
            from .report import path_report_data

            data = path_report_data(
                result,
                title=f"historystore: explaining {Path(store).name} ({result.method})",
                summary=summary,
                test_x=x,
                test_y=y,
                train_x=None if train_x is None else train_x.numpy(),
                train_y=train_y,
                num_classes=n_classes,
            )
            click.echo(f"report: {render(data, out_dir / 'report.html')}")
            return
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


def _parse_options(items: tuple[str, ...]) -> dict[str, object]:
    import json

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--option")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
