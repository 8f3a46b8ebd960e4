"""``lowrank``: per-example factors (exact for nn.Linear under plain SGD) or truncated SVD.

Factors: under plain SGD (no momentum, no weight decay) a Linear layer's update is
Δ_t = −η Σ_b g_b a_bᵀ with a_b the layer input and g_b the (already batch-averaged) gradient
at its output, so storing U = −η·G [rows, out] and V = A [rows, in] is exact up to the float
sum, costs rows·(in+out) instead of in·out, and splits Δ_t exactly per example (row b of the
forward pass is example b of the batch; ghost rows follow the real ones when present).

SVD: otherwise a truncated (randomized for large tensors) SVD of rank r of the delta, with
error feedback; conv kernels are reshaped to [out, in·kh·kw]. AdamW deltas are not low-rank
(elementwise normalisation): expect large errors there; the per-step error is recorded.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import EncodingError
from .base import ArraySpec, Encoding, StepContext, register


@register
class FactorsEncoding(Encoding):
    name = "factors"
    lossless = False
    capabilities = frozenset({"dense", "factors"})
    needs_io = True

    def __init__(self, shape: tuple[int, ...], dtype: str, max_rows: int = 0, **_: Any) -> None:
        super().__init__(shape, dtype)
        if len(shape) != 2:
            raise ValueError(f"factors need a 2-D Linear weight, got shape {shape}")
        if int(max_rows) < 1:
            raise ValueError("factors need max_rows >= 1 (the largest batch, ghosts included)")
        self.max_rows = int(max_rows)

    def params(self) -> dict[str, Any]:
        return {"max_rows": self.max_rows}

    def arrays(self) -> dict[str, ArraySpec]:
        out, inp = self.shape
        return {
            "u": ArraySpec((self.max_rows, out), self.dtype),
            "v": ArraySpec((self.max_rows, inp), self.dtype),
        }

    def encode_step(self, delta: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        a, g = ctx.inputs, ctx.grad_outputs
        if a is None or g is None:
            raise EncodingError(
                "factors: no layer inputs/gradients were captured for this step "
                "(did the forward/backward run through the module?)"
            )
        rows = a.shape[0]
        if rows > self.max_rows:
            raise EncodingError(f"factors: {rows} rows exceed max_rows={self.max_rows}")
        u = delta.new_zeros((self.max_rows, self.shape[0]))
        v = delta.new_zeros((self.max_rows, self.shape[1]))
        u[:rows] = g.to(delta.dtype) * (-ctx.lr)
        v[:rows] = a.to(delta.dtype)
        return {"u": u, "v": v}

    def decode_block(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        # one GEMM per step, as in the recorder: a batched kernel may round differently,
        # and the replayed θ̂ must match the recorder's bit for bit (verify checks it)
        u, v = arrays["u"], arrays["v"]
        return torch.stack([u[s].T @ v[s] for s in range(u.shape[0])])


@register
class SVDEncoding(Encoding):
    name = "svd"
    lossless = False
    capabilities = frozenset({"dense", "factors"})
    feedback = True

    def __init__(self, shape: tuple[int, ...], dtype: str, rank: int = 8, **_: Any) -> None:
        super().__init__(shape, dtype)
        if len(shape) < 2:
            raise ValueError(f"svd needs a tensor with >= 2 dims, got shape {shape}")
        self.m = shape[0]
        self.n = math.prod(shape[1:])
        self.rank = max(1, min(int(rank), self.m, self.n))

    def params(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def arrays(self) -> dict[str, ArraySpec]:
        return {
            "u": ArraySpec((self.m, self.rank), self.dtype),
            "v": ArraySpec((self.n, self.rank), self.dtype),
        }

    def encode_step(self, delta: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        mat = delta.reshape(self.m, self.n).float()
        if min(self.m, self.n) <= 4 * self.rank + 32:
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            u, s, v = u[:, : self.rank], s[: self.rank], vh[: self.rank].T
        else:
            u, s, v = torch.svd_lowrank(mat, q=self.rank + 8, niter=2)
            u, s, v = u[:, : self.rank], s[: self.rank], v[:, : self.rank]
        return {"u": (u * s).to(delta.dtype), "v": v.to(delta.dtype)}

    def decode_block(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        u, v = arrays["u"], arrays["v"]  # per-step GEMMs: see FactorsEncoding.decode_block
        return torch.stack([u[s] @ v[s].T for s in range(u.shape[0])]).reshape(
            u.shape[0], *self.shape
        )
