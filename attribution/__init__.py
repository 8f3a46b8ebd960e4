"""Explain predictions by streaming a recorded training history (the attribution package).

``explain(store, model, test_x)`` decomposes each explained layer's preactivation of every test
point over the training steps (Pfahler & Morik, AAAI 2022) in one pass over the store per batch
of test points, and returns an :class:`AttributionResult` (per-step scores, top-k training
examples, per-class ridge data) that saves to ``.npz`` or zarr.
"""

from .capture import resolve_layers, supported_layers
from .engine import Engine, explain, index_store, self_influence
from .layers import (
    ConvAdapter,
    LayerAdapter,
    LinearAdapter,
    adapter_for,
    register_adapter,
)
from .methods import (
    AttributionMethod,
    ExplainContext,
    LayerSpec,
    PreactivationMethod,
    StoreIndex,
    get_method,
    method_names,
    register_method,
)
from .results import AttributionResult

__all__ = [
    "AttributionMethod",
    "AttributionResult",
    "ConvAdapter",
    "Engine",
    "ExplainContext",
    "LayerAdapter",
    "LayerSpec",
    "LinearAdapter",
    "PreactivationMethod",
    "StoreIndex",
    "adapter_for",
    "explain",
    "get_method",
    "index_store",
    "method_names",
    "register_adapter",
    "register_method",
    "resolve_layers",
    "self_influence",
    "supported_layers",
]
