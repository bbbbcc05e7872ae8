"""The "Ablation" section of docs/benchmarks.md, from the suite's ``ablation`` part
(edgemoe_ort.bench.ablation)."""

from __future__ import annotations

from typing import Any

__all__ = ["ablation_markdown"]


def _dtypes(counts: dict[str, int] | None) -> str:
    """`` (experts: int2 28, int3 4)`` or empty."""
    return f" (experts: {', '.join(f'{d} {n}' for d, n in counts.items())})" if counts else ""


def ablation_markdown(results: dict[str, Any]) -> list[str]:
    """The sections' Markdown lines, one per ablation run (``ablations``, or the single ``ablation`` of
    results written before; empty without any)."""
    entries = dict(results.get("ablations") or {})
    if results.get("ablation"):
        entries.setdefault(results["ablation"]["run"], results["ablation"])
    out: list[str] = []
    for ab in entries.values():
        run = (results.get("runs") or {}).get(ab["run"])
        if run:
            out += _one(ab, run)
    return out


def _one(ab: dict[str, Any], run: dict[str, Any]) -> list[str]:
    from edgemoe_ort.bench.ablation import STEP_LABELS, steps
    from edgemoe_ort.bench.report import _f, edgemoe_row, paired_speedup

    large = ab.get("model") == "large"
    naive = next((m for m in run["modes"] if m["mode"] == "naive"), None)
    plan = bool(ab.get("plan_bundle"))
    todo = steps(ab["policy"], plan)
    rows: list[dict[str, Any] | None] = [naive] + [
        None if s is None
        else edgemoe_row(run, "25%", s["policy"], s["predictor"], s["routing"], s["precision"], s["variant"])
        for s in todo
    ]
    ppl = ab["perplexity"]
    base = ppl.get("exact")
    # the perplexity each step computes with (exact until the plan step)
    step_ppl = [base] + [None if s is None else ppl.get(s["ppl"]) for s in todo]
    prof = run.get("profile") or {}
    if large:
        quality = (
            "No held-out perplexity: the large model has random weights and no tokenizer (each step's "
            "quality is measured on the default model), and no plan step (the planner ranks experts by "
            "calibration perplexity)."
        )
    else:
        where = (
            f"the plan step and those after it on `{ab['plan_bundle']}` (the default model exported with "
            f"`edgemoe-plan`'s expert-wise bitwidths{_dtypes(ab.get('plan_dtypes'))} and the same twins) at "
            f"the same {ab.get('budget_bytes', 0) / 2**20:.2f} MiB"
            if plan
            else "the bitwidth plan left out (no plan bundle in the run; docs/quality.md, "
            '"Expert-wise bitwidths")'
        )
        quality = (
            f"Held-out perplexity: the first {ab['tokens']} tokens of the held-out stream in decode mode at "
            "25 % with the step's bundle and options (the cache and prefetch steps compute what exact "
            f"computes); {where}."
        )
    model = "large" if large else "default"
    L = [
        f"## Ablation ({model} model, 25 %, storage profile {prof.get('name', 'none')})",
        "",
        f"EdgeMoE-style: each step adds one technique to the step above, all rows from run "
        f"`{ab['run']}` (`{ab['bundle']}`: int4 experts with int2 twins; {run.get('decode_tokens', '?')} "
        f"decode tokens, median of {run.get('repeats', '?')}, interleaved in one process). Best policy: "
        f"`{ab['policy']}` (the faster of lru and hobbit there); prefetch `{ab['predictor']}`; twins "
        f"`--miss-precision {ab['precision']}`; routing `{ab['routing']}`. {quality}",
        "",
        "| step | decode tok/s | s / token | × naive (paired) | × the step above (paired) "
        "| expert MB / token | hit rate | held-out perplexity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    prev = None
    for label, m, p in zip(STEP_LABELS, rows, step_ppl, strict=True):
        if m is None:
            L.append(f"| {label} | – | – | – | – | – | – | – |")
            continue
        up_naive = paired_speedup(m, naive) if naive and m is not naive else None
        up_prev = paired_speedup(m, prev) if prev is not None else None
        pp = (
            "–"
            if p is None
            else f"{p:.3f}" + ("" if base is None or p is base else f" ({100 * (p / base - 1):+.2f}%)")
        )
        L.append(
            f"| {label} | {m['decode_tokens_per_s']:.2f} | {m['decode_s_per_token']:.4f} | {_f(up_naive)} "
            f"| {_f(up_prev)} | {m['bytes_read_per_token'] / 1e6:.3f} | {_f(m['hit_rate'], '{:.0%}')} "
            f"| {pp} |"
        )
        prev = m
    return [*L, ""]
