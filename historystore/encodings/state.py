"""How optimizer state is stored: as the optimizer holds it (lossless), or compactly for Adam.

The compact plan for ``torch.optim.Adam``/``AdamW`` (no amsgrad, not maximize) keeps what the
path methods need at a fraction of the bytes:

* ``exp_avg_sq`` (v_t) as uint8 codes of log v, linear in a per-row range fixed for each block
  (``log8``; relative error ≤ exp(span/508) − 1, about 2-5 % in v and half that in √v, which
  is what the derived m feels), stored as differences from the previous step's codes (mostly
  0: v moves slowly), the codes themselves at each block's first step; ``bfloat16`` (error
  ≤ 2^-9) is the other choice;
* ``exp_avg`` (m_t) is **not stored**: Adam's own update gives it back from the recorded
  step, ``Δ_t = −lr·wd·θ_t − lr/(1−β1^t) · m_t / (√v_t/√(1−β2^t) + ε)`` (the ``wd`` term
  only for decoupled weight decay, AdamW), so
  ``m_t = −(Δ_t + lr·wd·θ_t) · (√v_t/√(1−β2^t) + ε) · (1−β1^t) / lr``.
  The reader computes it from the stored Δ_t, θ_t, v_t and the step's recorded
  hyperparameters (:func:`derive_first_moments`); its error is that of Δ and v together
  (measured in ``benchmarks.storage`` and tested on a real run);
* ``step`` and anything else as recorded.

The reader decodes a block of steps at once (:func:`decode_stored`, :func:`with_derived`):
``HistoryStore.optimizer_state(t)`` is the same code on a block of one step, so the scan
(``scan(optim=True)``, what TracIn and EPK read) serves exactly what it serves.

Other optimizers keep their state lossless under every profile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..errors import EncodingError

#: ``state_plan`` values: how a state key is stored
DERIVED = "derived"
BF16 = "bfloat16"
LOG8 = "log8"  # uint8 codes of log(v), linear between each row's smallest and largest v > 0
LOGRANGE = "_logrange"  # suffix of the array holding a LOG8 key's [rows, 2] log range
LEVELS = 254  # codes 1..255; 0 is an exact zero


def state_plan(profile: str, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """State key -> storage (``"derived"`` or ``"bfloat16"``); keys not named are kept as is."""
    if profile != "compact" or not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return {}
    if any(g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups):
        return {}
    return {"exp_avg": DERIVED, "exp_avg_sq": LOG8}


def log8_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a LOG8 key's range array: (lo, hi, intra) per row of the first axis."""
    return (shape[0], 3) if len(shape) >= 2 else (3,)


#: margins (nats) of a range below the smallest and above the largest log v of its first step:
#: v decays by at most β2 per step (0.26 nats in 256 steps at β2 = 0.999) and grows with new
#: large gradients; a step with a value outside starts a new range
MARGIN_DOWN, MARGIN_UP = 1.0, 2.0


def log8_encode(
    v: torch.Tensor,
    rng: torch.Tensor | None = None,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """uint8 codes of log(v) per row, the rows' (lo, hi, intra) range, and whether this step
    starts a new range (``intra``, as a Python bool: the caller needs no device sync for it).

    Why log codes: v spans many decades, and its relative error is what the derived m feels
    (halved by the square root). Why a range fixed for a block (``rng`` from its first step,
    with margins): the codes of a slowly moving v then barely change from step to step, so the
    recorder stores each step's code *differences* (mostly 0), which compress to a fraction
    of a byte; only a block's first step holds the codes themselves (``intra`` = 1), and any
    step with a v outside the range (early in training v grows quickly) starts a new range,
    so no code is ever clamped.

    ``work``: optional pair of float32 scratch tensors of ``v.numel()`` elements each that
    the caller reuses from step to step (a fresh full-size temporary costs a page fault per
    4 KiB)."""
    x = v.float().reshape(v.shape[0], -1) if v.dim() >= 2 else v.float().reshape(1, -1)
    least = float(x.amin()) if x.numel() else math.nan  # (NaN: the general path)
    if least >= 0:
        ok = work is not None and all(
            w.dtype == x.dtype and w.numel() == x.numel() and w.is_contiguous() for w in work
        )
        return _log8_positive(v, x, rng, zeros=least == 0, work=work if ok else None)
    return _log8_general(v, x, rng)


def _log8_general(
    v: torch.Tensor, x: torch.Tensor, rng: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`log8_encode` for any v >= 0 (exact zeros get code 0)."""
    pos = x > 0
    lg = torch.where(pos, x, 1.0).log()
    if rng is None:
        inf = torch.tensor(float("inf"), device=x.device)
        lo = torch.where(pos, lg, inf).amin(dim=1)
        hi = torch.where(pos, lg, -inf).amax(dim=1)
        empty = ~torch.isfinite(lo)
        lo = torch.where(empty, 0.0, lo) - MARGIN_DOWN
        hi = torch.where(empty, 0.0, hi) + MARGIN_UP
        r = torch.stack([lo, hi, torch.ones_like(lo)], dim=1)
    else:
        r = rng.reshape(-1, 3).clone()
        r[:, 2] = 0
        lo, hi = r[:, 0], r[:, 1]
    span = torch.where(hi > lo, hi - lo, 1.0)
    codes = torch.round((lg - lo[:, None]) / span[:, None] * LEVELS) + 1
    if rng is not None and bool((((codes < 1) | (codes > LEVELS + 1)) & pos).any()):
        return log8_encode(v)  # outside the block's range: this step starts a new range
    codes = torch.where(pos, codes.clamp_(1, LEVELS + 1), 0.0).to(torch.uint8)
    return codes.reshape(v.shape), (r if v.dim() >= 2 else r[0]), rng is None


def _log8_positive(
    v: torch.Tensor,
    x: torch.Tensor,
    rng: torch.Tensor | None,
    zeros: bool = False,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`log8_encode` when every v >= 0 (Adam's v after its first steps): the same
    arithmetic in the same order, in place on one buffer, and the range check on each row's
    extremes (the codes are monotonic in log v, so a row's smallest and largest codes are
    those of its extremes). Why: each fresh full-size temporary costs a page fault per
    4 KiB, and early in training (v growing) most steps start a new range, which the
    general path finds only after coding every element once: on a 2 M-element tensor this
    takes 10-18 ms instead of 40-60.

    ``zeros``: some v are exactly 0 (units that got no gradient yet): their log is -inf,
    which leaves each row's largest value alone, is masked out of its smallest, and codes
    to 0 at the final clamp, as the general path codes them."""
    bufs = (None, None) if work is None else (work[0].view_as(x), work[1].view_as(x))
    lg = x.log() if bufs[0] is None else torch.log(x, out=bufs[0])
    if zeros:
        lmax = lg.amax(dim=1)
        # the smallest log over v > 0: log 0 = -inf read as +inf (a row of zeros gives inf).
        # nan_to_num rather than where(v > 0, ...): one pass, no mask (1 vs 7-10 ms on 2 M)
        inf = math.inf
        lmin = torch.nan_to_num(lg, nan=0.0, posinf=inf, neginf=inf, out=bufs[1]).amin(dim=1)
    else:
        lmin, lmax = lg.amin(dim=1), lg.amax(dim=1)  # aminmax: 6x slower on CPU
    if rng is not None:
        r = rng.reshape(-1, 3).clone()
        r[:, 2] = 0
        lo, hi = r[:, 0], r[:, 1]
        span = torch.where(hi > lo, hi - lo, 1.0)
        cmin = torch.round((lmin - lo) / span * LEVELS) + 1
        cmax = torch.round((lmax - lo) / span * LEVELS) + 1
        if bool(((cmin < 1) | (cmax > LEVELS + 1)).any()):
            rng = None  # outside the block's range: this step starts a new range
    if rng is None:
        if zeros:  # rows of zeros only: the general path's range
            empty = ~torch.isfinite(lmin)
            lmin, lmax = torch.where(empty, 0.0, lmin), torch.where(empty, 0.0, lmax)
        lo, hi = lmin - MARGIN_DOWN, lmax + MARGIN_UP
        r = torch.stack([lo, hi, torch.ones_like(lo)], dim=1)
        span = torch.where(hi > lo, hi - lo, 1.0)
    codes = lg.sub_(lo[:, None]).div_(span[:, None]).mul_(LEVELS).round_().add_(1)
    out = codes.clamp_(0 if zeros else 1, LEVELS + 1).to(torch.uint8)
    return out.reshape(v.shape), (r if v.dim() >= 2 else r[0]), rng is None


def log8_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored rows of a block's v (``[n, *shape]``): the first step's codes and each later
    step's code differences from the step before (uint8, wrapping mod 256), and every
    step's range row (see :func:`log8_encode`). The recorder's writer runs this once per
    block, off the training thread."""
    codes_out = torch.empty(v.shape, dtype=torch.uint8)
    ranges: list[torch.Tensor] = []
    prev: tuple[torch.Tensor, torch.Tensor] | None = None
    for r in range(v.shape[0]):
        codes, rng, intra = log8_encode(v[r], None if prev is None else prev[1])
        codes_out[r] = codes if intra or prev is None else codes - prev[0]
        ranges.append(rng)
        prev = (codes, rng)
    return codes_out, torch.stack(ranges)


def log8_decode(codes: torch.Tensor, rng: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v from :func:`log8_encode`'s codes (within a factor exp(±(hi − lo)/508) of v)."""
    return log8_decode_steps(codes[None], rng[None], dtype)[0]


def log8_decode_steps(codes: torch.Tensor, rngs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`log8_decode` of several steps at once: codes ``[steps, *shape]``, their ranges
    ``[steps, ..., 3]`` (the one implementation; a single step is a block of one)."""
    s = codes.shape[0]
    r = rngs.reshape(s, -1, 3).double()
    c = codes.reshape(s, r.shape[1], -1)
    lo, hi = r[..., :1], r[..., 1:2]
    v = torch.exp(lo + (c.double() - 1) / LEVELS * (hi - lo))
    return torch.where(c > 0, v, 0.0).reshape(codes.shape).to(dtype)


def log8_chain(diffs: torch.Tensor, rngs: torch.Tensor) -> torch.Tensor:
    """The codes of every row of stored code differences (rows ``[steps, *shape]``, ranges
    ``[steps, ..., 3]``): each row's codes are the sum (mod 256) of the differences from the
    last row at or before it whose range is marked ``intra`` (from the first row where there
    is none, e.g. the zero rows before a state first appears). The rows must therefore start
    at or before the intra row of the first step wanted (its block's first step at the latest).

    Sums in uint8, which wraps mod 256 as the recorder's differences do: one byte per element
    and step, no int64 copy of the block."""
    h = diffs.shape[0]
    intra = rngs.reshape(h, -1, 3)[:, 0, 2] > 0
    idx = torch.arange(h, device=diffs.device)
    first = torch.cummax(torch.where(intra, idx, 0), 0).values
    c = torch.cumsum(diffs.reshape(h, -1), 0, dtype=torch.uint8)
    before = torch.cat([torch.zeros_like(c[:1]), c])[first]  # sums of the rows before ``first``
    return (c - before).reshape(diffs.shape)


def log8_codes(diffs: torch.Tensor, rngs: torch.Tensor) -> torch.Tensor:
    """The codes of the last row of stored code differences (see :func:`log8_chain`)."""
    return log8_chain(diffs, rngs)[-1]


def decoupled(optimizer_class: str, static: dict[str, Any]) -> bool:
    """Whether a recorded Adam-family group decays weights outside the moments (AdamW)."""
    if "decoupled_weight_decay" in static:
        return bool(static["decoupled_weight_decay"])
    return optimizer_class.endswith(".AdamW")


def derive_first_moment(
    delta: torch.Tensor,
    theta: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: float,
    hparams: dict[str, Any],
) -> torch.Tensor:
    """Adam's m_t of one step from the step it produced (see the module docstring);
    ``hparams`` holds the group's ``lr``, ``betas`` (β1, β2), ``eps``, ``weight_decay`` and
    ``decoupled``. One step of :func:`derive_first_moments`."""
    hp = {
        "lr": [hparams["lr"]],
        "betas": ([hparams["betas"][0]], [hparams["betas"][1]]),
        "eps": [hparams["eps"]],
        "weight_decay": [hparams["weight_decay"]],
        "decoupled": hparams["decoupled"],
    }
    return derive_first_moments(delta[None], theta[None], exp_avg_sq[None], [step], hp)[0]


def derive_first_moments(
    delta: torch.Tensor,
    theta: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    steps: Sequence[float],
    hparams: dict[str, Any],
    *,
    name: str | None = None,
    first: int | None = None,
) -> torch.Tensor:
    """Adam's m_t of consecutive steps at once (every tensor ``[steps, *shape]``: Δ_t, θ_t and
    v_t; ``steps`` the optimizer's step count after each). ``hparams`` holds per-step
    sequences ``lr``, ``betas`` (a pair of sequences), ``eps``, ``weight_decay``, and the
    group's ``decoupled`` flag; ``name`` and ``first`` (the history step of the first row)
    only word the error.

    A step taken at lr = 0 (a warm-up that starts from zero) moved nothing, so Δ_t carries no
    trace of m_t: that is an :class:`EncodingError`, not a division by zero. A row whose step
    count is 0 (a parameter the optimizer held no state for yet) gives m = 0."""
    n = len(steps)
    lrs = [float(x) for x in hparams["lr"]]
    coef, root, wdlr = [], [], []
    for i, (k, lr) in enumerate(zip(steps, lrs, strict=True)):
        k = float(k)
        if k == 0.0:  # no state yet: nothing moved, m = 0
            coef.append(0.0)
            root.append(1.0)
            wdlr.append(0.0)
            continue
        if lr == 0.0:
            of = f" of {name!r}" if name is not None else ""
            at = (
                f"step {first + i} (the optimizer's step {k:g})"
                if first is not None
                else (f"its step {k:g}")
            )
            raise EncodingError(
                f"Adam's first moment{of} after {at} cannot be derived: the step ran at "
                "lr = 0, so the recorded delta holds no trace of it, and the compact profile does "
                "not store it (record with the lossless profile to keep it)"
            )
        beta1, beta2 = float(hparams["betas"][0][i]), float(hparams["betas"][1][i])
        coef.append((1.0 - beta1**k) / lr)
        root.append((1.0 - beta2**k) ** 0.5)
        wdlr.append(lr * float(hparams["weight_decay"][i]))
    dev = exp_avg_sq.device
    shape = (n,) + (1,) * (exp_avg_sq.dim() - 1)

    def col(x: Sequence[float]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float64, device=dev).reshape(shape)

    d = delta.double()
    if hparams["decoupled"]:
        d = d + col(wdlr) * theta.double()
    eps = col([float(x) for x in hparams["eps"]])
    denom = exp_avg_sq.double().sqrt() / col(root) + eps
    return (-d * denom * col(coef)).to(exp_avg_sq.dtype)


def decode_stored(
    stored: dict[str, torch.Tensor],
    plan: dict[str, str],
    dtype: str,
    history: Callable[[str], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A tensor's state after consecutive steps (every key ``[steps, ...]``) as the optimizer
    held it, except the derived keys (see :func:`with_derived`): narrowed keys in the
    parameter's ``dtype``, LOG8 keys decoded. ``history(key)`` gives the rows of a stored key
    from at or before the intra row of the first step (its block's first step at the latest)
    through the last step, since LOG8 keys store code differences within a block."""
    out = {}
    dt = getattr(torch, dtype)
    for key, value in stored.items():
        if key.endswith(LOGRANGE) and plan.get(key.removesuffix(LOGRANGE)) == LOG8:
            continue
        if plan.get(key) == BF16:
            value = value.to(dt)
        elif plan.get(key) == LOG8:
            codes = log8_chain(history(key), history(key + LOGRANGE))[-value.shape[0] :]
            value = log8_decode_steps(codes, stored[key + LOGRANGE], dt)
        out[key] = value
    return out


def derives(plan: dict[str, str], keys: Iterable[str]) -> bool:
    """Whether a tensor whose decoded state has ``keys`` gets derived keys (Adam's m)."""
    keys = set(keys)
    return any(how == DERIVED for how in plan.values()) and {"exp_avg_sq", "step"} <= keys


def with_derived(
    out: dict[str, torch.Tensor],
    plan: dict[str, str],
    adam: Callable[[], dict[str, Any]],
    *,
    name: str | None = None,
    first: int | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`decode_stored`'s state with Adam's m added (where the plan derives it).

    ``adam()`` gives ``delta`` and ``theta`` (``[steps, *shape]``) and the per-step
    ``hparams`` of :func:`derive_first_moments` (called only when a key is derived)."""
    if not derives(plan, out):
        return out
    a = adam()
    steps = out["step"].reshape(out["step"].shape[0], -1)[:, 0].tolist()
    m = derive_first_moments(
        a["delta"], a["theta"], out["exp_avg_sq"], steps, a["hparams"], name=name, first=first
    )
    return {"step": out["step"], "exp_avg": m, **{k: v for k, v in out.items() if k != "step"}}
