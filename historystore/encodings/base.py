"""The encoding interface: how one tensor's per-step deltas are represented in the store.

An encoding turns each step's delta (on the training device, in the recorder's hot path) into
one or more named arrays with a leading step axis, and says what it can give back
(``capabilities``): a dense delta, per-example factors, a sketch. Readers and attribution
methods ask for a capability and get a clear :class:`~historystore.errors.EncodingError` when
the encoding cannot provide it.

Lossy encodings with ``feedback = True`` encode θ_{t+1} − θ̂_t, where θ̂_t is the reader's own
reconstruction (error feedback): the replay error then stays at about one step's encoding
error instead of accumulating, and keyframes reset it to zero. The decoded delta of step t is
then Δ_t plus the residual θ_t − θ̂_t carried over from earlier steps, not an estimate of Δ_t
alone: compared with the true Δ_t (e.g. from a lossless store) its relative error can exceed
1 when that residual is larger than the step (a low-rank SVD of AdamW updates does), while θ̂
stays close to θ. The recorder's per-step error (``encoding_error()[..., 0]``) is measured
against the encoded target θ_{t+1} − θ̂_t; judge a feedback encoding by the error of θ̂_t
(``encoding_error()[..., 1]``), which is what attribution over θ̂ sees.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import EncodingError


@dataclass(frozen=True)
class ArraySpec:
    """Shape (without the step axis) and dtype of one array an encoding stores per step."""

    shape: tuple[int, ...]
    dtype: str


@dataclass
class StepContext:
    """What an encoding may need beyond the delta: the step's lr, captured layer I/O."""

    lr: float = float("nan")
    inputs: torch.Tensor | None = None  # [rows, in] layer inputs of the step (factors)
    grad_outputs: torch.Tensor | None = None  # [rows, out] gradients at the layer output
    extra: dict[str, Any] = field(default_factory=dict)


class Encoding(ABC):
    """Base class. Subclasses set ``name``, ``lossless``, ``capabilities`` and ``feedback``."""

    name: ClassVar[str]
    #: True when decoding gives back the delta bit for bit (replay is then exact with fixes).
    lossless: ClassVar[bool]
    #: What the reader can ask for: "dense" (a dense delta), "factors", "sketch", ...
    capabilities: ClassVar[frozenset[str]] = frozenset({"dense"})
    #: Encode against the reader's reconstruction θ̂ (bounded drift) instead of the true θ_t.
    feedback: ClassVar[bool] = False
    #: Needs the layer's inputs and output gradients captured by module hooks.
    needs_io: ClassVar[bool] = False

    def __init__(self, shape: tuple[int, ...], dtype: str, **params: Any) -> None:
        self.shape = tuple(shape)
        self.dtype = dtype

    def params(self) -> dict[str, Any]:
        """JSON-able parameters, stored in the tensor's metadata to rebuild the encoding."""
        return {}

    @abstractmethod
    def arrays(self) -> dict[str, ArraySpec]:
        """The arrays this encoding stores per step."""

    @abstractmethod
    def encode_step(self, delta: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Encode one step's delta (on the training device) into per-step arrays."""

    def decode_block(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dense deltas ``[steps, *shape]`` from a block of stored arrays (torch, any device)."""
        raise EncodingError(f"encoding {self.name!r} cannot give a dense delta")

    def decode_step(self, arrays: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """One step's dense delta, into ``out`` where the encoding can (the recorder passes a
        buffer it reuses every step: a fresh full-size tensor costs a page fault per 4 KiB,
        more than the arithmetic on CPU). The result may be ``out`` or a new tensor."""
        return self.decode_block({a: v.unsqueeze(0) for a, v in arrays.items()})[0]

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


def encoding_class(name: str) -> type[Encoding]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown encoding {name!r}; known: {sorted(_REGISTRY)}") from None


def get_encoding(name: str, shape: tuple[int, ...], dtype: str, **params: Any) -> Encoding:
    """Instantiate a registered encoding for a tensor of ``shape``/``dtype``."""
    return encoding_class(name)(shape, dtype, **params)


def encoding_names() -> list[str]:
    return sorted(_REGISTRY)
