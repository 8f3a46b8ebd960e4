"""Record a Lightning ``Trainer`` run (extra ``lightning``: pytorch-lightning).

::

    from historystore.integrations import IndexedDataset
    from historystore.integrations.lightning import HistoryCallback

    loader = DataLoader(IndexedDataset(train), batch_size=32, shuffle=True)  # (idx, x, y)
    trainer = L.Trainer(max_epochs=3, callbacks=[HistoryCallback("run.zarr")])
    trainer.fit(module, loader)  # training_step unpacks ``_, x, y = batch``

Why the optimizer's step hook: Lightning steps the learning-rate schedulers before
``on_train_batch_end``, so the step is recorded from a post-step hook on the optimizer (the
weights have just moved, the lr is the one used). Ids and labels are collected in
``on_train_batch_start`` (several micro-batches under gradient accumulation), the loss in
``on_before_backward``; a step a GradScaler skipped is dropped with ``Recorder.skip``.

Works with the ``lightning`` package (``lightning.pytorch``) when it is installed, otherwise
with ``pytorch_lightning``: the callback subclasses that package's ``Callback``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

try:  # the unified package first: its Trainer accepts only its own Callback subclasses
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on what is installed
    from pytorch_lightning import Callback, LightningModule, Trainer

from ..config import RecorderConfig
from ..errors import RecorderError
from ..write.recorder import Recorder
from ._common import PendingStep, RecorderArgs, unwrap_optimizer

BatchFn = Callable[[Any], Any]


def default_ids(batch: Any, key: str = "idx") -> Any:
    """``batch[key]`` of a dict batch, ``batch[0]`` of a tuple/list batch (IndexedDataset)."""
    if isinstance(batch, dict):
        if key not in batch:
            raise RecorderError(
                f"the training batch has no {key!r} key: wrap the dataset in "
                "historystore.integrations.IndexedDataset or pass ids=<function of the batch>"
            )
        return batch[key]
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise RecorderError(f"cannot find example ids in a batch of type {type(batch).__name__}")


def default_labels(batch: Any) -> Any | None:
    """``labels``/``label``/``y`` of a dict batch; the last element of an (idx, x, y) batch."""
    if isinstance(batch, dict):
        return next((batch[k] for k in ("labels", "label", "y") if k in batch), None)
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        return batch[-1]
    return None


class HistoryCallback(Callback):
    """Records every optimizer step of a Lightning ``Trainer`` into a historystore.

    ``ids`` / ``labels``: functions of the batch returning its example ids / labels (default:
    :func:`default_ids`, :func:`default_labels`). One optimizer (automatic or manual
    optimization). The other arguments are :class:`~historystore.Recorder`'s.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: RecorderConfig | None = None,
        *,
        ids: BatchFn | None = None,
        labels: BatchFn | None = None,
        run_config: dict[str, Any] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.args = RecorderArgs(path, config, run_config, resume, overwrite, storage_options)
        self.ids = ids or default_ids
        self.labels = labels or default_labels
        self.recorder: Recorder | None = None
        self._pending = PendingStep()
        self._attempted = False
        self._stepped = False
        self._hook: Any = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RecorderError(
                f"HistoryCallback records one optimizer; the module has {len(trainer.optimizers)}"
            )
        opt = unwrap_optimizer(trainer.optimizers[0])
        self.recorder = self.args.open(pl_module, opt)
        # after the Recorder's own hook: it has counted the step when _after_step records it
        self._hook = opt.register_step_post_hook(self._after_step)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.recorder is not None:
            self._pending.add(self.ids(batch), self.labels(batch))

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        if self.recorder is not None:
            self._pending.add_loss(loss)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        self._attempted = True

    def _after_step(self, *_: Any) -> None:
        if self.recorder is not None:
            self._stepped = True
            self._pending.record(self.recorder)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.recorder is not None and self._attempted and not self._stepped:
            self._pending.clear()  # a GradScaler found inf/NaN gradients and skipped the step
            self.recorder.skip()
        self._attempted = self._stepped = False

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.close()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        with contextlib.suppress(Exception):  # never mask the training error
            self.close()  # what was committed stays

    def close(self) -> None:
        """Remove the hook and close the recorder (the final keyframe; idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        rec, self.recorder = self.recorder, None
        if rec is not None:
            rec.close()
