"""Typed, validated recorder configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from . import codecs
from .encodings import EncodingRule

MiB = 1 << 20


@dataclass(frozen=True)
class RecorderConfig:
    """How a run is laid out on disk. Validated on construction.

    keyframe_every: full θ_t every K steps; any θ_t is then K deltas away from a keyframe and
        the ranges between keyframes can be processed independently (dask).
    steps_per_block: steps buffered before the background writer compresses and commits them
        (one shard per array). ``None`` picks the largest divisor of ``keyframe_every`` whose
        block stays under ``block_bytes``; it must divide ``keyframe_every``.
    chunk_bytes: target size of one chunk (the unit of decoding) inside a shard.
    max_pending_blocks: blocks waiting for the writer before ``rec.step`` blocks (backpressure);
        host memory is bounded by about ``(max_pending_blocks + 2) * block_bytes``.
    optimizer_state: "every_step" records the optimizer state after every step (needed by
        path-kernel methods); "none" records none.
    codec / state_codec: codec presets (see :mod:`historystore.codecs`) for deltas and for
        optimizer state and keyframes.
    encodings: rules choosing each tensor's delta encoding, first match wins (default: all
        ``full``, lossless); see :mod:`historystore.encodings.policy`.
    """

    keyframe_every: int = 256
    steps_per_block: int | None = None
    block_bytes: int = 64 * MiB
    chunk_bytes: int = 8 * MiB
    max_pending_blocks: int = 2
    optimizer_state: Literal["every_step", "none"] = "every_step"
    codec: str = codecs.DEFAULT_CODEC
    state_codec: str = codecs.DEFAULT_CODEC
    encodings: tuple[EncodingRule, ...] = ()

    def __post_init__(self) -> None:
        if self.keyframe_every < 1:
            raise ValueError(f"keyframe_every must be >= 1, got {self.keyframe_every}")
        if self.steps_per_block is not None:
            if self.steps_per_block < 1:
                raise ValueError(f"steps_per_block must be >= 1, got {self.steps_per_block}")
            if self.keyframe_every % self.steps_per_block:
                raise ValueError(
                    f"steps_per_block ({self.steps_per_block}) must divide keyframe_every "
                    f"({self.keyframe_every}) so that keyframes fall on block boundaries"
                )
        if self.block_bytes < 1 or self.chunk_bytes < 1:
            raise ValueError("block_bytes and chunk_bytes must be positive")
        if self.max_pending_blocks < 1:
            raise ValueError(f"max_pending_blocks must be >= 1, got {self.max_pending_blocks}")
        if self.optimizer_state not in ("every_step", "none"):
            raise ValueError(
                f"optimizer_state must be 'every_step' or 'none', got {self.optimizer_state!r}"
            )
        if not all(isinstance(r, EncodingRule) for r in self.encodings):
            raise TypeError("encodings must be a tuple of EncodingRule")
        object.__setattr__(self, "encodings", tuple(self.encodings))
        codecs.validate(self.codec)
        codecs.validate(self.state_codec)

    def resolve_steps_per_block(self, step_bytes: int) -> int:
        """The block length for a run whose one step (deltas + state) takes ``step_bytes``."""
        if self.steps_per_block is not None:
            return self.steps_per_block
        best = 1
        for d in range(1, self.keyframe_every + 1):
            if self.keyframe_every % d == 0 and d * max(step_bytes, 1) <= self.block_bytes:
                best = d
        return best

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
