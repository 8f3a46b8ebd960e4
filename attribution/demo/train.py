"""Record the demo's training run: a small CNN on digits, the paper's protocol by default.

Protocol "single-class" (Pfahler & Morik, Algorithm 2): every step's loss comes from examples
of one class, plus ghost samples of all classes used only for batch-norm statistics, so each
step's update can be attributed to one class. "shuffled" is ordinary random mini-batches.

A planted duplicate: a copy of test image 0 is appended to the training set (id ``n_train``)
and *oversampled*: it joins every batch of its class (single-class protocol) or every 10th
batch (shuffled). The preactivation decomposition splits a step's γ equally among the batch's
examples, so an example can only stand out from its batch-mates by being in more steps; an
oversampled copy of the test image is the clearest evidence a prediction can have, and the
report shows whether the method finds it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from historystore.config import RecorderConfig
from historystore.write.recorder import Recorder

from .data import Digits, load_digits
from .model import DigitsCNN


@dataclass(frozen=True)
class TrainConfig:
    protocol: Literal["single-class", "shuffled"] = "single-class"
    epochs: int = 4
    batch_size: int = 16
    ghost_size: int = 16
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    plant: bool = True
    channels: int = 16
    hidden: int = 64
    seed: int = 0
    keyframe_every: int = 64

    def __post_init__(self) -> None:
        if self.protocol not in ("single-class", "shuffled"):
            raise ValueError(
                f"protocol must be 'single-class' or 'shuffled', not {self.protocol!r}"
            )
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', not {self.optimizer!r}")
        for name in ("epochs", "batch_size", "channels", "hidden", "keyframe_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.ghost_size < 0:
            raise ValueError("ghost_size must be >= 0")


@dataclass
class TrainedRun:
    store_path: Path
    model: torch.nn.Module
    x_train: torch.Tensor  # with the planted duplicate appended
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    planted_ids: list[int]
    seconds_total: float
    seconds_recording: float  # time spent inside rec.step() and the final flush
    test_accuracy: float
    timings: dict[str, float] = field(default_factory=dict)


def build_model(config: TrainConfig) -> DigitsCNN:
    return DigitsCNN(config.channels, config.hidden, batch_norm=True, ghost=True)


def planted_data(plant: bool, data: Digits | None = None) -> tuple[Digits, list[int]]:
    """Digits with a copy of test image 0 appended to the training set when ``plant``."""
    d = data or load_digits()
    n = len(d.y_train)
    if not plant:
        return d, []
    x = torch.cat([d.x_train, d.x_test[:1]])
    y = torch.cat([d.y_train, d.y_test[:1]])
    return Digits(x, y, d.x_test, d.y_test), [n]


def _optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=config.lr)


def train(
    store_path: str | Path,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    overwrite: bool = True,
) -> TrainedRun:
    """Train the demo CNN with recording on; deterministic for a given seed."""
    from historystore.protocol import SingleClassGhostSampler, ghost_split

    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    data, planted = planted_data(config.plant)
    n_orig = len(data.y_train) - len(planted)
    plant_label = int(data.y_test[0])
    extra = torch.tensor(planted, dtype=torch.long)
    model = build_model(config)
    opt = _optimizer(config, model)
    gen = torch.Generator().manual_seed(config.seed)
    sampler = SingleClassGhostSampler(
        data.y_train[:n_orig], config.batch_size, config.ghost_size, seed=config.seed
    )
    bs = config.batch_size
    steps_per_epoch = len(sampler) if config.protocol == "single-class" else -(-n_orig // bs)
    rec_seconds = 0.0
    start = time.perf_counter()
    rec_cfg = RecorderConfig(keyframe_every=config.keyframe_every)
    run_config = {"demo": config.__dict__, "planted_ids": planted}
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        desc="train+record",
        unit="step",
        disable=not progress,
    )
    with Recorder(
        store_path, model, opt, rec_cfg, run_config=run_config, overwrite=overwrite
    ) as rec:
        for epoch in range(config.epochs):
            if config.protocol == "single-class":
                sampler.set_epoch(epoch)
                batches = [
                    (torch.cat([b.ids, extra]) if b.label == plant_label else b.ids, b.ghost_ids)
                    for b in sampler
                ]
            else:
                perm = torch.randperm(n_orig, generator=gen)
                none = torch.zeros(0, dtype=torch.long)
                batches = [
                    (
                        torch.cat([perm[i : i + bs], extra])
                        if (i // bs) % 10 == 0
                        else perm[i : i + bs],
                        none,
                    )
                    for i in range(0, n_orig, bs)
                ]
            for ids, ghosts in batches:
                x = data.x_train[torch.cat([ids, ghosts])]
                with ghost_split(model, len(ids)) if len(ghosts) else _nullcontext():
                    out = model(x)[: len(ids)]
                loss = torch.nn.functional.cross_entropy(out, data.y_train[ids])
                opt.zero_grad()
                loss.backward()
                opt.step()
                t0 = time.perf_counter()
                rec.step(ids, labels=data.y_train[ids], loss=loss, ghost_ids=ghosts)
                rec_seconds += time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        t0 = time.perf_counter()
    rec_seconds += time.perf_counter() - t0
    bar.close()
    total = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    return TrainedRun(
        Path(store_path),
        model,
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        planted,
        total,
        rec_seconds,
        acc,
    )


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
