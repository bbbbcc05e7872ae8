"""The planner's search: which experts go to which level, within the tolerance (EdgeMoE's rule, extended to
more than two levels).

Given the offered levels ``L0 > L1 > ... > Lm`` (bits; ``L0`` is the reference), the uniform models'
calibration perplexities, the ranking (least important first) and a ``measure(dtypes) -> perplexity``:

1. **Bracket.** The degradation of a configuration is ``ppl / ppl(uniform L0) - 1``. ``high`` is the last
   level of the run ``L0, L1, ...`` whose uniform models all stay within the tolerance; ``low`` the next one.
   If every uniform level is within, the plan is uniform ``Lm``.
2. **K at low.** Start with every expert at ``high``; the K least important go to ``low``. K = 0 is within
   (the uniform ``high``) and K = N is not (the uniform ``low``); bisection finds the largest K within,
   assuming the degradation grows with K (it is close to monotone: each step lowers one more expert; a
   non-monotone curve can make the K found smaller than the largest K within, never one outside).
3. **Next level.** Of those K experts, the least important K' go one level lower (``Lj+1``), K' searched the
   same way over [0, K] (K' = K is measured first; within: all K go down and the next level is tried), and so
   on until the lowest level or K' = 0. The ranking stays the one of step 2 (EdgeMoE ranks once).

Every accepted configuration was measured, so the plan's degradation on the calibration tokens is at most the
tolerance. :func:`search` is pure (the measurements come from ``measure``), so it is tested on synthetic
losses too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Key = tuple[int, int]

__all__ = ["SearchResult", "bracket", "search"]


@dataclass
class SearchResult:
    dtypes: dict[Key, str]
    perplexity: float
    degradation: float
    high: str
    low: str | None
    #: per lowered level: {"dtype", "candidates", "k", "evaluations": [[k, ppl], ...]}
    levels: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0


def bracket(levels: Sequence[str], uniform: Mapping[str, float], tolerance: float) -> int:
    """Index of ``high``: the last level of the leading run whose uniform degradation is within."""
    ref = uniform[levels[0]]
    h = 0
    while h + 1 < len(levels) and uniform[levels[h + 1]] / ref - 1 <= tolerance:
        h += 1
    return h


def search(
    keys: Sequence[Key],
    levels: Sequence[str],
    uniform: Mapping[str, float],
    ranking: Sequence[Key] | None,
    tolerance: float,
    measure: Callable[[dict[Key, str]], float],
    progress: Callable[[int, int], None] | None = None,
) -> SearchResult:
    """The plan (see the module docstring). ``ranking``: every key, least important first (unused when the
    lowest uniform level is within the tolerance)."""
    ref = uniform[levels[0]]

    def within(ppl: float) -> bool:
        return ppl / ref - 1 <= tolerance

    h = bracket(levels, uniform, tolerance)
    if h == len(levels) - 1:
        p = uniform[levels[h]]
        return SearchResult(dict.fromkeys(keys, levels[h]), p, p / ref - 1, levels[h], None)
    if ranking is None or sorted(ranking) != sorted(keys):
        raise ValueError("search: the ranking must list every expert once")
    config = dict.fromkeys(keys, levels[h])
    ppl = uniform[levels[h]]
    result = SearchResult(config, ppl, ppl / ref - 1, levels[h], levels[h + 1])
    prefix = len(ranking)  # the experts (least important first) that may go one level lower
    steps, budget = 0, max(1, prefix.bit_length()) * (len(levels) - 1 - h)
    for j in range(h + 1, len(levels)):
        low = levels[j]
        evals: list[list[float]] = []

        def trial(k: int, low: str = low, evals: list[list[float]] = evals) -> float:
            nonlocal steps
            cfg = {**config, **dict.fromkeys(ranking[:k], low)}
            p = measure(cfg)
            evals.append([k, p])
            steps += 1
            if progress is not None:
                progress(steps, max(budget, steps))
            return p

        lo, lo_ppl = 0, ppl
        if j == h + 1:
            hi = prefix  # the uniform `low` model: measured, outside the tolerance
        else:
            p_all = trial(prefix)
            if within(p_all):
                lo, lo_ppl, hi = prefix, p_all, prefix
            else:
                hi = prefix
        while hi - lo > 1:
            mid = (lo + hi) // 2
            p = trial(mid)
            if within(p):
                lo, lo_ppl = mid, p
            else:
                hi = mid
        result.levels.append({"dtype": low, "candidates": prefix, "k": lo, "evaluations": evals})
        if lo == 0:
            break
        config.update(dict.fromkeys(ranking[:lo], low))
        ppl, prefix = lo_ppl, lo
    result.dtypes, result.perplexity, result.degradation = config, ppl, ppl / ref - 1
    result.evaluations = steps
    if progress is not None:
        progress(steps, steps)
    return result
