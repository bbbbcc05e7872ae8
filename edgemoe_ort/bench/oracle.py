"""What prefetching could reach with a better predictor (issue 10): the trace-replay bundle with a predictor
of chosen accuracy, so that the engine's overlap is measured apart from the predictors' quality.

The replay bundle's OffloadedExpert stack (``make_moe_graph``) gets HOBBIT's stacked-gates input; its
logits carry the trace's true experts of the next ``lookahead`` layers (+10, the rest 0), each true expert
replaced by a random wrong one with probability ``1 - accuracy``. The ``gates`` predictor then sees a
prediction of that precision, calibrated online like any other (docs/op-contract.md, "Cost rule"). Modes,
interleaved in one process: ``resident`` (budget 100 %, warmed: the compute), ``none`` (no prefetching) and
``oracle:A`` per accuracy A; every timed run starts from a cold cache with the page cache dropped.

``python -m edgemoe_ort.bench.oracle REPLAY_BUNDLE TRACE [--budget 25%] [--profile jetson-emmc] ...``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ORACLE_GRAPH", "DEFAULT_ACCURACIES", "oracle_feeds", "run_oracle", "oracle_markdown"]

ORACLE_GRAPH = "oracle-lookahead{P}.onnx"  # written into the replay bundle (a bench artefact)
DEFAULT_ACCURACIES = (1.0, 0.8, 0.6)
_LOGIT = 10.0


def oracle_feeds(steps: list[list[tuple[np.ndarray, np.ndarray]]], num_experts: int, lookahead: int,
                 accuracy: float, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Per replay step, the ``next_logits_{l}`` inputs ``[T, P_l, E]`` of every layer but the last: the true
    experts of layers l+1..l+P_l at ``_LOGIT``, each swapped for a random other expert with probability
    ``1 - accuracy``."""
    rng = np.random.default_rng(seed)
    L = len(steps[0])
    out = []
    for step in steps:
        T = step[0][0].shape[0]
        feeds = {}
        for li in range(L - 1):
            P = min(lookahead, L - 1 - li)
            z = np.zeros((T, P, num_experts), np.float32)
            for j in range(P):
                idx = step[li + 1 + j][0]
                for t in range(T):
                    true = {int(e) for e in idx[t] if e >= 0}
                    for e in true:
                        if rng.random() >= accuracy:
                            e = int(rng.choice([x for x in range(num_experts) if x not in true]))
                        z[t, j, e] = _LOGIT
            feeds[f"next_logits_{li}"] = z
        out.append(feeds)
    return out


def _graph(bundle: Any, lookahead: int) -> Path:
    import onnx

    from edgemoe_ort.bundle.testing import make_moe_graph

    path = bundle.path / ORACLE_GRAPH.format(P=lookahead)
    if not path.is_file():
        onnx.save(make_moe_graph(bundle.layers, lookahead=lookahead, manifest="manifest.json"), str(path))
    return path


def _timed(bundle: Any, graph: Path, workload: Any, extra: list[dict[str, np.ndarray]] | None,
           options: Any, warm: bool) -> dict[str, float]:
    from edgemoe_ort.bench.runner import _diff, drop_store_cache
    from edgemoe_ort.runtime.ops import open_session

    drop_store_cache(bundle)
    sess = open_session(graph, bundle.path, options)
    plain = workload._feeds
    if extra is not None:
        workload._feeds = lambda s: {**plain(s), **extra[s]}
    try:
        if warm:
            workload.run(sess, lambda: None)
        sess.reset_stats()
        snap: dict[str, Any] = {}
        _, steps = workload.run(sess, lambda: snap.update(sess.stats()))
        end = sess.stats()
    finally:
        workload._feeds = plain
        sess = None
    d = _diff(snap, end)
    n = len(steps)
    return {
        "decode_s_per_token": sum(steps) / n,
        "stall_s_per_token": d["stall_s"] / n,
        "bytes_per_token": d["bytes_read"] / n,
        "hits_per_token": d["hits"] / n,
        "misses_per_token": d["misses"] / n,
        "prefetch_issued_per_token": d["prefetch_issued"] / n,
        "prefetch_used_per_token": d["prefetch_used"] / n,
        "prefetch_declined_per_token": d["prefetch_declined"] / n,
    }


def run_oracle(bundle_dir: str | Path, trace: str | Path, *, budget: str = "25%", profile: str | None = None,
               accuracies: tuple[float, ...] = DEFAULT_ACCURACIES, lookahead: int = 2, depth: int = 1,
               tokens: int = 24, repeats: int = 3, io_threads: int = 2, log: Any = None) -> dict[str, Any]:
    """The interleaved run (module docstring); medians over ``repeats`` and per-repeat ratios to ``none``."""
    import os

    from edgemoe_ort.bench.runner import ReplayWorkload, machine_info
    from edgemoe_ort.bench.storage import load_profile, odirect_bandwidth
    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.runtime.ops import RuntimeOptions

    bundle = Bundle.open(bundle_dir)
    graph = _graph(bundle, lookahead)
    wl = ReplayWorkload(bundle, trace, tokens)
    prof = load_profile(profile) if profile else None
    thr = {}
    if prof:
        thr = dict(throttle_bw=float(prof["read_bw_bytes_per_s"]),
                   throttle_latency_us=float(prof["read_latency_us"]))
    E = int(bundle.layers[0]["num_experts"])
    modes: list[tuple[str, float | None]] = [("resident", None), ("none", None)]
    modes += [(f"oracle:{a:g}", a) for a in accuracies]
    feeds = {a: oracle_feeds(wl.steps, E, lookahead, a, seed=1) for _, a in modes if a is not None}
    zero = oracle_feeds(wl.steps, E, lookahead, 0.0, seed=1)  # the graph has the input: unused without gates

    def options(name: str) -> Any:
        pred = "gates" if name.startswith("oracle") else "none"
        return RuntimeOptions(budget="100%" if name == "resident" else budget, policy="lru", predictor=pred,
                              prefetch_depth=depth, io="direct", io_threads=io_threads, **thr)

    load = [os.getloadavg()[0]]
    per: dict[str, list[dict[str, float]]] = {m: [] for m, _ in modes}
    for r in range(repeats):
        order = modes if r % 2 == 0 else modes[::-1]
        for name, acc in order:
            if log:
                log(f"oracle: repeat {r + 1}/{repeats}: {name}")
            per[name].append(_timed(bundle, graph, wl, feeds[acc] if acc is not None else zero, options(name),
                                    warm=name == "resident"))
    load.append(os.getloadavg()[0])
    largest = int(bundle.summary()["largest_expert_bytes"])
    bw = float(prof["read_bw_bytes_per_s"]) if prof else odirect_bandwidth(
        bundle.store_path, largest, threads=io_threads)["bytes_per_s"]
    rows = []
    for name, _ in modes:
        runs = per[name]
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        compute = [x["decode_s_per_token"] for x in per["resident"]]
        bound = [max(c, x["bytes_per_token"] / bw) for c, x in zip(compute, runs, strict=True)]
        med["ratio_to_roofline_paired"] = statistics.median(
            b / x["decode_s_per_token"] for b, x in zip(bound, runs, strict=True))
        med["x_none_paired"] = statistics.median(
            n["decode_s_per_token"] / x["decode_s_per_token"] for n, x in zip(per["none"], runs, strict=True))
        rows.append({"mode": name, **med})
    return {"bundle": str(bundle.path), "trace": str(trace), "budget": budget, "profile": profile,
            "lookahead": lookahead, "depth": depth, "tokens": tokens, "repeats": repeats,
            "bandwidth_bytes_per_s": bw, "load": load, "machine": machine_info(), "rows": rows}


def oracle_markdown(res: dict[str, Any]) -> list[str]:
    """A table of one :func:`run_oracle` result."""
    prof = res["profile"] or "none (this VM's storage)"
    out = [
        f"Budget {res['budget']}, storage profile {prof}, {res['tokens'] - 1} decode steps, median of "
        f"{res['repeats']} interleaved repeats, depth {res['depth']}, load {res['load'][0]:.2f}→"
        f"{res['load'][1]:.2f}:",
        "",
        "| mode | ms / token | × none (paired) | stall ms / token | MB read / token | hits / token | "
        "prefetches issued / used / declined per token | ratio to roofline (paired) |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in res["rows"]:
        pf = "–" if r["mode"] in ("resident", "none") else (
            f"{r['prefetch_issued_per_token']:.1f} / {r['prefetch_used_per_token']:.1f} / "
            f"{r['prefetch_declined_per_token']:.1f}")
        out.append(
            f"| {r['mode']} | {1e3 * r['decode_s_per_token']:.1f} | {r['x_none_paired']:.2f} | "
            f"{1e3 * r['stall_s_per_token']:.1f} | {r['bytes_per_token'] / 1e6:.1f} | "
            f"{r['hits_per_token']:.1f} | "
            f"{pf} | {r['ratio_to_roofline_paired']:.2f} |"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """Run :func:`run_oracle` and print its table (``--json``: also write the result)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("trace")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--profile")
    ap.add_argument("--accuracies", default=",".join(f"{a:g}" for a in DEFAULT_ACCURACIES))
    ap.add_argument("--lookahead", type=int, default=2)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    res = run_oracle(a.bundle, a.trace, budget=a.budget, profile=a.profile,
                     accuracies=tuple(float(x) for x in a.accuracies.split(",") if x),
                     lookahead=a.lookahead, depth=a.depth, tokens=a.tokens, repeats=a.repeats,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(oracle_markdown(res)))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
