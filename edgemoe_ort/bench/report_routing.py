"""The cache-aware routing section of docs/benchmarks.md: the curve of misses and held-out perplexity per
routing setting (table + PNG), the prefetch recall under the best setting, and decode speed vs exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_curve", "routing_markdown"]

CURVE_PNG = "bench-routing-curve.png"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:+.1f} %"


def _curve_table(curve: dict[str, Any]) -> list[str]:
    rows = [
        "| setting | perplexity | Δ perplexity | misses | fewer misses | miss rate | selections changed "
        "| reads avoided (counted) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in curve["rows"]:
        share = r["changed"] / r["selections"] if r["selections"] else 0.0
        mark = "**" if r["setting"] == curve.get("best") else ""
        rows.append(
            f"| {mark}{r['setting']}{mark} | {r['perplexity']:.2f} | {_pct(r['ppl_increase'])} "
            f"| {r['misses']} | {r['fewer_misses'] * 100:.1f} % | {r['miss_rate']:.3f} | {share:.1%} "
            f"| {r['misses_avoided']} |"
        )
    return rows


def _series(rows: list[dict[str, Any]], rule: str, keep: str) -> list[tuple[float, dict[str, Any]]]:
    """(x, row) of the ``rule`` settings with J = ``keep``: x = lambda (cache-prior) or M (max-rank)."""
    out = []
    for r in rows:
        parts = r["setting"].split(":")
        if parts[0] != rule:
            continue
        if rule == "cache-prior" and (parts[2] if len(parts) > 2 else "1") == keep:
            out.append((float(parts[1]), r))
        elif rule == "max-rank" and parts[1] == keep and len(parts) > 2:
            out.append((float(parts[2]), r))
    return sorted(out, key=lambda t: t[0])


def plot_curve(curve: dict[str, Any], path: Path) -> None:
    """Miss rate and perplexity against lambda (cache-prior, J = 1 and 0) and M (max-rank, J = 1 and 0),
    with exact as a dashed line, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = curve["rows"]
    exact = next(r for r in rows if r["setting"] == "exact")
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    for col, (rule, xlabel) in enumerate((("cache-prior", "λ"), ("max-rank", "M (window)"))):
        for keep, style in (("1", "o-"), ("0", "s--")):
            pts = _series(rows, rule, keep)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            axes[0][col].plot(xs, [r["miss_rate"] for _, r in pts], style, label=f"J = {keep}")
            axes[1][col].plot(xs, [r["perplexity"] for _, r in pts], style, label=f"J = {keep}")
        axes[0][col].axhline(exact["miss_rate"], color="grey", ls=":", label="exact")
        axes[1][col].axhline(exact["perplexity"], color="grey", ls=":", label="exact")
        axes[1][col].axhline(exact["perplexity"] * 1.03, color="red", ls=":", lw=0.8, label="exact + 3 %")
        axes[0][col].set_title(rule)
        axes[1][col].set_xlabel(xlabel)
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    axes[0][0].set_ylabel("miss rate (misses / expert uses)")
    axes[1][0].set_ylabel("held-out perplexity")
    fig.suptitle(
        f"Cache-aware routing, {Path(curve['bundle']).name} at {curve['budget']} ({curve['policy']}), "
        f"{curve['tokens']} held-out tokens decoded one by one"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speed_lines(results: dict[str, Any]) -> list[str]:
    from edgemoe_ort.bench.report import edgemoe_row, paired_speedup

    out: list[str] = []
    for name, run in results.get("runs", {}).items():
        if not name.startswith("routing-") or not run.get("routings"):
            continue
        prof = run.get("profile") or {}
        out += [
            f"Decode speed, run `{name}` above (storage profile {prof.get('name', 'none')}, "
            f"{run.get('decode_tokens', '?')} decode tokens, median of {run.get('repeats', '?')}, "
            "interleaved, all modes in one process):",
            "",
        ]
        routed = [r for r in run["routings"] if r != "exact"]
        for pred in (None, *[p for p in run.get("predictors") or [] if p != "none"]):
            base = edgemoe_row(run, "25%", "lru", pred)
            for spec in routed:
                m = edgemoe_row(run, "25%", "lru", pred, spec)
                if base is None or m is None:
                    continue
                up = paired_speedup(m, base)
                label = f"lru{' + ' + pred if pred else ''}"
                out.append(
                    f"- {label}: `{spec}` vs exact: **{up:.2f}x** decode tokens/s (paired per repeat; "
                    f"{m['decode_tokens_per_s']:.1f} vs {base['decode_tokens_per_s']:.1f} tok/s, hit rate "
                    f"{m['hit_rate']:.0%} vs {base['hit_rate']:.0%}; goal ≥ 1.5x: "
                    f"{'met' if up >= 1.5 else '**not met**'})"
                )
        out.append("")
    return out


def routing_markdown(results: dict[str, Any], img_dir: Path, rel_img: Path) -> list[str]:
    """The section's Markdown lines (empty without a ``routing_curve``); writes the PNG into ``img_dir``."""
    curve = results.get("routing_curve")
    if not curve:
        return []
    from edgemoe_ort.bench.routing import GOAL_FEWER_MISSES, GOAL_PPL_INCREASE

    img_dir.mkdir(parents=True, exist_ok=True)
    plot_curve(curve, img_dir / CURVE_PNG)
    L = [
        "## Cache-aware routing (default model, 25 %)",
        "",
        f"`{curve['bundle']}` at {curve['budget']}, policy {curve['policy']}, no prefetching: the first "
        f"{curve['tokens']} tokens of the held-out stream (`models/eval_default.py`), scored in windows of "
        "128 decoded one token at a time through the KV cache (`edgemoe_ort.eval.evaluate`, decode mode), "
        "each "
        "setting in a fresh session on the same tokens. Settings: `cache-prior:λ[:J]` and `max-rank:J:M` "
        "(docs/op-contract.md, CacheAwareTopK; J defaults to 1). Misses are the store's own counters; "
        "`python -m edgemoe_ort.bench.routing BUNDLE --budget 25%` prints the same rows.",
        "",
        *_curve_table(curve),
        "",
        f"![routing curve]({(rel_img / CURVE_PNG).as_posix()})",
        "",
    ]
    best = next((r for r in curve["rows"] if r["setting"] == curve.get("best")), None)
    goal = (
        f"goal: ≥ {GOAL_FEWER_MISSES:.0%} fewer misses than exact at ≤ {GOAL_PPL_INCREASE:.0%} perplexity "
        "increase"
    )
    if best is None:
        L += [f"- No setting stays within {GOAL_PPL_INCREASE:.0%} perplexity ({goal}: **not met**).", ""]
    else:
        met = best["fewer_misses"] >= GOAL_FEWER_MISSES
        L += [
            f"- Most misses saved within {GOAL_PPL_INCREASE:.0%} perplexity: `{best['setting']}`, "
            f"{best['fewer_misses'] * 100:.1f} % fewer misses at {_pct(best['ppl_increase'])} perplexity "
            f"({goal}: {'met' if met else '**not met**'}).",
            "",
        ]
    pf = curve.get("prefetch_rows") or []
    if pf:
        L += [
            "With prefetching on (predictor `auto`, the bundle's profile), same tokens, each row against "
            "exact with the same prefetching: prefetched experts count as resident (they are being read), "
            "so the prior also steers toward what the predictors chose.",
            "",
            "| setting | perplexity | Δ perplexity | misses | fewer misses | prefetches issued | precision "
            "| recall | reads avoided |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in pf:
            p = r.get("prefetch") or {}
            L.append(
                f"| {r['setting']} | {r['perplexity']:.2f} | {_pct(r['ppl_increase'])} | {r['misses']} "
                f"| {r['fewer_misses'] * 100:.1f} % | {p.get('issued', 0)} | {p.get('precision', 0.0):.2f} "
                f"| {p.get('recall', 0.0):.2f} | {r['misses_avoided']} |"
            )
        ok = [r for r in pf if r["setting"] != "exact" and r["ppl_increase"] <= GOAL_PPL_INCREASE]
        if ok:
            b = max(ok, key=lambda r: r["fewer_misses"])
            met = b["fewer_misses"] >= GOAL_FEWER_MISSES
            L += [
                "",
                f"- With prefetching: `{b['setting']}` has {b['fewer_misses'] * 100:.1f} % fewer misses at "
                f"{_pct(b['ppl_increase'])} perplexity ({goal}: {'met' if met else '**not met**'}).",
            ]
        L.append("")
    return L + _speed_lines(results)
