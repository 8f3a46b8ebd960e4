"""Attribution methods: the base protocol and the built-in methods (registered by name)."""

from ._path import OptimizerStateError, PathMethod, TrainDataError
from .base import (
    AttributionMethod,
    ExplainContext,
    LayerSpec,
    StoreIndex,
    get_method,
    method_names,
    register_method,
)
from .pathkernel import PathKernelMethod
from .preactivation import PreactivationMethod, PreactivationState
from .tracin import TracInMethod

__all__ = [
    "AttributionMethod",
    "ExplainContext",
    "LayerSpec",
    "OptimizerStateError",
    "PathKernelMethod",
    "PathMethod",
    "PreactivationMethod",
    "PreactivationState",
    "StoreIndex",
    "TracInMethod",
    "TrainDataError",
    "get_method",
    "method_names",
    "register_method",
]
