"""Warm start, measured: the first generated tokens' stall with ``warm_start="profile"`` against a cold start,
on one bundle at one budget (optionally on a throttled storage profile), each in a fresh session.

    python -m edgemoe_ort.bench.warmstart BUNDLE [--budget 25%] [--profile rpi4] [--tokens 4] [--idle 0,2]

``idle``: seconds between opening the session and the prompt (a user typing): the warm reads run in the
background meanwhile. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from edgemoe_ort.bench.storage import load_profile
from edgemoe_ort.bench.trace import DEFAULT_PROMPT
from edgemoe_ort.runtime import RuntimeOptions, load_model

__all__ = ["measure_warm_start"]


def _one(bundle: Path, opts: RuntimeOptions, tokens: int, idle: float) -> dict[str, Any]:
    model = load_model(bundle, opts)
    time.sleep(idle)
    t0 = time.perf_counter()
    res = model.generate(DEFAULT_PROMPT, max_new_tokens=tokens)
    wall = time.perf_counter() - t0
    c = res.stats.cache
    return {
        "stall_s": c["stall_s"],
        "wall_s": wall,
        "misses": c["misses"],
        "hits": c["hits"],
        "reads": c["reads"],
        "ttft_s": res.stats.ttft_s,
    }


def measure_warm_start(
    bundle: str | Path,
    *,
    budget: str = "25%",
    profile: str | None = None,
    tokens: int = 4,
    idle: tuple[float, ...] = (0.0, 2.0),
    repeats: int = 3,
    policy: str = "lru",
) -> dict[str, Any]:
    """Median over ``repeats`` (cold and warm alternating) per ``idle``: stall, wall time and misses of the
    prompt + ``tokens`` generated tokens, cold vs ``warm_start="profile"``."""
    prof = load_profile(profile) if profile else None
    thr = (
        dict(
            throttle_bw=float(prof["read_bw_bytes_per_s"]), throttle_latency_us=float(prof["read_latency_us"])
        )
        if prof
        else {}
    )
    out: dict[str, Any] = {
        "bundle": str(bundle),
        "budget": budget,
        "profile": profile,
        "tokens": tokens,
        "policy": policy,
        "repeats": repeats,
        "runs": [],
    }
    for wait in idle:
        rows: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
        for _ in range(repeats):
            for kind in ("cold", "warm"):
                opts = RuntimeOptions(
                    budget=budget, policy=policy, warm_start="profile" if kind == "warm" else None, **thr
                )
                rows[kind].append(_one(Path(bundle), opts, tokens, wait))
        med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in rows.items()}
        out["runs"].append({"idle_s": wait, **med})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--profile")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--idle", default="0,2")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    idle = tuple(float(x) for x in a.idle.split(",") if x)
    print(
        json.dumps(
            measure_warm_start(
                a.bundle, budget=a.budget, profile=a.profile, tokens=a.tokens, idle=idle, repeats=a.repeats
            )
        )
    )


if __name__ == "__main__":
    main()
