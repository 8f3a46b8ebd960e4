"""Training protocol of Pfahler & Morik (AAAI 2022): single-class minibatches with ghost samples.

:class:`SingleClassGhostSampler` yields single-class batches plus ghost examples drawn from all
classes; :class:`GhostBatchNorm1d` / :class:`GhostBatchNorm2d` use the ghosts only for the
batch-norm statistics (the real batch weighs as one ghost example).
"""

from .ghost_bn import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    convert_batchnorm,
    ghost_split,
    mixture_stats,
    set_ghost_split,
)
from .sampler import GhostBatch, GhostSamplerConfig, SingleClassGhostSampler

__all__ = [
    "GhostBatch",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostSamplerConfig",
    "SingleClassGhostSampler",
    "convert_batchnorm",
    "ghost_split",
    "mixture_stats",
    "set_ghost_split",
]
