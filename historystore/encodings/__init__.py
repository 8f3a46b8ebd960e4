"""Registry of delta encodings (one module per encoding) and the policy that picks them."""

from .base import (
    ArraySpec,
    Encoding,
    StepContext,
    encoding_class,
    encoding_names,
    get_encoding,
    register,
)
from .full import FullEncoding
from .lowrank import FactorsEncoding, SVDEncoding
from .policy import EncodingRule, resolve
from .projected import ProjectedEncoding
from .quantized import QuantizedEncoding
from .rounded import RoundedEncoding, bitround

__all__ = [
    "ArraySpec",
    "Encoding",
    "EncodingRule",
    "FactorsEncoding",
    "FullEncoding",
    "ProjectedEncoding",
    "QuantizedEncoding",
    "RoundedEncoding",
    "SVDEncoding",
    "StepContext",
    "bitround",
    "encoding_class",
    "encoding_names",
    "get_encoding",
    "register",
    "resolve",
]
