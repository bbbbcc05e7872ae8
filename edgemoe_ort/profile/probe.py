"""Fitting the probes of a graph's prediction sites (:mod:`edgemoe_ort.bundle.probe`: the ``ResidualPrefetch``
scores and the rows of the stacked gates) on the train split, and scoring them on the held-out one.

The fit of a site is ridge regression from its features ``x`` (``[N, H]``) to the target layer's own router
logits ``z`` (``[N, E]``): ``[W; b] = (X1ᵀX1 + λ·N·I)⁻¹ X1ᵀZ`` with ``X1 = [x, 1]`` and ``λ`` = :data:`RIDGE`.
Only the sums are kept while the corpus runs (float64): ``X1ᵀX1`` once per features tensor (the rows of one
node's stacked gates share it) and ``X1ᵀZ`` per site, so the memory does not grow with the tokens; a graph
whose sums would pass :data:`MAX_FIT_BYTES` is not fitted (the note says so). No torch.
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
    "next_layer_sites",
    "softmax",
]

#: ridge strength per train token (the fit is insensitive to it over 1e-7..1e-3 on the default model)
RIDGE = 1e-4
#: the most memory the fit's sums may take, all sites together
MAX_FIT_BYTES = 1 << 30

Key = tuple[str, int, int]


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax (float64)."""
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _rows(a: np.ndarray, width: int) -> np.ndarray:
    return np.asarray(a, np.float64).reshape(-1, width)


def _with_ones(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((x.shape[0], 1))])


@dataclass
class ProbeFitter:
    """The running sums of every site's fit (module docstring). Feed it the recorder's outputs with
    :meth:`add` (``RoutingRecorder.record(on_outputs=fitter.add)``), then :meth:`fit`."""

    sites: Sequence[ProbeSite]
    ridge: float = RIDGE
    note: str | None = None  #: why nothing is fitted (the sums would be too large), or None
    tokens: int = 0  #: rows seen
    _gram: dict[str, np.ndarray] = field(default_factory=dict)
    _cross: dict[Key, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        hidden = {s.features: s.hidden for s in self.sites}
        need = sum(8 * (h + 1) ** 2 for h in hidden.values())
        need += sum(8 * (s.hidden + 1) * s.num_experts for s in self.sites)
        if need > MAX_FIT_BYTES:
            cap = MAX_FIT_BYTES >> 20
            self.note = f"probes not fitted: their sums would take {need >> 20} MiB (at most {cap} MiB)"
            self.sites = []
            return
        for name, h in hidden.items():
            self._gram[name] = np.zeros((h + 1, h + 1), np.float64)
        for s in self.sites:
            self._cross[s.key] = np.zeros((s.hidden + 1, s.num_experts), np.float64)

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        """Add one pass's rows (``outputs``: graph outputs by name, the sites' features and targets too)."""
        x1: dict[str, np.ndarray] = {}
        for s in self.sites:
            if s.features not in x1:
                x1[s.features] = _with_ones(_rows(outputs[s.features], s.hidden))
                self._gram[s.features] += x1[s.features].T @ x1[s.features]
            z = _rows(outputs[s.target], s.num_experts)
            n = x1[s.features].shape[0]
            if n != z.shape[0]:
                raise ValueError(
                    f"probe {s.kind} node {s.node} -> layer {s.layer}: {n} feature rows but {z.shape[0]} "
                    "router rows"
                )
            self._cross[s.key] += x1[s.features].T @ z
        if x1:
            self.tokens += next(iter(x1.values())).shape[0]

    def fit(self) -> dict[Key, Probe]:
        """The probe of every site (by key); empty before any row or when :attr:`note` says why."""
        if not self.tokens:
            return {}
        out = {}
        solved: dict[str, np.ndarray] = {}
        for s in self.sites:
            if s.features not in solved:
                g = self._gram[s.features]
                solved[s.features] = g + self.ridge * self.tokens * np.eye(g.shape[0])
            wb = np.linalg.solve(solved[s.features], self._cross[s.key])
            out[s.key] = Probe(*s.key, wb[:-1].astype(np.float32), wb[-1].astype(np.float32))
        return out


@dataclass
class ProbeScores:
    """The held-out logits of every site: its fitted probe's and its router's, gathered per pass
    (``RoutingRecorder.record(on_outputs=scores.add)``)."""

    sites: Sequence[ProbeSite]
    probes: dict[Key, Probe]
    _probe: dict[Key, list[np.ndarray]] = field(default_factory=dict)
    _router: dict[Key, list[np.ndarray]] = field(default_factory=dict)

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        """Score one pass's rows."""
        for s in self.sites:
            if s.key not in self.probes:
                continue
            x = _rows(outputs[s.features], s.hidden)
            self._probe.setdefault(s.key, []).append(self.probes[s.key].logits(x))
            if s.router is not None:
                self._router.setdefault(s.key, []).append(s.router.logits(x))

    def probe(self, key: Key) -> np.ndarray | None:
        """``[N, E]``: the fitted probe's logits at site ``key`` over the rows seen, or None."""
        parts = self._probe.get(key)
        return np.concatenate(parts) if parts else None

    def router(self, key: Key) -> np.ndarray | None:
        """``[N, E]``: the router's own logits on the same features (the unfitted baseline), or None."""
        parts = self._router.get(key)
        return np.concatenate(parts) if parts else None


def probe_section(
    fitter: ProbeFitter, scores: ProbeScores, heldout: Routing, layers: Sequence[dict[str, Any]]
) -> dict[str, Any] | None:
    """The profile's ``probes`` entry (docs/bundle-format.md), or None when the graph has no site.

    Also makes the held-out signals of every fitted site the probe's (the ``residual`` scores, the rows of
    the stacked gates), so the profile's recall and ``auto`` measure what the installed graph computes."""
    if not fitter.sites and fitter.note is None:
        return None
    entries = []
    for s in fitter.sites:
        p, r = scores.probe(s.key), scores.router(s.key)
        probe = scores.probes.get(s.key)
        if p is None or probe is None:
            continue
        lay = layers[s.layer]
        actual = expert_mask(heldout.layers[s.layer].indices, int(lay["num_experts"]))
        K = int(lay["top_k"])
        if s.kind == "residual":
            heldout.layers[s.layer].residual = softmax(p).astype(np.float32)
        else:
            nxt = heldout.layers[s.node].next_logits
            if nxt is not None and nxt.shape[1] > s.layer - s.node - 1:
                nxt[:, s.layer - s.node - 1, :] = p.astype(np.float32)
        entries.append(
            {
                "kind": s.kind,
                "node": s.node,
                "layer": s.layer,
                "hidden": s.hidden,
                "num_experts": s.num_experts,
                "weight": encode_f32(probe.weight),
                "bias": encode_f32(probe.bias),
                "recall_router": None if r is None else round(recall_at_k(r, actual, K)[1], 6),
                "recall_probe": round(recall_at_k(p, actual, K)[1], 6),
            }
        )
    doc: dict[str, Any] = {"ridge": fitter.ridge, "train_tokens": int(fitter.tokens), "sites": entries}
    if fitter.note is not None:
        doc["note"] = fitter.note
    return doc


def probe_summary(doc: dict[str, Any]) -> dict[str, Any] | None:
    """A profile's ``probes`` entry without its weights (None without one)."""
    rp = doc.get("probes")
    if rp is None:
        return None
    keep = ("kind", "node", "layer", "hidden", "num_experts", "recall_router", "recall_probe")
    sites = [{k: e[k] for k in keep} for e in rp["sites"]]
    return {**{k: v for k, v in rp.items() if k != "sites"}, "sites": sites}


def next_layer_sites(summary: dict[str, Any] | None, kind: str) -> list[dict[str, Any]]:
    """The sites of ``kind`` in a :func:`probe_summary` that predict the layer right after their node's input
    (every ``residual`` site; the first row of each node's stacked gates)."""
    sites = (summary or {}).get("sites", [])
    return [e for e in sites if e["kind"] == kind and e["layer"] == e["node"] + (kind == "gates")]
