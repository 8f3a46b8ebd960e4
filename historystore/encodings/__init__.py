"""Registry of delta encodings (one module per encoding)."""

from .base import ArraySpec, Encoding, encoding_names, get_encoding, register
from .full import FullEncoding

__all__ = ["ArraySpec", "Encoding", "FullEncoding", "encoding_names", "get_encoding", "register"]
