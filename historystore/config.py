"""Typed, validated recorder configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from . import codecs
from .encodings import EncodingRule

MiB = 1 << 20
PROFILES = ("lossless", "compact")
#: Codec of the compact profile. Its codes are near their entropy: zstd3, lz4 and byte/bit
#: shuffles were within ±10 % of each other on AdamW deltas (zstd1-bitshuffle the smallest).
COMPACT_CODEC = "blosc-zstd1-bitshuffle"
#: Bits of the compact profile's deltas. Measured on a digits CNN under AdamW (Δ codes, bytes
#: per parameter per step / median error of the derived m): 8 bits 0.82 / 0.7 %, 6 bits
#: 0.62 / 2.1 %, 5 bits 0.52 / 4.0 %, 4 bits 0.42 / 9.3 %; v in log8 adds ~0.55.
COMPACT_DELTA_BITS = 6


@dataclass(frozen=True)
class RecorderConfig:
    """How a run is laid out on disk. Validated on construction.

    keyframe_every: full θ_t every K steps; any θ_t is then K deltas away from a keyframe and
        the ranges between keyframes can be processed independently (dask).
    steps_per_block: steps buffered before the background writer compresses and commits them
        (one shard per array). ``None`` picks the largest divisor of ``keyframe_every`` whose
        block stays under ``block_bytes``; it must divide ``keyframe_every``. Why 16 MiB:
        the writer starts on a block only when it is full, so ``close()`` waits for up to
        the last two blocks, and each new block buffer is allocated (its pages populated) on
        the training thread; smaller blocks keep both short and the writer busy while
        training runs. Each block costs the writer a fixed ~30-70 ms (dozens of small
        arrays, the commit), which ``join_blocks`` pays once for all the blocks that wait.
        Measured on the demo CNN (310 KB a step, 6 interleaved runs): 32-step blocks 1.37x
        end to end, 64 steps 1.46x, 128 steps (64 MiB) 1.56x. Models whose step exceeds
        ``block_bytes`` get one step per block either way.
    chunk_bytes: target size of one chunk (the unit of decoding) inside a shard.
    max_pending_blocks: blocks waiting for the writer before ``rec.step`` blocks (backpressure);
        host memory is bounded by about ``(max_pending_blocks + 2) * block_bytes``.
    join_blocks: when the writer falls behind, it writes the blocks waiting for it together,
        under one commit (a block's fixed cost, ~40 small writes and the commit, is then paid
        once); a kill then loses up to ``max_pending_blocks + 1`` blocks instead of one.
        False: one commit per block.
    optimizer_state: "every_step" records the optimizer state after every step (needed by
        path-kernel methods); "none" records none.
    codec / state_codec: codec presets (see :mod:`historystore.codecs`) for deltas and for
        optimizer state and keyframes.
    encodings: rules choosing each tensor's delta encoding, first match wins (default: all
        ``full``, lossless); see :mod:`historystore.encodings.policy`.
    profile: "lossless" (default) keeps every delta and all optimizer state bit for bit.
        "compact" keeps θ̂_t and Adam's state (as ``optimizer_state`` and ``scan(optim=True)``
        serve it, which TracIn and EPK read) in about 1/10 of the bytes of θ + both moments
        in float32: deltas as error-fed 6-bit codes with a per-row scale
        (``quantized``: replay within half a quantum of θ, exact at keyframes) unless a rule
        in ``encodings`` says otherwise, and for Adam/AdamW the second moment as uint8 codes
        of log v and the first moment derived by the reader from Δ, v and the step's
        hyperparameters (:mod:`historystore.encodings.state`);
        ``RecorderConfig.compact()`` also picks its codecs. Every lossy choice reports its error:
        ``store.encoding_error()`` for Δ/θ̂, ``benchmarks.storage`` for v, m and attribution.
    """

    keyframe_every: int = 256
    steps_per_block: int | None = None
    block_bytes: int = 16 * MiB
    chunk_bytes: int = 8 * MiB
    max_pending_blocks: int = 2
    join_blocks: bool = True
    optimizer_state: Literal["every_step", "none"] = "every_step"
    codec: str = codecs.DEFAULT_CODEC
    state_codec: str = codecs.DEFAULT_STATE_CODEC
    encodings: tuple[EncodingRule, ...] = ()
    profile: Literal["lossless", "compact"] = "lossless"

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
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        if not all(isinstance(r, EncodingRule) for r in self.encodings):
            raise TypeError("encodings must be a tuple of EncodingRule")
        object.__setattr__(self, "encodings", tuple(self.encodings))
        codecs.validate(self.codec)
        codecs.validate(self.state_codec)

    @classmethod
    def compact(cls, **kwargs: Any) -> RecorderConfig:
        """The compact profile with its codecs (any field may still be overridden)."""
        # 256 MiB blocks: v's codes are differences within a block, so its blocks need many
        # steps (a block of 1 step stores every v whole: 1.59 instead of 1.14 B/param/step)
        return cls(
            **{
                "profile": "compact",
                "codec": COMPACT_CODEC,
                "state_codec": COMPACT_CODEC,
                "block_bytes": 256 * MiB,
                **kwargs,
            }
        )

    def delta_rules(self) -> tuple[EncodingRule, ...]:
        """The encoding rules in force: the user's, then the profile's default."""
        if self.profile == "compact":
            return (*self.encodings, EncodingRule("quantized", {"bits": COMPACT_DELTA_BITS}))
        return self.encodings

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
