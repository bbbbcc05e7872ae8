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


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _median(xs: list[float]) -> float:
    import statistics

    return float(statistics.median(xs)) if xs else 0.0


def paired_ratio(run: dict[str, Any], m: dict[str, Any]) -> float | None:
    """Median over repeats of ``bound_r / measured_r``, with repeat r's compute taken from the same repeat's
    ``resident`` run: robust when the machine's speed changes between repeats (other tenants)."""
    res = next((x for x in run["modes"] if x["mode"] == "resident"), None)
    if res is None or "decode_s_per_token_runs" not in m:
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
    rows = [
        "| mode | budget | decode tok/s | prefill tok/s | TTFT s | MB read / tok | hit rate | stall ms / tok "
        "| peak RSS MiB (Δ over base) | bound ms / tok | ratio to roofline | paired ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"| {m['mode']} | {budget} | {m['decode_tokens_per_s']:.2f} | {m['prefill_tokens_per_s']:.1f} "
            f"| {m['ttft_s']:.2f} | {m['bytes_read_per_token'] / 1e6:.1f} "
            f"| {_f(m['hit_rate'], '{:.0%}')} | {m['stall_s_per_token'] * 1e3:.1f} "
            f"| {_mib(peak)} ({_mib(delta)}) | {m['bound_s_per_token'] * 1e3:.1f} | "
            f"{m['roofline_ratio']:.2f} | {_f(paired_ratio(run, m))} |"
        )
    return "\n".join(rows)


def headline(run: dict[str, Any], budget: str = "25%") -> dict[str, Any]:
    by = {(m["mode"], m["budget"]): m for m in run["modes"]}
    e, n = by.get(("edgemoe", budget)), by.get(("naive", None))
    out: dict[str, Any] = {}
    if e and n and n["decode_tokens_per_s"]:
        out["edgemoe_over_naive"] = e["decode_tokens_per_s"] / n["decode_tokens_per_s"]
        out["edgemoe_over_naive_paired"] = paired_speedup(e, n)
        out["roofline_ratio"] = e["roofline_ratio"]
        out["roofline_ratio_paired"] = paired_ratio(run, e)
        rss = e.get("rss") or {}
        if e.get("peak_rss_bytes") and rss.get("base_rss_bytes") is not None:
            limit = run["dense_bytes"] + (e["budget_bytes"] or 0) + 64 * 2**20
            out["rss_delta"] = e["peak_rss_bytes"] - rss["base_rss_bytes"]
            out["rss_limit"] = limit
            out["rss_ok"] = out["rss_delta"] <= limit
    return out


def plot_run(name: str, run: dict[str, Any], img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    budgets = run["budgets"]
    store = run["store_bytes"]
    xs = {b: float(b.rstrip("%")) if b.endswith("%") else 100.0 * int(b) / store for b in budgets}
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, ylabel in (
        ("decode_tokens_per_s", axes[0], "decode tokens/s"),
        ("roofline_ratio", axes[1], "ratio to roofline (bound / measured)"),
    ):
        for mode in MODE_ORDER:
            rows = [m for m in run["modes"] if m["mode"] == mode]
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
            else:
                pts = sorted((xs[m["budget"]], m[key]) for m in rows)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=MODE_LABEL[mode])
        ax.set_xlabel("expert cache budget (% of the store)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
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


def write_report(results: dict[str, Any], out_md: str | Path, img_dir: str | Path) -> None:
    out_md, img_dir = Path(out_md), Path(img_dir)
    rel_img = Path("img") if img_dir.resolve().parent == out_md.resolve().parent else img_dir
    L: list[str] = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`mk/bench.mk`) from `build/bench/results.json`; do not edit by hand.",
        "",
    ]
    mach = next(iter(results["runs"].values()))["machine"] if results.get("runs") else {}
    L += [
        "## Machine",
        "",
        f"- CPU: {mach.get('cpu', '?')} ({mach.get('cpus', '?')} logical CPUs, shared), "
        f"RAM {mach.get('mem_bytes', 0) / 2**30:.0f} GiB, kernel path `{mach.get('kernel', '?')}`",
        f"- {mach.get('platform', '?')}, Python {mach.get('python', '?')}, onnxruntime "
        f"{mach.get('onnxruntime', '?')}",
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
        "(`edgemoe_ort.bench.rss`): VmHWM over the "
        "whole process (session creation included). `Δ` = peak − RSS after imports (interpreter + "
        "numpy + ORT).",
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
            f"{run['io_threads']} I/O threads, intra-op threads {run['threads'] or 'ORT default'}",
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
        h = headline(run)
        if h:
            L += [
                f"At 25 %: edgemoe / naive = **{h['edgemoe_over_naive']:.2f}x** (ratio of medians; median of "
                f"the per-repeat ratios {h['edgemoe_over_naive_paired']:.2f}x), ratio to roofline "
                f"**{h['roofline_ratio']:.2f}** (paired per repeat: {_f(h['roofline_ratio_paired'])})"
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
            "the same bytes; `MatMulNBits` = 2× ORT MatMulNBits (accuracy_level 0) + SwiGLU.",
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
    if results.get("findings"):
        L += ["## Findings", ""] + [f"- {f}" for f in results["findings"]] + [""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> None:
    a = argv or sys.argv[1:]
    results = json.loads(Path(a[0]).read_text())
    write_report(results, a[1], a[2])


if __name__ == "__main__":
    main()
