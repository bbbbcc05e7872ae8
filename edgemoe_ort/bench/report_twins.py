"""The "Low-bit twins" section of docs/benchmarks.md, from the suite's ``twins`` part
(edgemoe_ort.bench.twins)."""

from __future__ import annotations

from typing import Any

__all__ = ["twins_markdown"]


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _split(u: dict[str, Any]) -> str:
    total = sum(int(u.get(k, 0)) for k in ("high", "low", "skipped"))
    if not total:
        return "–"
    return " / ".join(f"{100 * int(u.get(k, 0)) / total:.0f}" for k in ("high", "low", "skipped"))


def _curve_table(curve: dict[str, Any]) -> list[str]:
    out = [
        "| setting | T1, T2 | held-out perplexity | Δ vs exact | expert MB / token | fewer bytes | "
        "uses high / low / skipped (%) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in curve["rows"]:
        th = r.get("thresholds")
        ths = "–" if not th else f"{th[0]:.3f}, {th[1]:.3f}"
        out.append(
            f"| `{r['setting']}` | {ths} | {r['perplexity']:.3f} | {_pct(r['ppl_increase'])} | "
            f"{r['bytes_per_token'] / 1e6:.3f} | {100 * r['fewer_bytes']:.1f} % | "
            f"{_split(r['uses'])} |"
        )
    return out


def _speed_lines(results: dict[str, Any], curve: dict[str, Any]) -> list[str]:
    from edgemoe_ort.bench.report import edgemoe_row, paired_speedup
    from edgemoe_ort.bench.twins import GOAL_PPL_INCREASE, GOAL_SPEEDUP

    ppl = {r["setting"]: r["ppl_increase"] for r in curve["rows"]}
    out: list[str] = []
    for name, run in results.get("runs", {}).items():
        if not name.startswith("twins-") or not run.get("precisions"):
            continue
        prof = run.get("profile") or {}
        busy = (run.get("load_average") or {}).get("busy")
        out += [
            f"Decode speed, run `{name}` (storage profile {prof.get('name', 'none')}, "
            f"{run.get('decode_tokens', '?')} decode tokens, median of {run.get('repeats', '?')}, "
            "interleaved, all modes in one process" + (", **busy machine**" if busy else "") + "):",
            "",
        ]
        for pred in (None, *[p for p in run.get("predictors") or [] if p != "none"]):
            base = edgemoe_row(run, "25%", "lru", pred)
            for spec in [p for p in run["precisions"] if p != "exact"]:
                m = edgemoe_row(run, "25%", "lru", pred, precision=spec)
                if base is None or m is None:
                    continue
                up = paired_speedup(m, base)
                inc = ppl.get(spec)
                met = up >= GOAL_SPEEDUP and inc is not None and inc <= GOAL_PPL_INCREASE
                out.append(
                    f"- lru{' + ' + pred if pred else ''}: `{spec}` vs exact: **{up:.2f}x** decode tokens/s "
                    f"(paired per repeat; {m['decode_tokens_per_s']:.1f} vs "
                    f"{base['decode_tokens_per_s']:.1f} tok/s, {m['bytes_read_per_token'] / 1e6:.2f} vs "
                    f"{base['bytes_read_per_token'] / 1e6:.2f} MB/token, uses "
                    f"{_split(m.get('uses_per_token') or {})}), perplexity "
                    f"{'?' if inc is None else _pct(inc)}; goal ≥ {GOAL_SPEEDUP}x within "
                    f"{GOAL_PPL_INCREASE:.0%}: {'met' if met else '**not met**'}"
                )
        out.append("")
    return out


def twins_markdown(results: dict[str, Any]) -> list[str]:
    """The section's Markdown lines (empty without a ``twins_curve``)."""
    curve = results.get("twins_curve")
    if not curve:
        return []
    fm = curve.get("formats") or {}
    L = [
        "## Low-bit twins: dynamic miss precision (default model, 25 %)",
        "",
        f"`{curve['bundle']}` (primaries {', '.join(fm.get('primary', []))}, twins "
        f"{', '.join(fm.get('twin', []))}) at {curve['budget']}, policy {curve['policy']}, no prefetching: "
        f"the first {curve['tokens']} tokens of the held-out stream, decoded one token at a time through the "
        "KV cache in windows of 128 (`edgemoe_ort.eval.evaluate`), each setting in a fresh session on the "
        "same tokens. `dynamic` takes its thresholds from the bundle's profile (docs/op-contract.md, \"Miss "
        'precision"); `dynamic:T1:T2` sets them. `python -m edgemoe_ort.bench.twins BUNDLE` prints the same '
        "rows.",
        "",
        *_curve_table(curve),
        "",
    ]
    best = curve.get("best")
    L += [
        f"- Fewest bytes within 2 % perplexity: `{best}`."
        if best
        else "- No dynamic setting stays within 2 % perplexity.",
        "",
    ]
    L += _speed_lines(results, curve)
    return L
