"""The main job end to end: record the demo run, explain test points, write the report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from historystore.meta.info import info

from ..report import PointExplanation, ReportData, render
from .train import TrainConfig, train

DEFAULT_LAYERS = ("conv2", "fc1", "fc2")


def report_data(
    result: Any,
    *,
    title: str,
    summary: dict[str, Any],
    layers: list[str],
    test_x: torch.Tensor,
    test_y: torch.Tensor | None,
    test_index: list[int],
    train_x: torch.Tensor | None,
    train_y: torch.Tensor | None,
    num_classes: int,
    highlight: dict[int, list[int]] | None = None,
) -> ReportData:
    """Turn an AttributionResult into what the report shows.

    ``highlight`` maps a test index to training ids to outline in its figures (e.g. planted
    duplicates of that test point)."""
    outputs = np.asarray(result.arrays["outputs"])
    probs = torch.softmax(torch.from_numpy(outputs).float(), dim=1).numpy()
    points = []
    for i, idx in enumerate(test_index):
        topk_ids, topk_scores, ridge = {}, {}, {}
        for layer in layers:
            ids, scores = result.topk(layer)
            keep = ids[i] >= 0
            topk_ids[layer] = ids[i][keep]
            topk_scores[layer] = scores[i][keep]
            ridge[layer] = result.ridge(layer)[i]
        points.append(
            PointExplanation(
                index=idx,
                image=test_x[i].numpy() if test_x[i].dim() in (2, 3) else None,
                label=None if test_y is None else int(test_y[i]),
                prediction=int(probs[i].argmax()),
                probabilities=probs[i],
                topk_ids=topk_ids,
                topk_scores=topk_scores,
                ridge=ridge,
                highlight_ids=list((highlight or {}).get(idx, ())),
            )
        )
    return ReportData(
        title=title,
        summary=summary,
        layers=layers,
        classes=[str(c) for c in range(num_classes)],
        grid=np.asarray(result.arrays["grid"]),
        points=points,
        train_images=None if train_x is None or train_x.dim() not in (3, 4) else train_x.numpy(),
        train_labels=None if train_y is None else train_y.numpy(),
    )


def pick_test_points(y: Any, n: int) -> list[int]:
    """Test point 0 (it has a planted, oversampled duplicate in the training set), then the
    first test point of each other class in turn: a report of one class only says little."""
    labels = [int(v) for v in y]
    index = [0][: max(n, 0)]
    seen = {labels[0]}
    for i, c in enumerate(labels):
        if len(index) >= n:
            break
        if c not in seen:
            seen.add(c)
            index.append(i)
    chosen = set(index)
    rest = (i for i in range(len(labels)) if i not in chosen)
    while len(index) < min(n, len(labels)):  # more points than classes: fill in order
        index.append(next(rest))
    return index


def run_demo(
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    test_points: int = 10,
    layers: tuple[str, ...] = DEFAULT_LAYERS,
    top_k: int = 8,
    progress: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Train with recording, explain ``test_points`` test images, write ``out/report.html``.

    Returns a summary (paths, timings, store figures) that is also saved as
    ``out/summary.json``.
    """
    from attribution import explain

    config = config or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = train(out / "history.zarr", config, progress=progress)
    t_train = time.perf_counter() - t0
    index = pick_test_points(run.y_test, test_points)
    x, y = run.x_test[index], run.y_test[index]
    t1 = time.perf_counter()
    result = explain(
        run.store_path,
        run.model,
        x,
        layers=list(layers),
        top_k=top_k,
        test_batch_size=max(1, len(index)),
        device=device,
        progress=progress,
    )
    t_explain = time.perf_counter() - t1
    result.save(out / "scores.npz")
    d = info(str(run.store_path))
    summary = {
        "store": str(run.store_path),
        "protocol": config.protocol,
        "optimizer": config.optimizer,
        "steps": d["num_steps"],
        "parameters": d["num_parameters"],
        "size on disk (MB)": d["bytes_stored"] / 1e6,
        "raw size (MB)": d["bytes_raw"] / 1e6,
        "compression ratio": d["ratio"],
        "keyframes": ", ".join(map(str, d["keyframe_steps"])),
        "test accuracy": run.test_accuracy,
        "training time with recording (s)": run.seconds_total,
        "time inside rec.step + flush (s)": run.seconds_recording,
        "recording overhead (% of training)": 100
        * run.seconds_recording
        / max(run.seconds_total - run.seconds_recording, 1e-9),
        "explain time (s)": t_explain,
        "planted duplicate of test #0": f"training id {run.planted_ids[0]} (in every batch "
        "of its class)"
        if run.planted_ids
        else "none",
    }
    data = report_data(
        result,
        title="historystore demo: explaining a digits CNN by its training history",
        summary=summary,
        layers=list(layers),
        test_x=x,
        test_y=y,
        test_index=index,
        train_x=run.x_train,
        train_y=run.y_train,
        num_classes=10,
        highlight={0: run.planted_ids},  # duplicates of test point 0
    )
    data.notes.append(
        "Reading the top-k: a step's γ is split equally among its batch, and an example's "
        "score sums its steps, so examples that are in many steps (the planted duplicate is in "
        "every batch of its class, for every test point) or in a small last batch of a class "
        "(a larger share each) rank high for many test points. The planted duplicate is "
        "outlined only for test #0, the image it duplicates."
    )
    report = render(data, out / "report.html")
    total = time.perf_counter() - t0
    figures = {
        "report": str(report),
        "scores": str(out / "scores.npz"),
        "seconds_train": t_train,
        "seconds_explain": t_explain,
        "seconds_total": total,
        **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
    }
    (out / "summary.json").write_text(json.dumps(figures, indent=2))
    return figures
