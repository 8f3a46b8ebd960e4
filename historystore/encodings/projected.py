"""``projected``: a seeded count-sketch of each delta to k dimensions.

⟨SΔ, Sv⟩ is an unbiased estimate of ⟨Δ, v⟩ with variance
(‖Δ‖²‖v‖² + ⟨Δ,v⟩² − 2 Σ_i Δ_i² v_i²)/k, like a dense Gaussian JL projection, but S is never
materialised: each coordinate i goes to bucket h(i) with sign s(i), both drawn once per tensor
from (seed, tensor name) and cached, so applying S costs O(P) per step, is reused for every
step and is exactly reproducible for test-side vectors at explanation time (``sketch``).
A sketch cannot be decoded into a dense delta.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

from .base import ArraySpec, Encoding, StepContext, register


@register
class ProjectedEncoding(Encoding):
    name = "projected"
    lossless = False
    capabilities = frozenset({"sketch"})

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: str,
        k: int = 1024,
        seed: int = 0,
        tensor: str = "",
        **_: Any,
    ) -> None:
        super().__init__(shape, dtype)
        if int(k) < 1:
            raise ValueError(f"projected: k must be >= 1, got {k}")
        self.k = int(k)
        self.seed = int(seed)
        self.tensor = tensor
        self.numel = math.prod(shape)
        self._hash: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "seed": self.seed, "tensor": self.tensor}

    def arrays(self) -> dict[str, ArraySpec]:
        return {"sketch": ArraySpec((self.k,), "float32")}

    def hash(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket, sign) of every coordinate, generated once from the seed and cached."""
        if device not in self._hash:
            g = torch.Generator().manual_seed(
                self.seed * 1_000_003 + zlib.crc32(self.tensor.encode())
            )
            bucket = torch.randint(0, self.k, (self.numel,), generator=g)
            sign = torch.randint(0, 2, (self.numel,), generator=g).float().mul_(2).sub_(1)
            self._hash[device] = (bucket.to(device), sign.to(device))
        return self._hash[device]

    def sketch(self, v: torch.Tensor) -> torch.Tensor:
        """S v for vectors shaped ``[..., *shape]`` -> ``[..., k]`` (test side uses this too)."""
        bucket, sign = self.hash(v.device)
        flat = v.reshape(-1, self.numel).float() * sign
        out = flat.new_zeros((flat.shape[0], self.k))
        out.index_add_(1, bucket, flat)
        return out.reshape(*v.shape[: v.dim() - len(self.shape)], self.k)

    def encode_step(self, delta: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"sketch": self.sketch(delta)}
