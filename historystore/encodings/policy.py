"""Which encoding each tensor gets: an ordered list of rules, first match wins.

A rule matches by parameter-name pattern (fnmatch), by module type, and by size; the encoding
it names may still fall back (per-example factors need nn.Linear under plain SGD; a factored
or sketched form that would store at least as many bytes per step as the dense delta, e.g.
factors with max_rows·(in+out) >= in·out, SVD with rank·(m+n) >= m·n or a sketch with
k >= numel, is replaced by "full", which is then smaller and lossless), and the reason is
recorded per tensor so that ``historystore info`` shows why.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tensors import dtype_name, torch_dtype
from .base import encoding_class


@dataclass(frozen=True)
class EncodingRule:
    """Use ``encoding`` (with ``params``) for tensors matching all the given criteria.

    ``encoding`` is a registered name (full, rounded, factors, svd, projected) or ``lowrank``:
    per-example factors where exact (nn.Linear weight under plain SGD), else SVD of ``rank``.
    ``params["force"] = True`` keeps the encoding even where it would store more bytes per step
    than ``full`` (e.g. factors of a small Linear layer, for the exact per-example split of
    attribution); tensors where factors cannot be exact still fall back, with the reason.
    """

    encoding: str
    params: dict[str, Any] = field(default_factory=dict)
    pattern: str = "*"
    module_types: tuple[str, ...] = ()
    min_numel: int = 0

    def __post_init__(self) -> None:
        if self.encoding != "lowrank":
            encoding_class(self.encoding)  # raises for unknown names
        if self.min_numel < 0:
            raise ValueError("min_numel must be >= 0")

    def matches(self, name: str, numel: int, module: torch.nn.Module | None) -> bool:
        if not fnmatch.fnmatchcase(name, self.pattern) or numel < self.min_numel:
            return False
        return not self.module_types or (
            module is not None and type(module).__name__ in self.module_types
        )


def _plain_sgd(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    if type(optimizer) is not torch.optim.SGD:
        return False
    for g in optimizer.param_groups:
        if any(p is param for p in g["params"]):
            return (
                g.get("momentum", 0) == 0
                and g.get("weight_decay", 0) == 0
                and not g.get("maximize", False)
            )
    return False


def _why_not_factors(
    name: str, module: torch.nn.Module | None, optimizer: torch.optim.Optimizer, param: torch.Tensor
) -> str:
    """Why exact per-example factors cannot encode this tensor ("" when they can)."""
    if not isinstance(module, torch.nn.Linear):
        kind = type(module).__name__ if module is not None else "no module"
        return f"factors need an nn.Linear weight, and {name!r} belongs to {kind}"
    if not name.endswith("weight") or param.dim() != 2:
        return f"factors need an nn.Linear weight, and {name!r} is not one (a bias has no factors)"
    if not _plain_sgd(optimizer, param):
        return (
            f"factors need plain SGD (no momentum, weight decay or maximize), and "
            f"{name!r} is trained by {type(optimizer).__name__} with other settings"
            if type(optimizer) is torch.optim.SGD
            else f"factors need plain SGD, and {name!r} is trained by {type(optimizer).__name__}"
        )
    return ""


def resolve(
    rules: tuple[EncodingRule, ...],
    name: str,
    param: torch.Tensor,
    module: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
) -> tuple[str, dict[str, Any], str]:
    """(encoding name, params, reason) for one parameter tensor."""
    numel = math.prod(param.shape)
    for i, rule in enumerate(rules):
        if not rule.matches(name, numel, module):
            continue
        why = f"rule {i} ({rule.encoding}, pattern {rule.pattern!r})"
        enc, params = rule.encoding, dict(rule.params)
        force = bool(params.pop("force", False))
        if enc in ("lowrank", "factors"):
            not_exact = _why_not_factors(name, module, optimizer, param)
            if not not_exact and "max_rows" in params:
                fparams = {"max_rows": params["max_rows"], "tensor": name}
                if "tolerance" in params:
                    fparams["tolerance"] = params["tolerance"]
                why = f"{why}: exact per-example factors"
                if force:
                    return "factors", fparams, f"{why} (forced, even if larger than full)"
                return _unless_bigger("factors", fparams, why, param)
            reason = not_exact or "factors need params max_rows"
            force = False  # ``force`` asks for exact factors, not for the SVD fallback
            enc = "svd"
            params = {"rank": params.get("rank", 8)}
            why = f"{why}: {reason}, using SVD rank {params['rank']}"
        if enc == "svd" and param.dim() < 2:
            return "full", {}, f"{why}: 1-D tensor cannot be low-rank, kept full"
        if enc == "projected":
            params = {"tensor": name, **params}
        if force:
            return enc, params, f"{why} (forced, even if larger than full)"
        return _unless_bigger(enc, params, why, param)
    return "full", {}, "default (lossless)"


def _unless_bigger(
    enc: str, params: dict[str, Any], why: str, param: torch.Tensor
) -> tuple[str, dict[str, Any], str]:
    """``full`` instead of a factored or sketched form that stores as many bytes or more.

    Dense encodings storing one array of the tensor's own shape (full, rounded) are kept:
    their gain, if any, comes from the codec, not from the array sizes."""
    shape = tuple(param.shape)
    encoding = encoding_class(enc)(shape, dtype_name(param.dtype), **params)
    specs = list(encoding.arrays().values())
    if "dense" in encoding.capabilities and len(specs) == 1 and specs[0].shape == shape:
        return enc, params, why
    size = sum(math.prod(s.shape) * torch_dtype(s.dtype).itemsize for s in specs)
    dense = math.prod(shape) * param.element_size()
    if size < dense:
        return enc, params, why
    return (
        "full",
        {},
        f"{why}; {enc} would store {size} bytes per step, not fewer than the dense "
        f"{dense}: kept full (lossless)",
    )
