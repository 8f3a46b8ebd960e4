"""Importable factories for ``historystore explain`` on a demo store, and the loader they use.

``historystore explain STORE --model attribution.demo.factories:model
--data attribution.demo.factories:train_data --test attribution.demo.factories:test_data``
shows how a user's own run plugs in: each option names ``module:function``; the model factory
gets the store's run config (the dict passed as ``run_config`` when recording).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch

from .train import TrainConfig, build_model, planted_data


def _config(run_config: dict[str, Any] | None) -> TrainConfig:
    demo = (run_config or {}).get("demo", {})
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in demo.items() if k in fields})


def model(run_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """The demo CNN (weights come from the store)."""
    return build_model(_config(run_config))


def train_data(run_config: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_train, y_train) with the planted duplicate, indexed like the recorded example ids."""
    data, _ = planted_data(_config(run_config).plant)
    return data.x_train, data.y_train


def test_data(run_config: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_test, y_test); test point 0 is the image planted in the training set."""
    data, _ = planted_data(False)
    return data.x_test, data.y_test


def load_factory(spec: str) -> Callable[..., Any]:
    """Import ``pkg.module:function`` with a clear error when it is not there."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} from {spec!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{module_name!r} has no callable {attr!r}")
    return fn


def call_factory(fn: Callable[..., Any], run_config: dict[str, Any]) -> Any:
    """Call a factory with the run config if it takes an argument, else with none."""
    try:
        n = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n = 0
    return fn(run_config) if n else fn()
