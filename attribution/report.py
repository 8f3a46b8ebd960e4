"""A self-contained HTML report of an explanation (matplotlib figures embedded as PNG).

Per test point: the image and prediction, its top-k most influential training examples per
layer, and per layer the class ridge plot (weighted KDE of the cosine γ̄_t over the steps of
each class), as in Pfahler & Morik's figures. The report is one file with no external assets,
so it can be mailed, archived or opened from a cluster's scratch space.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class PointExplanation:
    """What the report shows for one test point."""

    index: int
    image: np.ndarray | None  # [H, W] or [C, H, W]; None for non-image data
    label: int | None
    prediction: int
    probabilities: np.ndarray | None
    topk_ids: dict[str, np.ndarray]  # layer -> [k] training example ids, most influential first
    topk_scores: dict[str, np.ndarray]  # layer -> [k]
    ridge: dict[str, np.ndarray]  # layer -> [C, G] KDE of γ̄ per class
    ridge_weight: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [C] mass
    highlight_ids: Sequence[int] = ()  # e.g. planted duplicates of this point, outlined
    step_scores: np.ndarray | None = None  # [T] per-step influence (path methods)
    completeness_error: float | None = None  # EPK: |f_0 + Σ terms − f_T| / scale
    terms: dict[str, float] = field(default_factory=dict)  # EPK: f_0, examples, momentum, ...


@dataclass
class ReportData:
    title: str
    summary: dict[str, Any]  # label -> value, shown as a table
    layers: list[str]
    classes: list[str]
    grid: np.ndarray  # [G] γ̄ values of the KDE grid
    points: list[PointExplanation]
    train_images: np.ndarray | None = None  # [N, H, W] / [N, C, H, W] to show top-k examples
    train_labels: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    legend: str | None = None  # HTML legend replacing the preactivation method's


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _show(ax: Any, img: np.ndarray) -> None:
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
    ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def point_figure(data: ReportData, p: PointExplanation) -> str:
    """Image + prediction, then one row of top-k training examples per layer."""
    import matplotlib.pyplot as plt

    k = max((len(v) for v in p.topk_ids.values()), default=0)
    rows = len(data.layers)
    show_train = data.train_images is not None and k > 0
    fig = plt.figure(figsize=(1.6 + 1.15 * max(k, 1), 1.3 * max(rows, 1) + 0.4))
    gs = fig.add_gridspec(
        max(rows, 1), k + 1, width_ratios=[1.4] + [1] * k, wspace=0.15, hspace=0.45
    )
    ax = fig.add_subplot(gs[:, 0])
    if p.image is not None:
        _show(ax, p.image)
    title = f"test #{p.index}\npred {data.classes[p.prediction]}"
    if p.label is not None:
        title += f" (true {data.classes[p.label]})"
    ax.set_title(title, fontsize=9)
    highlight = {int(i) for i in p.highlight_ids}
    for r, layer in enumerate(data.layers):
        ids = p.topk_ids.get(layer, np.zeros(0, dtype=np.int64))
        scores = p.topk_scores.get(layer, np.zeros(0))
        for c in range(k):
            ax = fig.add_subplot(gs[r, c + 1])
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(ids):
                ax.axis("off")
                continue
            tid = int(ids[c])
            if show_train and data.train_images is not None and tid < len(data.train_images):
                _show(ax, data.train_images[tid])
            lab = ""
            if data.train_labels is not None and tid < len(data.train_labels):
                lab = f" [{data.classes[int(data.train_labels[tid])]}]"
            ax.set_title(f"#{tid}{lab}\n{scores[c]:.2g}", fontsize=7)
            if tid in highlight:
                for s in ax.spines.values():
                    s.set_edgecolor("crimson")
                    s.set_linewidth(2.5)
            if c == 0:
                ax.set_ylabel(layer, fontsize=8, rotation=0, ha="right", va="center")
    return _png(fig)


def ridge_figure(data: ReportData, p: PointExplanation) -> str:
    """Ridge plots: per layer, one KDE curve of γ̄_t per class (weighted by ‖Δ_t a‖)."""
    import matplotlib.pyplot as plt

    n = len(data.layers)
    fig, axes = plt.subplots(
        1,
        max(n, 1),
        figsize=(2.6 * max(n, 1), 0.32 * len(data.classes) + 1.2),
        sharey=True,
        squeeze=False,
    )
    cmap = plt.get_cmap("tab10")
    for j, layer in enumerate(data.layers):
        ax = axes[0, j]
        dens = p.ridge.get(layer)
        if dens is None:
            ax.axis("off")
            continue
        top = float(dens.max()) or 1.0
        for c in range(dens.shape[0]):
            y = dens[c] / top * 1.6
            ax.fill_between(data.grid, c, c + y, color=cmap(c % 10), alpha=0.75, lw=0)
            ax.plot(data.grid, c + y, color="black", lw=0.4)
        ax.axvline(0, color="grey", lw=0.5, ls=":")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("cosine γ̄ₜ", fontsize=8)
        ax.set_xlim(float(data.grid[0]), float(data.grid[-1]))
        ax.tick_params(labelsize=7)
    axes[0, 0].set_yticks(np.arange(len(data.classes)) + 0.3)
    axes[0, 0].set_yticklabels(data.classes, fontsize=8)
    axes[0, 0].set_ylabel("class of the step's batch", fontsize=8)
    fig.suptitle(
        f"test #{p.index}: which classes' steps moved the preactivation towards (γ̄>0) "
        "or away from it",
        fontsize=9,
    )
    return _png(fig)


def steps_figure(p: PointExplanation) -> str:
    """Per-step influence on the explained output and its running sum (path methods)."""
    import matplotlib.pyplot as plt

    assert p.step_scores is not None
    s = np.asarray(p.step_scores, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7.5, 2.2))
    t = np.arange(len(s))
    ax.bar(t, s, width=1.0, color=np.where(s >= 0, "tab:blue", "tab:red"), lw=0)
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel("influence of the step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax2 = ax.twinx()
    ax2.plot(t, np.cumsum(s), color="black", lw=1)
    ax2.set_ylabel("running sum", fontsize=8)
    ax2.tick_params(labelsize=7)
    title = f"test #{p.index}: per-step influence"
    if p.completeness_error is not None:
        title += f" (completeness error {p.completeness_error:.1e})"
    ax.set_title(title, fontsize=9)
    return _png(fig)


def path_report_data(
    result: Any,
    *,
    title: str,
    summary: dict[str, Any],
    test_x: Any,
    test_y: Any | None,
    train_x: Any | None,
    train_y: Any | None,
    num_classes: int,
) -> ReportData:
    """ReportData of a path method's result (TracIn, EPK): top-k training examples, the
    per-step influence and, for EPK, the completeness check of every test point."""
    d = result["model"]
    outputs = np.asarray(result.arrays["outputs"])
    logits = outputs.reshape(len(outputs), -1)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    points = []
    for i in range(result.num_points):
        keep = d["topk_ids"][i] >= 0
        terms = {}
        if "completeness_error" in d:
            terms = {
                k: float(d[k][i])
                for k in ("f_init", "examples", "weight_decay", "momentum", "residual", "f_final")
            }
            terms["nodes per step"] = float(d["nodes"][i].mean())
        x = np.asarray(test_x[i])
        points.append(
            PointExplanation(
                index=i,
                image=x if x.ndim in (2, 3) else None,
                label=None if test_y is None else int(test_y[i]),
                prediction=int(logits[i].argmax()),
                probabilities=probs[i],
                topk_ids={"model": d["topk_ids"][i][keep]},
                topk_scores={"model": d["topk_scores"][i][keep]},
                ridge={},
                step_scores=d["step_scores"][i],
                completeness_error=float(d["completeness_error"][i])
                if "completeness_error" in d
                else None,
                terms=terms,
            )
        )
    legend = {
        "tracin": "Top-k: training examples ranked by TracIn, Σ over the steps whose batch held "
        "them of lr<sub>t</sub>/|B<sub>t</sub>| ⟨∇f(x; θ<sub>t</sub>), P<sub>t</sub> ∇ℓ(z; "
        "θ<sub>t</sub>)⟩ (f: the explained logit). Below: each step's summed score.",
        "epk": "Top-k: training examples ranked by their exact path-kernel terms, Σ over the "
        "steps whose batch held them of ⟨ḡ<sub>t</sub>, their share of Δ<sub>t</sub>⟩ "
        "(ḡ<sub>t</sub>: the gradient of the explained logit integrated along the step). "
        "Below: each step's contribution ⟨ḡ<sub>t</sub>, Δ<sub>t</sub>⟩ and their running sum, "
        "which ends at f(θ<sub>T</sub>) − f(θ<sub>0</sub>). f(θ<sub>0</sub>) + examples + "
        "weight decay + momentum = f(θ<sub>T</sub>) up to the completeness error shown.",
    }.get(result.method)
    return ReportData(
        title=title,
        summary=summary,
        layers=["model"],
        classes=[str(c) for c in range(num_classes)],
        grid=np.zeros(0),
        points=points,
        train_images=None if train_x is None or np.ndim(train_x) not in (3, 4) else train_x,
        train_labels=None if train_y is None else np.asarray(train_y),
        legend=legend,
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1180px;
color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px
solid #ddd;padding-bottom:.2em}
table.summary{border-collapse:collapse;font-size:.92em}table.summary td{padding:2px 14px 2px
0;vertical-align:top}table.summary td:first-child{color:#666}
.point{margin:18px 0 34px}.point img{max-width:100%}.note{color:#555;font-size:.9em}
.legend{font-size:.88em;color:#444}
"""


def render(data: ReportData, path: str | Path) -> Path:
    """Write the report as one HTML file; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in data.summary.items()
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(data.title)}"
        f"</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(data.title)}</h1>",
        f"<table class='summary'>{rows}</table>",
        *[f"<p class='note'>{html.escape(n)}</p>" for n in data.notes],
        f"<p class='legend'>{data.legend}</p>"
        if data.legend is not None
        else "<p class='legend'>Top-k: training examples ranked by Σ γ<sub>t</sub>/|B<sub>t</sub>| "
        "over the steps whose batch contained them (γ<sub>t</sub> = ⟨W a, Δ<sub>t</sub> a⟩), "
        "per layer; the score is shown under each image"
        + (
            "; planted duplicates of the test image are outlined in red"
            if any(len(p.highlight_ids) for p in data.points)
            else ""
        )
        + ". Ridge plots: per layer and class, the distribution of the cosine γ̄<sub>t</sub> over "
        "the steps whose batch held that class, weighted by ‖Δ<sub>t</sub> a‖ (Gaussian KDE, "
        "bandwidth 0.1).</p>",
    ]
    for p in data.points:
        parts.append(
            f"<div class='point' id='point-{p.index}'><h2>Test point #{p.index}: "
            f"predicted {html.escape(data.classes[p.prediction])}"
            + (f", true {html.escape(data.classes[p.label])}" if p.label is not None else "")
            + "</h2>"
        )
        parts.append(f"<img alt='top-k' src='data:image/png;base64,{point_figure(data, p)}'>")
        if p.ridge:
            parts.append(f"<img alt='ridges' src='data:image/png;base64,{ridge_figure(data, p)}'>")
        if p.step_scores is not None:
            parts.append(f"<img alt='steps' src='data:image/png;base64,{steps_figure(p)}'>")
        if p.terms:
            cells = "".join(
                f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>" for k, v in p.terms.items()
            )
            parts.append(f"<table class='summary'>{cells}</table>")
        parts.append("</div>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
