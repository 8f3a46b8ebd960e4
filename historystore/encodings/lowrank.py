"""``lowrank``: per-example factors (exact for nn.Linear under plain SGD) or truncated SVD.

Factors: under plain SGD (no momentum, no weight decay) a Linear layer's update is
Δ_t = −η Σ_b g_b a_bᵀ with a_b the layer input and g_b the (already batch-averaged) gradient
at its output, so storing U = −η·G [rows, out] and V = A [rows, in] is exact up to the float
sum, costs rows·(in+out) instead of in·out, and splits Δ_t exactly per example (row b of the
forward pass is example b of the batch; ghost rows follow the real ones when present).
Each step is checked against the true Δ_t: a common scalar between the captured gradients and
the applied update (``clip_grad_norm_``, a GradScaler's loss scale) is fitted and folded into
U; anything a scalar cannot explain (weight decay or momentum added later, a forward pass that
bypasses the module's hooks, per-sample clipping) raises :class:`EncodingError` when the
residual exceeds ``tolerance`` (relative, beyond the float rounding of θ_{t+1}).

SVD: otherwise a truncated (randomized for large tensors) SVD of rank r of the delta, with
error feedback; conv kernels are reshaped to [out, in·kh·kw]. AdamW deltas are not low-rank
(elementwise normalisation): expect large errors there; the per-step error is recorded.
With error feedback each step encodes θ_{t+1} − θ̂_t, i.e. Δ_t plus the residual carried over
from earlier steps, so the recorded Δ error (``encoding_error()[..., 0]``) is measured against
that target (at most 1 for a truncated SVD) and a decoded Δ̂_t compared with the true Δ_t (e.g.
against a lossless store) can be off by more than 100 % when the carried residual is larger
than the step; the meaningful measure is the error of θ̂_t (``encoding_error()[..., 1]``),
which keyframes reset to zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import EncodingError
from .base import ArraySpec, Encoding, StepContext, register

# float layouts the granularity is computed in: (same-width int, mantissa bits, exponent bias)
_LAYOUT = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}


def _granularity(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, log2) of the least significant set bit of each element: a power of two, as
    float32 (float64 for float64 input); value 0 (log2 meaningless) where x is 0.

    A delta θ_{t+1} − θ_t is a multiple of the smaller ulp of the two, so this bounds the
    rounding error of θ_{t+1} = fl(θ_t + update) from the delta alone (θ itself is not known
    to the encoding). Integer bit operations only: a few passes over the tensor."""
    w = torch.float64 if x.dtype == torch.float64 else torch.float32
    it, mant, bias = _LAYOUT[w]
    b = x.to(w).view(it) & ((1 << (torch.finfo(w).bits - 1)) - 1)  # |x|'s bits
    exp = b >> mant
    sig = (b & ((1 << mant) - 1)) | ((exp > 0).to(it) << mant)  # integer significand
    low = sig & -sig  # its lowest set bit, a power of two: exact as a float
    log2 = (low.to(w).view(it) >> mant) - bias + exp.clamp_min(1) - (mant + bias)
    normal = log2 >= 1 - bias
    bits = torch.where(
        normal,
        (log2 + bias).clamp_min(0) << mant,
        torch.ones_like(log2) << (log2 + bias + mant - 1).clamp(0, mant - 1),
    )
    return torch.where(sig == 0, 0, bits).view(w), log2


def _median_pow2(log2: torch.Tensor) -> float:
    """Median of the powers of two 2**log2, in O(n) with a histogram of the exponents."""
    log2 = log2.reshape(-1)
    lo = int(log2.min())
    counts = torch.bincount(log2 - lo)
    k = int(torch.searchsorted(counts.cumsum(0), (log2.numel() + 1) // 2))
    return math.ldexp(1.0, lo + k)


@register
class FactorsEncoding(Encoding):
    """``max_rows``: the largest number of captured rows per step (batch, ghosts included);
    ``tolerance``: the largest relative residual ‖Δ_t − U_tᵀV_t‖ / ‖Δ_t‖ accepted beyond the
    float rounding of θ (else :class:`EncodingError`); ``tensor``: the parameter's name, for
    messages."""

    name = "factors"
    lossless = False
    capabilities = frozenset({"dense", "factors"})
    needs_io = True

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: str,
        max_rows: int = 0,
        tolerance: float = 1e-3,
        tensor: str = "",
        **_: Any,
    ) -> None:
        super().__init__(shape, dtype)
        if len(shape) != 2:
            raise ValueError(f"factors need a 2-D Linear weight, got shape {shape}")
        if int(max_rows) < 1:
            raise ValueError("factors need max_rows >= 1 (the largest batch, ghosts included)")
        if not (math.isfinite(float(tolerance)) and float(tolerance) > 0):
            raise ValueError(f"factors need a finite tolerance > 0, got {tolerance!r}")
        self.max_rows = int(max_rows)
        self.tolerance = float(tolerance)
        self.tensor = str(tensor)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_rows": self.max_rows, "tolerance": self.tolerance}
        if self.tensor:
            out["tensor"] = self.tensor
        return out

    def arrays(self) -> dict[str, ArraySpec]:
        out, inp = self.shape
        return {
            "u": ArraySpec((self.max_rows, out), self.dtype),
            "v": ArraySpec((self.max_rows, inp), self.dtype),
        }

    def _where(self) -> str:
        return f"factors of {self.tensor!r}" if self.tensor else "factors"

    def encode_step(self, delta: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        a, g = ctx.inputs, ctx.grad_outputs
        if a is None or g is None:
            raise EncodingError(
                f"{self._where()}: no layer inputs/gradients were captured for this step "
                "(did the forward/backward run through the module?)"
            )
        rows = a.shape[0]
        if rows > self.max_rows:
            raise EncodingError(
                f"{self._where()}: {rows} rows exceed max_rows={self.max_rows} (rows of every "
                "training-mode forward since the last recorded step: gradient accumulation, "
                "ghost rows, or a step skipped by a GradScaler add rows)"
            )
        u = delta.new_zeros((self.max_rows, self.shape[0]))
        v = delta.new_zeros((self.max_rows, self.shape[1]))
        u[:rows] = g.to(delta.dtype) * (-ctx.lr)
        v[:rows] = a.to(delta.dtype)
        self._check(delta, u, v, rows)
        return {"u": u, "v": v}

    def _check(self, delta: torch.Tensor, u: torch.Tensor, v: torch.Tensor, rows: int) -> None:
        """Fold a common scalar into ``u`` (in place) and refuse what a scalar cannot explain.

        The residual counts only beyond the float error of each element: ``_granularity(Δ)``
        (the rounding of θ_{t+1}; where Δ is 0, an absorbed update, 4× the median granularity)
        plus rows·eps·(|U|ᵀ|V|) for the products, so tiny steps on large weights pass."""
        w = torch.float64 if delta.dtype == torch.float64 else torch.float32
        eps = torch.finfo(delta.dtype).eps
        d = delta.to(w)
        if not bool(d.isfinite().all()):
            return  # a diverged step: stored as captured (NaN/inf factors count as non-finite)
        allow, log2 = _granularity(delta)
        nz = d != 0
        floor = 4 * _median_pow2(log2[nz]) if bool(nz.any()) else 0.0
        allow = torch.where(nz, allow, floor)
        prod = _product(u, v).to(w)
        pn = float(prod.norm())
        if not math.isfinite(pn):
            raise EncodingError(
                f"{self._where()}: the captured layer inputs/gradients hold NaN/inf but the "
                "step's update is finite (a step skipped by a GradScaler? its captured rows "
                'join the next recorded step\'s); record this tensor with "full" or "svd"'
            )
        scale = 1.0
        if pn > 0:
            slack = _product(u.abs(), v.abs()).to(w).mul_(rows * eps)  # float error of the GEMMs
            scale = float((d * prod).sum()) / pn**2
            if abs(scale - 1.0) * pn > float(allow.norm()) + float(slack.norm()):
                u[:rows] *= scale  # clipping, loss scaling, ...: the product now matches Δ
                prod = _product(u, v).to(w)
                slack.mul_(abs(scale))
            else:
                scale = 1.0
            allow += slack
        diff = (d - prod).abs_()
        excess = float((diff - allow).clamp_min_(0).norm())
        dn = float(d.norm())
        if excess <= self.tolerance * dn:
            return
        rel = float(diff.norm()) / dn if dn else math.inf
        raise EncodingError(
            f"{self._where()}: the step's update is not -lr·Σ_b g_b a_bᵀ of the captured layer "
            f"inputs a_b and output gradients g_b (exact for an nn.Linear under plain SGD), "
            f"even after fitting a common scale {scale:.6g} (clipping, loss scaling): relative "
            f"residual ‖Δ − UᵀV‖/‖Δ‖ = {rel:.3g}, {excess / dn if dn else math.inf:.3g} beyond "
            f"float rounding, tolerance {self.tolerance:g}. Likely causes: weight decay, momentum "
            "or another optimizer setting added to the param group after the Recorder was "
            "created; a forward pass that bypasses the module's hooks (e.g. a functional call "
            "with the weight); per-sample gradient clipping or other per-example reweighting; "
            "a second update of the weight between recorded steps; a step skipped by a "
            "GradScaler (its captured rows join the next step's). Remedy: record this tensor "
            'with encoding "full", "rounded" or "svd" (an EncodingRule whose pattern matches it, '
            "placed before the factors rule)."
        )

    def decode_block(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        # one GEMM per step, as in the recorder: a batched kernel may round differently,
        # and the replayed θ̂ must match the recorder's bit for bit (verify checks it)
        u, v = arrays["u"], arrays["v"]
        return torch.stack([_product(u[s], v[s]) for s in range(u.shape[0])])


def _product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Uᵀ V of one step: the single GEMM that decoding, replay and the encode check share."""
    return u.T @ v


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
