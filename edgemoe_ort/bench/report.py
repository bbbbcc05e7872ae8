"""Tables and plots from benchmark results:
``python -m edgemoe_ort.bench.report RESULTS.json OUT.md IMG_DIR``.

``RESULTS.json`` is what :mod:`edgemoe_ort.bench.suite` writes: ``{"runs": {name: run_bench result},
"kernels": run_kernel_bench result | null, "commands": [...], ...}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MODE_ORDER = ("resident", "inmemory", "naive", "mmap", "edgemoe")
MODE_LABEL = {
    "resident": "our op, everything cached (roofline compute)",
    "inmemory": "all-in-memory (ORT QMoE/MoE)",
    "naive": "naive on-demand (policy none, O_DIRECT)",
    "mmap": "mmap (LRU at budget)",
    "edgemoe": "edgemoe (LRU at budget, O_DIRECT)",
}
#: the RSS goal: peak RSS over the post-import baseline <= dense weights + budget + this slack
RSS_SLACK_BYTES = 64 * 2**20


def row_policy(m: dict[str, Any]) -> str | None:
    """The cache policy of a mode row (results written before rows carried ``policy``: derived)."""
    if "policy" in m:
        return m["policy"]
    return {"inmemory": None, "naive": "none"}.get(m["mode"], "lru")


def edgemoe_rows(
    run: dict[str, Any], budget: str | None = None, variant: str | None = None
) -> list[dict[str, Any]]:
    """The run's edgemoe rows (every policy) of the main bundle (or of the run's ``variant`` bundle),
    optionally only those at ``budget``."""
    return [
        m
        for m in run["modes"]
        if m["mode"] == "edgemoe"
        and (budget is None or m["budget"] == budget)
        and m.get("variant") == variant
    ]


def row_routing(m: dict[str, Any]) -> str:
    """The routing spec of a mode row (``exact`` for rows written before rows carried it)."""
    return m.get("routing") or "exact"


def edgemoe_row(
    run: dict[str, Any],
    budget: str,
    policy: str = "lru",
    predictor: str | None = None,
    routing: str = "exact",
    precision: str = "exact",
    variant: str | None = None,
) -> dict[str, Any] | None:
    """The edgemoe row at ``budget`` with ``policy``, ``predictor`` (None: no prefetching), ``routing`` and
    miss ``precision`` (labelled ``edgemoe@B``, ``edgemoe[P]@B``, ``edgemoe[P+pred]@B``,
    ``edgemoe[P+pred/spec]@B`` or ``edgemoe[P+pred~spec]@B``), of the main bundle or of the run's
    ``variant`` bundle (``variant:edgemoe[…]@B``)."""
    return next(
        (
            m
            for m in edgemoe_rows(run, budget, variant)
            if row_policy(m) == policy and m.get("predictor") == predictor and row_routing(m) == routing
            and row_precision(m) == precision
        ),
        None,
    )


def row_precision(m: dict[str, Any]) -> str:
    """The miss-precision spec of a mode row (``exact`` for rows written before rows carried it)."""
    return m.get("miss_precision") or "exact"


def row_config(m: dict[str, Any]) -> str:
    """``policy``, ``policy + predictor``, then `` / routing`` and `` ~ miss precision`` unless exact (``–``
    for the in-memory baseline)."""
    pol = row_policy(m) or "–"
    out = f"{pol} + {m['predictor']}" if m.get("predictor") else pol
    out = out if row_routing(m) == "exact" else f"{out} / {row_routing(m)}"
    out = out if row_precision(m) == "exact" else f"{out} ~ {row_precision(m)}"
    return f"{m['variant']}: {out}" if m.get("variant") else out


def policies_of(run: dict[str, Any]) -> list[str]:
    """The edgemoe policies of a run, in run order (rows without prefetching)."""
    out: list[str] = []
    for m in edgemoe_rows(run):
        if m.get("predictor"):
            continue
        p = row_policy(m) or "lru"
        if p not in out:
            out.append(p)
    return out


def rss_check(run: dict[str, Any], m: dict[str, Any]) -> dict[str, Any] | None:
    """The RSS goal for one mode row: ``delta`` = peak RSS - post-import baseline (both from the fresh
    process of :mod:`edgemoe_ort.bench.rss`), ``limit`` = the bundle's dense bytes + the budget + 64 MiB,
    ``ok`` = delta <= limit. None if the row has no RSS measurement."""
    rss = m.get("rss") or {}
    peak, base = m.get("peak_rss_bytes"), rss.get("base_rss_bytes")
    if not peak or base is None:
        return None
    limit = int(run["dense_bytes"]) + int(m.get("budget_bytes") or 0) + RSS_SLACK_BYTES
    return {
        "peak": int(peak),
        "base": int(base),
        "delta": int(peak) - int(base),
        "limit": limit,
        "ok": int(peak) - int(base) <= limit,
        "decode_tokens": rss.get("decode_tokens"),
        "hwm_per_step": rss.get("hwm_per_step"),
        "end_rss": rss.get("end_rss_bytes"),
    }


def _hwm_at(hwm: list[int] | None, base: int, steps: tuple[int, ...] = (8, 16, 32, 64)) -> str:
    """'Δ after 8/16/32/64 decode tokens: a/b/c/d MiB' from the per-step VmHWM list (index 0 = prefill)."""
    if not hwm:
        return ""
    got = [(n, hwm[n]) for n in steps if n < len(hwm)]
    if not got:
        return ""
    return (
        "; Δ after "
        + "/".join(str(n) for n, _ in got)
        + " decode tokens: "
        + "/".join(f"{(h - base) / 2**20:.0f}" for _, h in got)
        + " MiB"
    )


def rss_verdicts(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per budget and edgemoe policy: the RSS goal ``peak RSS <= dense + budget + 64 MiB`` (peak over the
    post-import baseline), with a one-line ``text``. Empty if the run measured no RSS."""
    out = []
    for m in edgemoe_rows(run):
        c = rss_check(run, m)
        if c is None:
            continue
        n = c["decode_tokens"]
        text = (
            f"{m['label']}: peak RSS {c['delta'] / 2**20:,.0f} MiB over the post-import baseline "
            f"(process peak {c['peak'] / 2**20:,.0f} MiB, {n if n is not None else '?'} decode tokens) "
            f"<= dense {run['dense_bytes'] / 2**20:,.0f} "
            f"+ budget {(m.get('budget_bytes') or 0) / 2**20:,.0f} "
            f"+ 64 MiB = {c['limit'] / 2**20:,.0f} MiB: {'met' if c['ok'] else 'not met'}"
            + _hwm_at(c["hwm_per_step"], c["base"])
        )
        out.append({"label": m["label"], "budget": m["budget"], "policy": row_policy(m), **c, "text": text})
    return out


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _median(xs: list[float]) -> float:
    import statistics

    return float(statistics.median(xs)) if xs else 0.0


def roofline_ratio(run: dict[str, Any], m: dict[str, Any]) -> float | None:
    """``m``'s ratio to roofline, or None when the run withheld its ratios (runner.ratios_withheld)."""
    return None if run.get("ratios_withheld") else m["roofline_ratio"]


def paired_ratio(run: dict[str, Any], m: dict[str, Any]) -> float | None:
    """Median over repeats of ``bound_r / measured_r``, with repeat r's compute taken from the same repeat's
    ``resident`` run: robust when the machine's speed changes between repeats (other tenants). None when
    the run withheld its ratios."""
    res = next((x for x in run["modes"] if x["mode"] == "resident"), None)
    if res is None or "decode_s_per_token_runs" not in m or run.get("ratios_withheld"):
        return None
    bw = run["roofline_bw_bytes_per_s"]
    io = m["bytes_read_per_token"] / bw if bw else 0.0
    pairs = zip(res["decode_s_per_token_runs"], m["decode_s_per_token_runs"], strict=False)
    return _median([max(c, io) / t for c, t in pairs if t > 0])


def paired_speedup(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median over repeats of ``time_b / time_a`` (how many times faster ``a`` is than ``b``)."""
    pairs = zip(a["decode_s_per_token_runs"], b["decode_s_per_token_runs"], strict=False)
    return _median([tb / ta for ta, tb in pairs if ta > 0])


def mode_table(run: dict[str, Any]) -> str:
    """The Markdown table of every mode of one run."""
    rows = [
        "| mode | policy (+ predictor) | budget | decode tok/s | prefill tok/s | TTFT s | MB read / tok "
        "| hit rate | stall ms / tok | peak RSS MiB (Δ over base) | bound ms / tok | ratio to roofline "
        "| paired ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in run["modes"]:
        rss = m.get("rss") or {}
        base = rss.get("base_rss_bytes")
        peak = m.get("peak_rss_bytes")
        delta = (peak - base) if (peak is not None and base is not None) else None
        budget = m["budget"] or "–"
        if m.get("budget_bytes"):
            budget += f" ({_mib(m['budget_bytes'])} MiB)"
        rows.append(
            f"| {m['mode']} | {row_config(m)} | {budget} | {m['decode_tokens_per_s']:.2f} "
            f"| {m['prefill_tokens_per_s']:.1f} "
            f"| {m['ttft_s']:.2f} | {m['bytes_read_per_token'] / 1e6:.1f} "
            f"| {_f(m['hit_rate'], '{:.0%}')} | {m['stall_s_per_token'] * 1e3:.1f} "
            f"| {_mib(peak)} ({_mib(delta)}) | {m['bound_s_per_token'] * 1e3:.1f} | "
            f"{_f(roofline_ratio(run, m))} | {_f(paired_ratio(run, m))} |"
        )
    return "\n".join(rows)


def headline(run: dict[str, Any], budget: str = "25%") -> dict[str, Any]:
    """edgemoe (policy lru) at ``budget`` against naive: speed-up (ratio of medians and paired), ratio to
    roofline (plain and paired) and the RSS goal (``rss_delta``, ``rss_limit``, ``rss_ok``) if measured."""
    e, n = edgemoe_row(run, budget), next((m for m in run["modes"] if m["mode"] == "naive"), None)
    out: dict[str, Any] = {}
    if e and n and n["decode_tokens_per_s"]:
        out["edgemoe_over_naive"] = e["decode_tokens_per_s"] / n["decode_tokens_per_s"]
        out["edgemoe_over_naive_paired"] = paired_speedup(e, n)
        out["roofline_ratio"] = roofline_ratio(run, e)
        out["roofline_ratio_paired"] = paired_ratio(run, e)
        c = rss_check(run, e)
        if c is not None:
            out["rss_delta"] = c["delta"]
            out["rss_limit"] = c["limit"]
            out["rss_ok"] = c["ok"]
    return out


def policy_table(run: dict[str, Any]) -> str:
    """One row per budget and edgemoe policy: speed, speed-up over lru (paired per repeat), cache figures,
    peak RSS and the RSS goal. Empty string if the run has fewer than two policies."""
    pols = policies_of(run)
    if len(pols) < 2:
        return ""
    rows = [
        "| budget | policy | decode tok/s | × lru (paired) | hit rate | MB read / tok | stall ms / tok "
        "| ratio to roofline (paired) | peak RSS Δ MiB | RSS ≤ dense + budget + 64 MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for b in run["budgets"]:
        lru = edgemoe_row(run, b, "lru")
        for m in edgemoe_rows(run, b):
            if m.get("predictor") or row_routing(m) != "exact" or row_precision(m) != "exact":
                continue  # the policies alone: prefetching, routing and twins have tables of their own
            c = rss_check(run, m)
            up = paired_speedup(m, lru) if lru is not None else None
            verdict = "–"
            if c is not None:
                verdict = f"{'met' if c['ok'] else '**not met**'} (≤ {_mib(c['limit'])})"
            rows.append(
                f"| {b} | {row_policy(m)} | {m['decode_tokens_per_s']:.2f} | {_f(up)} "
                f"| {_f(m['hit_rate'], '{:.0%}')} | {m['bytes_read_per_token'] / 1e6:.1f} "
                f"| {m['stall_s_per_token'] * 1e3:.1f} | {_f(paired_ratio(run, m))} "
                f"| {_mib(c['delta']) if c else '–'} | {verdict} |"
            )
    return "\n".join(rows)


def prefetch_table(run: dict[str, Any], budget: str = "25%") -> str:
    """The ablation of one prefetch run, EdgeMoE style: naive -> cache (lru) -> best policy -> + each
    predictor, with speed-up over naive and over lru without prefetching (paired per repeat), stall, ratio to
    roofline (paired), prefetch precision, hidden reads and wasted bytes per token."""
    naive = next((m for m in run["modes"] if m["mode"] == "naive"), None)
    lru = edgemoe_row(run, budget, "lru")
    rows = [
        "| configuration | decode tok/s | × naive | × lru, no prefetch | hit rate | stall ms / tok "
        "| ratio to roofline (paired) | prefetch precision | hidden reads / tok | wasted MB / tok |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in ([naive] if naive else []) + edgemoe_rows(run, budget):
        rows.append(
            f"| {'naive (no cache)' if m is naive else row_config(m)} | {m['decode_tokens_per_s']:.2f} "
            f"| {_f(paired_speedup(m, naive) if naive else None)} "
            f"| {_f(paired_speedup(m, lru) if lru and m is not naive else None)} "
            f"| {_f(m['hit_rate'], '{:.0%}')} | {m['stall_s_per_token'] * 1e3:.1f} "
            f"| {_f(roofline_ratio(run, m))} ({_f(paired_ratio(run, m))}) "
            f"| {_f(m.get('prefetch_precision'))} | {_f(m.get('prefetch_hidden_per_token'), '{:.1f}')} "
            f"| {_f((m.get('prefetch_wasted_bytes_per_token') or 0) / 1e6, '{:.2f}')} |"
        )
    return "\n".join(rows)


def prefetch_verdicts(name: str, run: dict[str, Any], budget: str = "25%") -> list[str]:
    """The issue's goals for one prefetch run: the best prediction row against the same policy without
    prediction (stall, speed) and its ratio to roofline."""
    rows = [m for m in edgemoe_rows(run, budget) if m.get("predictor")]
    if not rows:
        return []
    best = max(rows, key=lambda m: m["decode_tokens_per_s"])
    base = edgemoe_row(run, budget, row_policy(best) or "lru")
    lru = edgemoe_row(run, budget, "lru")
    ratio = roofline_ratio(run, best)
    verdict = "met" if ratio is not None and ratio >= 0.9 else "**not met**"
    if ratio is None:
        verdict = f"withheld: {run['ratios_withheld']}"
    out = [
        f"best with prediction: {row_config(best)}: {best['decode_tokens_per_s']:.2f} tok/s, ratio to "
        f"roofline {_f(ratio)} (paired {_f(paired_ratio(run, best))}; goal ≥ 0.9: {verdict})"
    ]
    if base is not None:
        s0, s1 = base["stall_s_per_token"], best["stall_s_per_token"]
        out.append(
            f"stall per token {s1 * 1e3:.1f} ms vs {s0 * 1e3:.1f} ms without prediction (same policy; "
            f"goal: at least halved: {'met' if s1 <= s0 / 2 else '**not met**'})"
        )
    if lru is not None:
        up = paired_speedup(best, lru)
        goal = f" (goal on the storage-bound small model: ≥ 1.3: {'met' if up >= 1.3 else '**not met**'})"
        out.append(f"× lru without prediction (paired): {up:.2f}{goal if 'small' in name else ''}")
    return out


def _large_profile_lines(pp: dict[str, Any]) -> list[str]:
    """What ``auto`` follows on the large model: its profile's recall, by depth (min / median / max)."""
    from edgemoe_ort.profile.probe import next_layer_sites

    def spread(vals: list[float | None]) -> str:
        v = sorted(x for x in vals if x is not None)
        return f"{v[0]:.3f} / {v[len(v) // 2]:.3f} / {v[-1]:.3f}" if v else "–"

    rp = pp.get("probes") or {}
    rows = []
    for kind in ("residual", "gates"):
        sites = next_layer_sites(rp, kind)
        if sites:
            rows.append(
                f"| {kind} | {spread([e['recall_router'] for e in sites])} | "
                f"{spread([e['recall_probe'] for e in sites])} |"
            )
    c = pp["corpus"]
    auto = sorted({"+".join(a) for a in pp.get("auto", [])[1:]})
    last = len(pp.get("auto", [])) - 1
    return [
        "### The large model's profile",
        "",
        f"`{pp['bundle']}/profile.json`: {c['train_tokens']} train and {c['heldout_tokens']} held-out tokens "
        f"of {', '.join(f'`{x}`' for x in c['paths'])} (`edgemoe-profile --ids`: the model has no tokenizer, "
        "and with random weights any text is as random to it). Held-out recall@2 of the next layer over "
        f"layers 1-{last}, min / median / max; the routers of deep layers see nearly the residual stream "
        f"they route, the first ones do not. `auto` there: {', '.join(auto) or '–'} (layers 1-{last}).",
        "",
        "| predictor | router | fitted probe |",
        "|---|---:|---:|",
        *rows,
        "",
    ]


def _probe_lines(rp: dict[str, Any] | None) -> list[str]:
    """The fitted probes' recall against the routers they replace (none without probes)."""
    from edgemoe_ort.profile.probe import next_layer_sites

    if not rp or not rp.get("sites"):
        return []
    lines = []
    for kind, what in (("residual", "`residual`"), ("gates", "`gates` (the next layer's row)")):
        cells = ", ".join(
            f"layer {e['layer']} {_f(e['recall_router'], '{:.3f}')} → **{e['recall_probe']:.3f}**"
            for e in next_layer_sites(rp, kind)
        )
        if cells:
            lines.append(f"- {what}: {cells}")
    return [
        f"`residual` and `gates` are the probes fitted to the routers (ridge {rp['ridge']:g} per token, "
        f"{rp['train_tokens']} train tokens; docs/op-contract.md, \"Fitted probes\"); held-out recall, the "
        "router on the same features → the probe:",
        "",
        *lines,
        "",
    ]


def recall_table(recall: dict[str, list[float | None]], auto: list[list[str]] | None) -> str:
    """Held-out recall@K per predictor (and mean of predictors) per layer, from a bundle's profile."""
    n = max(len(v) for v in recall.values())
    rows = ["| predictor | " + " | ".join(f"layer {i}" for i in range(n)) + " |", "|---|" + "---:|" * n]
    for name, vals in recall.items():
        rows.append(f"| {name} | " + " | ".join(_f(v, "{:.3f}") for v in vals) + " |")
    if auto:
        rows.append("| **auto** (chosen) | " + " | ".join("+".join(a) for a in auto) + " |")
    return "\n".join(rows)


def plot_run(name: str, run: dict[str, Any], img_dir: Path) -> list[str]:
    """Decode tokens/s and ratio to roofline against the budget (one line per mode and edgemoe policy) as
    ``img_dir/bench-NAME.png``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    budgets = run["budgets"]
    store = run.get("primary_bytes") or run["store_bytes"]  # what a budget in percent is a share of
    xs = {b: float(b.rstrip("%")) if b.endswith("%") else 100.0 * int(b) / store for b in budgets}
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [("decode_tokens_per_s", axes[0], "decode tokens/s")]
    if run.get("ratios_withheld"):  # not plotted: the numbers are what the run could not measure
        axes[1].text(0.5, 0.5, "ratios to roofline withheld:\nthe machine's speed changed during the run",
                     ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_axis_off()
    else:
        panels.append(("roofline_ratio", axes[1], "ratio to roofline (bound / measured)"))
    for key, ax, ylabel in panels:
        pols = policies_of(run)
        for mode in MODE_ORDER:
            rows = [m for m in run["modes"] if m["mode"] == mode and not m.get("variant")]
            if not rows:
                continue
            if rows[0]["budget"] is None:
                ax.axhline(
                    rows[0][key],
                    ls="--",
                    lw=1.2,
                    label=MODE_LABEL[mode],
                    color={"inmemory": "k", "naive": "tab:red", "resident": "tab:green"}.get(mode),
                )
                continue
            groups = [(MODE_LABEL[mode], rows)]
            if mode == "edgemoe" and len(pols) > 1:
                groups = [
                    (f"edgemoe ({p} at budget, O_DIRECT)", [m for m in rows if (row_policy(m) or "lru") == p])
                    for p in pols
                ]
            for label, grp in groups:
                pts = sorted((xs[m["budget"]], m[key]) for m in grp)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("expert cache budget (% of the store)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if not run.get("ratios_withheld"):
        axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"{name}: store {store / 2**30:.2f} GiB, {run['decode_tokens']} decode tokens, "
        f"median of {run['repeats']}"
    )
    fig.tight_layout()
    f = img_dir / f"bench-{name}.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(f.name)
    return files


def _simd_text(simd: list[str] | None) -> str:
    """' (CPU has AVX-512, AMX)' / ' (CPU has no AVX-512)' from machine_info's ``simd``; '' if unknown."""
    if simd is None:
        return ""
    amx = any(x.startswith("amx") for x in simd)
    has = (["AVX-512"] if "avx512f" in simd else []) + (["AMX"] if amx else [])
    return f" (CPU has {', '.join(has)})" if has else " (CPU has no AVX-512)"


def _kernel_load(k: dict[str, Any]) -> str:
    """" 1-minute load average 0.40 → 0.90 (start → end)." for a kernel result that recorded it, else ""."""
    a, b = k.get("loadavg_start"), k.get("loadavg_end")
    if not a or not b:
        return ""
    return f" 1-minute load average {a[0]:.2f} → {b[0]:.2f} (start → end)."


def write_report(
    results: dict[str, Any],
    out_md: str | Path,
    img_dir: str | Path,
    llama: dict[str, dict[str, Any]] | None = None,
    exports: list[dict[str, Any]] | None = None,
) -> None:
    """Render ``results`` (see the module doc) as Markdown in ``out_md`` with plots in ``img_dir``;
    ``llama``: the llama.cpp comparisons (:func:`llama_results`), one section each."""
    out_md, img_dir = Path(out_md), Path(img_dir)
    rel_img = Path("img") if img_dir.resolve().parent == out_md.resolve().parent else img_dir
    L: list[str] = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`mk/bench.mk`) from `build/bench/results.json`; do not edit by hand.",
        "",
    ]
    mach = next(iter(results["runs"].values()))["machine"] if results.get("runs") else {}
    simd = next(
        (r["machine"]["simd"] for r in results.get("runs", {}).values() if "simd" in r["machine"]), None
    )
    L += [
        "## Machine",
        "",
        f"- CPU: {mach.get('cpu', '?')} ({mach.get('cpus', '?')} logical CPUs, shared), "
        f"RAM {mach.get('mem_bytes', 0) / 2**30:.0f} GiB, kernel path `{mach.get('kernel', '?')}`"
        + _simd_text(simd),
        f"- {mach.get('platform', '?')}, Python {mach.get('python', '?')}, onnxruntime "
        f"{mach.get('onnxruntime', '?')}",
    ]
    libs = sorted(
        {
            str(r["machine"]["library"].get("sha256"))
            for r in results.get("runs", {}).values()
            if isinstance(r["machine"].get("library"), dict)
        }
    )
    if libs:
        L.append(f"- op library sha256 {', '.join(f'`{x}`' for x in libs)} (first 16 hex digits)")
    L += [
        "- 1-min load average before each run → after it (the run itself keeps ~2 threads busy): "
        + ", ".join(
            f"{n} {r['machine']['loadavg_start'][0]:.2f}→{r.get('loadavg_end', [0])[0]:.2f}"
            for n, r in results.get("runs", {}).items()
        ),
        "",
    ]
    if results.get("notes"):
        L += ["## Read this first", ""] + [f"- {n}" for n in results["notes"]] + [""]
    L += ["## Commands", "", "```"] + results.get("commands", []) + ["```", ""]
    L += [
        "## Method",
        "",
        "- One process per model, modes interleaved: repeat r runs every mode once, forward order "
        "for even r and "
        "reverse for odd r; every figure is the median over repeats. Each run opens a fresh session "
        "(cold cache; "
        "the store's pages are dropped from the page cache first), runs the prefill, then decodes a "
        "fixed token "
        "sequence (the greedy output of a reference run), so every mode does the same work.",
        "- all-in-memory = the bundle converted by `edgemoe_ort.bench.inmemory` into ORT's own "
        "`com.microsoft.QMoE` "
        "(int4/int8, the bundle's quantized bytes, bit-identical weights) or `MoE` (fp32), run by ORT alone.",
        "- Peak RSS: per mode, in a fresh subprocess running one generation "
        "(`edgemoe_ort.bench.rss`) of the number of decode tokens each section states (64 unless "
        "said otherwise: RSS that grows with the run length hides in a short run): VmHWM over the "
        "whole process (session creation included). `Δ` = peak − RSS after imports (interpreter + "
        "numpy + ORT). The RSS goal, per budget and policy: Δ ≤ dense weights (the bundle's graph files) + "
        "budget + 64 MiB.",
        "- Cache policies: with several policies every (policy, budget) pair is its own mode "
        "`edgemoe[P]@budget`, interleaved with all the others; `× lru (paired)` = the median over repeats "
        "of lru's time / the policy's time in the same repeat.",
        "- Roofline: `bound = max(compute, bytes read per token / bandwidth)`, compute = our op with every "
        "expert resident (budget 100 %, warmed, 0 misses), bandwidth = O_DIRECT reads of the store "
        "at its blob "
        "size (or the profile's bandwidth). `ratio = bound / measured` (1.0 = at the bound). "
        "`paired ratio` = "
        "the median over repeats of the same ratio with the compute of the same repeat's `resident` run: "
        "the machine's speed changed between repeats (other tenants), and pairing cancels that.",
        "",
    ]
    for name, run in results.get("runs", {}).items():
        st = run["storage"]
        L += [
            f"## {name}",
            "",
            f"- bundle `{run['bundle']}` "
            f"({run['workload']}{', trace ' + run['trace'] if run.get('trace') else ''}): "
            f"store {run['store_bytes'] / 2**30:.2f} GiB in {run['num_experts']} experts "
            f"(largest blob {run['largest_expert_bytes'] / 2**20:.2f} MiB), dense weights "
            f"{run['dense_bytes'] / 2**20:.0f} MiB",
            f"- {run['prompt_tokens']} prompt tokens, {run['decode_tokens']} decode tokens, "
            f"{run['repeats']} repeats, "
            f"{run['io_threads']} I/O threads, intra-op threads {run['threads'] or 'ORT default'}"
            + (
                f"; peak RSS over {run['rss_decode_tokens']} decode tokens"
                if run.get("rss_decode_tokens") is not None
                else ""
            ),
            f"- storage: O_DIRECT {st['bytes_per_s'] / 1e6:.0f} MB/s at {st['block_bytes'] / 2**20:.2f} MiB "
            f"reads (runs {', '.join(f'{x / 1e6:.0f}' for x in st['runs'])}), 4 KiB read "
            f"{st['latency_us']:.0f} µs, "
            f"direct={st['direct']}"
            + (
                f"; **profile `{run['profile']['name']}`**: "
                f"{run['profile']['read_bw_bytes_per_s'] / 1e6:.0f} MB/s, "
                f"{run['profile']['read_latency_us']:.0f} µs per read (throttled store)"
                if run.get("profile")
                else ""
            ),
            f"- resident compute {run['compute_s_per_token'] * 1e3:.1f} ms / decode token "
            f"(misses during it: {run['compute_misses']}); run took {run['elapsed_s']:.0f} s",
            "",
        ]
        L += [mode_table(run), ""]
        if run.get("predictors") and not run.get("routings"):  # a routing run: its own section below
            L += [
                "Ablation (naive → cache → policy → + prediction), paired per repeat:",
                "",
                prefetch_table(run),
                "",
            ]
            L += [f"- {v}" for v in prefetch_verdicts(name, run)] + [""]
        pt = policy_table(run)
        if pt:
            L += [f"Cache policies ({', '.join(policies_of(run))}), per budget:", "", pt, ""]
        verdicts = rss_verdicts(run)
        if verdicts:
            L += (
                [
                    "Peak RSS per budget (fresh process per mode, "
                    f"{run.get('rss_decode_tokens', verdicts[0]['decode_tokens'] or '?')} decode tokens; "
                    "goal: peak RSS over the post-import baseline ≤ dense + budget + 64 MiB):",
                    "",
                ]
                + [f"- {v['text']}" for v in verdicts]
                + [""]
            )
        h = headline(run)
        if h:
            L += [
                f"At 25 %: edgemoe / naive = **{h['edgemoe_over_naive']:.2f}x** (ratio of medians; median of "
                f"the per-repeat ratios {h['edgemoe_over_naive_paired']:.2f}x), ratio to roofline "
                f"**{_f(h['roofline_ratio'])}** (paired per repeat: {_f(h['roofline_ratio_paired'])})"
                + (
                    f", peak RSS Δ {h['rss_delta'] / 2**20:.0f} MiB vs dense + budget + 64 MiB = "
                    f"{h['rss_limit'] / 2**20:.0f} MiB ({'within' if h['rss_ok'] else 'OVER'})"
                    if "rss_delta" in h
                    else ""
                )
                + ".",
                "",
            ]
        for f in plot_run(name, run, img_dir):
            L += [f"![{name}]({(rel_img / f).as_posix()})", ""]
    pp = results.get("prefetch_profile")
    if pp:
        L += [
            "## Prediction: held-out recall of every predictor (default model)",
            "",
            f"Recall@K (K = 2: the share of a token's two experts among the predictor's two best guesses) on "
            f"the held-out {pp['corpus']['heldout_tokens']} tokens of `{pp['bundle']}/profile.json` "
            f"(tables fitted on {pp['corpus']['train_tokens']} tokens; `edgemoe-profile`). "
            "Layer 0 can only be "
            "predicted from the token (before it runs); `gates` = the layer's router on the previous layer's "
            "MoE input; `residual` = the layer's router on the residual stream leaving the previous layer "
            "(`ResidualPrefetch`), each or the probe fitted to it where the profile has one; a `+` is "
            "the mean of the members' probabilities.",
            "",
            recall_table(pp["recall"], pp.get("auto")),
            "",
            *_probe_lines(pp.get("probes")),
            "Reading the ablations above: where storage bounds the token (the small model on rpi4, the "
            "large model on jetson-emmc) compute is a small part of it, so overlap can hide at "
            "most that part, while "
            "every wrong guess is a read the device still serves and every swap evicts an expert the cache "
            "would have kept for later tokens (compare hit rate and MB read per token with and without a "
            "predictor). Where compute could hide reads (the large model unthrottled), that model has random "
            "weights: its routers give nearly flat softmaxes, so few guesses pass the threshold and many of "
            "those are wrong (the precision column). The rules that keep prediction from hurting (a prefetch "
            "swaps only within its layer, only a less likely expert, and takes its victim's recency) are in "
            "docs/op-contract.md.",
            "",
        ]
        best = [
            max((v[i] for v in pp["recall"].values() if v[i] is not None), default=None)
            for i in range(len(next(iter(pp["recall"].values()))))
        ]
        ok = all(b is not None and b >= 0.85 for b in best)
        L += [
            f"- Goal (best predictor ≥ 0.85 at every layer): {'met' if ok else '**not met**'} "
            f"(best per layer {', '.join(_f(b, '{:.3f}') for b in best)}).",
            "",
        ]
    ppl = results.get("prefetch_profile_large")
    if ppl:
        L += _large_profile_lines(ppl)
    if results.get("oracle"):
        from edgemoe_ort.bench.oracle import oracle_markdown

        L += [
            "## Prefetch with a predictor of chosen accuracy (trace replay)",
            "",
            "`python -m edgemoe_ort.bench.oracle` (suite part `oracle`): the trace-replay bundle, whose "
            "stacked-gates input carries the recorded next-layer experts, each replaced by a wrong one with "
            "probability 1 − accuracy: what the engine's overlap reaches with a predictor of that precision, "
            "apart from the predictors' quality. `none` = no prefetching; `resident` = everything cached "
            "(the compute).",
            "",
        ]
        for res in results["oracle"]:
            L += oracle_markdown(res) + [""]
    from edgemoe_ort.bench.report_routing import routing_markdown

    L += routing_markdown(results, img_dir, rel_img)
    from edgemoe_ort.bench.report_twins import twins_markdown

    L += twins_markdown(results)
    from edgemoe_ort.bench.report_ablation import ablation_markdown

    L += ablation_markdown(results)
    ws = results.get("warm_start")
    if ws:
        L += [
            "## Warm start",
            "",
            f"`{ws['bundle']}` at {ws['budget']}, storage profile {ws['profile']}, "
            f"policy {ws['policy']}: the "
            f"prompt and {ws['tokens']} generated tokens in a fresh session, cold vs `--warm-start profile`, "
            f"median of {ws['repeats']} (`python -m edgemoe_ort.bench.warmstart`). `idle` = seconds between "
            "opening the session and the prompt, while the warm reads run in the background.",
            "",
            "| idle s | cold stall s | warm stall s | cold wall s | warm wall s | cold misses "
            "| warm misses |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ws["runs"]:
            c, w = r["cold"], r["warm"]
            L.append(
                f"| {r['idle_s']:g} | {c['stall_s']:.3f} | {w['stall_s']:.3f} | {c['wall_s']:.3f} "
                f"| {w['wall_s']:.3f} | {c['misses']:.0f} | {w['misses']:.0f} |"
            )
        L += [""]
    ph = results.get("policy_hit_rates")
    if ph:
        from edgemoe_ort.bench.policies import markdown_table

        L += [
            "## Cache policies: hit rates on the default model's held-out text",
            "",
            "Held-out windows of the default model, prefilled, then decoded one token at a time through the "
            "KV cache. Hit rates are the op's own counters; the simulator replays the recorded routing and "
            "must agree exactly; Belady is the offline optimum for the same trace. Frequencies "
            "(`edgemoe+freq`, `pinned`) are counted on disjoint calibration windows. One table: "
            "`python -m edgemoe_ort.bench.policies BUNDLE --budget B`.",
            "",
        ]
        for r in ph:
            L += [f"### budget {r['budget']}", "", markdown_table(r), ""]
    k = results.get("kernels")
    if k:
        L += [
            "## Kernel micro-benchmark (one expert FFN, everything resident)",
            "",
            f"H={k['hidden']}, I={k['intermediate']}, int{k['bits']} g{k['group_size']}, "
            f"{k['threads']} intra-op thread(s); interleaved, median of {k['samples']} samples × "
            f"{k['calls']} calls. "
            "`ours` = OffloadedExpert with the expert cached; `QMoE` = ORT com.microsoft.QMoE "
            "(accuracy_level 0) on "
            "the same bytes; `MatMulNBits` = 2× ORT MatMulNBits (accuracy_level 0) + SwiGLU."
            + _kernel_load(k),
            "",
            "| T | ours ms | QMoE ms | MatMulNBits ms | ours / QMoE | ours / MatMulNBits | max |Δ| vs ours |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in k["results"]:
            md = r["median_s"]
            L.append(
                f"| {r['T']} | {md['ours'] * 1e3:.2f} | {md['qmoe'] * 1e3:.2f} | "
                f"{md['matmulnbits'] * 1e3:.2f} "
                f"| {r['ours_over_qmoe']:.2f} | {r['ours_over_matmulnbits']:.2f} "
                f"| QMoE {r['max_abs_diff_vs_ours']['qmoe']:.1e}, MMNB "
                f"{r['max_abs_diff_vs_ours']['matmulnbits']:.1e} |"
            )
        L.append("")
        kf = k.get("formats")
        if kf:
            L += [
                "### Ours across expert formats",
                "",
                f"The same expert shape (H={kf['hidden']}, I={kf['intermediate']}, g{kf['group_size']}, "
                f"{kf['threads']} thread(s)) in each quantized format, `ours` only, the formats timed "
                f"interleaved (median of {kf['samples']} samples × {kf['calls']} calls); the comparison "
                "with ORT's ops stays int4 (above: ORT has no 3-bit QMoE / MatMulNBits, and int2 is not "
                "converted to them here). Expert MB = the expert's blob (weights, scales, zero points); "
                "GB/s = those bytes over the time." + _kernel_load(kf),
                "",
                "| format | T | ours ms | expert MB | GB/s | vs int4 |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for r in kf["results"]:
                rel = r.get("over_int4")
                L.append(
                    f"| {r['dtype']} | {r['T']} | {r['median_s'] * 1e3:.2f} | {r['expert_bytes'] / 1e6:.1f} "
                    f"| {r['bytes_per_s'] / 1e9:.2f} | {'' if rel is None else f'{rel:.2f}x'} |"
                )
            L.append("")
    if llama:
        from edgemoe_ort.bench.llama_cap import markdown_table as llama_table

        L += [
            "## Against llama.cpp under the same memory cap",
            "",
            "`make bench-llama` (large model), `make bench-llama-1b` and `make bench-llama-1b-d4` (the 1.0 B "
            "shape of issue 17), "
            "mk/llama.mk: llama.cpp built from the llama-cpp-python sdist, the same checkpoint converted to "
            "GGUF Q4_0, every run in its own memory cgroup at the same cap. Issue 17's goal is ≥ 4x "
            "llama.cpp's decode tokens/s at llama's dense + 25% cap.",
            "",
        ]
        for name, run in llama.items():
            L += [f"### {name}", "", llama_table(run), ""]
    if exports:
        L += _export_section(exports)
    if results.get("findings"):
        L += ["## Findings", ""] + [f"- {f}" for f in results["findings"]] + [""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(L) + "\n")


#: the llama.cpp comparison files beside results.json that the report includes (mk/llama.mk writes them)
LLAMA_RESULTS = (
    ("Large model (24 layers, 1.16 GB int4 store), float32 dense weights", "llama.json"),
    ("Large model, int4 dense weights (--dense-bits 4)", "llama-d4.json"),
    ("The 1.0 B shape, float32 dense weights", "llama-1b.json"),
    ("The 1.0 B shape, int4 dense weights (--dense-bits 4)", "llama-1b-d4.json"),
)


#: the exporter measurements beside results.json (mk/export-bench.mk writes them)
EXPORT_RESULTS = ("large-export.json", "x8-export.json")


def export_results(results_path: str | Path) -> list[dict[str, Any]]:
    """The exporter measurements found beside ``results_path`` (EXPORT_RESULTS)."""
    here = Path(results_path).parent
    return [json.loads((here / f).read_text()) for f in EXPORT_RESULTS if (here / f).is_file()]


def _export_section(runs: list[dict[str, Any]]) -> list[str]:
    gib = 2**30
    L = [
        "## Exporter: peak memory and time",
        "",
        "`make export-bench` (mk/export-bench.mk): `edgemoe-export`'s library call on a random bf16"
        " checkpoint, int4 g64 experts, fp32 dense, under `/usr/bin/time -v` (peak RSS: its maximum"
        " resident set size, torch and transformers included). Issue 13's goals: peak RSS ≤ the fp32 dense"
        " bytes + 1 GiB (the 1 GiB-store model) and + 1.5 GiB (Mixtral-8x7B's expert shapes).",
        "",
        "| checkpoint | streamed | expert params | dense fp32 | peak RSS | goal | met | wall s | trace s | "
        "experts s | write s | load avg (1-min) | code |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in runs:
        sec = r.get("export_seconds") or {}
        code = r.get("code") or {}
        commit = (code.get("commit") or "?")[:7]
        if any(line[3:].startswith(("edgemoe_ort/", "customops/")) for line in code.get("changed") or []):
            commit += "+"  # measured with changes in the work tree
        L.append(
            f"| `{r['checkpoint']}` ({r['preset']}) | {'yes' if r['stream'] else 'no'} | "
            f"{r['expert_params'] / 1e9:.2f} B | {r['dense_fp32_bytes'] / gib:.2f} GiB | "
            f"{r['peak_rss_bytes'] / gib:.2f} GiB | {r['goal_bytes'] / gib:.2f} GiB | "
            f"{'yes' if r['meets_goal'] else '**no**'} | {r['elapsed_s']:.0f} | {sec.get('trace', 0):.0f} | "
            f"{sec.get('experts', 0):.0f} | {sec.get('write', 0):.0f} | "
            f"{'→'.join('?' if x is None else f'{x:.2f}' for x in r.get('loadavg_1min') or []) or '–'} | "
            f"{commit} |"
        )
    L += [
        "",
        "Before streaming (the whole checkpoint loaded in fp32): the 1 GiB-store model peaked at 19.1 GiB "
        "(`build/bench/large-build.log`: 20,068,468 kB, export 165 s); the 8x7B-shape checkpoint would need "
        "its 17 GB of fp32 experts at once and was not run. Tracing used to hold the torch model's dense "
        "weights and the ONNX graph's copy together (the 1 GiB-store model: 1.38 GiB, above its goal); the "
        "graph's serialization now lets go of each torch weight as soon as the proto has its bytes "
        "(export/trace.py), so the dense part is held once. The graphs are written before the experts are "
        "read, so their weights are gone by then; an expert is then held in fp32 while it is quantized "
        "(8x7B: w_in 470 MB, w_out 235 MB). 'code': the commit measured (+: with changes in the work tree; "
        "?: not recorded, i.e. before the serialization let go of the weights).",
        "",
    ]
    return L


def llama_results(results_path: str | Path) -> dict[str, dict[str, Any]]:
    """The llama.cpp comparisons found beside ``results_path`` (LLAMA_RESULTS), by section title."""
    here = Path(results_path).parent
    return {t: json.loads((here / f).read_text()) for t, f in LLAMA_RESULTS if (here / f).is_file()}


def main(argv: list[str] | None = None) -> None:
    a = argv or sys.argv[1:]
    results = json.loads(Path(a[0]).read_text())
    write_report(results, a[1], a[2], llama=llama_results(a[0]), exports=export_results(a[0]))


if __name__ == "__main__":
    main()
