"""A quanda ``Explainer`` backed by a recorded training history.

quanda (https://github.com/dilyabareeva/quanda) evaluates training-data attribution methods
through one interface: ``explainer.explain(test_data, targets) -> [B, len(train_dataset)]``
and ``explainer.self_influence() -> [len(train_dataset)]``. :class:`HistoryExplainer`
implements it with :class:`~attribution.engine.Engine`, so any quanda metric runs on this
library's methods unchanged::

    from quanda.metrics.downstream_eval import MislabelingDetectionMetric
    from attribution.integrations.quanda import HistoryExplainer

    metric = MislabelingDetectionMetric(
        model, train_dataset, mislabeling_indices=noisy_ids,
        explainer_cls=HistoryExplainer, expl_kwargs={"store": "run.zarr"},
    )
    metric.compute()["score"]

Dataset item i is the training example recorded with id ``train_ids[i]`` (default: i, the
dataset index passed to ``rec.step``). Scores are one layer's per-example scores (default: the
last explained layer, usually the logits); ``targets`` are accepted and not used (the
decomposition explains the layer's whole preactivation, not one output). ``self_influence``
follows :func:`attribution.self_influence`'s sign (high = suspicious), which is what quanda's
self-influence ranking expects.

``weights="model"`` (default here, quanda's convention: the explainer explains the model it is
given, e.g. the randomised copy that quanda's model-randomisation metric builds) keeps the
model's weights for the test side; ``weights="store"`` loads θ_T from the store into it first.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..engine import Engine
from ..methods.base import AttributionMethod

_TORCHVISION_OPS: list[torch.library.Library] = []  # kept alive: dropping them unregisters


def _import_torchvision() -> None:
    """Import torchvision even where its compiled operators cannot load.

    quanda imports torchvision (for its ResNet benchmarks). A PyPI torchvision wheel is built
    against PyPI's CUDA torch; next to a CPU-only torch build (this project's CI) its C++
    operators cannot load, and torchvision 0.2x then fails at import: two of its operator
    registrations (``nms``, ``qnms``) are not guarded by ``torchvision.extension._has_ops()``
    like the others. Declaring those two operator schemas (without kernels: calling them still
    raises) lets the pure-Python rest import. Nothing here runs when torchvision imports
    normally.
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e) or "does not exist" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define(
            "qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, "
            "int zero_point) -> Tensor"
        )
        _TORCHVISION_OPS.append(lib)
        import torchvision  # noqa: F401

        warnings.warn(
            f"torchvision's compiled operators do not load with this torch build ({e}); "
            "imported without them (quanda's metrics do not use them)",
            RuntimeWarning,
            stacklevel=3,
        )


def _quanda_explainer_base() -> type:
    _import_torchvision()
    try:
        from quanda.explainers import Explainer
    except ImportError as e:
        raise ImportError(
            "attribution.integrations.quanda needs quanda: pip install -c constraints.txt "
            "-e '.[quanda]' and then pip install -c constraints.txt --no-deps quanda captum "
            f"(see README): {e}"
        ) from e
    return Explainer


Explainer = _quanda_explainer_base()


class HistoryExplainer(Explainer):  # type: ignore[misc,valid-type]
    """quanda ``Explainer`` whose scores come from streaming a historystore.

    ``store``: path or open store of the run that trained ``model``. ``layer``: module path
    whose per-example scores are returned (default: the last explained layer). ``score``:
    "gamma" or "cosine". ``train_ids``: recorded example id of each dataset item (default: the
    item's index). ``method``/``method_options``, ``device``, ``scheduler``, ``block_steps``,
    ``test_batch_size``: as for :func:`attribution.explain`. ``checkpoints`` are accepted for
    quanda's interface and not loaded: the store holds the whole history.
    """

    accepted_tasks = ["image_classification"]  # noqa: RUF012 (quanda's class attribute)

    def __init__(
        self,
        model: torch.nn.Module,
        train_dataset: torch.utils.data.Dataset,
        store: str | os.PathLike[str] | Any,
        layer: str | None = None,
        score: str = "gamma",
        train_ids: Sequence[int] | np.ndarray | None = None,
        weights: str = "model",
        method: str | AttributionMethod = "preactivation",
        method_options: dict[str, Any] | None = None,
        task: str = "image_classification",
        checkpoints: str | list[str] | None = None,
        checkpoints_load_func: Any = None,
        device: str | torch.device | None = None,
        scheduler: Any = None,
        block_steps: int | None = None,
        test_batch_size: int = 64,
        progress: bool = False,
    ) -> None:
        super().__init__(
            model=model,
            train_dataset=train_dataset,
            task=task,
            checkpoints=checkpoints,
            checkpoints_load_func=checkpoints_load_func,
        )
        options = dict(method_options or {})
        if isinstance(method, str):
            options.setdefault("keep_scores", True)
            options.setdefault("top_k", 0)
            if method == "preactivation":
                options.setdefault("scores", (score,))
        self.engine = Engine(
            store,
            model,
            None if layer is None else [layer],
            method,
            device=self.device if device is None else device,
            scheduler=scheduler,
            block_steps=block_steps,
            progress=progress,
            weights=weights,
            **options,
        )
        self.layer = layer if layer is not None else self.engine.layers[-1].name
        self.score = score
        self.test_batch_size = test_batch_size
        n = len(self.train_dataset)
        ids = np.arange(n) if train_ids is None else np.asarray(train_ids)
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
            raise ValueError(
                f"train_ids must hold one recorded id >= 0 per dataset item ({n}), got "
                f"shape {ids.shape} {ids.dtype}"
            )
        self.train_ids = ids

    def _columns(self, s: np.ndarray) -> np.ndarray:
        """[b, num_train] scores by recorded id -> [b, len(dataset)] by dataset index; items
        whose id never occurs in the run score 0."""
        out = np.zeros((len(s), len(self.train_ids)), dtype=np.float32)
        ok = self.train_ids < s.shape[1]
        out[:, ok] = s[:, self.train_ids[ok]]
        return out

    def explain(self, test_data: torch.Tensor, targets: Any = None) -> torch.Tensor:
        """[B, len(train_dataset)] per-example scores of ``layer`` (``targets`` unused)."""
        x = torch.as_tensor(test_data)
        out = np.zeros((len(x), len(self.train_ids)), dtype=np.float32)

        def take(layer: str, kind: str, s: np.ndarray, row: int) -> None:
            if layer == self.layer and kind == self.score:
                out[row : row + len(s)] = self._columns(s)

        self.engine.explain(x, test_batch_size=self.test_batch_size, on_scores=take)
        return torch.from_numpy(out).to(self.device)

    def self_influence(self, batch_size: int = 32) -> torch.Tensor:
        """[len(train_dataset)] self-influence of ``layer``, high = suspicious (cached)."""
        cached = self.__dict__.get("_self_influence_cache")
        if cached is not None:
            return cached
        n = len(self.train_ids)
        out = torch.empty(n, dtype=torch.float64)
        step = max(1, max(batch_size, self.test_batch_size))
        for a in range(0, n, step):
            b = min(n, a + step)
            x = torch.stack([_input(self.train_dataset[i]) for i in range(a, b)])
            si = self.engine.self_influence(
                x, self.train_ids[a:b], score=self.score, test_batch_size=b - a
            )
            out[a:b] = torch.from_numpy(si[self.layer])
        self.__dict__["_self_influence_cache"] = out.to(self.device)
        return self.__dict__["_self_influence_cache"]


def _input(item: Any) -> torch.Tensor:
    """The model input of one dataset item: ``(x, y, ...)`` or ``{"input": x, ...}`` or x."""
    if isinstance(item, (tuple, list)):
        item = item[0]
    elif isinstance(item, dict):
        for key in ("input", "inputs", "x", "pixel_values"):
            if key in item:
                item = item[key]
                break
        else:
            raise ValueError(
                f"cannot find the model input in a dataset item with keys {list(item)}"
            )
    return torch.as_tensor(item).cpu()
