"""Fitting the residual probe of each ``ResidualPrefetch`` node (:mod:`edgemoe_ort.bundle.probe`) on the train
split, and scoring it on the held-out one.

The fit is ridge regression from the node's features ``x`` (``[N, H]``, the normalized residual stream before
the layer's attention) to the layer's own router logits ``z`` (``[N, E]``, after it):
``[W; b] = (X1ᵀX1 + λ·N·I)⁻¹ X1ᵀZ`` with ``X1 = [x, 1]`` and ``λ`` = :data:`RIDGE`. Only the sums ``X1ᵀX1``
and ``X1ᵀZ`` are kept while the corpus runs (float64, ``(H+1)²`` + ``(H+1)·E`` numbers a layer), so the
memory does not grow with the tokens; a graph whose sums would pass :data:`MAX_FIT_BYTES` is not fitted (the
note says so). Imports neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgemoe_ort.bundle.probe import Probe, ProbeSite
from edgemoe_ort.bundle.profile import encode_f32

from .recall import recall_at_k
from .routing import Routing
from .tables import expert_mask

__all__ = [
    "RIDGE",
    "MAX_FIT_BYTES",
    "ProbeFitter",
    "ProbeScores",
    "probe_section",
    "probe_summary",
    "softmax",
]

#: ridge strength per train token (the fit is insensitive to it over 1e-7..1e-3 on the default model)
RIDGE = 1e-4
#: the most memory the fit's sums may take, all layers together
MAX_FIT_BYTES = 1 << 30


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax (float64)."""
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _rows(a: np.ndarray, width: int) -> np.ndarray:
    return np.asarray(a, np.float64).reshape(-1, width)


@dataclass
class ProbeFitter:
    """The running sums of every site's fit (see the module docstring). Feed it the recorder's outputs with
    :meth:`add` (``RoutingRecorder.record(on_outputs=fitter.add)``), then :meth:`fit`."""

    sites: Sequence[ProbeSite]
    ridge: float = RIDGE
    note: str | None = None  #: why nothing is fitted (the sums would be too large), or None
    tokens: int = 0  #: rows seen by the first site
    _gram: dict[int, np.ndarray] = field(default_factory=dict)
    _cross: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        need = sum(8 * (s.hidden + 1) * (s.hidden + 1 + s.num_experts) for s in self.sites)
        if need > MAX_FIT_BYTES:
            self.note = (
                f"residual probe not fitted: its sums would take {need >> 20} MiB "
                f"(at most {MAX_FIT_BYTES >> 20} MiB)"
            )
            self.sites = []
        for s in self.sites:
            self._gram[s.layer] = np.zeros((s.hidden + 1, s.hidden + 1), np.float64)
            self._cross[s.layer] = np.zeros((s.hidden + 1, s.num_experts), np.float64)

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        """Add one pass's rows (``outputs``: graph outputs by name, the sites' features and targets too)."""
        for n, s in enumerate(self.sites):
            x = _rows(outputs[s.features], s.hidden)
            z = _rows(outputs[s.target], s.num_experts)
            if x.shape[0] != z.shape[0]:
                raise ValueError(
                    f"residual probe layer {s.layer}: {x.shape[0]} feature rows but {z.shape[0]} router rows"
                )
            x1 = np.hstack([x, np.ones((x.shape[0], 1))])
            self._gram[s.layer] += x1.T @ x1
            self._cross[s.layer] += x1.T @ z
            if n == 0:
                self.tokens += x.shape[0]

    def fit(self) -> dict[int, Probe]:
        """The probe of every site (by layer); empty before any row or when :attr:`note` says why."""
        if not self.tokens:
            return {}
        out = {}
        for s in self.sites:
            g = self._gram[s.layer]
            a = g + self.ridge * self.tokens * np.eye(g.shape[0])
            wb = np.linalg.solve(a, self._cross[s.layer])
            out[s.layer] = Probe(s.layer, wb[:-1].astype(np.float32), wb[-1].astype(np.float32))
        return out


@dataclass
class ProbeScores:
    """The held-out distributions of every site: its fitted probe's and its router's, gathered per pass
    (``RoutingRecorder.record(on_outputs=scores.add)``)."""

    sites: Sequence[ProbeSite]
    probes: dict[int, Probe]
    _probe: dict[int, list[np.ndarray]] = field(default_factory=dict)
    _router: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        """Score one pass's rows."""
        for s in self.sites:
            if s.layer not in self.probes:
                continue
            x = _rows(outputs[s.features], s.hidden)
            self._probe.setdefault(s.layer, []).append(softmax(self.probes[s.layer].logits(x)))
            if s.router is not None:
                self._router.setdefault(s.layer, []).append(softmax(s.router.logits(x)))

    def probe(self, layer: int) -> np.ndarray | None:
        """``[N, E]``: the fitted probe's distribution at ``layer`` over the rows seen, or None."""
        parts = self._probe.get(layer)
        return np.concatenate(parts) if parts else None

    def router(self, layer: int) -> np.ndarray | None:
        """``[N, E]``: the router's own distribution on the same features (the unfitted baseline), or None."""
        parts = self._router.get(layer)
        return np.concatenate(parts) if parts else None


def probe_section(
    fitter: ProbeFitter, scores: ProbeScores, heldout: Routing, layers: Sequence[dict[str, Any]]
) -> dict[str, Any] | None:
    """The profile's ``residual_probe`` entry (docs/bundle-format.md), or None when the graph has no site.

    Also makes the held-out ``residual`` distribution of every fitted layer the probe's, so the profile's
    recall and ``auto`` measure what the installed graph computes."""
    if not fitter.sites and fitter.note is None:
        return None
    entries = []
    for s in fitter.sites:
        p, r = scores.probe(s.layer), scores.router(s.layer)
        probe = scores.probes.get(s.layer)
        if p is None or probe is None:
            continue
        lay = layers[s.layer]
        actual = expert_mask(heldout.layers[s.layer].indices, int(lay["num_experts"]))
        K = int(lay["top_k"])
        heldout.layers[s.layer].residual = p.astype(np.float32)
        entries.append(
            {
                "layer": s.layer,
                "hidden": s.hidden,
                "num_experts": s.num_experts,
                "weight": encode_f32(probe.weight),
                "bias": encode_f32(probe.bias),
                "recall_router": None if r is None else round(recall_at_k(r, actual, K)[1], 6),
                "recall_probe": round(recall_at_k(p, actual, K)[1], 6),
            }
        )
    doc: dict[str, Any] = {"ridge": fitter.ridge, "train_tokens": int(fitter.tokens), "layers": entries}
    if fitter.note is not None:
        doc["note"] = fitter.note
    return doc


def probe_summary(doc: dict[str, Any]) -> dict[str, Any] | None:
    """A profile's ``residual_probe`` entry without its weights (None without one)."""
    rp = doc.get("residual_probe")
    if rp is None:
        return None
    keep = ("layer", "hidden", "num_experts", "recall_router", "recall_probe")
    layers = [{k: e[k] for k in keep} for e in rp["layers"]]
    return {**{k: v for k, v in rp.items() if k != "layers"}, "layers": layers}
