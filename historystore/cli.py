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
    from .meta.info import info

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

    Ends in one verdict line (OK ... or FAILED ...). Exit status: 0 sound, 1 damaged, 3 sound
    but the run has NaN/inf deltas.
    """
    from .meta.verify import verify

    report = verify(store, progress=progress and sys.stderr.isatty())
    for note in report.notes:
        click.echo(f"note: {note}")
    for w in report.warnings:
        click.echo(f"WARNING: {w}")
    click.echo(report.summary)
    if not report.ok:
        sys.exit(1)
    if report.warnings:
        sys.exit(3)
