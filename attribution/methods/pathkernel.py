"""The exact path kernel (EPK), in the style of ExPLAIND, streamed from the recorded history.

The recorded θ_0 → θ_1 → … → θ_T is a piecewise-linear path, so for a test point x and the
explained output f (default: the final model's predicted logit)::

    f(x; θ_T) = f(x; θ_0) + Σ_t ⟨ḡ_t, Δ_t⟩,    ḡ_t = ∫_0^1 ∇f(x; θ_t + s Δ_t) ds

exactly (the fundamental theorem of calculus per segment). ḡ_t is computed by adaptive
Simpson quadrature, refined locally: a step keeps 3 nodes when Simpson and the trapezoid rule
agree, otherwise the panels whose halves disagree are bisected (down to width 2^-max_level)
until the error estimate of ⟨ḡ_t, Δ_t⟩ is below ``rtol · max(|f_T|, |f_T − f_0|) / T`` for every
test point of the batch (split among the panels). Kinks of ReLU/max-pooling are where the
nodes go. The endpoint gradient of step t is reused at the start of step t+1, and the nodes
spent per step are returned (``nodes`` [B, T]).

The step's update is then written per training example from the optimizer's rule (torch's
SGD and Adam/AdamW, read from the store)::

    Δ_t = −lr_t [A_t ⊙ (c_g (g_t + wd_L2 θ_t) + c_m m_{t−1}) + wd_dec θ_t]
    g_t = 1/|B_t| Σ_i ∇ℓ_i(θ_t)

* SGD: A = 1, m = the momentum buffer, c_g = 1 − dampening (1 on the buffer's first step),
  c_m = momentum (nesterov: c_g → 1 + μ c_g, c_m → μ²), wd_L2 = weight_decay.
* Adam/AdamW: m = the first moment, A = 1/(√(v_t/bc2) + eps) with the *recorded* second
  moment v_t (it holds the current gradient too, so it is taken as a fixed preconditioner:
  only the first moment is split), c_g = (1 − β1)/bc1, c_m = β1/bc1; AdamW: wd_dec =
  weight_decay, Adam: wd_L2 = weight_decay.

so that ⟨ḡ_t, Δ_t⟩ = Σ_{i∈B_t} K_t(x, z_i) + weight-decay term + momentum term + residual:

* ``examples``: K_t(x, z_i) = −lr_t c_g/|B_t| ⟨A_t ⊙ ḡ_t, ∇ℓ(z_i; θ_t)⟩, summed per example id
  over the steps (top-k/bottom-k; full rows with ``keep_scores``);
* ``weight_decay``: −lr_t (c_g wd_L2 ⟨A ⊙ ḡ, θ_t⟩ + wd_dec ⟨ḡ, θ_t⟩);
* ``momentum``: −lr_t c_m ⟨A ⊙ ḡ, m_{t−1}⟩ — the earlier batches' gradients carried by the
  momentum/first moment, kept as one running per-step term (the recorded buffer), which needs
  no per-example momentum buffer (ExPLAIND keeps one of num_train × params);
* ``residual``: what the rule does not reproduce of the recorded update (float rounding; a loss
  that is not a mean of per-example losses, e.g. batch norm in training mode).

``completeness_error`` = |f_0 + Σ examples + weight_decay + momentum − f_T| / max(|f_T|,
|f_T − f_0|) per test point (quadrature and split errors together); ``quadrature_error`` is the
same for f_0 + Σ_t ⟨ḡ_t, Δ_t⟩ alone. Per-example gradients are taken in eval mode with the
final buffers (no batch-norm batch statistics), so models whose training loss mixes examples
show that in ``residual``.

Cost per test batch of B points: per step (nodes − 1) gradients over B test points plus one
over the |B_t| examples. The steps of a block are integrated in groups of up to 8, level by
level, so one refinement level of the whole group is one batched call (per-call overhead, not
arithmetic, dominates on small models); memory O(nodes in flight × B × params + |B_t| ×
params + B × num_train).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from historystore.read.store import HistoryStore, StepBlock

from ._path import (
    OptimizerStateError,
    PathMethod,
    PathState,
    assemble,
    dots,
    pair_scores,
    preconditioner,
    require_state,
    store_at,
    total,
)
from .base import ExplainContext, register_method

_TERMS = ("path", "examples", "weight_decay", "momentum", "residual")


def _along(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """⟨g[k, b], d⟩ for stacked node gradients [K, B, *shape] -> [K, B] float64."""
    return g.reshape(g.shape[0], g.shape[1], -1).double() @ d.reshape(-1).double()


@register_method
class PathKernelMethod(PathMethod):
    """The exact path kernel (see the module docstring). ``rtol``: quadrature tolerance
    (default 1e-10 for float64 models, 1e-5 otherwise); ``max_level``: panels no narrower
    than 2^-max_level of the step; ``min_level``: at least 2^min_level + 1 nodes;
    ``node_batch``: quadrature nodes evaluated in one batched call (memory node_batch × B ×
    params; default: ~4 MB of gradients, 8..256 nodes); ``momentum_window``: attribute what
    momentum carries from the last W batches (within a keyframe interval) to their examples
    too, keeping their per-example gradients (memory W × |B| × params); the rest stays in
    the ``momentum`` term."""

    name = "epk"
    exact = True
    term_names = _TERMS

    def __init__(
        self,
        top_k: int = 10,
        keep_scores: bool = False,
        target: str | int = "pred",
        rtol: float | None = None,
        min_level: int = 1,
        max_level: int = 12,
        train_batch_size: int = 256,
        allow_lossy: bool = False,
        node_batch: int | None = None,
        momentum_window: int = 0,
    ) -> None:
        super().__init__(top_k, keep_scores, target, train_batch_size, allow_lossy)
        if node_batch is not None and node_batch < 1:
            raise ValueError(f"node_batch must be >= 1, got {node_batch}")
        self.node_batch = None if node_batch is None else int(node_batch)
        if momentum_window < 0:
            raise ValueError(f"momentum_window must be >= 0, got {momentum_window}")
        self.momentum_window = int(momentum_window)
        if rtol is not None and not rtol > 0:
            raise ValueError(f"rtol must be > 0, got {rtol}")
        if not 1 <= min_level <= max_level:
            raise ValueError(f"need 1 <= min_level <= max_level, got {min_level}, {max_level}")
        self.rtol = rtol
        self.min_level = int(min_level)
        self.max_level = int(max_level)

    def _bind(self, store: HistoryStore) -> None:
        self.keyframes = {int(k) for k in store.keyframe_steps}
        rule = self.rule
        assert rule is not None
        if rule.kind == "adam":
            require_state(rule, ["exp_avg", "exp_avg_sq", "step"], "EPK (Adam)", store.path)
        elif any(float(np.max(rule.hp[n]["momentum"], initial=0.0)) > 0 for n in rule.names):
            require_state(rule, ["momentum_buffer"], "EPK (SGD with momentum)", store.path)

    def needs_optim(self) -> bool:
        return self.rule is not None and (
            self.rule.kind == "adam" or any(self.rule.state_keys[n] for n in self.rule.names)
        )

    # -- quadrature --------------------------------------------------------------------------
    def _quadrature(
        self, state: PathState, ctx: ExplainContext, block: StepBlock, lo: int, hi: int
    ) -> tuple[torch.Tensor, list[int]]:
        """ḡ_t of the steps lo..hi−1 of ``block`` (flat [steps, B, P]) by locally adaptive
        Simpson quadrature on each segment [θ_t, θ_t+1], and the nodes spent per step.

        A step keeps 3 nodes when Simpson and the trapezoid rule agree; otherwise the panels
        whose two halves disagree are bisected (kinks of ReLU or max-pooling sit in one panel,
        so only that panel is refined), each half with half the tolerance, down to panels of
        width 2^-max_level. All steps of the group advance level by level together, so one
        level of all their panels is one batched gradient call (chunks of ``node_batch``)
        instead of one call per step and level; the endpoints θ_t are evaluated once and
        shared by the two steps that meet there (also across groups and blocks)."""
        assert state.fn is not None and block.params is not None
        fn, p = state.fn, ctx.extra["path"]
        x, c, b = p["x"], p["target"], ctx.batch_size
        g_len = hi - lo
        theta = fn.flat({n: block.params[n][lo : hi + 1] for n in self.names}, 1)  # [G+1, P]
        dflat = theta[1:] - theta[:-1]  # [G, P]
        dpad = torch.cat([dflat, torch.zeros_like(dflat[:1])])
        nb = self._node_batch(b, theta.shape[1], theta.element_size())

        def grads(idx: list[int], s: list[float]) -> torch.Tensor:
            """Gradients at θ_i + s Δ_i for the (local step i, node s) pairs -> [K, B, P]."""
            out = []
            for k in range(0, len(idx), nb):
                i = torch.tensor(idx[k : k + nb], device=theta.device)
                sk = torch.tensor(s[k : k + nb], dtype=theta.dtype, device=theta.device)
                out.append(fn.test_grads_at(theta[i] + sk[:, None] * dpad[i], x, c))
            return out[0] if len(out) == 1 else torch.cat(out)

        def along(g: torch.Tensor, steps: list[int] | slice) -> torch.Tensor:
            """⟨g_k, Δ of step k's segment⟩ -> [K, B] float64 (only the stopping rule uses
            it; the step's path term is taken in float64 from ḡ)."""
            return torch.bmm(g, dflat[steps].unsqueeze(2)).squeeze(2).double()

        carry = state.carry
        t0 = block.start + lo
        reuse = carry.get("t") == t0
        ends = list(range(1 if reuse else 0, g_len + 1))
        gall = grads(ends + list(range(g_len)), [0.0] * len(ends) + [0.5] * g_len)
        gend = torch.cat([carry["end"][None], gall[: len(ends)]]) if reuse else gall[: len(ends)]
        gmid = gall[len(ends) :]
        carry.update(t=block.start + hi, end=gend[g_len].clone())
        e0, em, e1 = (
            along(gend[:-1], slice(None)),
            along(gmid, slice(None)),
            along(gend[1:], slice(None)),
        )
        tol = self._tol(ctx, p)
        eps = 64 * torch.finfo(fn.dtype).eps
        simpson = (e0 + 4 * em + e1) / 6
        trapezoid = (e0 + 2 * em + e1) / 4
        noise = eps * (e0.abs() + 4 * em.abs() + e1.abs()) / 6
        done = ((simpson - trapezoid).abs() <= torch.maximum(tol, noise)).all(1)
        done = (done & (self.min_level <= 1)).tolist()
        gbar = torch.empty(g_len, b, theta.shape[1], dtype=gall.dtype, device=gall.device)
        nodes = [3] * g_len
        # a panel: (step, a, b, depth, g at a, mid, b; e at a, mid, b; Simpson on it)
        panels = []
        for j in range(g_len):
            if done[j]:
                gbar[j] = (gend[j] + 4 * gmid[j] + gend[j + 1]) / 6
            else:
                gbar[j] = 0
                panels.append(
                    (j, 0.0, 1.0, 0, gend[j], gmid[j], gend[j + 1], e0[j], em[j], e1[j], simpson[j])
                )
        level = 1
        while panels:
            level += 1
            refined = []
            # chunks of panels: a level's gradients never exist all at once
            for c0 in range(0, len(panels), max(1, nb // 2)):
                chunk = panels[c0 : c0 + max(1, nb // 2)]
                idx = [q[0] for q in chunk for _ in (0, 1)]
                s = [q[1] + (q[2] - q[1]) * f for q in chunk for f in (0.25, 0.75)]
                g = grads(idx, s)
                e = along(g, idx)
                el, emid, er = (torch.stack([q[k] for q in chunk]) for k in (7, 8, 9))
                whole = torch.stack([q[10] for q in chunk])
                eq1, eq3 = e[0::2], e[1::2]
                w = torch.tensor([q[2] - q[1] for q in chunk], dtype=torch.float64, device=e.device)
                w = w[:, None]
                left = w / 12 * (el + 4 * eq1 + emid)
                right = w / 12 * (emid + 4 * eq3 + er)
                err = (left + right - whole).abs() / 15
                noise = (
                    eps
                    * w
                    / 12
                    * (el.abs() + 4 * eq1.abs() + 2 * emid.abs() + 4 * eq3.abs() + er.abs())
                )
                depth = torch.tensor([q[3] for q in chunk], dtype=torch.float64, device=e.device)
                tol_p = tol[None, :] * torch.exp2(-depth)[:, None]
                ok = (err <= torch.maximum(tol_p, noise)).all(1).tolist()
                stop = level >= self.max_level
                for k, q in enumerate(chunk):
                    j, a, bb, dep, gl, gm, gr = q[:7]
                    nodes[j] += 2
                    gq1, gq3 = g[2 * k], g[2 * k + 1]
                    if stop or (level >= self.min_level and ok[k]):
                        gbar[j] += (gl + 4 * gq1 + 2 * gm + 4 * gq3 + gr) * ((bb - a) / 12)
                    else:
                        # copies: a view would keep the chunk's [2 × panels, B, P] alive
                        gq1, gq3 = gq1.clone(), gq3.clone()
                        m = a + (bb - a) / 2
                        refined.append(
                            (j, a, m, dep + 1, gl, gq1, gm, el[k], eq1[k], emid[k], left[k])
                        )
                        refined.append(
                            (j, m, bb, dep + 1, gm, gq3, gr, emid[k], eq3[k], er[k], right[k])
                        )
                del g
            panels = refined
        return gbar, nodes

    def _node_batch(self, b: int, p: int, itemsize: int) -> int:
        """Nodes per batched gradient call: ``node_batch`` or, by default, as many as keep
        the call's gradients near 4 MB (at least 8, at most 256)."""
        if self.node_batch is not None:
            return self.node_batch
        return int(min(256, max(8, 2**22 // max(1, b * p * itemsize))))

    def _group(self, b: int, p: int, itemsize: int) -> int:
        """Steps integrated together (up to 8): their first-level nodes (2 per step) fit
        ~32 MB; more steps per group means fewer, larger batched calls, but more node
        gradients held while their panels are refined."""
        return int(min(8, max(1, 2**25 // max(1, 3 * b * p * itemsize))))

    def _tol(self, ctx: ExplainContext, p: dict[str, torch.Tensor]) -> torch.Tensor:
        rtol = self.rtol
        if rtol is None:
            rtol = 1e-10 if self._f64() else 1e-5
        scale = torch.maximum(p["f_final"].abs(), (p["f_final"] - p["f_init"]).abs())
        return rtol * scale.clamp_min(1e-30) / max(1, ctx.index.num_steps)

    def _f64(self) -> bool:
        return next(iter(self.theta0.values())).dtype == torch.float64

    # -- the optimizer's split ---------------------------------------------------------------
    def _prev_state(
        self, state: PathState, block: StepBlock, i: int, key: str, ctx: ExplainContext
    ) -> dict[str, torch.Tensor | None]:
        """m_{t−1} per tensor (momentum buffer / first moment after step t−1; None before
        the first step)."""
        t = block.start + i
        if t == 0:
            return {n: None for n in self.names}
        if i > 0:
            assert block.optim is not None
            return {n: block.optim[n][key][i - 1] if n in block.optim else None for n in self.names}
        prev = state.carry.get("prev")
        if prev is not None and prev[0] == t - 1:
            return prev[1]
        st = store_at(self.store_path).optimizer_state(t - 1)
        return {n: st[n][key].to(ctx.device) if n in st else None for n in self.names}

    def _coefficients(
        self,
        state: PathState,
        block: StepBlock,
        i: int,
        ctx: ExplainContext,
        gbar: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, Any]]:
        """(A ⊙ ḡ, −lr c_g per tensor, other terms' pieces) for step block.start+i."""
        rule = self.rule
        assert rule is not None
        t = block.start + i
        key = "exp_avg" if rule.kind == "adam" else "momentum_buffer"
        need_prev = rule.kind == "adam" or any(rule.momentum_of(n, t) > 0 for n in self.names)
        prev = self._prev_state(state, block, i, key, ctx) if need_prev else {}
        if block.optim is not None and block.optim:
            state.carry["prev"] = (
                t,
                {n: block.optim[n][key][i] if n in block.optim else None for n in self.names},
            )
        ga: dict[str, torch.Tensor] = {}
        cg: dict[str, float] = {}
        parts: dict[str, Any] = {}
        for n in self.names:
            hp = rule.hp[n]
            lr, wd = float(block.lr[n][i]), float(hp["weight_decay"][t])
            m_prev = prev.get(n)
            if rule.kind == "adam":
                assert block.optim is not None
                st = block.optim[n]
                a, bc1 = preconditioner(rule, n, t, st["exp_avg_sq"][i], st["step"][i])
                b1 = float(hp["beta1"][t])
                c_g, c_m = (1 - b1) / bc1, b1 / bc1
                w_buf, decay = 1 - b1, b1
                wd_l2, wd_dec = (0.0, wd) if rule.decoupled[n] else (wd, 0.0)
                ga[n] = gbar[n] * a
            else:
                mu, damp = float(hp["momentum"][t]), float(hp["dampening"][t])
                # torch starts the buffer as a copy of d_p (no dampening) on its first step
                first = m_prev is None or (damp != 0 and not bool(m_prev.any()))
                c_g = 1.0 if (mu == 0 or first) else 1.0 - damp
                c_m = mu
                w_buf, decay = c_g, mu  # buf_t = μ buf_{t−1} + w d_t
                if rule.nesterov[n] and mu > 0:
                    c_g, c_m = 1.0 + mu * c_g, mu * mu
                wd_l2, wd_dec = wd, 0.0
                ga[n] = gbar[n]
            cg[n] = -lr * c_g
            parts[n] = (lr, c_g, c_m, wd_l2, wd_dec, m_prev, w_buf, decay)
        return ga, cg, parts

    # -- the stream --------------------------------------------------------------------------
    def update(self, state: PathState, block: StepBlock, ctx: ExplainContext) -> None:
        assert block.params is not None and state.fn is not None
        if self.rule is not None and self.rule.kind == "adam" and block.optim is None:
            raise OptimizerStateError("EPK (Adam): the scan did not provide optimizer state")
        fn, dev = state.fn, ctx.device
        b, s_len = ctx.batch_size, block.num_steps
        steps = torch.zeros(b, s_len, dtype=torch.float64, device=dev)
        nodes = np.zeros(s_len, dtype=np.int32)
        p_len = sum(fn.sizes)
        group = self._group(b, p_len, block.params[self.names[0]].element_size())
        gflat = torch.empty(0)
        for i in range(s_len):
            t = block.start + i
            if i % group == 0:
                hi = min(s_len, i + group)
                gflat, spent = self._quadrature(state, ctx, block, i, hi)
                nodes[i:hi] = spent
            th0 = {n: block.params[n][i] for n in self.names}
            d = {n: block.params[n][i + 1] - th0[n] for n in self.names}
            gbar = fn.unflat(gflat[i % group])
            per = dots(gbar, d)
            path = total(per)
            for k, n in enumerate(self.names):
                state.params[:, k] += per[n]
            steps[:, i] = path
            ga, cg, parts = self._coefficients(state, block, i, ctx, gbar)
            ids, x, y = self._batch(block, i, dev, fn.dtype)
            ex = torch.zeros_like(path)
            j: dict[str, torch.Tensor] = {}
            if len(ids):
                j = fn.train_grads(th0, x, y, self.loss_fn)
                e, _ = pair_scores(ga, j, {n: cg[n] / len(ids) for n in self.names})
                state.examples.index_add_(1, torch.from_numpy(ids).to(dev), e)
                ex = e.sum(1)
            wd = torch.zeros_like(path)
            mom = torch.zeros_like(path)
            for n in self.names:
                lr, c_g, c_m, wd_l2, wd_dec, m_prev, _, _ = parts[n]
                if wd_l2:
                    wd -= lr * c_g * wd_l2 * dots({n: ga[n]}, {n: th0[n]})[n]
                if wd_dec:
                    wd -= lr * wd_dec * dots({n: gbar[n]}, {n: th0[n]})[n]
                if c_m and m_prev is not None:
                    mom -= lr * c_m * dots({n: ga[n]}, {n: m_prev})[n]
            if self.momentum_window:
                carried = self._window(state, t, ga, parts, ids, j if len(ids) else None, dev)
                ex, mom = ex + carried, mom - carried
            for k, v in (("path", path), ("examples", ex), ("weight_decay", wd), ("momentum", mom)):
                state.terms[k] += v
            state.terms["residual"] += path - ex - wd - mom
        state.steps.append((block.start, steps))
        state.nodes.append((block.start, nodes))

    def _window(
        self,
        state: PathState,
        t: int,
        ga: dict[str, torch.Tensor],
        parts: dict[str, Any],
        ids: np.ndarray,
        j: dict[str, torch.Tensor] | None,
        dev: torch.device,
    ) -> torch.Tensor:
        """Attribute what the momentum/first moment m_{t−1} carries from the last
        ``momentum_window`` batches to their examples; return that part [B] (it leaves the
        momentum term). m_{t−1} = Σ_s (Π_{s<r<t} decay_r) w_s g_s, so example i of step s
        gets −lr_t c_m f_s ⟨A ⊙ ḡ_t, ∇ℓ(z_i; θ_s)⟩ with f_s = w_s/|B_s| Π decay. The window
        restarts at keyframes, so the result does not depend on how ranges are scheduled."""
        win = state.carry.setdefault("window", [])
        if t in self.keyframes:
            win.clear()
        carried = torch.zeros(state.examples.shape[0], dtype=torch.float64, device=dev)
        for ids_s, j_s, f_s in win:
            coef = {n: -parts[n][0] * parts[n][2] * f_s[n] for n in self.names}
            e_s, _ = pair_scores(ga, j_s, coef)
            state.examples.index_add_(1, ids_s, e_s)
            carried += e_s.sum(1)
            for n in self.names:
                f_s[n] *= parts[n][7]
        if j is not None and len(ids):
            f = {n: parts[n][6] / len(ids) for n in self.names}
            win.append((torch.from_numpy(ids).to(dev), j, f))
        del win[: max(0, len(win) - self.momentum_window)]
        return carried

    def finalize(self, state: PathState, ctx: ExplainContext) -> dict[str, dict[str, np.ndarray]]:
        out = self._finalize_common(state, ctx)
        f0, ft = out["f_init"], out["f_final"]
        terms = {k: v.cpu().numpy() for k, v in state.terms.items()}
        scale = np.maximum(np.abs(ft), np.abs(ft - f0))
        recon = f0 + terms["examples"] + terms["weight_decay"] + terms["momentum"]
        with np.errstate(divide="ignore", invalid="ignore"):
            out["completeness_error"] = np.abs(recon - ft) / scale
            out["quadrature_error"] = np.abs(f0 + terms["path"] - ft) / scale
        out.update({f"{k}_total" if k == "path" else k: v for k, v in terms.items()})
        with np.errstate(divide="ignore", invalid="ignore"):
            share = float(np.nanmax(np.abs(terms["residual"]) / scale))
        if share > 1e-3:
            warnings.warn(
                f"EPK: the optimizer's rule applied to per-example gradients misses up to "
                f"{share:.1%} of the recorded path (the 'residual' term); the training loss is "
                "probably not a mean of per-example losses (batch norm in training mode, "
                "ghost batch norm) or loss_fn is not the training loss",
                stacklevel=2,
            )
        nodes = assemble(state.nodes, 0, ctx.index.num_steps, np.int32)
        out["nodes"] = np.broadcast_to(nodes, (ctx.batch_size, len(nodes))).copy()
        return {"model": out}

    def attrs(self) -> dict[str, Any]:
        return {
            **super().attrs(),
            "rtol": self.rtol,
            "min_level": self.min_level,
            "max_level": self.max_level,
            "quadrature": "locally adaptive Simpson, endpoint reuse",
            "momentum_window": self.momentum_window,
        }
