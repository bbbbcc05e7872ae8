"""The tables of ``profile.json`` (docs/bundle-format.md, "profile.json") from the train split's routing.

Per manifest layer ``l``, from the experts ``E_l`` each train token chose there:

- ``frequency[e]``: top-k assignments of expert ``e``; ``coactivation[i][j]``: tokens choosing both.
- ``gate_weights``: histogram, per rank, of the normalized gate weight (``topk_weights`` / their sum).
- ``transitions.order1`` / ``order2``: ``P(e in E_l | E_{l-1})`` and ``P(e in E_l | E_{l-2}, E_{l-1})``.
- ``tokens``: ``P(e in E_l | token id)``.

``p = count(e selected | key) / count(key)``; a key is kept if seen ``>= min_count`` times, with at most
``top_m`` entries, ``p > 0``, sorted by ``p`` descending (ties: smaller expert first). ``p`` is stored with 6
significant digits; the held-out recall (:mod:`edgemoe_ort.profile.recall`) is measured on the stored values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .routing import LayerRouting, Routing

__all__ = [
    "DEFAULT_TOP_M",
    "DEFAULT_MIN_COUNT",
    "GATE_BINS",
    "expert_mask",
    "sorted_sets",
    "conditional_table",
    "build_layers",
]

DEFAULT_TOP_M = 16
DEFAULT_MIN_COUNT = 1
GATE_BINS = 20


def _p(x: float) -> float:
    return float(f"{x:.6g}")


def expert_mask(indices: np.ndarray, num_experts: int) -> np.ndarray:
    """bool ``[N, E]``: token ``n`` chose expert ``e`` (``-1`` and out-of-range entries are ignored)."""
    idx = np.asarray(indices, dtype=np.int64)
    mask = np.zeros((idx.shape[0], num_experts), dtype=bool)
    rows, cols = np.nonzero((idx >= 0) & (idx < num_experts))
    mask[rows, idx[rows, cols]] = True
    return mask


def sorted_sets(indices: np.ndarray) -> np.ndarray:
    """Each row's experts in ascending order (the key of a token's expert set; ``-1`` entries sort first)."""
    return np.sort(np.asarray(indices, dtype=np.int64), axis=1)


def conditional_table(
    keys: np.ndarray, mask: np.ndarray, *, min_count: int, top_m: int
) -> list[tuple[np.ndarray, list[list[float]]]]:
    """``P(e selected | key)`` for every key seen ``>= min_count`` times.

    ``keys``: int64 ``[N]`` or ``[N, D]`` (one key per token), ``mask``: bool ``[N, E]`` (what each token
    chose). Returns ``(key, next)`` in ascending key order, ``next = [[e, p], ...]`` as in the profile.
    """
    keys = np.asarray(keys, dtype=np.int64)
    n, num_experts = mask.shape
    if n == 0:
        return []
    if keys.ndim == 1:
        uniq, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    else:
        uniq, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    tok, exp = np.nonzero(mask)
    pair, pair_counts = np.unique(inv[tok] * num_experts + exp, return_counts=True)
    kid, e = pair // num_experts, pair % num_experts
    p = pair_counts / counts[kid]
    order = np.lexsort((e, -p, kid))  # by key, then p descending, then expert
    kid, e, p = kid[order], e[order], p[order]
    starts = np.searchsorted(kid, np.arange(len(uniq) + 1))
    out = []
    for k in np.nonzero(counts >= min_count)[0]:
        a, b = starts[k], min(starts[k + 1], starts[k] + top_m)
        entries = [[int(x), _p(float(y))] for x, y in zip(e[a:b], p[a:b], strict=True)]
        if entries:
            out.append((uniq[k], entries))
    return out


def _key_set(row: np.ndarray) -> list[int]:
    return sorted({int(x) for x in row if x >= 0})


def _gate_hist(weights: np.ndarray, top_k: int, bins: int) -> dict[str, Any]:
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum(axis=1, keepdims=True)
    norm = np.clip(np.divide(w, total, out=np.zeros_like(w), where=total > 0), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = [np.histogram(norm[:, r], bins=edges)[0].astype(int).tolist() for r in range(top_k)]
    return {"edges": [round(float(x), 12) for x in edges], "counts": counts}


def _transitions(
    prev: Sequence[np.ndarray], mask: np.ndarray, *, min_count: int, top_m: int
) -> list[dict[str, Any]]:
    """Entries ``{"prev": [[E_{l-d}], ..., [E_{l-1}]], "next": [...]}`` keyed by the sorted expert sets."""
    widths = [p.shape[1] for p in prev]
    keys = np.concatenate(list(prev), axis=1)
    out, seen = [], set()
    for key, entries in conditional_table(keys, mask, min_count=min_count, top_m=top_m):
        parts, at = [], 0
        for w in widths:
            parts.append(_key_set(key[at : at + w]))
            at += w
        ident = tuple(tuple(s) for s in parts)
        if any(not s for s in parts) or ident in seen:  # no expert (all -1), or a duplicate set
            continue
        seen.add(ident)
        out.append({"prev": parts, "next": entries})
    return out


def build_layers(
    routing: Routing,
    manifest_layers: Sequence[dict[str, Any]],
    *,
    top_m: int = DEFAULT_TOP_M,
    min_count: int = DEFAULT_MIN_COUNT,
    bins: int = GATE_BINS,
) -> list[dict[str, Any]]:
    """The ``layers`` list of a profile from the train split's ``routing`` (one entry per manifest layer)."""
    if top_m < 1 or min_count < 1:
        raise ValueError(f"top_m and min_count must be >= 1, found top_m {top_m}, min_count {min_count}")
    by_layer: dict[int, LayerRouting] = {r.layer: r for r in routing.layers}
    sets = {li: sorted_sets(r.indices) for li, r in by_layer.items()}
    out = []
    for li, lay in enumerate(manifest_layers):
        E, K = int(lay["num_experts"]), int(lay["top_k"])
        r = by_layer[li]
        mask = expert_mask(r.indices, E)
        valid = r.indices[(r.indices >= 0) & (r.indices < E)]
        co = mask.T.astype(np.int64) @ mask.astype(np.int64)
        np.fill_diagonal(co, 0)
        order2 = (
            _transitions([sets[li - 2], sets[li - 1]], mask, min_count=min_count, top_m=top_m)
            if li >= 2
            else []
        )
        order1 = _transitions([sets[li - 1]], mask, min_count=min_count, top_m=top_m) if li >= 1 else []
        tokens = conditional_table(routing.token_ids, mask, min_count=min_count, top_m=top_m)
        out.append(
            {
                "layer": li,
                "num_experts": E,
                "top_k": K,
                "tokens_seen": int(r.indices.shape[0]),
                "frequency": np.bincount(valid, minlength=E).astype(int).tolist(),
                "coactivation": co.tolist(),
                "gate_weights": _gate_hist(r.weights, K, bins),
                "transitions": {"order2": order2, "order1": order1},
                "tokens": {"ids": [int(k) for k, _ in tokens], "next": [n for _, n in tokens]},
            }
        )
    return out
