"""Shared fixtures: small real training runs on scikit-learn digits, recorded once per session."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import historystore as hs
from attribution.demo.data import Digits, load_digits
from attribution.demo.model import DigitsCNN


@dataclass
class Run:
    path: Path
    snapshots: list[dict[str, torch.Tensor]]  # θ_t for every t
    states: dict[int, dict[str, dict[str, torch.Tensor]]]  # optimizer state after step t
    ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    losses: list[float]
    lrs: list[float]
    stats: dict = field(default_factory=dict)  # Recorder.stats after close


def make_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    raise ValueError(kind)


def record_run(
    path: Path,
    kind: str,
    steps: int,
    data: Digits,
    *,
    batch: int = 32,
    config: hs.RecorderConfig | None = None,
    seed: int = 0,
    scheduler: bool = False,
    last_batch: int | None = None,
    writer: str = "auto",
    on_step: Callable[[hs.Recorder, int], None] | None = None,
) -> Run:
    torch.manual_seed(seed)
    model = DigitsCNN(channels=8, hidden=32)
    opt = make_optimizer(kind, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5) if scheduler else None
    g = torch.Generator().manual_seed(seed)
    run = Run(
        path, [{n: p.detach().clone() for n, p in model.named_parameters()}], {}, [], [], [], []
    )
    names = dict(
        zip(map(id, model.parameters()), (n for n, _ in model.named_parameters()), strict=True)
    )
    with hs.Recorder(
        path,
        model,
        opt,
        config or hs.RecorderConfig(keyframe_every=32),
        run_config={"kind": kind},
        writer=writer,
    ) as rec:
        for t in range(steps):
            b = last_batch if (last_batch and t == steps - 1) else batch
            idx = torch.randperm(len(data.y_train), generator=g)[:b]
            loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.lrs.append(opt.param_groups[0]["lr"])
            rec.step(idx, labels=data.y_train[idx], loss=loss)
            if on_step is not None:
                on_step(rec, t)
            if sched is not None:
                sched.step()
            run.snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
            run.ids.append(idx)
            run.labels.append(data.y_train[idx])
            run.losses.append(loss.item())
            if t % 7 == 0:
                run.states[t] = {
                    names[id(p)]: {
                        k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)
                    }
                    for p, s in opt.state.items()
                }
    run.stats = rec.stats
    return run


@pytest.fixture(scope="session")
def digits() -> Digits:
    return load_digits()


@pytest.fixture(scope="session", params=["sgd", "adamw"])
def run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, digits: Digits
) -> Run:
    path = tmp_path_factory.mktemp(request.param) / "run.zarr"
    return record_run(path, request.param, 120, digits, last_batch=13)
