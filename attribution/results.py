"""The result of an explanation: plain numpy arrays per layer, saved without pickle.

Arrays are keyed by layer (module path) and field; what the fields mean is the method's
business (see :mod:`attribution.methods.preactivation`). Every per-test-point
array has a leading axis over the explained test points. A result saves to ``.npz`` (one file,
``np.load(allow_pickle=False)``) or to a zarr v3 group (any other path), so it can be read back
by tools that never import this library.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

FORMAT = "historystore-attribution"
FORMAT_VERSION = 1
_ATTRS_KEY = "__attrs__"


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, set)):
        return list(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


@dataclass
class AttributionResult:
    """Per-layer arrays of one explanation, plus test-point independent arrays and settings.

    ``layers[layer][field]``: e.g. for the preactivation method ``gamma`` [N, T], ``cosine``,
    ``norm``, ``topk_ids``/``topk_scores`` [N, k] (by γ; ``cosine_topk_*`` by the cosine, and
    ``bottomk_*`` the lowest), ``class_kde`` [N, C, G], ``class_weight`` [N, C],
    ``init``/``total``/``preactivation`` [N, D]. ``arrays``: e.g. ``grid`` [G] and the
    model's ``outputs`` [N, ...]. ``attrs``: JSON-able settings and facts about the run.
    """

    method: str
    layers: dict[str, dict[str, np.ndarray]]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    # -- access ------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def num_points(self) -> int:
        for arrays in self.layers.values():
            for a in arrays.values():
                return int(a.shape[0])
        return 0

    def __getitem__(self, layer: str) -> dict[str, np.ndarray]:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(
                f"no layer {layer!r} in this result; layers: {self.layer_names}"
            ) from None

    def topk(self, layer: str, score: str = "gamma") -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) [N, k] of the most influential training examples, highest first, by
        the per-example ``score`` ("gamma" or "cosine")."""
        return self._ranked(layer, score, "topk")

    def bottomk(self, layer: str, score: str = "gamma") -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) [N, k] of the most opposing training examples, lowest first."""
        return self._ranked(layer, score, "bottomk")

    def _ranked(self, layer: str, score: str, end: str) -> tuple[np.ndarray, np.ndarray]:
        d = self[layer]
        pre = "" if score == "gamma" else f"{score}_"
        if f"{pre}{end}_ids" not in d:
            have = sorted(
                {
                    k.removesuffix(f"{end}_ids").rstrip("_") or "gamma"
                    for k in d
                    if k.endswith(f"{end}_ids")
                }
            )
            raise KeyError(
                f"layer {layer!r} has no per-example {score!r} scores; this result has {have} "
                "(the preactivation method's scores= option chooses them)"
            )
        return d[f"{pre}{end}_ids"], d[f"{pre}{end}_scores"]

    def ridge(self, layer: str, normalize: bool = True) -> np.ndarray:
        """Per-class KDE of the step cosines [N, C, G]; ``normalize`` makes each class's curve
        a density over γ̄ (classes without steps stay zero)."""
        d = self[layer]
        kde = d["class_kde"].astype(np.float64)
        if not normalize:
            return kde
        h = float(self.attrs.get("bandwidth", 0.1))
        w = d["class_weight"][..., None] * h * math.sqrt(2 * math.pi)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(w > 0, kde / w, 0.0)

    def decomposition_error(self, layer: str) -> np.ndarray:
        """‖init + Σ_t c_t − z‖ / ‖z‖ per test point: how well the history explains z."""
        d = self[layer]
        diff = np.linalg.norm(d["total"] - d["preactivation"].astype(np.float64), axis=1)
        ref = np.linalg.norm(d["preactivation"].astype(np.float64), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ref > 0, diff / ref, diff)

    def __repr__(self) -> str:
        return (
            f"AttributionResult(method={self.method!r}, points={self.num_points}, "
            f"layers={self.layer_names}, steps={self.attrs.get('num_steps')})"
        )

    # -- persistence -------------------------------------------------------------------------
    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "method": self.method,
            "layers": self.layer_names,
            "attrs": self.attrs,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``*.npz`` (a single file) or, for any other path, a zarr v3 group."""
        p = Path(path)
        header = json.dumps(self._header(), default=_json_default)
        if p.suffix == ".npz":
            flat: dict[str, np.ndarray] = {_ATTRS_KEY: np.array(header)}
            for k, v in self.arrays.items():
                flat[f"global/{k}"] = np.asarray(v)
            for layer, arrays in self.layers.items():
                for k, v in arrays.items():
                    flat[f"layer/{layer}/{k}"] = np.asarray(v)
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "wb") as f:
                np.savez(f, **flat)  # type: ignore[arg-type]
            return p
        g = zarr.open_group(str(p), mode="w", zarr_format=3)
        g.attrs[FORMAT] = json.loads(header)
        for k, v in self.arrays.items():
            g.create_array(f"global/{k}", data=np.ascontiguousarray(v))
        for layer, arrays in self.layers.items():
            for k, v in arrays.items():
                g.create_array(f"layers/{layer}/{k}", data=np.ascontiguousarray(v))
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AttributionResult:
        """Read a result written by :meth:`save` (never unpickles anything)."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if p.is_file():
            with np.load(p, allow_pickle=False) as z:
                if _ATTRS_KEY not in z.files:
                    raise ValueError(f"{p} is not an attribution result (no {_ATTRS_KEY!r})")
                header = _check_header(json.loads(str(z[_ATTRS_KEY])), p)
                arrays: dict[str, np.ndarray] = {}
                layers: dict[str, dict[str, np.ndarray]] = {n: {} for n in header["layers"]}
                for key in z.files:
                    if key.startswith("global/"):
                        arrays[key[len("global/") :]] = z[key]
                    elif key.startswith("layer/"):
                        layer, _, name = key[len("layer/") :].rpartition("/")
                        layers.setdefault(layer, {})[name] = z[key]
        else:
            g = zarr.open_group(str(p), mode="r", zarr_format=3)
            header = _check_header(g.attrs.asdict().get(FORMAT), p)
            arrays = {}
            if "global" in g:
                gg = g["global"]
                assert isinstance(gg, zarr.Group)
                arrays = {k: np.asarray(a[...]) for k, a in gg.arrays()}
            layers = {}
            for layer in header["layers"]:
                lg = g[f"layers/{layer}"]
                assert isinstance(lg, zarr.Group)
                layers[layer] = {k: np.asarray(a[...]) for k, a in lg.arrays()}
        return cls(header["method"], layers, arrays, dict(header["attrs"]))


def _check_header(h: Any, p: Path) -> dict[str, Any]:
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise ValueError(f"{p} is not a historystore attribution result")
    if int(h.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{p} was written by a newer version (format {h['version']} > {FORMAT_VERSION})"
        )
    return h


def concat_layers(
    parts: list[dict[str, dict[str, np.ndarray]]],
) -> dict[str, dict[str, np.ndarray]]:
    """Concatenate per-test-batch layer arrays along the test-point axis."""
    if not parts:
        return {}
    return {
        layer: {k: np.concatenate([p[layer][k] for p in parts]) for k in parts[0][layer]}
        for layer in parts[0]
    }
