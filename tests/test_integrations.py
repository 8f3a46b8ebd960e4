"""Training-loop integrations on tiny models built from configs (no downloads): a Hugging Face
Trainer (a 1-layer BERT) and a Lightning Trainer (an MLP on digits) record through Recorder;
the store replays the trained weights bit for bit, with the ids each step really used, their
labels, and the learning rate of each step (recorded before the scheduler moves).

transformers/accelerate and pytorch-lightning come with the ``hf`` and ``lightning`` extras (in
``dev``): without them these tests fail at import instead of being skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import historystore as hs
from attribution.demo.data import Digits
from historystore.integrations import IndexedDataset
from historystore.meta.verify import verify


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    it = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return a.shape == b.shape and torch.equal(a.view(it), b.view(it))


def _check_final_weights(store: hs.HistoryStore, model: torch.nn.Module) -> None:
    final = store.params_at(store.num_steps)
    trained = dict(model.named_parameters())
    assert set(final) == {n for n, p in trained.items() if p.requires_grad}
    for n, v in final.items():
        assert _bits_equal(v, trained[n].detach().cpu()), n


def test_the_store_and_its_integrations_never_import_attribution() -> None:
    """The write side stands alone: no module of historystore (integrations included) imports
    the engine, at the top or inside a function."""
    root = Path(hs.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert root / "integrations" / "hf.py" in files
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "attribution" for n in names), (f, names)


def test_indexed_dataset() -> None:
    base = torch.utils.data.TensorDataset(torch.arange(5.0), torch.arange(5) % 2)
    ds = IndexedDataset(base)
    assert len(ds) == 5 and ds[3][0] == 3 and torch.equal(ds[3][1], torch.tensor(3.0))
    assert IndexedDataset([{"x": 1}])[0] == {"idx": 0, "x": 1}
    with pytest.raises(KeyError, match="idx"):
        IndexedDataset([{"idx": 7}])[0]


# -- Hugging Face Trainer ----------------------------------------------------------------------
class _Tokens(torch.utils.data.Dataset):
    """64 random token sequences; the label says whether the first token is in the upper half."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 40, (64, 8), generator=g)
        self.y = (self.x[:, 0] >= 20).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _hf_trainer(tmp_path: Path, callback: Any, **args: Any) -> tuple[Any, Any]:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainingArguments,
    )

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    targs = TrainingArguments(
        output_dir=str(tmp_path / "hf-out"),
        max_steps=6,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **args,
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=IndexedDataset(_Tokens()), callbacks=[callback]
    )
    return trainer, model


def test_hf_trainer_callback_records_a_bit_exact_history(tmp_path: Path) -> None:
    from historystore.integrations.hf import HistoryCallback

    path = tmp_path / "hf.zarr"
    trainer, model = _hf_trainer(
        tmp_path,
        HistoryCallback(path, hs.RecorderConfig(keyframe_every=4)),
        remove_unused_columns=False,
    )
    seen: list[torch.Tensor] = []  # the ids each training forward received, independently

    def spy(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if module.training:
            seen.append(kwargs["idx"].clone())

    spy_hook = model.register_forward_pre_hook(spy, with_kwargs=True)  # runs before the callback's
    trainer.train()
    spy_hook.remove()
    store = hs.open_store(path)
    assert store.num_steps == 6 and store.keyframe_steps.tolist() == [0, 4, 6]
    _check_final_weights(store, model)
    assert verify(str(path)).ok
    labels = _Tokens().y.numpy()
    for t in range(6):  # two micro-batches of 8 per step (gradient accumulation)
        b = store.batch(t)
        np.testing.assert_array_equal(b.ids, torch.cat(seen[2 * t : 2 * t + 2]).numpy())
        np.testing.assert_array_equal(b.labels, labels[b.ids])
        assert np.isfinite(b.loss) and 0.3 < b.loss < 1.2
    # one epoch of 64 examples, then the next: the first 4 steps use every example once
    assert sorted(np.concatenate([store.batch(t).ids for t in range(4)])) == list(range(64))
    # linear decay from 1e-3 over 6 steps: the lr each step used, not the next one
    np.testing.assert_allclose(store.lr(), 1e-3 * (6 - np.arange(6)) / 6, rtol=1e-12)
    assert store.meta.optimizer["class"] == "torch.optim.adamw.AdamW"
    assert store.tensor_names[0] == "bert.embeddings.word_embeddings.weight"


def test_hf_callback_as_a_context_closes_after_a_failed_train(tmp_path: Path) -> None:
    """trainer.train() raising mid-run: the with-block closes the recorder, so the committed
    steps verify and a retry in the same process is not locked out by its own old writer."""
    from transformers import TrainerCallback

    from historystore.integrations.hf import HistoryCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 3:
                raise RuntimeError("boom at step 3")

    path = tmp_path / "hf.zarr"
    with HistoryCallback(path, hs.RecorderConfig(keyframe_every=2)) as cb:
        trainer, _ = _hf_trainer(tmp_path, cb, remove_unused_columns=False)
        trainer.add_callback(Boom())
        with pytest.raises(RuntimeError, match="boom"):
            trainer.train()
    assert cb.recorder is None
    store = hs.open_store(path)
    assert store.num_steps == 3 and verify(str(path)).ok
    with HistoryCallback(path, overwrite=True) as cb:  # the lock was released
        trainer, model = _hf_trainer(tmp_path, cb, remove_unused_columns=False)
        trainer.train()
    _check_final_weights(hs.open_store(path), model)


def test_hf_callback_refuses_to_lose_the_id_column(tmp_path: Path) -> None:
    from historystore.integrations.hf import HistoryCallback

    trainer, _ = _hf_trainer(tmp_path, HistoryCallback(tmp_path / "x.zarr"))
    with pytest.raises(hs.RecorderError, match="remove_unused_columns=False"):
        trainer.train()
    assert not (tmp_path / "x.zarr").exists()


# -- Lightning ---------------------------------------------------------------------------------
def test_lightning_callback_records_a_bit_exact_history(tmp_path: Path, digits: Digits) -> None:
    from historystore.integrations.lightning import HistoryCallback, LightningModule, Trainer

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Flatten(),
                torch.nn.Linear(64, 16),
                torch.nn.ReLU(),
                torch.nn.Linear(16, 10),
            )
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            idx, x, y = batch
            self.seen.append(idx.clone())
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    torch.manual_seed(0)
    module = Module()
    data = IndexedDataset(torch.utils.data.TensorDataset(digits.x_train, digits.y_train))
    loader = torch.utils.data.DataLoader(
        data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    path = tmp_path / "pl.zarr"
    trainer = Trainer(
        max_steps=6,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[HistoryCallback(path, hs.RecorderConfig(keyframe_every=4))],
    )
    trainer.fit(module, loader)
    store = hs.open_store(path)
    assert store.num_steps == 6 and store.keyframe_steps.tolist() == [0, 4, 6]
    _check_final_weights(store, module)
    assert verify(str(path)).ok
    y = digits.y_train.numpy()
    for t in range(6):
        b = store.batch(t)
        np.testing.assert_array_equal(b.ids, torch.cat(module.seen[2 * t : 2 * t + 2]).numpy())
        np.testing.assert_array_equal(b.labels, y[b.ids])
        assert np.isfinite(b.loss) and 1.0 < b.loss < 3.0
    np.testing.assert_allclose(store.lr(), [0.1, 0.1, 0.05, 0.05, 0.025, 0.025], rtol=1e-12)
    # the optimizer state after the last step is SGD's momentum buffer, recorded every step
    state = store.optimizer_state(5)
    opt = trainer.optimizers[0]
    for n, p in module.named_parameters():
        assert _bits_equal(state[n]["momentum_buffer"], opt.state[p]["momentum_buffer"]), n
