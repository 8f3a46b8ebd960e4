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

import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..engine import Engine, per_example_options
from ..methods.base import AttributionMethod

_PLACEHOLDER_MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.models",
    "torchvision.models.resnet",
)


def _placeholder_module(name: str) -> types.ModuleType:
    """A stand-in for a torchvision module: any attribute is a class that can be named,
    subclassed and (for transforms) constructed, and raises ImportError when used."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, origin="placeholder")
    module.__path__ = []  # a package, so that its submodules resolve
    why = (
        f"{name} is not installed: quanda's benchmark models and transforms need it, its "
        "metrics (and HistoryExplainer) do not"
    )
    models = name.startswith("torchvision.models")

    def missing(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ImportError(why)

    def construct(self: Any, *args: Any, **kwargs: Any) -> None:
        torch.nn.Module.__init__(self)

    def getattr_(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        cls = type(
            attr,
            (torch.nn.Module,),
            {"__init__": missing if models else construct, "__call__": missing},
        )
        setattr(module, attr, cls)
        return cls

    module.__getattr__ = getattr_  # type: ignore[method-assign]
    return module


def _import_quanda() -> None:
    """Import quanda, whose package import pulls in torchvision only for its benchmark
    resources (a ResNet-50 class, image transforms).

    Without torchvision installed (as in this project's environment: PyPI's torchvision is
    built against PyPI's CUDA torch and cannot load next to a CPU-only torch build, and an
    installed but broken torchvision also breaks transformers, which imports it when present),
    those two quanda modules get placeholder modules for the duration of ``import quanda``
    only. The libraries in the same import that probe for torchvision (datasets,
    transformers, accelerate) are imported and probed first, so they record "not installed",
    which stays true; afterwards the placeholders leave ``sys.modules``. A working torchvision
    is used as is.
    """
    if "quanda" in sys.modules:
        return
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision  # noqa: F401
        except Exception as e:
            raise ImportError(
                f"torchvision is installed but cannot be imported ({type(e).__name__}: {e}); "
                "quanda imports it: install a torchvision built for this torch, or uninstall "
                "it (quanda's metrics do not need it)"
            ) from e
        import quanda

        return
    import datasets  # noqa: F401 (probes torchvision at import)
    from accelerate.utils import is_torchvision_available as accelerate_probe
    from transformers.utils import is_torchvision_available as transformers_probe

    transformers_probe(), accelerate_probe()  # cached: "not installed"
    placeholders = {n: _placeholder_module(n) for n in _PLACEHOLDER_MODULES}
    for n, m in placeholders.items():
        parent, _, child = n.rpartition(".")
        if parent:
            setattr(placeholders[parent], child, m)
    sys.modules.update(placeholders)
    try:
        import quanda  # noqa: F401
    finally:
        for n, m in placeholders.items():
            if sys.modules.get(n) is m:
                del sys.modules[n]


def _quanda_explainer_base() -> type:
    try:
        _import_quanda()
        from quanda.explainers import Explainer
    except ImportError as e:
        raise ImportError(
            "attribution.integrations.quanda needs quanda: pip install -c constraints.txt "
            "-e '.[quanda]', then pip install -c constraints.txt --no-deps quanda captum "
            f"kronfluence (see README): {e}"
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
        name = method if isinstance(method, str) else getattr(method, "name", "")
        if name not in ("preactivation", "gamma"):
            raise ValueError(
                f"HistoryExplainer runs the preactivation method (gamma), not {name!r}: the "
                "path methods explain the model's output from the training data and are not "
                "wired to quanda's interface yet (use attribution.explain(..., method="
                f"{name!r}, train_data=...) directly)"
            )
        options = per_example_options(method, score, method_options)
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
