"""The planner's ranking: how important each routed expert is (EdgeMoE's rule, and a cheap proxy).

* ``loss`` (EdgeMoE): the calibration perplexity when that one expert alone is at the lowest offered dtype
  and every other expert at the ``high`` level; a higher perplexity is a more important expert. One forward
  pass over the calibration tokens per expert.
* ``proxy``: :meth:`~edgemoe_ort.plan.evaluate.Calibrator.proxy_errors`: each expert's output error at the
  lowest dtype on the calibration inputs the router sends it, weighted by gate weight, relative to its
  layer's MoE output energy. One pass in all.

:func:`order` sorts experts least important first (ties by layer, expert); :func:`spearman` is the rank
correlation of two scorings (average ranks for ties).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from edgemoe_ort.plan.evaluate import Calibrator, Key

__all__ = ["loss_scores", "proxy_scores", "order", "spearman", "overlap"]


def loss_scores(cal: Calibrator, high: str, lowest: str,
                progress: Callable[[int, int], None] | None = None) -> dict[Key, float]:
    """Per expert: the calibration perplexity with it alone at ``lowest``, the others at ``high`` (the
    decoder layers before the expert's from the prefix cache, :meth:`Calibrator.cache_prefix`)."""
    base = cal.uniform(high)
    cal.cache_prefix(base)
    out: dict[Key, float] = {}
    for i, key in enumerate(cal.keys):
        cal.assign(base)
        out[key] = cal.perplexity({key: lowest}, from_layer=key[0])
        if progress is not None:
            progress(i + 1, len(cal.keys))
    cal.assign(base)
    return out


def proxy_scores(cal: Calibrator, high: str, lowest: str) -> dict[Key, float]:
    """Per expert: the gate-weighted relative output error at ``lowest`` with every expert at ``high``."""
    errors, _ = cal.proxy_errors(cal.uniform(high), lowest)
    return errors


def order(scores: Mapping[Key, float]) -> list[Key]:
    """Experts least important (lowest score) first; ties by (layer, expert)."""
    return sorted(scores, key=lambda k: (scores[k], k))


def _ranks(values: np.ndarray) -> np.ndarray:
    idx = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[idx] = np.arange(len(values), dtype=np.float64)
    for v in np.unique(values):  # ties: their average rank
        tie = values == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: Mapping[Key, float], b: Mapping[Key, float]) -> float | None:
    """Spearman's rank correlation of two scorings of the same experts (None: fewer than 3, or constant)."""
    keys = sorted(a)
    if len(keys) < 3:
        return None
    ra = _ranks(np.array([a[k] for k in keys], np.float64))
    rb = _ranks(np.array([b[k] for k in keys], np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def overlap(a: Mapping[Key, float], b: Mapping[Key, float], k: int) -> float | None:
    """Share of the ``k`` least important experts by ``a`` that are also among ``b``'s ``k`` least."""
    if k <= 0:
        return None
    return len(set(order(a)[:k]) & set(order(b)[:k])) / k
