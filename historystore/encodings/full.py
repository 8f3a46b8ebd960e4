"""``full``: the dense delta, stored as is (lossless; replay is bit-exact with fixes)."""

from __future__ import annotations

import numpy as np

from .base import ArraySpec, Encoding, register


@register
class FullEncoding(Encoding):
    name = "full"
    lossless = True
    capabilities = frozenset({"dense"})

    def arrays(self, shape: tuple[int, ...], dtype: str) -> dict[str, ArraySpec]:
        return {"delta": ArraySpec(shape, dtype)}

    def encode(self, block: np.ndarray) -> dict[str, np.ndarray]:
        return {"delta": block}

    def decode(
        self, arrays: dict[str, np.ndarray], shape: tuple[int, ...], dtype: str
    ) -> np.ndarray:
        return arrays["delta"]
