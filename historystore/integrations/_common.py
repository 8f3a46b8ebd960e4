"""What both callbacks share: the indexed dataset wrapper and the batch collected for a step."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import RecorderConfig
from ..errors import RecorderError
from ..write.recorder import Recorder


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items carry their index (the id the store records).

    Dict items get ``key`` added (``{"idx": i, **item}``: the Hugging Face convention of an
    index column); tuple or list items become ``(i, *item)``; anything else ``(i, item)``.
    """

    def __init__(self, dataset: Any, key: str = "idx") -> None:
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, dict):
            if self.key in item:
                raise KeyError(f"the dataset's items already have a {self.key!r} key")
            return {self.key: i, **item}
        if isinstance(item, (tuple, list)):
            return (i, *item)
        return (i, item)


def _flat(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise RecorderError(f"{what} must be integers, got dtype {a.dtype}")
    return a.reshape(-1).astype(np.int64, copy=False)


@dataclass
class PendingStep:
    """Ids, labels and losses of the micro-batches since the last optimizer step (several
    under gradient accumulation)."""

    ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray | None] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def add(self, ids: Any, labels: Any | None) -> None:
        i = _flat(ids, "example ids")
        lab = None if labels is None else _flat(labels, "labels")
        if lab is not None and len(lab) != len(i):  # e.g. token labels: not per example
            lab = None
        self.ids.append(i)
        self.labels.append(lab)

    def add_loss(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float().mean().item()
        self.losses.append(float(loss))

    def record(self, rec: Recorder) -> None:
        """``rec.step`` with everything collected, then start afresh."""
        if not self.ids:
            raise RecorderError(
                "the optimizer stepped but no batch ids were seen since the last step: the "
                "batches must carry their dataset index (wrap the dataset in "
                "historystore.integrations.IndexedDataset)"
            )
        ids = np.concatenate(self.ids)
        labels = None
        if all(lab is not None for lab in self.labels):
            labels = np.concatenate([lab for lab in self.labels if lab is not None])
        loss = float(np.mean(self.losses)) if self.losses else None
        self.clear()
        rec.step(ids, labels=labels, loss=loss)

    def clear(self) -> None:
        self.ids, self.labels, self.losses = [], [], []


#: wrappers whose ``step`` only calls the wrapped optimizer's (others, e.g. Lookahead, change
#: the weights after the inner step and must be recorded as they are)
_WRAPPERS = {"AcceleratedOptimizer": "optimizer", "LightningOptimizer": "_optimizer"}


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's or Lightning's wrapper: its step hooks fire on
    real steps only (not on steps a GradScaler skipped), and its class is what is recorded."""
    opt = optimizer
    while type(opt).__name__ in _WRAPPERS:
        opt = getattr(opt, _WRAPPERS[type(opt).__name__])
    if not isinstance(opt, torch.optim.Optimizer):
        raise RecorderError(f"cannot find a torch.optim.Optimizer in {type(optimizer).__name__}")
    return opt


@dataclass
class RecorderArgs:
    """The Recorder's arguments, kept by a callback until training starts."""

    path: str | os.PathLike[str]
    config: RecorderConfig | None = None
    run_config: dict[str, Any] | None = None
    resume: bool = False
    overwrite: bool = False
    storage_options: dict[str, Any] | None = None

    def open(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Recorder:
        rec = Recorder(
            self.path,
            model,
            optimizer,
            self.config,
            run_config=self.run_config,
            resume=self.resume,
            overwrite=self.overwrite,
            storage_options=self.storage_options,
        )
        rec.__enter__()
        return rec
