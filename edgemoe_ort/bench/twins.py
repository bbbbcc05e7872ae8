"""The price and the gain of low-bit twins (HOBBIT's dynamic miss precision) at one budget.

    python -m edgemoe_ort.bench.twins BUNDLE [--budget 25%] [--tokens N] [--json OUT]

``BUNDLE`` holds twins (``edgemoe-export --twin``). The text is the default model's held-out token stream
(``models/eval_default.py``), scored by :func:`edgemoe_ort.eval.evaluate` in decode mode (one token per pass
through the KV cache, windows of 128), so each miss sees the cache the previous tokens left. Each setting
runs in a fresh session on the same tokens, without prefetching; perplexity, expert bytes read per token and
the uses split high / low / skipped are compared with ``exact`` (the primaries only) of the same run. The
decode speed of the settings is measured by the ``twins`` part of ``edgemoe_ort.bench.suite``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgemoe_ort.bench.runner import parse_precision

__all__ = ["DEFAULT_SETTINGS", "GOAL_PPL_INCREASE", "GOAL_SPEEDUP", "best_setting", "run_twins_part", "sweep"]

#: the miss-precision specs of the sweep (edgemoe_ort.bench.runner.parse_precision); ``dynamic`` takes its
#: thresholds from the bundle's profile (HOBBIT's 67/30/3 split), else 0.6, 0.9
DEFAULT_SETTINGS = (
    "exact",
    "dynamic",
    "dynamic:0.6:0.9",
    "dynamic:0.5:0.9",
    "dynamic:0.5:0.85",
    "dynamic:0.5:0.8",
    "dynamic:0.5:0.75",
    "dynamic:0.5:0.7",
    "dynamic:0.5:0.65",
)
#: the goals of the issue: perplexity within this of exact ...
GOAL_PPL_INCREASE = 0.02
#: ... at this decode speed-up over exact (rpi4 storage profile, 25 %)
GOAL_SPEEDUP = 1.2


def sweep(
    bundle: str | Path,
    token_ids: Any,
    *,
    settings: tuple[str, ...] | list[str] = DEFAULT_SETTINGS,
    budget: str = "25%",
    log: Any = None,
) -> list[dict[str, Any]]:
    """One row per setting (policy lru, no prefetching): ``setting``, ``perplexity``, ``tokens``,
    ``bytes_per_token`` (expert bytes read per token run), ``misses``, ``uses`` (high / low / skipped),
    ``thresholds`` in effect, and relative to the ``exact`` row (run first if missing): ``ppl_increase``,
    ``fewer_bytes``."""
    from edgemoe_ort.bench.sweep import evaluate_settings
    from edgemoe_ort.runtime.ops import RuntimeOptions

    def options_of(spec: str) -> RuntimeOptions:
        return RuntimeOptions(budget=budget, policy="lru", predictor="none", **parse_precision(spec))

    rows = []
    for spec, r, seconds in evaluate_settings(bundle, token_ids, list(settings), options_of):
        c = r.cache
        mp = c.get("miss_precision") or {}
        rows.append(
            {
                "setting": spec,
                "perplexity": r.perplexity,
                "tokens": r.tokens,
                "bytes_per_token": c["bytes_read"] / max(r.tokens_run, 1),
                "misses": c["misses"],
                "uses": c.get("uses") or {},
                "thresholds": [mp.get("t1"), mp.get("t2")] if mp.get("mode") == "dynamic" else None,
                "seconds": seconds,
            }
        )
        if log:
            u = rows[-1]["uses"]
            log(
                f"  {spec:<18} ppl {r.perplexity:8.3f}  {rows[-1]['bytes_per_token'] / 1e6:6.3f} MB/token  "
                f"uses {u.get('high', 0)}/{u.get('low', 0)}/{u.get('skipped', 0)}"
            )
    exact = next(r for r in rows if r["setting"] == "exact")
    for r in rows:
        r["ppl_increase"] = r["perplexity"] / exact["perplexity"] - 1.0
        base = exact["bytes_per_token"]
        r["fewer_bytes"] = 1.0 - r["bytes_per_token"] / base if base else 0.0
    return rows


def best_setting(
    rows: list[dict[str, Any]], max_increase: float = GOAL_PPL_INCREASE
) -> dict[str, Any] | None:
    """The dynamic row that reads the fewest bytes with ``ppl_increase <= max_increase`` (None if none)."""
    ok = [r for r in rows if r["setting"] != "exact" and r["ppl_increase"] <= max_increase]
    return min(ok, key=lambda r: r["bytes_per_token"]) if ok else None


def run_twins_part(a: Any, results: dict[str, Any], common: dict[str, Any], log: Any = None) -> None:
    """The suite's ``twins`` part on ``a.twins`` (a bundle of the default model with twins) at 25 %: the sweep
    above on ``a.twins_tokens`` held-out tokens, then the decode speed of exact, the profile's ``dynamic``
    and the sweep's best setting within the perplexity goal on the small-model storage profile, with and
    without prefetching (``auto``, if the bundle has a profile), interleaved in one run."""
    from edgemoe_ort.bench.policies import HELDOUT_TOKENS, eval_default
    from edgemoe_ort.bench.runner import run_bench
    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.runtime.generate import load_tokenizer

    b = Bundle.open(a.twins)
    ids = eval_default().heldout_token_ids(load_tokenizer(b), HELDOUT_TOKENS)[: a.twins_tokens]
    if log:
        log(
            f"== low-bit twins: perplexity and bytes per setting, {a.twins}, 25 %, {len(ids)} held-out tokens"
        )
    rows = sweep(a.twins, ids, budget="25%", log=log)
    best = best_setting(rows)
    chosen = ["exact", "dynamic"] + ([best["setting"]] if best and best["setting"] != "dynamic" else [])
    results["twins_curve"] = {
        "bundle": str(a.twins),
        "budget": "25%",
        "policy": "lru",
        "tokens": len(ids),
        "rows": rows,
        "best": best["setting"] if best else None,
        "formats": {"primary": sorted(b.summary()["dtypes"]), "twin": sorted(b.summary()["twin_dtypes"])},
    }
    preds = ["none", "auto"] if (b.path / "profile.json").is_file() else ["none"]
    if log:
        log(f"== low-bit twins: decode speed, storage profile {a.profile}: {', '.join(chosen)}")
    results["runs"][f"twins-small-{a.profile}"] = run_bench(
        a.twins,
        budgets=["25%"],
        tokens=max(a.tokens, 32),
        profile=a.profile,
        modes=["naive", "edgemoe"],
        precisions=chosen,
        predictors=preds,
        **dict(common, policies=["lru"], rss=False),
    )


def main(argv: list[str] | None = None) -> None:
    """Print the sweep of ``BUNDLE`` (and write ``--json``)."""
    from edgemoe_ort.bench.policies import HELDOUT_TOKENS, eval_default
    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.runtime.generate import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    b = Bundle.open(a.bundle)
    if not b.twins:
        print(f"error: {b.path}: the bundle has no twins (export it with --twin)", file=sys.stderr)
        raise SystemExit(2)
    ids = eval_default().heldout_token_ids(load_tokenizer(b), min(a.tokens, HELDOUT_TOKENS))
    rows = sweep(
        b.path,
        ids,
        settings=[s for s in a.settings.split(",") if s],
        budget=a.budget,
        log=lambda s: print(s, flush=True),
    )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
