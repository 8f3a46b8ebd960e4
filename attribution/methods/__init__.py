"""Attribution methods: the base protocol and the built-in methods (registered by name)."""

from .base import (
    AttributionMethod,
    ExplainContext,
    LayerSpec,
    StoreIndex,
    get_method,
    method_names,
    register_method,
)
from .preactivation import PreactivationMethod, PreactivationState

__all__ = [
    "AttributionMethod",
    "ExplainContext",
    "LayerSpec",
    "PreactivationMethod",
    "PreactivationState",
    "StoreIndex",
    "get_method",
    "method_names",
    "register_method",
]
