"""Keyframe policy: full θ_t every ``keyframe_every`` steps (and at θ_0 and at close).

Why: any θ_t is then at most K deltas from an exact copy, ranges between keyframes can be
replayed independently (dask), lossy replay restarts from exact weights (the recorder resets
its θ̂ there), and buffers (BatchNorm statistics) and untrained parameters, which have no
deltas, are saved whole. Keyframes fall on block boundaries (``steps_per_block`` divides K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import tensors


@dataclass
class Keyframe:
    step: int
    params: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]


def keyframe_due(step: int, keyframe_every: int) -> bool:
    """Whether θ_step is saved whole (step counts recorded steps; θ_0 is saved at start)."""
    return step % keyframe_every == 0


def make_keyframe(
    step: int,
    params: list[tuple[str, torch.Tensor]],
    buffers: list[tuple[str, torch.Tensor]],
) -> Keyframe:
    """Host copies of θ_step and of the buffers (a synchronous copy, once per K steps)."""
    return Keyframe(
        step=step,
        params={n: tensors.to_numpy(p) for n, p in params},
        buffers={n: tensors.to_numpy(b) for n, b in buffers},
    )
