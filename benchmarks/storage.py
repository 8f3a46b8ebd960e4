#!/usr/bin/env python
"""Storage benchmark: ratio, write/read MB/s, reconstruction error and attribution fidelity (vs the
lossless store) of every codec and delta encoding on five recorded runs, beside the machine's
limits: sequential read (page cache dropped), memcpy, each codec's one-thread speed on real deltas.

    python -m benchmarks.storage           # full, 10-30 min: benchmarks/results/storage.*
    python -m benchmarks.storage --quick   # ~1-2 min, writes to a temp folder (or --out-dir DIR)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import historystore as hs
from attribution.demo.data import load_digits
from attribution.demo.model import DigitsCNN
from historystore.config import COMPACT_CODEC
from historystore.encodings import EncodingRule
from historystore.meta.info import info

try:  # run as a module (python -m benchmarks.storage) or as a script
    from benchmarks import _machine
except ImportError:  # pragma: no cover
    import _machine  # type: ignore[no-redef]

MB = _machine.MB
DEFAULT_CODEC = "blosc-zstd1-bitshuffle"
NUM_TEST = 32
TOP = 10
#: test points of the path methods (TracIn, EPK) on the compact settings (the first of NUM_TEST)
PATH_TEST = 8

DETAILS = """\
Runs (each a real training run, recorded by :class:`historystore.Recorder`):

* ``cnn-sgdm``   DigitsCNN(channels=16, hidden=64) on digits, SGD lr 0.05 momentum 0.9
* ``cnn-adamw``  the same CNN, AdamW lr 2e-3 weight decay 0.01
* ``mlp-sgd``    a digits MLP 64-256-256-10 under plain SGD (lr 0.1): per-example factors apply
* ``big-adamw``  an MLP 1024-2048-1024-10 (4.2 M parameters) on generated data (random
  teacher network), 100 steps, AdamW lr 1e-3, batch 64, fewer settings
* ``big-sgd``    the same MLP under plain SGD (lr 0.05): per-example factors at scale

How settings are recorded: every setting retrains the run from the same seed under its own
Recorder. Training is deterministic on the CPU, so every setting sees the same trajectory
(checked: each store's final keyframe equals the lossless store's bit for bit). We chose
retraining over re-encoding the lossless θ_t sequence with a ``SetTo`` optimizer because
(1) per-example factors need the layers' real inputs and output gradients and plain
``torch.optim.SGD``, which a replay optimizer cannot provide, and (2) for these models the
training step costs less than the recording itself (a replay would save only that part).

Measured per setting (deltas = the per-step arrays of every parameter tensor):

* ratio Δ: dense float32 delta bytes / stored bytes of the delta arrays (``info()`` per tensor);
  ratio store: ``info()`` bytes_raw / bytes_stored of the whole store (keyframes, ids, ... too).
  Optimizer state is not recorded (``optimizer_state="none"``): it is the same for every setting
  and would hide the differences (see the notes: Adam's moments compress 1.1-1.2x losslessly).
* write MB/s: dense delta bytes / recording time (``Recorder.__enter__`` + every ``rec.step`` +
  ``close``, i.e. the time the training loop waits for the recorder; training itself excluded).
* read MB/s: dense delta bytes / time of a full scan of all deltas (decoded to dense tensors
  where the encoding can, sketches read raw), page cache of the store dropped first ("cold",
  posix_fadvise DONTNEED; best of two for stores under 300 MB) and, for those small stores,
  again with the store cached ("warm", JSON only).
* Δ err: max over steps of ‖Δ̂_t − Δ_t‖ / ‖Δ_t‖ over all tensors, Δ_t from the lossless store.
  θ err: max over steps of the relative error of the replayed θ̂_(t+1), from the store's own
  ``encoding_error()`` (exact, per tensor) combined over tensors with the lossless θ norms.
* attribution: 32 test points, every Linear layer L; z = W_T a + b_T and a (L's input) from the
  final model (the lossless store's θ_T), γ_t = ⟨z, Δ̂W_t a⟩ = ⟨Δ̂W_t, z aᵀ⟩ (for sketches
  ⟨S ΔW_t, S(z aᵀ)⟩). Against the lossless γ: Spearman over steps and top-10 overlap of the
  steps with the largest γ; and for per-example scores s(e) = Σ_{t: e ∈ B_t} γ_t / |B_t| the
  Spearman over the training examples that were drawn and the top-10 overlap. Means over test
  points and layers (per layer in the JSON).
* compact profile (``RecorderConfig.compact()``, all tensors, optimizer state recorded):
  B/param/step = stored bytes of Δ + optimizer state per parameter per step (keyframes, 4
  bytes per parameter every ``keyframe_every`` steps, apart); m err / v err: median relative
  L2 error of the derived first moment and of the served second moment against the
  optimizer's own state (kept every 10 steps during training); ρ as for every setting.
  Path methods (the compact profile's state is what they read): TracIn (``batches``, Adam
  preconditioner from v) and the exact path kernel EPK (``allow_lossy``: θ̂_t replayed from
  the 6-bit Δ, m derived) on the compact store and on a lossless twin recorded *with*
  optimizer state (the same training), the first ``PATH_TEST`` (8) test points, each test
  point's per-example scores over the drawn training examples: Spearman (mean and min over
  test points) and top-10 overlap (mean) against the twin. EPK with ``max_level=3`` (at most
  9 quadrature nodes per step; the ranking, not completeness, is compared; the same options
  on both stores). Only on runs up to ``PATH_MAX_PARAMS`` (200 k) parameters: the digits CNN;
  ``--no-path`` skips them.
* machine (``benchmarks/_machine.py``, shared with the other benchmarks): sequential read of
  a large file (page cache dropped), memcpy, one-thread encode/decode speed of the blosc/zstd
  presets on real deltas (plus the default preset with a 256 KiB Blosc block), and the share
  of a core a busy thread gets at the start and end (below 100 %: the machine is shared and
  every speed above is pessimistic).

Encodings apply to weight tensors (pattern ``*weight``); biases stay full (lossless). Projected
sketches apply only to tensors with at least 2k elements (a k-sketch of a smaller tensor is
larger than the tensor and still lossy). Lossy settings use the default codec
(blosc-zstd1-bitshuffle). Outputs: ``storage.json``, ``storage.md`` and ``storage.png`` (rate vs
attribution fidelity) in ``--out-dir``, and a compact table on the terminal.

--quick sizes the runs and settings down (1-2 minutes) and writes to a temporary folder unless
--out-dir is given, so that the committed results stay as they are.
"""


# ------------------------------------------------------------------------------------------
# models, data, runs


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor


def digits_data() -> Data:
    d = load_digits()
    return Data(d.x_train, d.y_train, d.x_test[:NUM_TEST])


def teacher_data(dim: int, n_train: int, seed: int = 0) -> Data:
    """``_machine.teacher_data`` with ``NUM_TEST`` more points held out as the test set."""
    x, y = _machine.teacher_data(dim, n_train + NUM_TEST, seed)
    return Data(x[:n_train], y[:n_train], x[n_train:])


@dataclass
class Setting:
    name: str
    family: str  # lossless | rounded | svd | factors | projected | compact
    codec: str = DEFAULT_CODEC
    rules: tuple[EncodingRule, ...] = ()
    # "compact": RecorderConfig.compact(), optimizer state recorded; "state": lossless with
    # the optimizer state (the path methods' reference)
    profile: str = "lossless"


@dataclass
class Run:
    name: str
    title: str
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    data: Callable[[], Data]
    layers: list[str]
    steps: int
    batch: int
    settings: list[Setting]
    seed: int = 0


def lossless(codec: str, name: str | None = None) -> Setting:
    return Setting(name or codec, "lossless", codec)


def rounded(bits: int) -> Setting:
    return Setting(
        f"bitround{bits}", "rounded", rules=(EncodingRule("rounded", {"bits": bits}, "*weight"),)
    )


def bf16() -> Setting:
    return Setting(
        "bf16", "rounded", rules=(EncodingRule("rounded", {"cast": "bfloat16"}, "*weight"),)
    )


def svd(rank: int) -> Setting:
    return Setting(f"svd{rank}", "svd", rules=(EncodingRule("svd", {"rank": rank}, "*weight"),))


def factors(batch: int) -> Setting:
    rule = EncodingRule("lowrank", {"rank": 16, "max_rows": batch}, "*weight")
    return Setting("factors", "factors", rules=(rule,))


def projected(k: int) -> Setting:
    rule = EncodingRule("projected", {"k": k}, "*weight", min_numel=2 * k)
    return Setting(f"proj{k}", "projected", rules=(rule,))


def compact(bits: int | None = None) -> Setting:
    """The compact profile (all tensors, optimizer state included); ``bits`` overrides its
    delta bits."""
    rules = () if bits is None else (EncodingRule("quantized", {"bits": bits}),)
    name = "compact" if bits is None else f"compact-{bits}bit"
    return Setting(name, "compact", COMPACT_CODEC, rules, "compact")


REFERENCE = lossless(DEFAULT_CODEC, "lossless-default")


def full_settings(plain_sgd: bool, batch: int) -> list[Setting]:
    out = [
        REFERENCE,
        lossless("none"),
        lossless("blosc-zstd1-shuffle"),
        lossless("blosc-lz4-bitshuffle"),
        lossless("blosc-lz4-shuffle"),
        lossless("zstd3"),
        rounded(13),
        rounded(10),
        rounded(7),
        bf16(),
        svd(4),
        svd(16),
        svd(64),
    ]
    if plain_sgd:
        out.append(factors(batch))
    return [*out, projected(256), projected(1024), projected(4096)]


def make_runs(quick: bool) -> list[Run]:
    def sgdm(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    def adamw(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.01)

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.1)

    def adamw_big(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)

    def sgd_big(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.05)

    steps = 60 if quick else 300
    if quick:
        small = [REFERENCE, lossless("none"), rounded(10), bf16(), svd(16), projected(1024)]
        small_sgd = [*small, factors(32)]
        big_dims, big_steps, big_n = [512, 1024, 512, 10], 20, 2048
        big = [REFERENCE, bf16(), svd(16), projected(1024), compact()]
        big_sgd = [REFERENCE, factors(64), projected(1024)]
    else:
        small = full_settings(False, 32)
        small_sgd = full_settings(True, 32)
        big_dims, big_steps, big_n = [1024, 2048, 1024, 10], 100, 8192
        big_sgd = [REFERENCE, bf16(), factors(64), svd(16), projected(4096), projected(65536)]
        big = [
            REFERENCE,
            lossless("none"),
            lossless("blosc-lz4-shuffle"),
            lossless("zstd3"),
            rounded(10),
            rounded(7),
            bf16(),
            svd(16),
            svd(64),
            projected(4096),
            projected(65536),
            compact(),
            compact(8),
        ]
    n_big = sum(a * b + b for a, b in itertools.pairwise(big_dims))
    return [
        Run(
            "cnn-sgdm",
            "DigitsCNN(16, 64), SGD+momentum",
            lambda: DigitsCNN(16, 64),
            sgdm,
            digits_data,
            ["fc1", "fc2"],
            steps,
            32,
            small,
        ),
        Run(
            "cnn-adamw",
            "DigitsCNN(16, 64), AdamW",
            lambda: DigitsCNN(16, 64),
            adamw,
            digits_data,
            ["fc1", "fc2"],
            steps,
            32,
            [*small, compact(), *([] if quick else [compact(8)])],
        ),
        Run(
            "mlp-sgd",
            "digits MLP 64-256-256-10, plain SGD",
            lambda: _machine.MLP([64, 256, 256, 10]),
            sgd,
            digits_data,
            ["fc1", "fc2", "fc3"],
            steps,
            32,
            small_sgd,
        ),
        Run(
            "big-adamw",
            f"MLP {'-'.join(map(str, big_dims))} ({n_big / 1e6:.1f} M params), "
            "generated data, AdamW",
            lambda: _machine.MLP(big_dims),
            adamw_big,
            lambda: teacher_data(big_dims[0], big_n),
            ["fc1", "fc2", "fc3"],
            big_steps,
            64,
            big,
        ),
        Run(
            "big-sgd",
            f"the same MLP ({n_big / 1e6:.1f} M params), generated data, plain SGD",
            lambda: _machine.MLP(big_dims),
            sgd_big,
            lambda: teacher_data(big_dims[0], big_n),
            ["fc1", "fc2", "fc3"],
            big_steps,
            64,
            big_sgd,
        ),
    ]


# ------------------------------------------------------------------------------------------
# training and recording


def _batches(run: Run, data: Data) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(run.seed)
    for _ in range(run.steps):
        yield torch.randperm(len(data.y_train), generator=g)[: run.batch]


def train_baseline(run: Run, data: Data) -> tuple[float, dict[str, torch.Tensor]]:
    """Training alone (no recorder): its wall time and the final weights."""
    torch.manual_seed(run.seed)
    model = run.make_model()
    opt = run.make_optimizer(model)
    t0 = time.perf_counter()
    for idx in _batches(run, data):
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, {n: p.detach().clone() for n, p in model.named_parameters()}


#: steps at which a compact setting's true optimizer state is kept to measure v's and m's error
STATE_SAMPLE_EVERY = 10


def record(
    run: Run,
    data: Data,
    setting: Setting,
    path: Path,
    states: dict[int, dict] | None = None,
    steps_per_block: int | None = None,
) -> dict[str, float]:
    """Train the run under a Recorder; the seconds spent inside the recorder and in all.
    ``states`` receives the true optimizer state every ``STATE_SAMPLE_EVERY`` steps; every
    setting takes the reference's ``steps_per_block`` (the comparison scans in lockstep; the
    block length otherwise follows each encoding's bytes per step)."""
    torch.manual_seed(run.seed)
    model = run.make_model()
    opt = run.make_optimizer(model)
    names = {id(p): n for n, p in model.named_parameters()}
    if setting.profile == "compact":
        cfg = hs.RecorderConfig.compact(encodings=setting.rules, steps_per_block=steps_per_block)
    else:
        cfg = hs.RecorderConfig(
            codec=setting.codec,
            encodings=setting.rules,
            optimizer_state="every_step" if setting.profile == "state" else "none",
            steps_per_block=steps_per_block,
        )
    rec = hs.Recorder(path, model, opt, cfg, run_config={"run": run.name, "setting": setting.name})
    wall = time.perf_counter()
    t0 = time.perf_counter()
    rec.__enter__()
    enter_s = time.perf_counter() - t0
    steps_s = 0.0
    try:
        for idx in _batches(run, data):
            y = data.y_train[idx]
            loss = F.cross_entropy(model(data.x_train[idx]), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t0 = time.perf_counter()
            rec.step(idx, labels=y, loss=loss)
            steps_s += time.perf_counter() - t0
            t = rec.num_steps - 1
            if states is not None and t % STATE_SAMPLE_EVERY == 0:
                states[t] = {
                    names[id(p)]: {k: v.clone() for k, v in st.items() if k != "step"}
                    for p, st in opt.state.items()
                }
    except BaseException:
        rec.__exit__(*sys.exc_info())
        raise
    t0 = time.perf_counter()
    rec.__exit__(None, None, None)
    close_s = time.perf_counter() - t0
    return {
        "record_s": enter_s + steps_s + close_s,
        "record_enter_s": enter_s,
        "record_steps_s": steps_s,
        "record_close_s": close_s,
        "wall_s": time.perf_counter() - wall,
    }


# ------------------------------------------------------------------------------------------
# reading


def dense_capable(store: hs.HistoryStore) -> list[str]:
    return [n for n in store.tensor_names if "dense" in store.encodings[n].capabilities]


def iter_blocks(store: hs.HistoryStore) -> Iterator[tuple[int, int, dict, dict]]:
    """(start, stop, dense deltas of decodable tensors, raw arrays of the others) per block."""
    dense = set(dense_capable(store))
    if len(dense) == len(store.tensor_names):
        for blk in store.scan():
            yield blk.start, blk.stop, blk.deltas, {}
        return
    for blk in store.scan(dense=False, raw=True):
        raw = blk.raw or {}
        deltas = {n: store.encodings[n].decode_block(raw[n]) for n in dense}
        yield blk.start, blk.stop, deltas, {n: raw[n] for n in raw if n not in dense}


def timed_scan(store_path: Path, cold: bool) -> float:
    """Seconds for one full scan of every delta (decoded where decodable)."""
    if cold:
        _machine.drop_from_page_cache(store_path)
    t0 = time.perf_counter()
    store = hs.open_store(store_path)
    for _, _, deltas, raw in iter_blocks(store):
        for v in deltas.values():
            v.view(-1)[:1].sum()  # touch
        for arrays in raw.values():
            for v in arrays.values():
                v.view(-1)[:1].sum()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------
# attribution


@dataclass
class Probe:
    """Test-side vectors of one Linear layer: its inputs a [J, in] and outputs z [J, out]."""

    a: torch.Tensor
    z: torch.Tensor
    sketches: dict[int, torch.Tensor] = field(default_factory=dict)


def probes(run: Run, data: Data, theta: dict[str, torch.Tensor]) -> dict[str, Probe]:
    model = run.make_model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta[n])
    model.eval()
    out: dict[str, Probe] = {}
    handles = []
    for layer in run.layers:

        def hook(
            mod: nn.Module, inp: tuple[torch.Tensor, ...], z: torch.Tensor, layer=layer
        ) -> None:
            out[layer] = Probe(inp[0].detach().reshape(len(z), -1).clone(), z.detach().clone())

        handles.append(getattr(model, layer).register_forward_hook(hook))
    with torch.no_grad():
        model(data.x_test)
    for h in handles:
        h.remove()
    return out


def gamma_dense(delta: torch.Tensor, p: Probe) -> torch.Tensor:
    """γ[t, j] = z_jᵀ Δ_t a_j for a block of dense weight deltas [steps, out, in]."""
    return (torch.matmul(delta.float(), p.a.T) * p.z.T.unsqueeze(0)).sum(1)


def gamma_sketch(sk: torch.Tensor, p: Probe, enc: Any) -> torch.Tensor:
    """γ[t, j] = ⟨S Δ_t, S(z_j a_jᵀ)⟩ from stored sketches [steps, k]."""
    if enc.k not in p.sketches:
        rows = [
            enc.sketch(p.z[j : j + 8, :, None] * p.a[j : j + 8, None, :])
            for j in range(0, len(p.z), 8)
        ]
        p.sketches[enc.k] = torch.cat(rows)
    return sk.float() @ p.sketches[enc.k].T


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = spearmanr(x, y).statistic
    return float(r) if np.isfinite(r) else float("nan")


def top_overlap(x: np.ndarray, y: np.ndarray, k: int = TOP) -> float:
    return len(set(np.argsort(-x)[:k].tolist()) & set(np.argsort(-y)[:k].tolist())) / k


def fidelity(ref: np.ndarray, got: np.ndarray, per_ex: Any, drawn: np.ndarray) -> dict[str, float]:
    """Mean over test points of Spearman / top-10 overlap, over steps and over examples."""
    s_ref, s_got = per_ex @ ref, per_ex @ got  # [examples, J]
    s_ref, s_got = s_ref[drawn], s_got[drawn]
    J = ref.shape[1]
    return {
        "spearman_steps": float(np.nanmean([spearman(ref[:, j], got[:, j]) for j in range(J)])),
        "top10_steps": float(np.mean([top_overlap(ref[:, j], got[:, j]) for j in range(J)])),
        "spearman_examples": float(
            np.nanmean([spearman(s_ref[:, j], s_got[:, j]) for j in range(J)])
        ),
        "top10_examples": float(np.mean([top_overlap(s_ref[:, j], s_got[:, j]) for j in range(J)])),
    }


# ------------------------------------------------------------------------------------------
# one setting against the lossless reference


@dataclass
class Reference:
    path: Path
    gammas: dict[str, np.ndarray]  # layer -> [T, J]
    theta_norm: np.ndarray  # [T, tensors] ‖θ_(t+1)‖ per tensor
    delta_norm: np.ndarray  # [T, tensors]
    final: dict[str, torch.Tensor]
    per_example: Any  # sparse [examples, T] with 1/|B_t| where e ∈ B_t
    drawn: np.ndarray  # examples drawn at least once
    # the lossless deltas per block, kept in memory when they fit (else re-read per setting)
    blocks: list[tuple[int, int, dict[str, torch.Tensor]]] | None = None


#: keep a reference run's decoded deltas in memory up to this size (saves a decode per setting)
CACHE_BYTES = 3 << 30


def _ref_blocks(ref: Reference) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    if ref.blocks is not None:
        yield from ref.blocks
        return
    for blk in hs.open_store(ref.path).scan():
        yield blk.start, blk.stop, blk.deltas


def compare(run: Run, store: hs.HistoryStore, ref: Reference | None, pr: dict[str, Probe]) -> dict:
    """One pass over the setting's store (and the reference's, in lockstep): γ per layer and
    step, direct Δ errors, and (for the reference itself) the norms the errors need."""
    names = store.tensor_names
    T = store.num_steps
    dense = set(dense_capable(store))
    gam = {layer: np.zeros((T, NUM_TEST)) for layer in run.layers}
    d_num = np.zeros(T)
    d_den = np.zeros(T)
    theta_norm = np.zeros((T, len(names)))
    delta_norm = np.zeros((T, len(names)))
    theta = store.keyframe(0) if ref is None else None
    ref_iter = _ref_blocks(ref) if ref is not None else None
    keep = (
        []
        if ref is None and store.num_steps * sum(t.nbytes for t in store.tensors) <= CACHE_BYTES
        else None
    )
    for a, b, deltas, raw in iter_blocks(store):
        if ref_iter is not None:
            ra, rb, rdeltas = next(ref_iter)
            assert (ra, rb) == (a, b)
            for n in dense:
                diff = (deltas[n].float() - rdeltas[n].float()).reshape(b - a, -1)
                d_num[a:b] += diff.double().pow(2).sum(1).numpy()
            for n in names:
                d_den[a:b] += rdeltas[n].reshape(b - a, -1).double().pow(2).sum(1).numpy()
        else:
            assert theta is not None
            if keep is not None:
                keep.append((a, b, deltas))
            for i, n in enumerate(names):
                d = deltas[n].reshape(b - a, -1).double()
                delta_norm[a:b, i] = d.pow(2).sum(1).sqrt().numpy()
                th = theta[n].reshape(1, -1).double() + d.cumsum(0)
                theta_norm[a:b, i] = th.pow(2).sum(1).sqrt().numpy()
                theta[n] = th[-1].float().reshape(theta[n].shape)
        for layer in run.layers:
            w = f"{layer}.weight"
            if w in dense:
                g = gamma_dense(deltas[w], pr[layer])
            else:
                g = gamma_sketch(raw[w]["sketch"], pr[layer], store.encodings[w])
            gam[layer][a:b] = g.double().numpy()
    out: dict[str, Any] = {"gammas": gam}
    if ref is None:
        out["theta_norm"], out["delta_norm"], out["blocks"] = theta_norm, delta_norm, keep
    else:
        ok = d_den > 0
        rel = np.sqrt(d_num[ok] / d_den[ok])
        out["delta_err_max"] = float(rel.max()) if dense == set(names) else None
        out["delta_err_mean"] = float(rel.mean()) if dense == set(names) else None
        # weights that can be decoded, even if others are sketched
        out["delta_err_decodable_max"] = float(rel.max()) if ok.any() else None
    return out


def recorded_errors(store: hs.HistoryStore, ref: Reference) -> dict[str, Any]:
    """Global relative errors of Δ (as encoded) and of θ̂ from ``encoding_error()``."""
    e = store.encoding_error().astype(np.float64)  # [T, tensors, 2]
    if set(dense_capable(store)) != set(store.tensor_names):
        return {"theta_err_max": None, "theta_err_mean": None, "enc_delta_err_max": None}
    if not np.isfinite(e).any():
        return {"theta_err_max": 0.0, "theta_err_mean": 0.0, "enc_delta_err_max": 0.0}
    e = np.nan_to_num(e, nan=0.0)
    th = np.sqrt(((e[:, :, 1] * ref.theta_norm) ** 2).sum(1) / (ref.theta_norm**2).sum(1))
    dl = np.sqrt(((e[:, :, 0] * ref.delta_norm) ** 2).sum(1) / (ref.delta_norm**2).sum(1))
    per_tensor = {
        n: {"delta": float(e[:, i, 0].max()), "theta": float(e[:, i, 1].max())}
        for i, n in enumerate(store.tensor_names)
        if e[:, i].any()
    }
    return {
        "theta_err_max": float(th.max()),
        "theta_err_mean": float(th.mean()),
        "enc_delta_err_max": float(dl.max()),
        "per_tensor_max": per_tensor,
    }


def state_errors(store: hs.HistoryStore, states: dict[int, dict], path: Path) -> dict[str, Any]:
    """Compact profile: bytes per parameter per step of Δ + optimizer state (keyframes apart),
    and the relative L2 error of the served v and of the derived m against the true state."""
    n_params = sum(t.numel for t in store.tensors)
    state = sum(
        f.stat().st_size for f in (path / "optim").rglob("*") if f.is_file() and "/c/" in str(f)
    )
    delta = sum(
        f.stat().st_size
        for f in (path / "params").rglob("*")
        if f.is_file() and "/c/" in str(f) and "/keyframes/" not in str(f)
    )
    v_err, m_err = [], []
    for t, true in states.items():
        got = store.optimizer_state(t)
        for n, st in true.items():
            for key, errs in (("exp_avg_sq", v_err), ("exp_avg", m_err)):
                ref = st[key].double()
                errs.append(float((got[n][key].double() - ref).norm() / ref.norm()))
    T = store.num_steps
    return {
        "bytes_per_param_step": (delta + state) / n_params / T,
        "delta_bytes_per_param_step": delta / n_params / T,
        "state_bytes_per_param_step": state / n_params / T,
        "v_err_median": float(np.median(v_err)),
        "v_err_max": float(np.max(v_err)),
        "m_err_median": float(np.median(m_err)),
        "m_err_max": float(np.max(m_err)),
    }


#: TracIn as the method's defaults; EPK with panels no narrower than 1/8 of a step (≤ 9 nodes
#: per step): the ranking against the twin is what is measured, not completeness, and the
#: default quadrature (rtol 1e-5 on this float32 ReLU CNN) costs ~6 s per step here
PATH_METHODS: dict[str, dict[str, Any]] = {
    "tracin": {},
    "epk": {"allow_lossy": True, "max_level": 3},
}
#: the path methods run on the compact settings of runs up to this many parameters (per-example
#: gradients at every quadrature node: the 4.2 M-parameter MLP would take most of an hour)
PATH_MAX_PARAMS = 200_000


def path_scores(run: Run, data: Data, path: Path, method: str, tmp: Path) -> np.ndarray:
    """[PATH_TEST, examples] per-example scores of a path method on one store."""
    import zarr

    from attribution import explain

    scores = tmp / f"{path.stem}-{method}-scores.zarr"
    res = explain(
        path,
        run.make_model(),
        data.x_test[:PATH_TEST],
        method=method,
        train_data=torch.utils.data.TensorDataset(data.x_train, data.y_train),
        progress=False,
        scheduler="sync",
        scores_path=scores,
        method_options=dict(PATH_METHODS[method]),
    )
    rows = np.asarray(zarr.open_group(res.attrs["scores_path"], mode="r")["model"][...])
    shutil.rmtree(scores, ignore_errors=True)
    return rows.astype(np.float64)


def path_fidelity(
    run: Run, data: Data, path: Path, tmp: Path, twin: dict[str, Any], ref: Reference
) -> dict[str, Any]:
    """TracIn and EPK on the compact store against the lossless twin with state (recorded
    once per run, into ``twin``): per-test-point Spearman and top-10 overlap of the
    per-example scores over the drawn examples."""
    if "rows" not in twin:
        twin_path = tmp / f"{run.name}-lossless-state.zarr"
        record(run, data, Setting("lossless-state", "lossless", profile="state"), twin_path,
               steps_per_block=hs.open_store(ref.path).steps_per_block)  # fmt: skip
        t0 = time.perf_counter()
        twin["rows"] = {m: path_scores(run, data, twin_path, m, tmp) for m in PATH_METHODS}
        twin["seconds"] = time.perf_counter() - t0
        shutil.rmtree(twin_path, ignore_errors=True)
    out: dict[str, Any] = {"path_test_points": PATH_TEST, "path_lossless_s": twin["seconds"]}
    for m in PATH_METHODS:
        t0 = time.perf_counter()
        got = path_scores(run, data, path, m, tmp)[:, ref.drawn]
        out[f"{m}_s"] = time.perf_counter() - t0
        want = twin["rows"][m][:, ref.drawn]
        rho = [spearman(want[j], got[j]) for j in range(len(got))]
        out[f"{m}_spearman"] = float(np.nanmean(rho))
        out[f"{m}_spearman_min"] = float(np.nanmin(rho))
        out[f"{m}_top10"] = float(np.mean([top_overlap(want[j], got[j]) for j in range(len(got))]))
    return out


def store_sizes(path: Path) -> dict[str, Any]:
    inf = info(str(path))
    raw = sum(t["bytes_raw"] for t in inf["tensors"])
    stored = sum(t["bytes_stored"] for t in inf["tensors"])
    return {
        "deltas_raw_bytes": raw,
        "deltas_stored_bytes": stored,
        "ratio_deltas": raw / stored,
        "store_raw_bytes": inf["bytes_raw"],
        "store_stored_bytes": inf["bytes_stored"],
        "ratio_store": inf["ratio"],
        "encodings": {t["name"]: [t["encoding"], t["encoding_params"]] for t in inf["tensors"]},
        "steps_per_block": inf["steps_per_block"],
    }


def evaluate(
    run: Run,
    data: Data,
    setting: Setting,
    tmp: Path,
    ref: Reference | None,
    pr: dict | None,
    twin: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Reference, dict[str, Probe]]:
    """Record one setting and measure it; the first call (``ref=None``) makes the reference.
    ``twin`` (compact settings): the run's path-method reference, filled on first use; None
    skips the path methods."""
    path = tmp / f"{run.name}-{setting.name}.zarr"
    states: dict[int, dict] = {}
    compact = setting.profile == "compact"
    timing = record(
        run,
        data,
        setting,
        path,
        states if compact else None,
        hs.open_store(ref.path).steps_per_block if ref is not None else None,
    )
    sizes = store_sizes(path)
    if setting.profile == "compact":
        sizes.update(state_errors(hs.open_store(path), states, path))
    raw = sizes["deltas_raw_bytes"]
    # small stores: best of two (overheads dominate); large ones: one cold scan, no warm one
    small = raw < 300 * MB
    cold = min(timed_scan(path, cold=True) for _ in range(2 if small else 1))
    warm = timed_scan(path, cold=False) if small else math.nan
    res: dict[str, Any] = {
        "setting": setting.name,
        "family": setting.family,
        "codec": setting.codec,
        **sizes,
        **timing,
        "write_mbps": raw / timing["record_s"] / MB,
        "read_cold_s": cold,
        "read_warm_s": warm,
        "read_cold_mbps": raw / cold / MB,
        "read_warm_mbps": raw / warm / MB,
        "read_cold_stored_mbps": sizes["deltas_stored_bytes"] / cold / MB,
    }
    store = hs.open_store(path)
    is_ref = ref is None
    if ref is None:
        final = store.params_at(store.num_steps)
        pr = probes(run, data, final)
        cmp = compare(run, store, None, pr)
        ids, _, off = store.batches()
        from scipy.sparse import csr_matrix

        steps = np.repeat(np.arange(store.num_steps), np.diff(off))
        weights = 1.0 / np.diff(off)[steps]
        per_ex = csr_matrix((weights, (ids, steps)), shape=(len(data.y_train), store.num_steps))
        drawn = np.flatnonzero(np.asarray(per_ex.sum(1)).ravel() > 0)
        ref = Reference(
            path,
            cmp["gammas"],
            cmp["theta_norm"],
            cmp["delta_norm"],
            final,
            per_ex,
            drawn,
            cmp["blocks"],
        )
        # against itself: zero error by construction (the other lossless codecs check the code)
        cmp = {"gammas": ref.gammas, "delta_err_max": 0.0, "delta_err_mean": 0.0}
        cmp["delta_err_decodable_max"] = 0.0
    else:
        assert pr is not None
        cmp = compare(run, store, ref, pr)
    last = store.keyframe(len(store.keyframe_steps) - 1)
    res["identical_training"] = all(
        torch.equal(last[n].view(torch.int32), ref.final[n].view(torch.int32)) for n in last
    )
    res["delta_err_max"] = cmp["delta_err_max"]
    res["delta_err_mean"] = cmp["delta_err_mean"]
    res["delta_err_decodable_max"] = cmp["delta_err_decodable_max"]
    res.update(recorded_errors(store, ref))
    per_layer = {
        layer: fidelity(ref.gammas[layer], cmp["gammas"][layer], ref.per_example, ref.drawn)
        for layer in run.layers
    }
    res["attribution_per_layer"] = per_layer
    for key in ("spearman_steps", "top10_steps", "spearman_examples", "top10_examples"):
        res[key] = float(np.nanmean([v[key] for v in per_layer.values()]))
    if compact and twin is not None and sum(t.numel for t in store.tensors) <= PATH_MAX_PARAMS:
        res.update(path_fidelity(run, data, path, tmp, twin, ref))
    if not is_ref:
        shutil.rmtree(path, ignore_errors=True)
    return res, ref, pr


# ------------------------------------------------------------------------------------------
# machine limits (benchmarks/_machine.py, shared with the other benchmarks)

#: codec presets whose encode/decode speed is measured on real deltas (one thread each)
DECODE_PRESETS = [
    "blosc-zstd1-bitshuffle",
    "blosc-zstd3-bitshuffle",
    "blosc-lz4-bitshuffle",
    "blosc-lz4-shuffle",
    "zstd3",
]


def codec_speeds(sample: np.ndarray) -> dict[str, dict[str, float]]:
    """One thread each: the presets, and the default one with a 256 KiB Blosc block (a block
    size no preset sets)."""
    from numcodecs import Blosc

    out = {name: _machine.codec_speed(name, sample) for name in DECODE_PRESETS}
    default_256k = Blosc("zstd", 1, Blosc.BITSHUFFLE, blocksize=1 << 18)
    out["blosc-zstd1-bitshuffle, blocksize 256 KiB"] = _machine.codec_speed(default_256k, sample)
    return out


# ------------------------------------------------------------------------------------------
# output


COLUMNS = [
    ("run", "run", "{}"),
    ("setting", "setting", "{}"),
    ("ratio_deltas", "ratio Δ", "{:.2f}"),
    ("ratio_store", "ratio store", "{:.2f}"),
    ("write_mbps", "write MB/s", "{:.0f}"),
    ("read_cold_mbps", "read MB/s", "{:.0f}"),
    ("delta_err_max", "Δ err", "{:.1e}"),
    ("theta_err_max", "θ err", "{:.1e}"),
    ("spearman_steps", "ρ steps", "{:.3f}"),
    ("top10_steps", "top10 steps", "{:.2f}"),
    ("spearman_examples", "ρ examples", "{:.3f}"),
    ("top10_examples", "top10 ex.", "{:.2f}"),
    ("bytes_per_param_step", "B/param/step", "{:.2f}"),
    ("m_err_median", "m err", "{:.1e}"),
    ("v_err_median", "v err", "{:.1e}"),
    ("tracin_spearman", "ρ TracIn", "{:.4f}"),
    ("epk_spearman", "ρ EPK", "{:.4f}"),
]


def _fmt(v: Any, f: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if f == "{:.1e}" and v == 0:
        return "0"
    return f.format(v)


def table_rows(results: list[dict]) -> list[list[str]]:
    return [[_fmt(r.get(k), f) for k, _, f in COLUMNS] for r in results]


def terminal_table(results: list[dict]) -> str:
    head = [h for _, h, _ in COLUMNS]
    rows = table_rows(results)
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w[i]) if i > 1 else c.ljust(w[i]) for i, c in enumerate(cells))

    return "\n".join([line(head), line(["-" * x for x in w]), *(line(r) for r in rows)])


def markdown(report: dict) -> str:
    res = report["results"]
    m = report["machine"]
    fa = m["facts"]
    lines = [
        "# Storage benchmark",
        "",
        f"`python -m benchmarks.storage{' --quick' if report['quick'] else ''}` on "
        f"{fa['cpus_usable']} cores ({fa['platform']}), torch {fa['torch']}, "
        f"zarr {fa['zarr']}, numcodecs {fa['numcodecs']}; "
        f"{report['elapsed_s']:.0f} s in all.",
        "",
        "Runs: "
        + "; ".join(
            f"**{r['name']}** {r['title']}, {r['steps']} steps, batch "
            f"{r['batch']}, {r['num_params']:,} parameters, "
            f"{r['deltas_raw_mb']:.0f} MB of raw deltas (training alone "
            f"{r['train_s']:.1f} s)"
            for r in report["runs"]
        )
        + ".",
        "",
        "Ratio Δ: dense float32 delta bytes / stored delta bytes; ratio store: the whole store "
        "(keyframes, ids, ... included; no optimizer state). write: raw delta MB per second "
        "spent in the recorder; read: raw delta MB per second of a full scan decoding every "
        "delta (sketches read raw) after dropping the page cache. Δ err / θ err: max over "
        "steps of the relative L2 error of the decoded Δ_t (vs the lossless store) and of the "
        "replayed θ_t (n/a: sketches cannot be decoded). ρ / top10: Spearman and top-10 "
        "overlap of γ_t over steps and of per-example scores against the lossless store, "
        "mean over 32 test points and the Linear layers. B/param/step (compact profile "
        "only, optimizer state recorded): stored bytes of Δ + optimizer state per parameter "
        "per step, keyframes apart (fp32 θ + both Adam moments: 12; the lossless store with "
        "state: ~9); m err / v err: median relative L2 error of the derived first moment and "
        "of the served second moment against the optimizer's own, every "
        f"{STATE_SAMPLE_EVERY} steps. ρ TracIn / ρ EPK (compact profile only): Spearman of "
        "the per-example scores of TracIn and of the exact path kernel on the compact store "
        "against a lossless twin recorded with optimizer state, over the drawn examples, mean "
        f"over the first {PATH_TEST} test points (min and top-10 overlap in the JSON; EPK "
        "with max_level=3; runs up to 200 k parameters).",
        "",
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(res)]
    lines += ["", "## Machine limits (same run)", ""]
    rr = m["raw_read"]
    lines.append(
        f"- sequential read of a {rr['size_mb']:.0f} MB file: "
        f"{rr['cold_mbps']:.0f} MB/s with the page cache dropped "
        f"(posix_fadvise DONTNEED{'' if rr['cache_dropped'] else ' unavailable'}; the host "
        f"may still cache it), {rr['cached_mbps']:.0f} MB/s cached"
    )
    lines.append(
        f"- memcpy (numpy copyto, {64 if report['quick'] else 256} MB): "
        f"{m['memcpy_mbps']:.0f} MB/s; a busy Python thread got {m['cpu_share_start']:.0%} / "
        f"{m['cpu_share_end']:.0%} of a core at the start / end (below 100 %: shared machine)"
    )
    lines.append(
        f"- numcodecs on real deltas ({m['decode_sample']}, {m['decode_sample_mb']:.0f} MB, "
        "one thread, median of 3):"
    )
    lines += ["", "| codec | ratio | encode MB/s | decode MB/s |", "|---|---:|---:|---:|"]
    for name, d in m["decode"].items():
        if not name.startswith("_"):
            lines.append(
                f"| {name} | {d['ratio']:.2f} | {d['encode_mbps']:.0f} | {d['decode_mbps']:.0f} |"
            )
    if report.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"


FAMILY_STYLE = {
    "lossless": ("#777777", "o"),
    "rounded": ("#1f77b4", "s"),
    "svd": ("#ff7f0e", "^"),
    "factors": ("#2ca02c", "*"),
    "projected": ("#d62728", "D"),
    "compact": ("#9467bd", "P"),
}
PLOT_METRICS = [
    ("spearman_examples", "Spearman ρ of per-example scores"),
    ("top10_examples", "top-10 overlap of training examples"),
]


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, float) and math.isfinite(v)


def _place_labels(ax: Any, points: list[tuple[float, float, str, str]], fontsize: float) -> None:
    """Label points without overlaps where possible: try offsets near to far, each label
    avoiding the markers and the labels placed before it (display coordinates); if none is
    free, take the least overlapping one. Far labels get a thin leader line."""
    fig = ax.figure
    fig.canvas.draw()
    px = fig.dpi / 72.0
    h, cw = fontsize * 1.2 * px, fontsize * 0.58 * px
    xy = ax.transData.transform([(p[0], p[1]) for p in points]) if points else []
    taken = [(x - 4 * px, y - 4 * px, x + 4 * px, y + 4 * px) for x, y in xy]
    frame = ax.get_window_extent()
    offsets = [(5, 3), (5, -3), (-5, 3), (-5, -3), (0, 8), (0, -8)]
    offsets += [(dx, dy) for dy in (15, -15, 24, -24) for dx in (6, -6)]

    def overlap(a: tuple, b: tuple) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        hh = min(a[3], b[3]) - max(a[1], b[1])
        return max(w, 0.0) * max(hh, 0.0)

    order = sorted(range(len(points)), key=lambda i: -xy[i][1])  # top to bottom
    for i in order:
        x, y, text, color = points[i]
        dx, dy = xy[i]
        w = len(text) * cw
        best, best_cost = None, math.inf
        for ox, oy in offsets:
            ha = "left" if ox > 0 else "right" if ox < 0 else "center"
            va = "bottom" if oy > 0 else "top"
            x0 = dx + ox * px - (w if ha == "right" else w / 2 if ha == "center" else 0)
            y0 = dy + oy * px - (h if va == "top" else 0)
            box = (x0, y0, x0 + w, y0 + h)
            outside = w * h - overlap(box, (frame.x0, frame.y0, frame.x1, frame.y1))
            cost = sum(overlap(box, t) for t in taken) + 2 * outside
            if cost < best_cost - 1e-9:
                best, best_cost = (ox, oy, ha, va, box), cost
            if cost == 0:
                break
        assert best is not None
        ox, oy, ha, va, box = best
        taken.append(box)
        far = abs(oy) > 10
        ax.annotate(
            text,
            (x, y),
            xytext=(ox, oy),
            textcoords="offset points",
            ha=ha,
            va=va,
            fontsize=fontsize,
            color=color,
            arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.6}
            if far
            else None,
        )


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r["name"] for r in report["runs"]]
    fig, axes = plt.subplots(
        len(PLOT_METRICS),
        len(runs),
        figsize=(3.9 * len(runs), 3.7 * len(PLOT_METRICS) + 1.1),
        squeeze=False,
    )
    pending: list[tuple[Any, list[tuple[float, float, str, str]]]] = []
    for row, (key, label) in enumerate(PLOT_METRICS):
        vals = [r[key] for r in report["results"] if _finite(r.get(key))]
        lo = min(vals, default=0.0)
        ylo = 0.5 if lo > 0.55 else max(0.0, math.floor((lo - 0.05) * 10) / 10)
        for col, run in enumerate(runs):
            ax = axes[row][col]
            res = [r for r in report["results"] if r["run"] == run and _finite(r.get(key))]
            xs = [r["ratio_deltas"] for r in res]
            ax.set_xscale("log")
            ax.set_xlim(min(xs) / 1.5, max(xs) * 2.5)
            ax.set_ylim(ylo, 1.0 + 0.13 * (1.0 - ylo))
            ax.grid(True, which="both", alpha=0.25)
            labels: list[tuple[float, float, str, str]] = []
            for fam, (color, marker) in FAMILY_STYLE.items():
                group = [r for r in res if r["family"] == fam]
                if not group:
                    continue
                ax.scatter(
                    [r["ratio_deltas"] for r in group],
                    [r[key] for r in group],
                    c=color,
                    marker=marker,
                    s=90 if marker == "*" else 30,
                    zorder=3,
                    edgecolors="white",
                    linewidths=0.5,
                )
                if fam in ("lossless", "rounded"):  # tight clusters: one label for the group
                    gx = [r["ratio_deltas"] for r in group]
                    text = (
                        f"lossless ×{min(gx):.1f}" + (f"–{max(gx):.1f}" if len(gx) > 1 else "")
                        if fam == "lossless"
                        else "round: "
                        + ",".join(r["setting"].replace("bitround", "") for r in group)
                    )
                    gy = min(r[key] for r in group)
                    labels.append((math.sqrt(min(gx) * max(gx)), gy, text, color))
                else:
                    labels += [(r["ratio_deltas"], r[key], r["setting"], color) for r in group]
            pending.append((ax, labels))
            if row == 0:
                title = next(r["title"] for r in report["runs"] if r["name"] == run)
                ax.set_title(f"{run}\n" + textwrap.fill(title, 48), fontsize=8.5)
            if row == len(PLOT_METRICS) - 1:
                ax.set_xlabel("compression ratio of the deltas (log)", fontsize=8.5)
            if col == 0:
                ax.set_ylabel(label, fontsize=8.5)
            ax.tick_params(labelsize=7.5)
    handles = [
        plt.Line2D(
            [], [], color=c, marker=m, linestyle="", label=f, markersize=8 if m == "*" else 6
        )
        for f, (c, m) in FAMILY_STYLE.items()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(
        "Storage vs attribution fidelity against the lossless store (up and right is better)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    for ax, labels in pending:  # after the layout: overlap checks use final positions
        _place_labels(ax, labels, 7)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    ap = _machine.arg_parser(
        __doc__, DETAILS, "small run (1-2 min)", "storage.json, .md and .png", out_dir=True
    )
    ap.add_argument("--tmp-dir", type=Path, default=None, help="where the stores go (temporary)")
    ap.add_argument("--runs", default="", help="comma-separated subset of run names")
    ap.add_argument(
        "--settings",
        default="",
        help="comma-separated subset of setting names (the reference, lossless-default, is kept)",
    )
    ap.add_argument(
        "--no-path",
        action="store_true",
        help="skip TracIn and EPK on the compact settings (and their lossless twin with state)",
    )
    args = ap.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = _machine.results_dir(args.quick)
    started = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = make_runs(args.quick)
    if args.runs:
        keep = set(args.runs.split(","))
        runs = [r for r in runs if r.name in keep]
    if args.settings:
        want = {*args.settings.split(","), REFERENCE.name}
        runs = [replace(r, settings=[s for s in r.settings if s.name in want]) for r in runs]
    results: list[dict] = []
    run_meta: list[dict] = []
    notes: list[str] = []
    machine: dict[str, Any] = {
        "facts": _machine.machine_facts(),
        "cpu_share_start": _machine.cpu_share(),
    }
    with tempfile.TemporaryDirectory(prefix="hs-bench-", dir=args.tmp_dir) as tmpdir:
        tmp = Path(tmpdir)
        for run in runs:
            data = run.data()
            train_s, final = train_baseline(run, data)
            ref: Reference | None = None
            pr: dict[str, Probe] | None = None
            twin: dict[str, Any] | None = None if args.no_path else {}
            n_params = sum(v.numel() for v in final.values())
            run_meta.append(
                {
                    "name": run.name,
                    "title": run.title,
                    "steps": run.steps,
                    "batch": run.batch,
                    "num_params": n_params,
                    "train_s": train_s,
                    "deltas_raw_mb": n_params * 4 * run.steps / MB,
                    "examples": len(data.y_train),
                }
            )
            print(
                f"\n== {run.name}: {run.title}, {run.steps} steps, {n_params:,} params, "
                f"training alone {train_s:.1f} s",
                flush=True,
            )
            for setting in run.settings:
                t0 = time.perf_counter()
                first = ref is None
                res, ref, pr = evaluate(run, data, setting, tmp, ref, pr, twin)
                if first and not all(torch.equal(final[n], ref.final[n]) for n in final):
                    notes.append(f"{run.name}: the recorded run differs from training alone")
                res = {"run": run.name, **res}
                # training slowdown with this recorder (includes the writer thread's CPU use)
                res["record_overhead_s"] = res["wall_s"] - train_s
                results.append(res)
                print(
                    f"  {setting.name:<22} ratio {res['ratio_deltas']:7.2f}  write "
                    f"{res['write_mbps']:6.0f} MB/s  read {res['read_cold_mbps']:6.0f} MB/s  "
                    f"ρ_ex {res['spearman_examples']:.3f}"
                    + "".join(
                        f"  ρ_{m} {res[f'{m}_spearman']:.4f} (min {res[f'{m}_spearman_min']:.4f})"
                        for m in PATH_METHODS
                        if f"{m}_spearman" in res
                    )
                    + f"  ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
                if not res["identical_training"]:
                    notes.append(f"{run.name}/{setting.name}: final θ differs from lossless")
            if run.name == runs[-1].name and ref is not None:
                sample, where = _machine.delta_sample(ref.path, (8 if args.quick else 64) << 20)
                machine["decode_sample"] = f"{run.name} {where}"
                machine["decode_sample_mb"] = sample.nbytes / MB
                machine["decode"] = codec_speeds(sample)
            if ref is not None:
                shutil.rmtree(ref.path, ignore_errors=True)
        machine["raw_read"] = _machine.raw_read_mbps(
            tmp, 128 if args.quick else 1024, repeats=1 if args.quick else 3
        )
    machine["memcpy_mbps"] = _machine.memcpy_mbps(64 if args.quick else 256)
    machine["cpu_share_end"] = _machine.cpu_share()
    machine["load_avg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    share = min(machine["cpu_share_start"], machine["cpu_share_end"])
    if share < 0.8:
        notes.append(
            f"the machine was shared during this run (a busy thread got {share:.0%} of a core "
            f"at the start or end; 1-minute load average {machine['facts']['load_avg_1m']:.1f} "
            f"at the start, {machine['load_avg_1m_end']:.1f} at the end): speeds are "
            "pessimistic and noisy"
        )
    report = {
        "quick": args.quick,
        "elapsed_s": time.perf_counter() - started,
        "runs": run_meta,
        "results": results,
        "machine": machine,
        "notes": notes,
    }
    (args.out_dir / "storage.json").write_text(json.dumps(_machine.plain_json(report), indent=1))
    (args.out_dir / "storage.md").write_text(markdown(report))
    plot(report, args.out_dir / "storage.png")
    print()
    print(terminal_table(results))
    print(
        f"\nmachine: read {machine['raw_read'].get('cold_mbps', float('nan')):.0f} MB/s cold, "
        f"memcpy {machine['memcpy_mbps']:.0f} MB/s; "
        + ", ".join(
            f"{k} decode {v['decode_mbps']:.0f} MB/s"
            for k, v in machine["decode"].items()
            if not k.startswith("_")
        )
    )
    print(f"wrote {args.out_dir}/storage.{{json,md,png}} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
