"""Record a Hugging Face ``transformers.Trainer`` run (extra ``hf``: transformers, accelerate).

::

    from historystore.integrations import IndexedDataset
    from historystore.integrations.hf import HistoryCallback

    args = TrainingArguments(..., remove_unused_columns=False)  # let the id column through
    trainer = Trainer(model, args, train_dataset=IndexedDataset(train),  # or an "idx" column
                      callbacks=[HistoryCallback("run.zarr")])
    trainer.train()

Why a forward pre-hook: the Trainer passes the batch to ``model(**batch)``, so the callback
takes the id column out of the keyword arguments (the model never sees it) and keeps it with
the ``labels`` until the optimizer steps; the step is recorded in ``on_optimizer_step``, before
the learning-rate scheduler moves, so the recorded lr is the one the step used.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..config import RecorderConfig
from ..errors import RecorderError
from ..write.recorder import Recorder
from ._common import PendingStep, RecorderArgs, unwrap_optimizer


class HistoryCallback(TrainerCallback):
    """Records every optimizer step of a ``transformers.Trainer`` into a historystore.

    ``id_column``: the batch key holding each example's dataset index (an index column of a
    ``datasets.Dataset``, or :class:`~historystore.integrations.IndexedDataset`); it is removed
    before the model's forward. Labels come from the batch's ``labels``, the loss from the
    model output's ``loss`` (averaged over gradient-accumulation micro-batches). The other
    arguments are :class:`~historystore.Recorder`'s.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: RecorderConfig | None = None,
        *,
        id_column: str = "idx",
        run_config: dict[str, Any] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.args = RecorderArgs(path, config, run_config, resume, overwrite, storage_options)
        self.id_column = id_column
        self.recorder: Recorder | None = None
        self._pending = PendingStep()
        self._steps = 0
        self._hooks: list[Any] = []

    # -- hooks on the model and the optimizer --------------------------------------------------
    def _take_ids(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.id_column not in kwargs:
            if module.training and torch.is_grad_enabled():
                raise RecorderError(
                    f"the training batch has no {self.id_column!r} column: give the dataset an "
                    "index column or wrap it in historystore.integrations.IndexedDataset"
                )
            return args, kwargs
        kwargs = dict(kwargs)
        ids = kwargs.pop(self.id_column)
        if module.training and torch.is_grad_enabled():
            self._pending.add(ids, kwargs.get("labels"))
        return args, kwargs

    def _take_loss(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
        if loss is not None and module.training and torch.is_grad_enabled():
            self._pending.add_loss(loss)

    def _count_step(self, *_: Any) -> None:
        self._steps += 1

    # -- Trainer events ------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if args.remove_unused_columns:
            raise RecorderError(
                "HistoryCallback needs TrainingArguments(remove_unused_columns=False): "
                f"otherwise the Trainer drops the {self.id_column!r} column before the model "
                "(the callback removes it before the forward itself)"
            )
        if model is None or optimizer is None:
            raise RecorderError("the Trainer passed no model or optimizer to the callback")
        opt = unwrap_optimizer(optimizer)
        self.recorder = self.args.open(model, opt)
        self._hooks = [
            model.register_forward_pre_hook(self._take_ids, with_kwargs=True),
            model.register_forward_hook(self._take_loss, with_kwargs=True),
            opt.register_step_post_hook(self._count_step),
        ]

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        rec = self.recorder
        if rec is None:
            return
        if self._steps == 0:  # a GradScaler found inf/NaN gradients and skipped the step
            self._pending.clear()
            rec.skip()
            return
        self._steps = 0
        self._pending.record(rec)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    def __enter__(self) -> HistoryCallback:
        return self

    def __exit__(self, *exc: Any) -> None:
        """The Trainer has no event for an exception: ``with HistoryCallback(...) as cb:``
        around ``trainer.train()`` closes the recorder (committed steps kept, the writer lock
        released) whatever happens, without masking the training error."""
        if exc[0] is None:
            self.close()
            return
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Remove the hooks and close the recorder (the final keyframe; idempotent)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        rec, self.recorder = self.recorder, None
        if rec is not None:
            rec.close()
