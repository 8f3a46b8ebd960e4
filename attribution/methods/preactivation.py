"""Pfahler & Morik (AAAI 2022): decompose a layer's preactivation over the training steps.

For a test point with layer input a and final preactivation z = f(W_T, a) + b_T (f linear in
W), the recorded history splits z exactly into an initialisation term and one term per step::

    z = (f(W_0, a) + b_0) + Σ_t c_t,      c_t = f(Δ_t, a) + Δb_t

Step t's alignment with the prediction is γ_t = ⟨z, c_t⟩ (inner products over the flattened
output, C×H×W for convolutions) and its cosine γ̄_t = γ_t / (‖z‖ ‖c_t‖). Aggregates, all kept
as running sums in the stream so memory does not grow with the number of steps:

* per step: γ_t, ‖c_t‖ (γ̄_t derived) -> ``gamma``, ``norm``, ``cosine`` [B, T]
* per training example: Σ of γ_t / |batch_t| over the steps whose batch held it (a step's γ is
  split equally among its examples) -> top-k / bottom-k ids and scores [B, k]. Where the store
  has per-example factors of an nn.Linear weight (Δ_t = Σ_r u_r v_rᵀ, row r = example r of the
  batch, ghosts after the real rows), the weight's part of γ_t is split *exactly*:
  γ_{t,r} = ⟨z, u_r⟩ ⟨v_r, a⟩; only the rest (the bias's part, float residue) is split equally.
  The cosine's per-example scores split each step's γ̄_t = γ_t / (‖z‖ ‖c_t‖) the same way
  (every share of γ_t divided by the step's ‖z‖ ‖c_t‖), so an example's cosine score is Σ of its
  shares of γ̄_t and the scores of all examples sum to Σ_t γ̄_t -> ``cosine_topk_*``.
* per class: weighted Gaussian KDE of γ̄_t (weight ‖c_t‖, bandwidth h) over the steps whose batch
  held the class, on a grid over [-1, 1] -> ``class_kde`` [B, C, G] (unnormalised: Σ_t w_t
  exp(-(g-γ̄_t)²/2h²)) and ``class_weight`` [B, C] (Σ_t w_t), for ridge plots
* checks: ``init`` (f(W_0,a)+b_0), ``total`` (init + Σ_t c_t, float64) and ``preactivation``
  (the real z of the final model) [B, D]; ``total`` ≈ ``preactivation`` up to fp rounding.
  Σ_t c_t is computed as f(Σ_t Δ_t, a) + Σ_t Δb_t (f is linear): the stream then only sums the
  deltas, instead of adding a [B, D] tensor per step, and the total is exact in float64.
  Σ_t γ_t = ⟨z, total − init⟩ ties the per-step stream to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from historystore.read.store import StepBlock

from .base import (
    AttributionMethod,
    ExplainContext,
    LayerSpec,
    assemble,
    register_method,
    topk,
)


@dataclass
class _LayerAcc:
    gamma: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (start, [B, S])
    norm: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    dw_sum: torch.Tensor | None = None  # Σ_t ΔW_t, float64 (weight shape)
    db_sum: torch.Tensor | None = None  # Σ_t Δb_t, float64 (bias shape), None without bias
    examples: torch.Tensor | None = None  # [B, N] float64, shares of γ_t
    examples_cos: torch.Tensor | None = None  # [B, N] float64, shares of γ̄_t (or None)
    kde: torch.Tensor | None = None  # [B, C, G] float64
    class_weight: torch.Tensor | None = None  # [B, C] float64


@dataclass
class PreactivationState:
    """Running aggregates of the steps [start, stop), per layer."""

    start: int
    stop: int
    layers: dict[str, _LayerAcc]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 models stay float64; everything else (incl. bf16/fp16 deltas) runs in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@register_method
class PreactivationMethod(AttributionMethod):
    """The preactivation decomposition (see the module docstring for what it returns).

    ``top_k``: training examples kept per test point (highest and lowest scores); clamped to
    the number of training examples that occur in the run (the arrays are then narrower).
    ``scores``: which per-example scores to accumulate: "gamma" (shares of γ_t; ``topk_*``,
    ``bottomk_*``) and/or "cosine" (shares of γ̄_t; ``cosine_topk_*``, ``cosine_bottomk_*``);
    each costs one float64 [B, num_train] accumulator.
    ``bandwidth``/``grid_size``: the class KDE's Gaussian bandwidth and grid over [-1, 1].
    ``keep_scores``: also return the full per-example scores ``example_scores`` [B, N] (and
    ``example_scores_cosine``; the engine writes them to zarr in chunks instead of keeping them).
    ``split``: "auto" splits a step's γ exactly per example where the store has per-example
    factors of the layer's weight, equally otherwise; "equal" always splits equally (the
    paper's rule).
    ``chunk_elements``: bound on the elements of one [B, steps, D] contribution tensor; a block
    is processed in step chunks under it, which bounds memory by B and the layer size. Default:
    4 M on CPU (buffers that malloc reuses instead of fresh, page-faulting mappings), 64 M on
    GPUs (fewer, larger kernels).
    """

    name = "preactivation"

    def __init__(
        self,
        top_k: int = 10,
        bandwidth: float = 0.1,
        grid_size: int = 201,
        keep_scores: bool = False,
        chunk_elements: int | None = None,
        split: str = "auto",
        scores: str | tuple[str, ...] | list[str] = ("gamma", "cosine"),
    ) -> None:
        if split not in ("auto", "equal"):
            raise ValueError(f"split must be 'auto' or 'equal', got {split!r}")
        self.split = split
        kinds = (scores,) if isinstance(scores, str) else tuple(scores)
        bad = [k for k in kinds if k not in SCORE_KINDS]
        if bad or not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(
                f"scores must be one or both of {SCORE_KINDS} without repeats, got {scores!r}"
            )
        self.scores = tuple(k for k in SCORE_KINDS if k in kinds)
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        if grid_size < 2:
            raise ValueError(f"grid_size must be >= 2, got {grid_size}")
        if chunk_elements is not None and chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.top_k = int(top_k)
        self.bandwidth = float(bandwidth)
        self.grid_size = int(grid_size)
        self.keep_scores = keep_scores
        self.chunk_elements = chunk_elements
        self.grid = np.linspace(-1.0, 1.0, self.grid_size)

    def _chunk(self, device: torch.device) -> int:
        if self.chunk_elements is not None:
            return self.chunk_elements
        return 1 << 26 if device.type == "cuda" else 1 << 22

    def _exact(self, spec: LayerSpec, ctx: ExplainContext) -> bool:
        """Whether this layer's γ is split exactly per example (per-example factors)."""
        return (
            self.split == "auto"
            and spec.weight_encoding == "factors"
            and ctx.inputs[spec.name].dim() == 2  # one factor row per example
        )

    def raw_tensors(self, ctx: ExplainContext) -> list[str]:
        return [s.weight for s in ctx.layers if self._exact(s, ctx)]

    # -- per test batch ----------------------------------------------------------------------
    def prepare(self, ctx: ExplainContext) -> None:
        """The initialisation term and the flattened real preactivation z of every layer."""
        extra: dict[str, dict[str, torch.Tensor]] = {}
        for spec in ctx.layers:
            a, z = ctx.inputs[spec.name], ctx.outputs[spec.name]
            w0, b0 = ctx.theta0[spec.name]
            dt = _compute_dtype(w0)
            a = a.to(dt)
            bias = b0[None].to(dt) if b0 is not None else None
            init = spec.adapter.step_contributions(spec.module, w0[None].to(dt), bias, a)[:, 0]
            if tuple(init.shape) != tuple(z.shape):
                raise ValueError(
                    f"layer {spec.name!r}: the adapter {spec.adapter.describe()} gives "
                    f"preactivations of shape {tuple(init.shape)}, the module outputs "
                    f"{tuple(z.shape)}"
                )
            zf = z.reshape(len(z), -1).to(dt)
            extra[spec.name] = {
                "a": a,
                "z": zf,
                "znorm": torch.linalg.vector_norm(zf, dim=1),
                "init": init.reshape(len(z), -1),
            }
        ctx.extra["preactivation"] = extra
        ctx.extra["grid"] = torch.as_tensor(self.grid, dtype=torch.float32, device=ctx.device)

    # -- per step range ----------------------------------------------------------------------
    def begin(self, ctx: ExplainContext, start: int, stop: int) -> PreactivationState:
        b, n, c, g = ctx.batch_size, ctx.index.num_train, ctx.index.num_classes, self.grid_size
        dev, f64 = ctx.device, torch.float64
        layers = {}
        for spec in ctx.layers:
            w0, b0 = ctx.theta0[spec.name]
            layers[spec.name] = _LayerAcc(
                dw_sum=torch.zeros(w0.shape, dtype=f64, device=dev),
                db_sum=torch.zeros(b0.shape, dtype=f64, device=dev)
                if spec.bias is not None and b0 is not None
                else None,
                examples=torch.zeros(b, n, dtype=f64, device=dev)
                if "gamma" in self.scores
                else None,
                examples_cos=torch.zeros(b, n, dtype=f64, device=dev)
                if "cosine" in self.scores
                else None,
                kde=torch.zeros(b, c, g, dtype=f64, device=dev),
                class_weight=torch.zeros(b, c, dtype=f64, device=dev),
            )
        return PreactivationState(start, stop, layers)

    def update(self, state: PreactivationState, block: StepBlock, ctx: ExplainContext) -> None:
        s_len, dev = block.num_steps, ctx.device
        if s_len == 0:
            return
        counts = np.diff(block.offsets).astype(np.int64)
        step_of = np.repeat(np.arange(s_len), counts)
        num_classes = ctx.index.num_classes
        member = torch.zeros(s_len, num_classes, dtype=torch.float32)  # step holds class
        lab = block.labels
        ok = (lab >= 0) & (lab < num_classes)
        member[torch.from_numpy(step_of[ok]), torch.from_numpy(lab[ok])] = 1.0
        member = member.to(dev)
        ids = rows = share = None
        if len(block.ids) > 0 and ctx.index.num_train > 0:
            ids = torch.from_numpy(block.ids).to(dev)
            rows = torch.from_numpy(step_of).to(dev)
            share = torch.from_numpy(1.0 / counts[step_of]).to(dev)  # float64
        grid = ctx.extra["grid"]
        for spec in ctx.layers:
            ex = ctx.extra["preactivation"][spec.name]
            acc = state.layers[spec.name]
            gamma, norm = self._contributions(spec, block, ex, acc)  # [B, S]
            denom = ex["znorm"].to(gamma.dtype)[:, None] * norm
            cos = torch.where(denom > 0, gamma / denom.clamp_min(1e-300), torch.zeros_like(gamma))
            self._kde(acc, cos.float(), norm.float(), member, grid)
            if ids is not None:
                assert rows is not None and share is not None
                d64 = denom.double()  # 1/(‖z‖ ‖c_t‖) turns a share of γ_t into one of γ̄_t
                inv = torch.where(d64 > 0, 1.0 / d64.clamp_min(1e-300), torch.zeros_like(d64))
                rest = gamma.double()
                if self._exact(spec, ctx) and block.raw is not None:
                    rest = rest - self._split_exactly(spec, block, ex, acc, ctx, inv)
                if acc.examples is not None:
                    acc.examples.index_add_(1, ids, rest[:, rows] * share)
                if acc.examples_cos is not None:
                    acc.examples_cos.index_add_(1, ids, (rest * inv)[:, rows] * share)
            acc.gamma.append((block.start, gamma.float()))
            acc.norm.append((block.start, norm.float()))

    def _split_exactly(
        self,
        spec: LayerSpec,
        block: StepBlock,
        ex: dict[str, torch.Tensor],
        acc: _LayerAcc,
        ctx: ExplainContext,
        inv: torch.Tensor,
    ) -> torch.Tensor:
        """Add γ_{t,r} = ⟨z, u_r⟩⟨v_r, a⟩ to each row's example (and γ_{t,r} · inv_t, inv =
        1/(‖z‖ ‖c_t‖) [B, S], to its cosine score); return Σ_r γ_{t,r} [B, S].

        Rows map to the step's ids, then its ghost ids; padding rows (u = 0) and rows without
        an id add nothing here (whatever they hold stays in the equally split rest)."""
        assert block.raw is not None
        f = block.raw[spec.weight]
        z, a = ex["z"], ex["a"]
        u, v = f["u"].to(z.dtype), f["v"].to(z.dtype)  # [S, R, out], [S, R, in]
        s_len, r_len = u.shape[0], u.shape[1]
        rid = np.full((s_len, r_len), -1, dtype=np.int64)
        g_ids, g_off = block.ghost_ids, block.ghost_offsets
        for s in range(s_len):
            row = block.ids[block.offsets[s] : block.offsets[s + 1]]
            if g_ids is not None and g_off is not None:
                row = np.concatenate([row, g_ids[g_off[s] : g_off[s + 1]]])
            n = min(len(row), r_len)
            rid[s, :n] = row[:n]
        rid[rid >= ctx.index.num_train] = -1
        valid = torch.from_numpy(rid >= 0).to(z.device)
        # [B, S, R]: ⟨z, u_r⟩ ⟨v_r, a⟩, in float64 for the sums
        g = torch.einsum("bo,sro->bsr", z, u).double() * torch.einsum("bi,sri->bsr", a, v).double()
        g = g * valid
        keep = torch.from_numpy(rid[rid >= 0]).to(z.device)
        if acc.examples is not None:
            acc.examples.index_add_(1, keep, g[:, valid])
        if acc.examples_cos is not None:
            acc.examples_cos.index_add_(1, keep, (g * inv[:, :, None])[:, valid])
        return g.sum(2)

    def _contributions(
        self,
        spec: LayerSpec,
        block: StepBlock,
        ex: dict[str, torch.Tensor],
        acc: _LayerAcc,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """γ [B, S] and ‖c_t‖ [B, S] of one layer, in step chunks of bounded size.

        c is [B, s, D] (the adapters' layout), so γ and the norm are reductions over
        contiguous memory."""
        try:
            dw = block.deltas[spec.weight]
        except KeyError:
            raise KeyError(f"the scan did not decode {spec.weight!r}") from None
        db = block.deltas.get(spec.bias) if spec.bias is not None else None
        a, z = ex["a"], ex["z"]
        b, d = z.shape
        dt = z.dtype
        s_len = dw.shape[0]
        chunk = max(1, self._chunk(z.device) // max(1, b * d))
        gamma = torch.empty(b, s_len, dtype=dt, device=z.device)
        norm = torch.empty(b, s_len, dtype=dt, device=z.device)
        zrow = z.unsqueeze(1)
        assert acc.dw_sum is not None
        acc.dw_sum.add_(dw.sum(0).to(torch.float64))  # S float32 rows, then one f64 add
        if db is not None and acc.db_sum is not None:
            acc.db_sum.add_(db.sum(0).to(torch.float64))
        for s0 in range(0, s_len, chunk):
            s1 = min(s_len, s0 + chunk)
            bias = db[s0:s1].to(dt) if db is not None else None
            c = spec.adapter.step_contributions(spec.module, dw[s0:s1].to(dt), bias, a)
            c = c.reshape(b, s1 - s0, d)
            gamma[:, s0:s1] = torch.linalg.vecdot(c, zrow, dim=-1)  # fused; bmm with n=1 is slow
            norm[:, s0:s1] = torch.linalg.vector_norm(c, dim=2)
        return gamma, norm

    def _kde(
        self,
        acc: _LayerAcc,
        cos: torch.Tensor,
        norm: torch.Tensor,
        member: torch.Tensor,
        grid: torch.Tensor,
    ) -> None:
        """Add Σ_t w_t exp(-(g-γ̄_t)²/2h²) over each class's steps to the [B, C, G] sums."""
        assert acc.kde is not None and acc.class_weight is not None
        b, c_num, g = acc.kde.shape
        if c_num == 0:
            return
        acc.class_weight.add_(norm @ member)
        s_len = cos.shape[1]
        chunk = max(1, self._chunk(grid.device) // max(1, b * g))
        scale = -0.5 / self.bandwidth**2
        for s0 in range(0, s_len, chunk):
            s1 = min(s_len, s0 + chunk)
            k = cos[:, s0:s1, None] - grid  # in place from here: one [B, s, G] buffer
            k.mul_(k).mul_(scale).exp_().mul_(norm[:, s0:s1, None])
            acc.kde.add_(torch.matmul(member[s0:s1].T, k))  # [C, s] @ [B, s, G] -> [B, C, G]

    def merge(self, a: PreactivationState, b: PreactivationState) -> PreactivationState:
        for name, acc in a.layers.items():
            other = b.layers[name]
            acc.gamma.extend(other.gamma)
            acc.norm.extend(other.norm)
            for f in _SUMS:
                mine, theirs = getattr(acc, f), getattr(other, f)
                if mine is not None:
                    mine += theirs.to(mine.device)
        return PreactivationState(min(a.start, b.start), max(a.stop, b.stop), a.layers)

    def state_to(self, state: PreactivationState, device: str | torch.device) -> PreactivationState:
        dev = torch.device(device)
        layers = {}
        for name, acc in state.layers.items():
            layers[name] = _LayerAcc(
                gamma=[(s, g.to(dev)) for s, g in acc.gamma],
                norm=[(s, g.to(dev)) for s, g in acc.norm],
                **{f: _to(getattr(acc, f), dev) for f in _SUMS},
            )
        return PreactivationState(state.start, state.stop, layers)

    # -- results -----------------------------------------------------------------------------
    def finalize(
        self, state: PreactivationState, ctx: ExplainContext
    ) -> dict[str, dict[str, np.ndarray]]:
        t_total = ctx.index.num_steps
        seen = torch.from_numpy(ctx.index.seen).to(ctx.device)
        out: dict[str, dict[str, np.ndarray]] = {}
        for spec in ctx.layers:
            acc = state.layers[spec.name]
            ex = ctx.extra["preactivation"][spec.name]
            assert acc.dw_sum is not None
            assert acc.kde is not None and acc.class_weight is not None
            gamma = _assemble(acc.gamma, ctx.batch_size, t_total, spec.name)
            norm = _assemble(acc.norm, ctx.batch_size, t_total, spec.name)
            denom = ex["znorm"].float().cpu().numpy()[:, None] * norm
            with np.errstate(divide="ignore", invalid="ignore"):
                cosine = np.where(denom > 0, gamma / denom, 0.0).astype(np.float32)
            arrays = {"gamma": gamma, "norm": norm, "cosine": cosine}
            for kind, scores in (("gamma", acc.examples), ("cosine", acc.examples_cos)):
                if scores is None:
                    continue
                pre = "" if kind == "gamma" else f"{kind}_"
                for end, largest in (("topk", True), ("bottomk", False)):
                    ids_, sc_ = topk(scores, seen, self.top_k, largest=largest)
                    arrays[f"{pre}{end}_ids"], arrays[f"{pre}{end}_scores"] = ids_, sc_
                if self.keep_scores:
                    key = "example_scores" if kind == "gamma" else f"example_scores_{kind}"
                    arrays[key] = scores.float().cpu().numpy()
            arrays |= {
                "class_kde": acc.kde.float().cpu().numpy(),
                "class_weight": acc.class_weight.cpu().numpy(),
                "init": ex["init"].cpu().numpy(),
                "total": self._total(spec, acc, ex).cpu().numpy(),
                "preactivation": ex["z"].cpu().numpy(),
            }
            out[spec.name] = arrays
        return out

    def _total(self, spec: LayerSpec, acc: _LayerAcc, ex: dict[str, torch.Tensor]) -> torch.Tensor:
        """init + Σ_t c_t = init + f(Σ_t ΔW_t, a) + Σ_t Δb_t, in float64 [B, D]."""
        assert acc.dw_sum is not None
        db = acc.db_sum[None] if acc.db_sum is not None else None
        a = ex["a"].double()
        c = spec.adapter.step_contributions(spec.module, acc.dw_sum[None], db, a)[:, 0]
        return ex["init"].double() + c.reshape(len(a), -1)

    def global_arrays(self) -> dict[str, np.ndarray]:
        return {"grid": self.grid.astype(np.float32)}

    def attrs(self) -> dict[str, Any]:
        return {
            "top_k": self.top_k,
            "bandwidth": self.bandwidth,
            "grid_size": self.grid_size,
            "split": self.split,
            "scores": list(self.scores),
            "kde_normaliser": "class_kde / (class_weight * bandwidth * sqrt(2 pi))",
        }


SCORE_KINDS = ("gamma", "cosine")
_SUMS = ("dw_sum", "db_sum", "examples", "examples_cos", "kde", "class_weight")


def _to(t: torch.Tensor | None, dev: torch.device) -> torch.Tensor | None:
    return t.to(dev) if t is not None else None


def _assemble(
    segments: list[tuple[int, torch.Tensor]], b: int, t_total: int, layer: str
) -> np.ndarray:
    """Stitch the per-block [B, S] segments into [B, T], checking that they tile [0, T)."""
    return assemble(segments, b, t_total, np.float32, f"layer {layer!r}: the scan")
