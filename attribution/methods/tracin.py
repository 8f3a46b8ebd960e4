"""TracIn on the recorded batches (TracInIdeal) and at checkpoints (TracIn-CP).

For a test point x and the explained output f (default: the final model's predicted logit)::

    batches:      score(x, z_i) = Σ_{t: z_i ∈ B_t} lr_t / |B_t| · ⟨∇f(x; θ_t), P_t ∇ℓ(z_i; θ_t)⟩
    checkpoints:  score(x, z_i) = Σ_{t ≡ 0 mod K} lr_t · ⟨∇f(x; θ_t), P_t ∇ℓ(z_i; θ_t)⟩  (all z_i)

P_t = I for SGD (with or without momentum) and Adam's diagonal preconditioner
1/(√(v_t/bc2) + eps) from the recorded second moment for Adam/AdamW (``preconditioner="none"``:
P_t = I always). "batches" needs only each step's own batch: per step one vmapped gradient
over the B test points and one over the |B_t| examples. "checkpoints" is the usual TracIn-CP
for comparison: every K-th step against every training example id below the store's largest
(chunked by ``train_batch_size``), whether or not the run used it. ``every=K`` also thins the
"batches" variant to the steps t ≡ 0 (mod K).

Outputs (pseudo-layer ``"model"``): top-k/bottom-k examples, ``step_scores`` [B, T] (Σ over
the step's examples), ``param_scores`` [B, tensors] (each recorded tensor's share of Σ scores).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from historystore.read.store import HistoryStore, StepBlock

from ._path import PathMethod, PathState, pair_scores, preconditioner, require_state
from .base import ExplainContext, register_method


@register_method
class TracInMethod(PathMethod):
    """TracIn along the recorded path (see the module docstring)."""

    name = "tracin"
    term_names = ()

    def __init__(
        self,
        top_k: int = 10,
        keep_scores: bool = False,
        target: str | int = "pred",
        variant: str = "batches",
        every: int = 1,
        preconditioner: str = "auto",
        train_batch_size: int = 256,
        allow_lossy: bool = True,
    ) -> None:
        super().__init__(top_k, keep_scores, target, train_batch_size, allow_lossy)
        if variant not in ("batches", "checkpoints"):
            raise ValueError(f"variant must be 'batches' or 'checkpoints', got {variant!r}")
        if preconditioner not in ("auto", "none"):
            raise ValueError(f"preconditioner must be 'auto' or 'none', got {preconditioner!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.variant = variant
        self.every = int(every)
        self.precondition = preconditioner

    def uses_rule(self) -> bool:
        return self.precondition == "auto"

    def _adam(self) -> bool:
        return self.rule is not None and self.rule.kind == "adam"

    def _bind(self, store: HistoryStore) -> None:
        if self._adam():
            assert self.rule is not None
            require_state(self.rule, ["exp_avg_sq", "step"], "TracIn (Adam)", store.path)

    def needs_optim(self) -> bool:
        return self._adam()

    def update(self, state: PathState, block: StepBlock, ctx: ExplainContext) -> None:
        assert block.params is not None and state.fn is not None
        p = ctx.extra["path"]
        fn, dev = state.fn, ctx.device
        steps = torch.zeros(ctx.batch_size, block.num_steps, dtype=torch.float64, device=dev)
        for i in range(block.num_steps):
            t = block.start + i
            if t % self.every:
                continue
            theta = {n: block.params[n][i] for n in self.names}
            g = fn.test_grads(theta, p["x"], p["target"])
            if self._adam():
                assert self.rule is not None and block.optim is not None
                for n in self.names:
                    st = block.optim[n]
                    a, _ = preconditioner(self.rule, n, t, st["exp_avg_sq"][i], st["step"][i])
                    g[n] = g[n] * a
            lr = {n: float(block.lr[n][i]) for n in self.names}
            if self.variant == "batches":
                ids, x, y = self._batch(block, i, dev, fn.dtype)
                if len(ids) == 0:
                    continue
                coef = {n: lr[n] / len(ids) for n in self.names}
                chunks = [(ids, x, y)]
            else:
                coef = lr
                seen = np.arange(ctx.index.num_train)  # TracIn-CP scores every example
                chunks = (
                    (seen[c : c + self.train_batch_size], None, None)
                    for c in range(0, len(seen), self.train_batch_size)
                )
            for ids, x, y in chunks:
                if x is None:
                    x, y = self.data.fetch(ids)
                    x = x.to(dev, fn.dtype) if x.is_floating_point() else x.to(dev)
                    y = y.to(dev)
                assert y is not None
                j = fn.train_grads(theta, x, y, self.loss_fn)
                s, per = pair_scores(g, j, coef)  # [B, m]
                state.examples.index_add_(1, torch.from_numpy(ids).to(dev), s)
                steps[:, i] += s.sum(1)
                for k, n in enumerate(self.names):
                    state.params[:, k] += per[n]
        state.steps.append((block.start, steps))

    def finalize(self, state: PathState, ctx: ExplainContext) -> dict[str, dict[str, np.ndarray]]:
        return {"model": self._finalize_common(state, ctx, self.variant == "checkpoints")}

    def attrs(self) -> dict[str, Any]:
        return {
            **super().attrs(),
            "variant": self.variant,
            "every": self.every,
            "preconditioner": "adam" if self._adam() else "identity",
        }
