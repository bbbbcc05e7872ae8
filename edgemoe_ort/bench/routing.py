"""The price of cache-aware routing: cache misses and held-out perplexity per routing setting at one budget.

    python -m edgemoe_ort.bench.routing BUNDLE [--budget 25%] [--tokens N] [--policy lru] [--json OUT]

The text is the default model's held-out token stream (``models/eval_default.py``), scored by
:func:`edgemoe_ort.eval.evaluate` in decode mode (one token per pass through the KV cache, windows of 128),
so every token is routed with the cache as the previous tokens left it. Each setting runs in a fresh session
(a cold cache) on the same tokens; misses and perplexity are compared with ``exact`` of the same run. The
settings sweep ``cache-prior`` over lambda (with J = 1 and, for the paper's rule, J = 0) and ``max-rank`` over
J and M. With prefetching on (``--predictor``), the chosen settings are run again to show how the
predictors' recall moves when the routing follows the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgemoe_ort.bench.runner import parse_routing

__all__ = ["DEFAULT_SETTINGS", "best_setting", "main", "sweep"]

#: the routing specs of the curve (edgemoe_ort.bench.runner.parse_routing)
DEFAULT_SETTINGS = (
    "exact",
    *(f"cache-prior:{lam}" for lam in (0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.75, 1.0)),
    *(f"cache-prior:{lam}:0" for lam in (0.1, 0.2, 0.3, 0.5, 1.0)),
    *(f"max-rank:1:{m}" for m in (3, 4, 5, 6, 8)),
    "max-rank:0:3",
    "max-rank:0:4",
)
#: the goal of the issue: at least this many fewer misses than exact ...
GOAL_FEWER_MISSES = 0.40
#: ... at most this perplexity increase
GOAL_PPL_INCREASE = 0.03


def sweep(
    bundle: str | Path,
    token_ids: Any,
    *,
    settings: tuple[str, ...] | list[str] = DEFAULT_SETTINGS,
    budget: str = "25%",
    policy: str = "lru",
    predictor: str = "none",
    window: int = 128,
    log: Any = None,
) -> list[dict[str, Any]]:
    """One row per setting: ``setting``, ``perplexity``, ``misses``, ``hits``, ``miss_rate`` (misses per
    expert use), ``changed`` / ``selections``, ``misses_avoided``, the prefetch summary, and relative to
    the ``exact`` row of the sweep (run first if missing): ``fewer_misses``, ``ppl_increase``."""
    from edgemoe_ort.bench.sweep import evaluate_settings
    from edgemoe_ort.runtime.ops import RuntimeOptions

    def options_of(spec: str) -> RuntimeOptions:
        return RuntimeOptions(budget=budget, policy=policy, predictor=predictor, **parse_routing(spec))

    rows = []
    for spec, r, seconds in evaluate_settings(bundle, token_ids, list(settings), options_of, window=window):
        c = r.cache
        uses = c["hits"] + c["misses"]
        row = {
            "setting": spec,
            "perplexity": r.perplexity,
            "tokens": r.tokens,
            "hits": c["hits"],
            "misses": c["misses"],
            "miss_rate": c["misses"] / uses if uses else 0.0,
            "bytes_read": c["bytes_read"],
            "selections": c["routing"].get("selections", 0),
            "changed": c["routing"].get("changed", 0),
            "misses_avoided": c["routing"].get("misses_avoided", 0),
            "prefetch": c["prefetch"],
            "seconds": seconds,
        }
        rows.append(row)
        if log is not None:
            log(f"  {spec:<18} ppl {row['perplexity']:.3f}  misses {row['misses']}  "
                f"({row['seconds']:.0f} s)")
    base = next(r for r in rows if r["setting"] == "exact")
    for r in rows:
        r["fewer_misses"] = 1.0 - r["misses"] / base["misses"] if base["misses"] else 0.0
        r["ppl_increase"] = r["perplexity"] / base["perplexity"] - 1.0
    return rows


def best_setting(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The setting with the most fewer misses among those within the perplexity goal (None if none is)."""
    ok = [r for r in rows if r["setting"] != "exact" and r["ppl_increase"] <= GOAL_PPL_INCREASE]
    return max(ok, key=lambda r: r["fewer_misses"]) if ok else None


def main(argv: list[str] | None = None) -> None:
    """Run the sweep (and, with ``--predictor``, the prefetch rows) and print or write JSON."""
    from edgemoe_ort.bench.policies import HELDOUT_TOKENS, eval_default
    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.runtime.generate import load_tokenizer

    ap = argparse.ArgumentParser(
        prog="python -m edgemoe_ort.bench.routing", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("bundle")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
    ap.add_argument("--predictor", default="auto", help="prefetch rows: exact and the best setting with it")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if not 2 <= a.tokens <= HELDOUT_TOKENS:
        ap.error(f"--tokens: expected 2..{HELDOUT_TOKENS}, found {a.tokens}")
    b = Bundle.open(a.bundle)
    ids = eval_default().heldout_token_ids(load_tokenizer(b), HELDOUT_TOKENS)[: a.tokens]

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    log(f"routing sweep: {b.path}, budget {a.budget}, policy {a.policy}, {a.tokens} held-out tokens")
    rows = sweep(b.path, ids, settings=a.settings.split(","), budget=a.budget, policy=a.policy, log=log)
    best = best_setting(rows)
    prefetch_rows: list[dict[str, Any]] = []
    if a.predictor != "none":
        chosen = ["exact"] + ([best["setting"]] if best else [])
        log(f"with prefetching (predictor {a.predictor}): {', '.join(chosen)}")
        prefetch_rows = sweep(b.path, ids, settings=chosen, budget=a.budget, policy=a.policy,
                              predictor=a.predictor, log=log)
    doc = {
        "bundle": str(b.path), "budget": a.budget, "policy": a.policy, "tokens": a.tokens, "window": 128,
        "goal": {"fewer_misses": GOAL_FEWER_MISSES, "ppl_increase": GOAL_PPL_INCREASE},
        "rows": rows, "best": best["setting"] if best else None,
        "predictor": a.predictor, "prefetch_rows": prefetch_rows,
    }
    text = json.dumps(doc, indent=2)
    if a.json is not None:
        a.json.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
