"""``rounded``: lossy float rounding of the delta (BitRound mantissa bits, bfloat16, float16).

Rounding is *relative* (it keeps the leading mantissa bits), which matters because step sizes
shrink 70-180x over a run: absolute-tolerance codecs ruin the late steps. BitRound is applied
in the recorder (bit-identical to numcodecs.BitRound) and the data stays float32, so any zarr
v3 reader can read it and bit-shuffle compresses the zeroed low bits. With error feedback the
replayed θ̂_t stays within about one step's rounding error of θ_t. Each stored delta is the
rounded θ_{t+1} − θ̂_t, i.e. Δ_t plus the previous step's rounding residual: against the true
Δ_t its relative error is about 2^-bits·‖Δ_(t−1)‖/‖Δ_t‖, not 2^-bits, and exceeds 1 when a
step is smaller than the carried residual (an lr drop by more than 2^bits, a step with almost
no gradient); the recorded Δ error is measured against θ_{t+1} − θ̂_t, and the θ̂ error
(``encoding_error()[..., 1]``) is the measure to judge (see :mod:`historystore.encodings.base`).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ArraySpec, Encoding, StepContext, register

_MANTISSA = {"float32": 23, "float64": 52, "float16": 10, "bfloat16": 7}
_INT = {
    "float32": torch.int32,
    "float64": torch.int64,
    "float16": torch.int16,
    "bfloat16": torch.int16,
}


def bitround(x: torch.Tensor, keepbits: int) -> torch.Tensor:
    """Round to ``keepbits`` mantissa bits, half to even (same bits as numcodecs.BitRound)."""
    bits = _MANTISSA[str(x.dtype).removeprefix("torch.")]
    if keepbits >= bits:
        return x.clone()
    it = _INT[str(x.dtype).removeprefix("torch.")]
    b = x.contiguous().view(it).clone()
    maskbits = bits - keepbits
    mask = (-1 >> maskbits) << maskbits
    half_quantum1 = (1 << (maskbits - 1)) - 1
    b += ((b >> maskbits) & 1) + half_quantum1
    b &= mask
    return b.view(x.dtype)


@register
class RoundedEncoding(Encoding):
    """``bits=N`` keeps N mantissa bits (stored in the tensor's dtype); ``dtype="bfloat16"``
    or ``"float16"`` casts (float16 has an absolute underflow: late, tiny steps lose bits)."""

    name = "rounded"
    lossless = False
    capabilities = frozenset({"dense"})
    feedback = True

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: str,
        bits: int | None = None,
        cast: str | None = None,
        **_: Any,
    ) -> None:
        super().__init__(shape, dtype)
        if (bits is None) == (cast is None):
            raise ValueError("rounded: give exactly one of bits=N or cast='bfloat16'|'float16'")
        if bits is not None and not 1 <= int(bits) <= _MANTISSA.get(dtype, 23):
            raise ValueError(f"rounded: bits must be in 1..{_MANTISSA.get(dtype, 23)}, got {bits}")
        if cast is not None and cast not in ("bfloat16", "float16"):
            raise ValueError(f"rounded: cast must be 'bfloat16' or 'float16', got {cast!r}")
        self.bits = None if bits is None else int(bits)
        self.cast = cast

    def params(self) -> dict[str, Any]:
        return {"bits": self.bits} if self.bits is not None else {"cast": self.cast}

    def arrays(self) -> dict[str, ArraySpec]:
        return {"delta": ArraySpec(self.shape, self.cast or self.dtype)}

    def encode_step(self, delta: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.cast is not None:
            return {"delta": delta.to(getattr(torch, self.cast))}
        return {"delta": bitround(delta, self.bits or 0)}

    def decode_block(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        return arrays["delta"].to(getattr(torch, self.dtype))
