"""Single-class minibatches with ghost samples (Pfahler & Morik, AAAI 2022, Algorithm 2).

Why single-class batches: the explanation method attributes every parameter update to the
training examples that produced it. If every minibatch holds examples of one class only, each
update (and each change of a layer's representation) can be attributed to that class exactly.

Why ghost samples: batch normalisation computed over a single-class batch would see badly
skewed statistics (and would leak the label into the features). The protocol therefore appends
*ghost* examples, drawn from all classes by their prior, that only feed the batch-norm
statistics (see :mod:`historystore.protocol.ghost_bn`) and never the loss, so they do not
contribute to the update that is attributed to the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GhostBatch", "GhostSamplerConfig", "SingleClassGhostSampler"]


@dataclass(frozen=True, eq=False)
class GhostBatch:
    """One minibatch of the protocol.

    ids: dataset indices of the real (loss-bearing) examples, all of class ``label``.
    ghost_ids: dataset indices of the ghost examples (batch-norm statistics only); disjoint
        from ``ids``.
    label: the class of the real examples.

    Feed the model ``x[batch.all_ids]`` (real rows first) under
    ``ghost_split(model, batch.n_real)`` and compute the loss on the first ``n_real`` rows.
    """

    ids: torch.Tensor
    ghost_ids: torch.Tensor
    label: int

    @property
    def n_real(self) -> int:
        """Number of leading real rows in :attr:`all_ids`."""
        return int(self.ids.numel())

    @property
    def all_ids(self) -> torch.Tensor:
        """``cat([ids, ghost_ids])``: the row order :class:`GhostBatchNorm1d/2d` expects."""
        return torch.cat([self.ids, self.ghost_ids])


@dataclass(frozen=True)
class GhostSamplerConfig:
    """Scalar settings of :class:`SingleClassGhostSampler`, validated on construction.

    batch_size: size of the real, single-class part of a batch (the last batch of a class may
        be smaller unless ``drop_last``).
    ghost_size: number of ghost examples appended to every batch.
    seed: seeds a private ``torch.Generator``; together with the epoch it fixes the sequence.
    drop_last: drop each class's last batch when it is smaller than ``batch_size``.
    """

    batch_size: int
    ghost_size: int
    seed: int = 0
    drop_last: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "ghost_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an int, got {type(value).__name__}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ghost_size < 1:
            raise ValueError(f"ghost_size must be >= 1, got {self.ghost_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def _as_labels(labels: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
    """Validate labels: a non-empty 1-D tensor/array of integers (bool is rejected)."""
    if isinstance(labels, torch.Tensor):
        t = labels.detach().cpu()
    else:
        arr = np.asarray(labels)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
        t = torch.from_numpy(arr.astype(np.int64, copy=False))
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"labels must be integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError("labels must not be empty")
    return t.to(torch.int64)


class SingleClassGhostSampler:
    """Yields :class:`GhostBatch` es for one epoch: single-class real parts plus ghosts.

    Each epoch: every class's examples are shuffled and cut into batches of ``batch_size``;
    the order of all batches (across classes) is shuffled; each batch then gets
    ``ghost_size`` ghost examples. So every example is a real example exactly once per epoch.

    Ghosts are drawn without replacement, never from the batch's own real examples, and so
    that each draw picks class ``k`` with the prior ``π_k = n_k / n``. Uniform sampling from
    the dataset minus the real batch would under-represent the batch's class (its pool shrinks
    by up to ``batch_size``); we instead give the remaining examples of that class the weight
    ``n_k / (n_k - |batch|)`` relative to everyone else, which restores ``π_k`` exactly for
    a single draw (drawing several without replacement depletes classes only slightly while
    ``ghost_size`` is small against class sizes).

    Randomness comes from a private ``torch.Generator`` seeded from ``(seed, epoch)``, so the
    sequence is reproducible and does not touch the global RNG; call :meth:`set_epoch` before
    each epoch to get a different, still deterministic, sequence.
    """

    def __init__(
        self,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        batch_size: int,
        ghost_size: int,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.config = GhostSamplerConfig(batch_size, ghost_size, seed, drop_last)
        self.labels = _as_labels(labels)
        self.classes: list[int] = [int(c) for c in torch.unique(self.labels).tolist()]
        self._class_ids: list[torch.Tensor] = [
            torch.nonzero(self.labels == c).flatten() for c in self.classes
        ]
        n = self.labels.numel()
        largest_real = min(batch_size, max(len(ids) for ids in self._class_ids))
        if ghost_size > n - largest_real:
            raise ValueError(
                f"ghost_size={ghost_size} is too large: the dataset has {n} examples and a "
                f"real batch can hold {largest_real} of them, leaving {n - largest_real} "
                "possible ghosts"
            )
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def ghost_size(self) -> int:
        return self.config.ghost_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (deterministic) sequence the next iteration yields."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        b = self.config.batch_size
        if self.config.drop_last:
            return sum(len(ids) // b for ids in self._class_ids)
        return sum(-(-len(ids) // b) for ids in self._class_ids)

    def _generator(self) -> torch.Generator:
        # SeedSequence mixes (seed, epoch) so nearby pairs give unrelated streams.
        state = np.random.SeedSequence([self.config.seed, self.epoch]).generate_state(2)
        seed = (int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1)
        return torch.Generator().manual_seed(seed)

    def _plan(self, gen: torch.Generator) -> list[tuple[torch.Tensor, int]]:
        """Shuffle within classes, cut into single-class batches, shuffle batch order."""
        b = self.config.batch_size
        batches: list[tuple[torch.Tensor, int]] = []
        for label, ids in zip(self.classes, self._class_ids, strict=True):
            shuffled = ids[torch.randperm(len(ids), generator=gen)]
            for chunk in torch.split(shuffled, b):
                if self.config.drop_last and len(chunk) < b:
                    continue
                batches.append((chunk, label))
        order = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in order]

    def _ghosts(self, ids: torch.Tensor, label_index: int, gen: torch.Generator) -> torch.Tensor:
        """Weighted sampling without replacement (Efraimidis–Spirakis: top-k of log(u)/w)."""
        n = self.labels.numel()
        same = self._class_ids[label_index]
        weights = torch.ones(n, dtype=torch.float64)
        remaining = len(same) - len(ids)
        if remaining > 0:
            weights[same] = len(same) / remaining
        weights[ids] = 0.0  # log(u)/0 = -inf: real examples are never drawn
        u = torch.rand(n, generator=gen, dtype=torch.float64).clamp_min(1e-300)
        keys = u.log() / weights
        return torch.topk(keys, self.config.ghost_size).indices

    def __iter__(self) -> Iterator[GhostBatch]:
        gen = self._generator()
        index_of = {c: i for i, c in enumerate(self.classes)}
        for ids, label in self._plan(gen):
            ghosts = self._ghosts(ids, index_of[label], gen)
            yield GhostBatch(ids=ids, ghost_ids=ghosts, label=label)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"{type(self).__name__}(n={self.labels.numel()}, classes={len(self.classes)}, "
            f"batch_size={c.batch_size}, ghost_size={c.ghost_size}, seed={c.seed}, "
            f"drop_last={c.drop_last}, epoch={self.epoch})"
        )
