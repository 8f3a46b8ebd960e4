"""``full``: the dense delta, stored as is (lossless; replay is bit-exact with fixes)."""

from __future__ import annotations

import torch

from .base import ArraySpec, Encoding, StepContext, register


@register
class FullEncoding(Encoding):
    name = "full"
    lossless = True
    capabilities = frozenset({"dense"})

    def arrays(self) -> dict[str, ArraySpec]:
        return {"delta": ArraySpec(self.shape, self.dtype)}

    def encode_step(self, delta: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"delta": delta}

    def decode_block(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        return arrays["delta"]
