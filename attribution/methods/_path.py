"""What the path methods (TracIn, the exact path kernel) share: the training data by id, the
optimizer's update rule read from the store, per-example and per-test-point gradients with
``torch.func``, and the state that runs over step ranges like every other method.

The path methods differ from the preactivation decomposition in what they need from a step:
θ_t itself (the scan's ``params=True``: keyframe + decoded deltas + exact fixes), the training
examples of the step's batch (``train_data``, fetched by the recorded ids), and for Adam the
recorded optimizer state (``optim=True``). Their results live under the pseudo-layer
``"model"``: they attribute the model's output, not one layer's preactivation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils.data import TensorDataset

from historystore.encodings import state as optim_state
from historystore.errors import EncodingError, HistoryStoreError
from historystore.read.store import HistoryStore, StepBlock, open_store

from .base import AttributionMethod, ExplainContext, StoreIndex, assemble, topk

LAYER = "model"  # the result's pseudo-layer of path methods
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TrainDataError(HistoryStoreError, ValueError):
    """The training data a path method needs is missing or does not match the store."""


class OptimizerStateError(HistoryStoreError, ValueError):
    """The store lacks the optimizer state (or the optimizer) a method needs."""


# -- training data by id -----------------------------------------------------------------------
class TrainData:
    """The training set as the store's ids index it: a torch ``Dataset`` (items ``(x, y)``) or
    a callable ``ids (LongTensor) -> (x, y)``. Labels are checked against the recorded ones on
    every fetch, so a shuffled or different data set is an error, not silent nonsense."""

    def __init__(self, data: Any, num_train: int) -> None:
        if data is None:
            raise TrainDataError(
                "this method needs the training data: pass train_data= (a torch Dataset whose "
                "item i is (x_i, y_i) for the recorded example id i, or a callable ids -> (x, y))"
            )
        self.data = data
        if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.kind = "dataset"
            n = len(data)
            if num_train > n:
                raise TrainDataError(
                    f"train_data has {n} examples but the store's example ids go up to "
                    f"{num_train - 1}: it is not the training set this run was recorded on"
                )
        elif callable(data):
            self.kind = "callable"
        else:
            raise TrainDataError(
                f"train_data must be a torch Dataset or a callable ids -> (x, y), "
                f"not {type(data).__name__}"
            )

    def fetch(
        self, ids: np.ndarray, labels: np.ndarray | None = None, step: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the examples ``ids``; with ``labels`` (the recorded ones, < 0 unknown),
        raise :class:`TrainDataError` where they differ."""
        try:
            if isinstance(self.data, TensorDataset) and len(self.data.tensors) == 2:
                i = torch.from_numpy(np.asarray(ids, dtype=np.int64))  # one gather, no item loop
                x, y = (v[i.to(v.device)] for v in self.data.tensors)
            elif self.kind == "dataset":
                items = [self.data[int(i)] for i in ids]
                x = torch.stack([torch.as_tensor(it[0]) for it in items])
                y = torch.stack([torch.as_tensor(it[1]) for it in items])
            else:
                x, y = self.data(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
                x, y = torch.as_tensor(x), torch.as_tensor(y)
        except (IndexError, KeyError) as e:
            raise TrainDataError(
                f"train_data cannot give the examples {ids[:8].tolist()}... recorded "
                f"{_at(step)}: {e}"
            ) from e
        if len(x) != len(ids) or len(y) != len(ids):
            raise TrainDataError(
                f"train_data returned {len(x)} inputs and {len(y)} targets for {len(ids)} ids"
            )
        if labels is not None and y.dim() == 1 and not y.is_floating_point():
            known = labels >= 0
            got = y.cpu().numpy()
            bad = np.flatnonzero(known & (got != labels))
            if len(bad):
                i = int(bad[0])
                raise TrainDataError(
                    f"train_data does not match the store: example {int(ids[i])} has label "
                    f"{int(got[i])} in train_data but {int(labels[i])} was recorded {_at(step)} "
                    f"({len(bad)} of {len(ids)} labels differ)"
                )
        return x, y


def _at(step: int | None) -> str:
    return f"at step {step}" if step is not None else ""


# -- the optimizer's update rule ---------------------------------------------------------------
@dataclass
class UpdateRule:
    """Δ_t = −lr_t [A_t ⊙ (c_g (g_t + wd_L2 θ_t) + c_m m_{t−1}) + wd_dec θ_t] per tensor, with
    g_t the batch-mean gradient. SGD: A = 1, m = momentum buffer; Adam/AdamW: A = the
    preconditioner 1/(√(v_t/bc2) + eps) from the recorded second moment, m = first moment."""

    kind: str  # "sgd" | "adam"
    names: list[str]
    hp: dict[str, dict[str, np.ndarray]]  # tensor -> key -> [T]
    nesterov: dict[str, bool]
    decoupled: dict[str, bool]
    state_keys: dict[str, list[str]]  # tensor -> recorded optimizer state keys
    #: state key -> how the recorder's profile stored it ("log8", "derived", ...; {} = as held);
    #: the scan serves every key as the optimizer held it
    state_plan: dict[str, str] = field(default_factory=dict)

    def momentum_of(self, n: str, t: int) -> float:
        return float(self.hp[n]["momentum"][t]) if self.kind == "sgd" else 0.0


def read_rule(store: HistoryStore, names: list[str], what: str) -> UpdateRule:
    """The update rule of the recorded optimizer (SGD with momentum/dampening/nesterov/weight
    decay, Adam, AdamW); anything else raises :class:`OptimizerStateError`."""
    cls = str(store.meta.optimizer.get("class", ""))
    short = cls.rsplit(".", 1)[-1]
    if short == "SGD":
        kind = "sgd"
    elif short in ("Adam", "AdamW"):
        kind = "adam"
    else:
        raise OptimizerStateError(
            f"{what} knows the update rules of torch.optim.SGD, Adam and AdamW; {store.path} "
            f"was recorded with {cls}"
        )
    static = store.meta.optimizer.get("static", [])
    hp: dict[str, dict[str, np.ndarray]] = {}
    nesterov, decoupled = {}, {}
    for n in names:
        g = store.group_of(n)
        st = static[g] if g < len(static) else {}
        if st.get("maximize"):
            raise OptimizerStateError(f"{what}: maximize=True (param group {g}) is not supported")
        if st.get("amsgrad"):
            raise OptimizerStateError(f"{what}: amsgrad=True (param group {g}) is not supported")
        keys = {"lr": "lr", "weight_decay": "weight_decay"}
        if kind == "sgd":
            keys.update(momentum="momentum", dampening="dampening")
        else:
            keys.update(beta1="betas.0", beta2="betas.1", eps="eps")
        hp[n] = {k: np.nan_to_num(store.hparam(f"g{g}.{v}"), nan=0.0) for k, v in keys.items()}
        nesterov[n] = bool(st.get("nesterov", False))
        decoupled[n] = short == "AdamW" or bool(st.get("decoupled_weight_decay", False))
    state_keys = {n: [a.name for a in store.meta.optim_state.get(n, [])] for n in names}
    plan = dict(store.meta.recorder.get("state_plan", {}))
    return UpdateRule(kind, names, hp, nesterov, decoupled, state_keys, plan)


def require_state(rule: UpdateRule, keys: list[str], what: str, path: str) -> None:
    """Refuse a store without the state keys a method reads from ``scan(optim=True)``.

    Under the compact profile the scan serves the state as the optimizer held it (Adam's v
    decoded from its log codes, m derived from Δ_t, θ_t and v_t), so a key the plan derives
    counts as present where what it is derived from was stored."""
    for n in rule.names:
        have = set(rule.state_keys[n])
        if optim_state.derives(rule.state_plan, have):
            have |= {k for k, how in rule.state_plan.items() if how == optim_state.DERIVED}
        missing = [k for k in keys if k not in have]
        if missing:
            raise OptimizerStateError(
                f"{what} needs the optimizer state {missing} of {n!r}, but {path} was recorded "
                f"without it (record with RecorderConfig(optimizer_state='every_step'))"
            )


def preconditioner(
    rule: UpdateRule, n: str, t: int, v: torch.Tensor, step: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Adam's A_t = 1/(√v_t/√bc2 + eps) as torch computes its denominator, and bc1."""
    k = float(step.reshape(-1)[0]) if step.numel() else float(t + 1)
    b1, b2 = float(rule.hp[n]["beta1"][t]), float(rule.hp[n]["beta2"][t])
    bc1, bc2 = 1.0 - b1**k, 1.0 - b2**k
    denom = (v.sqrt() / math.sqrt(bc2)).add_(float(rule.hp[n]["eps"][t]))
    return denom.reciprocal_(), bc1


# -- gradients with torch.func -----------------------------------------------------------------
class Functional:
    """The model as a function of the recorded tensors (buffers and untrained parameters are
    held fixed at their final values), evaluated in eval mode on a private copy, so that
    concurrent step ranges never swap parameters on a shared module. Gradients come back as
    flat rows [N, P] over the recorded tensors in ``names`` order (views per tensor via
    :meth:`unflat`), so that quadrature nodes are combined with one op each, not per tensor."""

    def __init__(self, model: nn.Module, names: list[str], device: torch.device) -> None:
        self.model = copy.deepcopy(model).to(device).eval()
        recorded = set(names)
        params = dict(self.model.named_parameters())
        self.consts = {n: p.detach() for n, p in params.items() if n not in recorded}
        self.consts.update({n: b.detach() for n, b in self.model.named_buffers()})
        self.dtype = next(iter(p.dtype for p in params.values()))
        self.names = list(names)
        self.shapes = [tuple(params[n].shape) for n in names]
        self.sizes = [int(params[n].numel()) for n in names]

    def flat(self, p: dict[str, torch.Tensor], lead: int = 0) -> torch.Tensor:
        """{name: [*lead dims, *shape]} -> [*lead dims, P]."""
        return torch.cat([p[n].reshape(*p[n].shape[:lead], -1) for n in self.names], lead)

    def unflat(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., P] -> {name: [..., *shape]} (views)."""
        parts = torch.split(v, self.sizes, dim=-1)
        lead = v.shape[:-1]
        return {
            n: x.reshape(*lead, *sh)
            for n, x, sh in zip(self.names, parts, self.shapes, strict=True)
        }

    def _out(self, p: dict[str, torch.Tensor], x1: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self.consts, **p}, (x1.unsqueeze(0),))

    def output(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return functional_call(self.model, {**self.consts, **p}, (x,))

    def _per_sample(
        self,
        p: torch.Tensor,
        f: Callable[..., torch.Tensor],
        args: tuple[torch.Tensor, ...],
        post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """∇_θ of sample j's scalar at its own parameter row ``p[j]`` ([N, P]) -> [N, P].

        The batched forward (vmap over parameter rows and inputs) gives every sample its own
        parameter copy, so one ordinary backward of the summed outputs yields each sample's
        own gradient: per-example gradients without ``torch.func.grad``, whose first call
        imports torch._dynamo (1.5 s) and whose per-call overhead is twice as high."""
        with torch.enable_grad():
            leaf = p.detach().requires_grad_(True)
            out = vmap(lambda row, *a: f(self.unflat(row), *a))(leaf, *args)
            if post is not None:
                out = post(out)
            (g,) = torch.autograd.grad(out.sum(), [leaf], materialize_grads=True)
        return g

    def _logit(self, p: dict[str, torch.Tensor], x1: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.gather(self._out(p, x1).reshape(-1), 0, c.reshape(1))[0]

    def test_grads(
        self, p: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """∇_θ f(x_b; θ) for every test point b: {name: [B, *shape]}."""
        row = self.flat(p)
        return self.unflat(self._per_sample(row.expand(len(x), -1), self._logit, (x, target)))

    def test_grads_at(self, p: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """∇_θ f(x_b; θ_k) at K flat parameter points ``p`` [K, P] at once -> [K, B, P]: one
        batched call instead of K, since the per-call overhead dominates on small models."""
        k, b = p.shape[0], len(x)
        rows = p.unsqueeze(1).expand(k, b, p.shape[1]).reshape(k * b, p.shape[1])
        xk = x.repeat(k, *([1] * (x.dim() - 1)))
        return self._per_sample(rows, self._logit, (xk, target.repeat(k))).reshape(k, b, -1)

    def train_grads(
        self, p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
    ) -> dict[str, torch.Tensor]:
        """∇_θ ℓ(z_i; θ) for every training example i: {name: [m, *shape]}. The loss is
        applied per example outside vmap (its own call on (output_i, y_i), as in training on a
        batch of one): under vmap torch's losses run as Python decompositions, slower and
        importing sympy on first use."""

        def post(out: torch.Tensor) -> torch.Tensor:
            return torch.stack([loss_fn(out[i], y[i : i + 1]) for i in range(len(y))])

        rows = self.flat(p).expand(len(x), -1)
        return self.unflat(self._per_sample(rows, self._out, (x,), post))


def pair_scores(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], coef: dict[str, float] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_n coef_n ⟨a_n[i], b_n[j]⟩ -> [I, J] float64, and each tensor's [I] row sums."""
    total: torch.Tensor | None = None
    per: dict[str, torch.Tensor] = {}
    for n, an in a.items():
        bn = b[n]
        s = an.reshape(len(an), -1) @ bn.reshape(len(bn), -1).to(an.dtype).T
        s = s.double() * (coef[n] if coef is not None else 1.0)
        per[n] = s.sum(1)
        total = s if total is None else total + s
    assert total is not None
    return total, per


def dots(a: dict[str, torch.Tensor], v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """⟨a_n[b], v_n⟩ per tensor -> {name: [B] float64}."""
    return {
        n: (an.reshape(len(an), -1).double() @ v[n].reshape(-1).double()) for n, an in a.items()
    }


def total(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(d.values())).sum(0)


# -- the running state -------------------------------------------------------------------------
@dataclass
class PathState:
    """Running sums of the steps [start, stop). ``examples`` is [B, num_train] (the only
    train-sized array; never train × params); per-step rows are kept as block segments."""

    start: int
    stop: int
    examples: torch.Tensor
    params: torch.Tensor  # [B, num_tensors] float64
    terms: dict[str, torch.Tensor]  # name -> [B] float64
    steps: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (start, [B, S])
    nodes: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (start, [S])
    fn: Functional | None = None  # private model copy (not shipped back)
    carry: dict[str, Any] = field(default_factory=dict)  # within-range carry-over


_STORES: dict[str, HistoryStore] = {}


def store_at(path: str) -> HistoryStore:
    """The store opened once per process (workers read one row of state at a range start)."""
    st = _STORES.get(path)
    if st is None:
        st = _STORES[path] = open_store(path)
    return st


class PathMethod(AttributionMethod):
    """Base of the methods that walk θ_t along the recorded path (see the module docstring).

    ``top_k``: training examples kept per test point; ``keep_scores``: also return the full
    rows ``example_scores`` [B, num_train] (streamed to zarr by ``scores_path=``). ``target``:
    which output is explained: "pred" (the final model's arg-max class) or an output index.
    ``allow_lossy``: accept tensors stored with a lossy encoding (θ_t then approximate; the
    result's attrs say so) where the method would otherwise refuse them.
    """

    needs_params = True  # the engine scans keyframe-aligned ranges with scan(params=True)
    exact = False  # whether lossy θ_t are refused by default

    def __init__(
        self,
        top_k: int = 10,
        keep_scores: bool = False,
        target: str | int = "pred",
        train_batch_size: int = 256,
        allow_lossy: bool = False,
    ) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if target != "pred" and not (isinstance(target, int) and target >= 0):
            raise ValueError(f"target must be 'pred' or an output index >= 0, got {target!r}")
        if train_batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {train_batch_size}")
        self.top_k = int(top_k)
        self.keep_scores = keep_scores
        self.target = target
        self.train_batch_size = int(train_batch_size)
        self.allow_lossy = allow_lossy
        self._bound = False
        self.lossy: list[str] = []
        self.rule: UpdateRule | None = None

    # -- binding to a store (the engine calls this once) -------------------------------------
    def bind(
        self,
        store: HistoryStore,
        model: nn.Module,
        train_data: Any,
        loss_fn: LossFn | None,
        index: StoreIndex,
    ) -> None:
        """Check the store and data, keep what every step range needs."""
        self.names = list(store.tensor_names)
        for n in self.names:
            enc = store.encodings[n]
            if "dense" not in enc.capabilities:
                raise EncodingError(
                    f"{self.name}: tensor {n!r} is stored with encoding {enc.name!r}, which "
                    "cannot give dense deltas, so θ_t along the path cannot be rebuilt"
                )
            if not enc.lossless:
                if self.exact and not self.allow_lossy:
                    raise EncodingError(
                        f"{self.name}: tensor {n!r} is stored with the lossy encoding "
                        f"{enc.name!r}, so θ_t is approximate and the decomposition would not "
                        "be exact; pass method_options={'allow_lossy': True} to accept (the "
                        "result then reports it)"
                    )
                self.lossy.append(n)
        self.data = TrainData(train_data, index.num_train)
        self.loss_fn: LossFn = loss_fn or nn.functional.cross_entropy
        self.model = model
        self.store_path = store.path
        self.theta0 = store.params_at(0, self.names)
        self.rule = read_rule(store, self.names, self.name) if self.uses_rule() else None
        self._bind(store)
        self._bound = True

    def uses_rule(self) -> bool:
        return True

    def _bind(self, store: HistoryStore) -> None:
        """Method-specific checks on the store."""

    def needs_optim(self) -> bool:
        return False

    def tensor_names(self, ctx: ExplainContext) -> list[str]:
        return list(self.names)

    def scan_options(self, ctx: ExplainContext) -> dict[str, bool]:
        return {"params": True, "optim": self.needs_optim()}

    # -- per test batch ----------------------------------------------------------------------
    def prepare(self, ctx: ExplainContext) -> None:
        if not self._bound:
            raise RuntimeError(f"{self.name}: run through Engine/explain (train_data= needed)")
        x = ctx.extra["test_x"]
        fn = Functional(self.model, self.names, ctx.device)
        x = x.to(ctx.device, fn.dtype) if x.is_floating_point() else x.to(ctx.device)
        final = {n: p.detach() for n, p in fn.model.named_parameters() if n in set(self.names)}
        out_t = fn.output(final, x).reshape(len(x), -1)
        if self.target == "pred":
            target = out_t.argmax(1)
        else:
            if self.target >= out_t.shape[1]:
                raise ValueError(f"target {self.target} >= the model's {out_t.shape[1]} outputs")
            target = torch.full((len(x),), int(self.target), device=ctx.device)
        theta0 = {n: v.to(ctx.device) for n, v in self.theta0.items()}
        out_0 = fn.output(theta0, x).reshape(len(x), -1)
        rows = torch.arange(len(x), device=ctx.device)
        ctx.extra["path"] = {
            "x": x,
            "target": target,
            "f_final": out_t[rows, target].double(),
            "f_init": out_0[rows, target].double(),
        }

    # -- per step range ----------------------------------------------------------------------
    term_names: tuple[str, ...] = ()

    def begin(self, ctx: ExplainContext, start: int, stop: int) -> PathState:
        b, dev, f64 = ctx.batch_size, ctx.device, torch.float64
        return PathState(
            start,
            stop,
            examples=torch.zeros(b, ctx.index.num_train, dtype=f64, device=dev),
            params=torch.zeros(b, len(self.names), dtype=f64, device=dev),
            terms={k: torch.zeros(b, dtype=f64, device=dev) for k in self.term_names},
            fn=Functional(self.model, self.names, dev),
        )

    def merge(self, a: PathState, b: PathState) -> PathState:
        a.examples += b.examples.to(a.examples.device)
        a.params += b.params.to(a.params.device)
        for k, v in a.terms.items():
            v += b.terms[k].to(v.device)
        a.steps.extend(b.steps)
        a.nodes.extend(b.nodes)
        return PathState(min(a.start, b.start), max(a.stop, b.stop), a.examples, a.params,
                         a.terms, a.steps, a.nodes)  # fmt: skip

    def state_to(self, state: PathState, device: str | torch.device) -> PathState:
        dev = torch.device(device)
        return PathState(
            state.start,
            state.stop,
            state.examples.to(dev),
            state.params.to(dev),
            {k: v.to(dev) for k, v in state.terms.items()},
            [(s, g.to(dev)) for s, g in state.steps],
            list(state.nodes),
        )

    def _batch(
        self, block: StepBlock, i: int, dev: torch.device, dtype: torch.dtype
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """The recorded ids of step block.start+i and their (x, y) on ``dev``."""
        a, b = int(block.offsets[i]), int(block.offsets[i + 1])
        ids = block.ids[a:b]
        x, y = self.data.fetch(ids, block.labels[a:b], block.start + i)
        x = x.to(dev, dtype) if x.is_floating_point() else x.to(dev)
        return ids, x, y.to(dev)

    def _finalize_common(
        self, state: PathState, ctx: ExplainContext, every_id: bool = False
    ) -> dict[str, np.ndarray]:
        """Arrays every path method returns; top-k among the ids that occur in the run (every
        id below num_train with ``every_id``)."""
        seen = torch.from_numpy(ctx.index.seen).to(ctx.device)
        if every_id:
            seen = torch.ones_like(seen)
        ex = state.examples.to(ctx.device)
        top_ids, top_sc = topk(ex, seen, self.top_k, largest=True)
        bot_ids, bot_sc = topk(ex, seen, self.top_k, largest=False)
        p = ctx.extra["path"]
        out = {
            "topk_ids": top_ids,
            "topk_scores": top_sc,
            "bottomk_ids": bot_ids,
            "bottomk_scores": bot_sc,
            "step_scores": assemble(state.steps, ctx.batch_size, ctx.index.num_steps, np.float64),
            "param_scores": state.params.cpu().numpy(),
            "target": p["target"].cpu().numpy(),
            "f_final": p["f_final"].cpu().numpy(),
            "f_init": p["f_init"].cpu().numpy(),
        }
        if self.keep_scores:
            out["example_scores"] = ex.float().cpu().numpy()
        return out

    def attrs(self) -> dict[str, Any]:
        return {
            "top_k": self.top_k,
            "target": self.target,
            "tensors": list(getattr(self, "names", [])),
            "lossy_tensors": list(self.lossy),
            "optimizer": self.rule.kind if getattr(self, "rule", None) is not None else None,
        }
