"""How well the profile predicts the held-out split's routing, and what an expert cache gets out of it.

A predictor gives, per held-out token and target layer ``t``, a distribution over ``t``'s experts
(docs/bundle-format.md, "profile.json"):

- ``table``: the ``order2`` entry of the token's ``(E_{t-2}, E_{t-1})`` if present, else the ``order1`` entry
  of ``E_{t-1}``, else ``frequency / tokens_seen``; ``None`` at layer 0.
- ``token``: the ``tokens`` entry of the token id if present, else ``frequency / tokens_seen``.
- ``gates``: the softmax of row 0 of layer ``t-1``'s stacked next-router logits; ``None`` at layer 0 and
  where the graph has no such input.
- ``residual``: layer ``t``'s router softmax on the residual stream entering it (the scores of its
  ``ResidualPrefetch`` node); ``None`` where the graph has no such node (always at layer 0).
- a combination: the mean of its members' distributions (experts a member's entry does not list count 0);
  ``None`` if a member is.

``recall@K`` of ``t`` = mean over held-out tokens of ``|top-K of the distribution ∩ E_t| / K`` (``K`` = the
layer's ``top_k``; ties in the top-K go to the smaller expert id). ``auto[t]`` = the combination with the
most hits; ties: fewer members, then the order ``table``, ``gates``, ``token``, ``residual``.

:func:`hit_rates` replays the held-out tokens one at a time (decode order: every layer of a token, then the
next token; the first :data:`HIT_RATE_TOKENS`) through :mod:`edgemoe_ort.runtime.cachesim` for each
policy and budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgemoe_ort.bundle.profile import COMBINATIONS, PREDICTORS, combination_members
from edgemoe_ort.runtime.cachesim import CacheSimulator, belady, lengths_from_bundle
from edgemoe_ort.runtime.ops import parse_budget

from .routing import Routing
from .tables import expert_mask

__all__ = [
    "BUDGETS",
    "POLICIES",
    "HIT_RATE_TOKENS",
    "distributions",
    "recall_at_k",
    "heldout_recall",
    "choose_auto",
    "decode_trace",
    "hit_rates",
]

BUDGETS: tuple[str, ...] = ("12.5%", "25%", "50%")
#: name -> simulator options; ``+freq`` / ``pinned`` use the profile's train frequencies; ``belady`` is the
#: offline bound (not an op policy)
POLICIES: tuple[str, ...] = ("lru", "lfu", "edgemoe", "edgemoe+freq", "hobbit", "pinned", "belady")
#: held-out tokens replayed for the hit rates (the simulator is pure Python; the first ones suffice)
HIT_RATE_TOKENS = 4096


def _dense(entries: Sequence[Sequence[float]], num_experts: int) -> np.ndarray:
    row = np.zeros(num_experts, np.float64)
    for e, p in entries:
        row[int(e)] = float(p)
    return row


def _fallback(layer: dict[str, Any]) -> np.ndarray:
    seen = int(layer["tokens_seen"])
    freq = np.asarray(layer["frequency"], np.float64)
    return freq / seen if seen else np.zeros_like(freq)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.asarray(x, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _lookup(
    keys: list[Any], table: dict[Any, np.ndarray], fallback: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``table`` for ``keys`` (fallback where absent) and whether each key was found."""
    out = np.empty((len(keys), fallback.shape[0]), np.float64)
    found = np.zeros(len(keys), bool)
    for n, k in enumerate(keys):
        row = table.get(k)
        if row is None:
            out[n] = fallback
        else:
            out[n] = row
            found[n] = True
    return out, found


def _set_keys(indices: np.ndarray) -> list[tuple[int, ...]]:
    idx = np.sort(np.asarray(indices, np.int64), axis=1)
    if (idx < 0).any():
        return [tuple(sorted({int(x) for x in row if x >= 0})) for row in idx]
    return [tuple(int(x) for x in row) for row in idx]


def distributions(
    layers: Sequence[dict[str, Any]], target: int, heldout: Routing
) -> dict[str, np.ndarray | None]:
    """Each single predictor's distribution ``[N, E_t]`` (float64) over the held-out tokens for ``target``."""
    lay = layers[target]
    E = int(lay["num_experts"])
    fb = _fallback(lay)
    tok_table = {
        int(i): _dense(n, E) for i, n in zip(lay["tokens"]["ids"], lay["tokens"]["next"], strict=True)
    }
    token, _ = _lookup([int(t) for t in heldout.token_ids], tok_table, fb)
    out: dict[str, np.ndarray | None] = {"table": None, "gates": None, "token": token, "residual": None}
    resid = heldout.layers[target].residual
    if target >= 1 and resid is not None and resid.shape[-1] == E:
        out["residual"] = np.asarray(resid, np.float64)
    if target >= 1:
        prev1 = _set_keys(heldout.layers[target - 1].indices)
        o1 = {tuple(e["prev"][0]): _dense(e["next"], E) for e in lay["transitions"]["order1"]}
        table, found = _lookup(prev1, o1, fb)
        if target >= 2:
            prev2 = _set_keys(heldout.layers[target - 2].indices)
            o2 = {
                (tuple(e["prev"][0]), tuple(e["prev"][1])): _dense(e["next"], E)
                for e in lay["transitions"]["order2"]
            }
            t2, found2 = _lookup(list(zip(prev2, prev1, strict=True)), o2, fb)
            table = np.where(found2[:, None], t2, table)
        out["table"] = table
        logits = heldout.layers[target - 1].next_logits
        if logits is not None and logits.shape[-1] == E:
            out["gates"] = _softmax(logits[:, 0, :])
    return out


def recall_at_k(dist: np.ndarray, actual: np.ndarray, top_k: int) -> tuple[int, float]:
    """``(hits, recall@K)``: ``actual`` is the bool ``[N, E]`` mask of the chosen experts."""
    n = dist.shape[0]
    if n == 0:
        return 0, 0.0
    top = np.argsort(-dist, axis=1, kind="stable")[:, :top_k]
    hits = int(actual[np.arange(n)[:, None], top].sum())
    return hits, hits / (top_k * n)


def heldout_recall(
    layers: Sequence[dict[str, Any]], heldout: Routing
) -> tuple[dict[str, list[float | None]], list[list[str]]]:
    """``(recall, auto)`` of the profile's ``layers`` on the held-out routing: ``recall[name][t]`` for every
    predictor and combination (``None`` where it does not apply) and ``auto[t]``."""
    recall: dict[str, list[float | None]] = {name: [] for name in COMBINATIONS}
    auto: list[list[str]] = []
    for t, lay in enumerate(layers):
        K = int(lay["top_k"])
        actual = expert_mask(heldout.layers[t].indices, int(lay["num_experts"]))
        single = distributions(layers, t, heldout)
        hits: dict[str, int] = {}
        for name in COMBINATIONS:
            members = [single[m] for m in combination_members(name)]
            if any(m is None for m in members):
                recall[name].append(None)
                continue
            dist = members[0] if len(members) == 1 else np.mean(np.stack(members), axis=0)  # type: ignore[arg-type]
            hits[name], r = recall_at_k(dist, actual, K)  # type: ignore[arg-type]
            recall[name].append(r)
        auto.append(choose_auto(hits))
    return recall, auto


def choose_auto(hits: dict[str, int]) -> list[str]:
    """The members of the combination with the most hits (ties: fewer members, then in the order of
    :data:`~edgemoe_ort.bundle.profile.PREDICTORS`: ``table``, ``gates``, ``token``, ``residual``)."""
    rank = {p: i for i, p in enumerate(PREDICTORS)}

    def key(name: str) -> tuple[int, int, list[int]]:
        members = combination_members(name)
        return (-hits[name], len(members), sorted(rank[m] for m in members))

    return combination_members(min(hits, key=key))


def decode_trace(heldout: Routing) -> list[tuple[int, tuple[int, ...]]]:
    """The held-out routing as the cache sees it when decoding: token by token, every layer in order."""
    sets = [_set_keys(r.indices) for r in heldout.layers]
    layers = [r.layer for r in heldout.layers]
    return [(layers[li], sets[li][n]) for n in range(heldout.num_tokens) for li in range(len(layers))]


def hit_rates(
    bundle: Any,
    heldout: Routing,
    frequencies: Sequence[Sequence[float]],
    *,
    budgets: Sequence[str] = BUDGETS,
    policies: Sequence[str] = POLICIES,
    max_tokens: int | None = HIT_RATE_TOKENS,
) -> list[dict[str, Any]]:
    """``[{"budget", "policy", "hit_rate"}]`` of the held-out decode trace (its first ``max_tokens`` tokens);
    budgets below the largest expert are left out. ``frequencies``: the profile's per-layer train
    frequencies (``edgemoe+freq``, ``pinned``)."""
    lengths = lengths_from_bundle(bundle)
    largest = max(max(r) for r in lengths)
    trace = decode_trace(heldout)
    if max_tokens is not None:
        trace = trace[: max_tokens * len(heldout.layers)]
    freq = [[float(v) for v in row] for row in frequencies]
    out = []
    for b in budgets:
        budget = parse_budget(b, bundle.store_bytes, bundle.primary_bytes)
        if budget < largest:
            continue
        for name in policies:
            if name == "belady":
                res = belady(trace, lengths, budget)
            else:
                base = name.removesuffix("+freq")
                kw: dict[str, Any] = {}
                if name.endswith("+freq") or base == "pinned":
                    kw["frequencies"] = freq
                res = CacheSimulator(lengths, budget, base, num_layers=len(lengths), **kw).run(trace)
            out.append({"budget": b, "policy": name, "hit_rate": res.hit_rate})
    return out
