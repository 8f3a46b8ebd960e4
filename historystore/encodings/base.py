"""The encoding interface: how one tensor's per-step deltas are represented in the store.

An encoding turns a block of dense deltas ``[steps, *shape]`` into one or more named arrays
with a leading step axis, and says what it can give back (``capabilities``): a dense delta,
factors, a sketch. Readers and attribution methods ask for a capability and get a clear
:class:`~historystore.errors.EncodingError` when the encoding cannot provide it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import EncodingError


@dataclass(frozen=True)
class ArraySpec:
    """Shape (without the step axis) and dtype of one array an encoding stores per step."""

    shape: tuple[int, ...]
    dtype: str


class Encoding(ABC):
    """Base class. Subclasses set ``name``, ``lossless`` and ``capabilities``."""

    name: ClassVar[str]
    #: True when ``decode(encode(x))`` is bit-identical to ``x`` (replay is then exact).
    lossless: ClassVar[bool]
    #: What the reader can ask for: "dense" (a dense delta), "factors", "sketch", ...
    capabilities: ClassVar[frozenset[str]] = frozenset({"dense"})

    def params(self) -> dict[str, Any]:
        """JSON-able parameters, stored in the tensor's metadata to rebuild the encoding."""
        return {}

    @abstractmethod
    def arrays(self, shape: tuple[int, ...], dtype: str) -> dict[str, ArraySpec]:
        """The arrays this encoding stores for a tensor of ``shape``/``dtype``."""

    @abstractmethod
    def encode(self, block: np.ndarray) -> dict[str, np.ndarray]:
        """Encode dense deltas ``[steps, *shape]`` into the arrays of :meth:`arrays`."""

    def decode(
        self, arrays: dict[str, np.ndarray], shape: tuple[int, ...], dtype: str
    ) -> np.ndarray:
        """Dense deltas ``[steps, *shape]`` from stored arrays (if ``"dense"`` is supported)."""
        raise EncodingError(f"encoding {self.name!r} cannot give a dense delta")

    def require(self, capability: str) -> None:
        """Raise a clear error if this encoding lacks ``capability``."""
        if capability not in self.capabilities:
            raise EncodingError(
                f"encoding {self.name!r} provides {sorted(self.capabilities)}, not {capability!r}"
            )


_REGISTRY: dict[str, type[Encoding]] = {}


def register(cls: type[Encoding]) -> type[Encoding]:
    """Class decorator adding an encoding to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def get_encoding(name: str, **params: Any) -> Encoding:
    """Instantiate a registered encoding by name."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown encoding {name!r}; known: {sorted(_REGISTRY)}") from None
    return cls(**params)


def encoding_names() -> list[str]:
    return sorted(_REGISTRY)
