"""llama.cpp (mmap) and edgemoe under the same memory caps, interleaved: ``make bench-llama``.

``python -m edgemoe_ort.bench.llama bench --bin build/llama/build/bin --gguf
build/llama/models/large/Q4_0.gguf --check build/llama/models/large/check.json --bundle
build/bench/large-bundle --out build/bench/llama.json --markdown build/bench/llama.md``

Caps (:func:`plan_caps`): llama.cpp's dense bytes (every GGUF tensor that is not a routed expert, plus the
file's metadata) + 10/25/50/100% of its expert tensor bytes, and ours: ``estimate_rss(bundle, B)`` at each
``--ours-budgets`` B, with the KV cache and prefill of this run's length (``context = prompt + tokens + 1``),
and ``uncapped`` (the machine's RAM as the cap: both compute-bound, the page cache warm after the first
touch; ours at a 100% budget), the ceiling each reaches here.

At every cap, ``--repeats`` times (forward order on even repeats, reversed on odd ones, so ratios are side by
side in time), each run in a memory cgroup of its own (:func:`edgemoe_ort.bench.memcap.run_capped`, cgroup v1
or v2, page cache dropped before the run) under ``/usr/bin/time -v``:

- ``llama``: ``llama-bench -m GGUF -p 0 -n TOKENS -r 1 -t 1 -lm mmap --repack 0 -o json`` (repacking copies
  the weights to anonymous memory, which a cap kills);
- ``qmoe``: ORT's own all-in-memory MoE (``com.microsoft.QMoE`` holding every expert, the bundle converted by
  :mod:`edgemoe_ort.bench.inmemory` before the runs, outside any cap), one greedy generation of TOKENS decode
  steps on 1 thread in a fresh process (:mod:`edgemoe_ort.bench.rss`): what a user without an expert cache
  runs, which a cap below its weights kills;
- ``ours``: ``edgemoe-run BUNDLE --ids 1 --max-new-tokens TOKENS+1 --budget B --threads 1 --json`` plus
  ``--ours-args`` (default: the best exact-routing settings of docs/benchmarks.md on the large model: policy
  hobbit, no prefetching, direct I/O). B: at our own caps, the budget the cap was computed for; at
  llama.cpp's, the largest budget whose ``estimate_rss`` fits the cap (what ``--budget auto`` computes), or,
  when none fits, the smallest budget the store accepts (the run shows whether the process fits anyway).

Per run: decode tokens/s, the group's peak charge (page cache included) and sampled peak anonymous memory,
bytes read from storage (``/usr/bin/time``'s "File system inputs", 512-byte blocks: real block-device reads,
readahead included; major faults hide readahead), OOM-killed or not, the exit status, and ``/proc/loadavg``
before and after. The summary gives medians over repeats and ours / llama.cpp per cap (ratio of medians and
the median of per-repeat ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Cap",
    "llama_caps",
    "markdown_table",
    "ours_budget_for_cap",
    "parse_time_v",
    "plan_caps",
    "run_benchmark",
    "summarize",
]

MiB = 1 << 20
LLAMA_FRACTIONS = (0.10, 0.25, 0.50, 1.00)
DEFAULT_OURS_ARGS = ("--policy", "hobbit", "--predictor", "none", "--io", "direct")
BUSY_LOAD = 1.5
GOAL_RATIO = 4.0
GOAL_FRACTION = 0.25
#: the table's name of each mode
MODE_NAMES = {"llama": "llama.cpp", "ours": "edgemoe", "qmoe": "ORT QMoE (all in memory)"}


@dataclass(frozen=True)
class Cap:
    """One memory cap: ``label`` (``llama+25%``, ``ours@25%``), ``bytes``, who it is derived from (``llama``:
    dense + ``fraction`` of the experts; ``ours``: ``estimate_rss`` at ``budget``)."""

    label: str
    bytes: int
    kind: str  # llama | ours | machine (uncapped: the machine's RAM)
    fraction: float | None = None
    budget: str | None = None


def llama_caps(
    dense_bytes: int, expert_bytes: int, fractions: Sequence[float] = LLAMA_FRACTIONS
) -> list[Cap]:
    """``dense + f * experts`` (rounded up to a page) for every fraction f, labelled ``llama+F%``."""
    out = []
    for f in fractions:
        if not 0 <= f <= 1:
            raise ValueError(f"fraction: expected 0..1, found {f}")
        n = int(dense_bytes) + int(round(f * int(expert_bytes)))
        n = -(-n // 4096) * 4096
        out.append(Cap(f"llama+{f:.0%}", n, "llama", fraction=f))
    return out


def plan_caps(
    dense_bytes: int,
    expert_bytes: int,
    ours: Sequence[tuple[str, int]],
    fractions: Sequence[float] = LLAMA_FRACTIONS,
    uncapped_bytes: int | None = None,
) -> list[Cap]:
    """llama.cpp's caps (:func:`llama_caps`), ours (``(budget, estimate total bytes)`` pairs, labelled
    ``ours@budget``) and, with ``uncapped_bytes`` (the machine's RAM), ``uncapped``: the compute-bound
    reference (everything fits); smallest first, equal byte counts keep both labels."""
    caps = llama_caps(dense_bytes, expert_bytes, fractions)
    caps += [Cap(f"ours@{b}", -(-int(n) // 4096) * 4096, "ours", budget=b) for b, n in ours]
    if uncapped_bytes:
        caps.append(Cap("uncapped", int(uncapped_bytes), "machine"))
    return sorted(caps, key=lambda c: (c.bytes, c.kind))


def ours_budget_for_cap(bundle: Any, cap: Cap, *, context: int, prompt_tokens: int) -> tuple[int, str]:
    """(budget bytes, how it was chosen) for our run at ``cap``: the cap's own budget for an ``ours`` cap,
    else the largest that :func:`edgemoe_ort.runtime.memory.estimate_rss` fits in the cap, else the minimum
    budget (noted: the estimate says it does not fit)."""
    from edgemoe_ort.runtime.memory import estimate_rss, minimum_budget
    from edgemoe_ort.runtime.ops import parse_budget

    if cap.kind == "ours" and cap.budget is not None:
        own = parse_budget(cap.budget, bundle.store_bytes, bundle.primary_bytes)
        return own, f"{cap.budget} (the cap's own budget)"
    floor = minimum_budget(bundle)

    def total(b: int) -> int:
        return estimate_rss(bundle, b, context=context, prompt_tokens=prompt_tokens)["total_bytes"]

    if total(floor) > cap.bytes:
        return floor, (f"minimum {floor / MiB:.1f} MiB: the estimate at it, {total(floor) / MiB:.0f} MiB, "
                       f"exceeds the cap")
    lo, hi = floor, int(bundle.store_bytes)
    if total(hi) <= cap.bytes:
        return hi, "100% (the whole store fits)"
    while hi - lo > 4096:  # total() grows with the budget
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= cap.bytes else (lo, mid)
    return lo, f"{lo / bundle.primary_bytes:.0%}: the largest whose estimate fits the cap"


# --- measuring one run -------------------------------------------------------------------------------------
_TIME_FIELDS = {
    "File system inputs": "fs_inputs",
    "File system outputs": "fs_outputs",
    "Maximum resident set size (kbytes)": "max_rss_kb",
    "Major (requiring I/O) page faults": "major_faults",
    "Minor (reclaiming a frame) page faults": "minor_faults",
    "Exit status": "exit_status",
}


def parse_time_v(text: str) -> dict[str, Any]:
    """The fields of GNU ``/usr/bin/time -v`` output that matter here: ``fs_inputs`` (512-byte blocks read),
    ``bytes_read`` (= fs_inputs * 512), ``max_rss_kb``, ``major_faults``, ``minor_faults``, ``exit_status``,
    ``elapsed_s`` and ``signal`` (if "Command terminated by signal N")."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, val = line.strip().rpartition(": ")
        if key in _TIME_FIELDS and val.strip().lstrip("-").isdigit():
            out[_TIME_FIELDS[key]] = int(val)
        elif key.startswith("Elapsed (wall clock) time"):
            parts = [float(p) for p in val.strip().split(":")]
            secs = 0.0
            for p in parts:
                secs = secs * 60 + p
            out["elapsed_s"] = secs
        m = re.search(r"Command terminated by signal (\d+)", line)
        if m:
            out["signal"] = int(m.group(1))
    if "fs_inputs" in out:
        out["bytes_read"] = out["fs_inputs"] * 512
    return out


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _measured(cmd: Sequence[str], cap: int, timeout: float) -> dict[str, Any]:
    """``cmd`` under ``/usr/bin/time -v`` in a memory cgroup capped at ``cap`` (page cache dropped first)."""
    from edgemoe_ort.bench.memcap import run_capped

    with tempfile.TemporaryDirectory(prefix="edgemoe-llama-") as tmp:
        tf = Path(tmp) / "time.txt"
        load0 = _loadavg()
        t0 = time.perf_counter()
        r = run_capped(["/usr/bin/time", "-v", "-o", str(tf), *cmd], cap, drop_caches=True, timeout=timeout)
        wall = time.perf_counter() - t0
        tv = parse_time_v(tf.read_text()) if tf.is_file() else {}
    return {
        "returncode": r.returncode, "oom_killed": r.oom_killed, "timed_out": r.timed_out,
        "peak_bytes": r.peak_bytes, "peak_anon_bytes": r.peak_anon_bytes, "failcnt": r.failcnt,
        "cgroup_version": r.cgroup_version, "bytes_read": tv.get("bytes_read"), "time_v": tv,
        "wall_s": wall, "load_before": load0, "load_after": _loadavg(),
        "stdout": r.stdout, "stderr_tail": r.stderr[-1500:],
    }


def _llama_cmd(bin_dir: Path, gguf: Path, tokens: int) -> list[str]:
    return [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-r", "1", "-t", "1",
            "-lm", "mmap", "--repack", "0", "-o", "json"]


def _ours_cmd(bundle: Path, budget: int, tokens: int, extra: Sequence[str]) -> list[str]:
    # the prefill yields the first new token: tokens + 1 new ones = ``tokens`` decode steps (llama-bench -n)
    return [sys.executable, "-c", "from edgemoe_ort.cli import run_app; run_app()", str(bundle), "--ids", "1",
            "--max-new-tokens", str(tokens + 1), "--budget", str(budget), "--threads", "1", *extra, "--json"]


def _qmoe_cmd(bundle: Path, inmem: Path, tokens: int) -> list[str]:
    spec = {"bundle": str(bundle), "mode": "inmemory", "inmem_path": str(inmem), "tokens": tokens + 1,
            "prompt_ids": [1], "io_threads": 1, "threads": 1}
    return [sys.executable, "-m", "edgemoe_ort.bench.rss", json.dumps(spec)]


def _run_qmoe(bundle: Path, inmem: Path, tokens: int, cap: int, timeout: float) -> dict[str, Any]:
    m = _measured(_qmoe_cmd(bundle, inmem, tokens), cap, timeout)
    m["decode_tokens_per_s"] = None
    if m["returncode"] == 0:
        try:
            j = json.loads(m["stdout"].strip().splitlines()[-1])
            m["decode_tokens_per_s"] = float(j["decode_tokens_per_s"])
            m["decode_tokens"] = int(j["decode_tokens"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            m["error"] = f"bench.rss output: {exc}"
    m.pop("stdout")
    return m


def _run_llama(bin_dir: Path, gguf: Path, tokens: int, cap: int, timeout: float) -> dict[str, Any]:
    from edgemoe_ort.bench.llama import parse_llama_bench

    m = _measured(_llama_cmd(bin_dir, gguf, tokens), cap, timeout)
    m["decode_tokens_per_s"] = None
    if m["returncode"] == 0:
        try:
            rows = [r for r in parse_llama_bench(m["stdout"]) if int(r.get("n_gen", 0)) > 0]
            m["decode_tokens_per_s"] = float(rows[0]["avg_ts"])
            m["decode_tokens"] = int(rows[0]["n_gen"])
        except (ValueError, KeyError, IndexError) as exc:
            m["error"] = f"llama-bench output: {exc}"
    m.pop("stdout")
    return m


def _run_ours(bundle: Path, budget: int, tokens: int, cap: int, extra: Sequence[str],
              timeout: float) -> dict[str, Any]:
    m = _measured(_ours_cmd(bundle, budget, tokens, extra), cap, timeout)
    m["decode_tokens_per_s"] = None
    if m["returncode"] == 0:
        try:
            j = json.loads(m["stdout"])
            m["decode_tokens_per_s"] = float(j["decode_tokens_per_s"])
            m["decode_tokens"] = int(j["generated_tokens"]) - 1
            m["op_bytes_read"] = int(j["cache"]["bytes_read"])
            m["hit_rate"] = j["cache"]["hits"] / max(1, j["cache"]["hits"] + j["cache"]["misses"])
            m["peak_resident_bytes"] = int(j["cache"]["peak_resident_bytes"])
            m["stop_reason"] = j["stop_reason"]
        except (ValueError, KeyError) as exc:
            m["error"] = f"edgemoe-run --json output: {exc}"
    m.pop("stdout")
    m["budget_bytes"] = budget
    return m


# --- the whole benchmark -----------------------------------------------------------------------------------
def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: Sequence[dict[str, Any]], caps: Sequence[Cap]) -> list[dict[str, Any]]:
    """One row per (cap, mode): medians over repeats of tokens/s (a failed run counts as missing), peak
    charge, peak anon, bytes read; OOM kills and exit codes; the loads; ours / llama per cap (ratio of the
    medians, and median of per-repeat ratios where both ran)."""
    rows = []
    for cap in caps:
        by_mode: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            if r["cap"] == cap.label:
                by_mode.setdefault(r["mode"], []).append(r)
        for mode, rs in by_mode.items():
            tps = [r["decode_tokens_per_s"] for r in rs]
            reads = [r["bytes_read"] for r in rs]
            toks = [r.get("decode_tokens") for r in rs]
            per_tok = [b / t for b, t in zip(reads, toks, strict=True) if b is not None and t]
            rows.append({
                "cap": cap.label, "cap_bytes": cap.bytes, "mode": mode, "repeats": len(rs),
                "budget_bytes": rs[0].get("budget_bytes"), "budget_note": rs[0].get("budget_note"),
                "decode_tokens_per_s": _median(tps), "decode_tokens_per_s_runs": tps,
                "peak_bytes": _median([r["peak_bytes"] for r in rs]),
                "peak_anon_bytes": _median([r["peak_anon_bytes"] for r in rs]),
                "bytes_read": _median(reads), "bytes_read_per_token": _median(per_tok),
                "op_bytes_read": _median([r.get("op_bytes_read") for r in rs]),
                "hit_rate": _median([r.get("hit_rate") for r in rs]),
                "oom_killed": sum(bool(r["oom_killed"]) for r in rs),
                "returncodes": [r["returncode"] for r in rs],
                "load_before": [r["load_before"][0] if r["load_before"] else None for r in rs],
                "load_after": [r["load_after"][0] if r["load_after"] else None for r in rs],
            })
        llama = next((x for x in rows if x["cap"] == cap.label and x["mode"] == "llama"), None)
        ours = next((x for x in rows if x["cap"] == cap.label and x["mode"] == "ours"), None)
        if llama and ours:
            a, b = ours["decode_tokens_per_s"], llama["decode_tokens_per_s"]
            ours["ratio"] = a / b if a is not None and b else None
            mine = {o["repeat"]: o["decode_tokens_per_s"] for o in runs
                    if o["cap"] == cap.label and o["mode"] == "ours" and o["decode_tokens_per_s"]}
            theirs = {q["repeat"]: q["decode_tokens_per_s"] for q in runs
                      if q["cap"] == cap.label and q["mode"] == "llama" and q["decode_tokens_per_s"]}
            paired = [mine[k] / theirs[k] for k in mine if k in theirs]
            ours["ratio_paired"] = _median(paired)
    return rows


def _fmt(x: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return "–" if x is None else format(x / scale, spec)


def markdown_table(result: dict[str, Any]) -> str:
    """The results as markdown: settings, one table row per (cap, mode), the goal line, warnings."""
    s = result["settings"]
    g = result["llama_gguf"]
    lines = [
        f"llama.cpp `{Path(s['gguf']).name}` (dense {g['dense_bytes'] / MiB:.1f} MiB incl. metadata, "
        f"experts {g['expert_bytes'] / MiB:.1f} MiB) vs edgemoe `{s['bundle']}` (dense "
        f"{s['bundle_dense_bytes'] / MiB:.1f} MiB, store {s['bundle_store_bytes'] / MiB:.1f} MiB); "
        f"{s['tokens']} decode tokens, 1 compute thread "
        f"each, median of {s['repeats']} interleaved repeats, page cache dropped before every run, each run "
        f"in its own cgroup-v{result['cgroup_version']} memory cap.",
        "",
        f"- llama.cpp: `{' '.join(s['llama_cmd'])}`",
        f"- edgemoe: `{' '.join(s['ours_cmd'])}`",
        *([f"- ORT QMoE, all experts in memory: `python -m edgemoe_ort.bench.rss "
           f"'{json.dumps(s['qmoe_cmd'][-1])}'`"] if s.get("qmoe_cmd") else []),
        "",
        "| cap | cap MiB | mode | budget MiB | decode tok/s | ours / llama (paired) | peak cgroup MiB | "
        "peak anon MiB | MB read / run | MB read / token | OOM-killed | rc | load avg (1-min, per run) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in result["summary"]:
        ratio = "–"
        if r["mode"] == "ours" and r.get("ratio") is not None:
            ratio = f"**{r['ratio']:.2f}x** ({_fmt(r.get('ratio_paired'))})"
        loads = ", ".join(f"{a:.2f}→{b:.2f}" for a, b in zip(r["load_before"], r["load_after"], strict=True)
                          if a is not None and b is not None)
        lines.append(
            f"| {r['cap']} | {r['cap_bytes'] / MiB:.0f} | "
            f"{MODE_NAMES.get(r['mode'], r['mode'])} | "
            f"{_fmt(r['budget_bytes'], '.0f', MiB)} | {_fmt(r['decode_tokens_per_s'])} | {ratio} | "
            f"{_fmt(r['peak_bytes'], '.0f', MiB)} | {_fmt(r['peak_anon_bytes'], '.0f', MiB)} | "
            f"{_fmt(r['bytes_read'], '.0f', 1e6)} | {_fmt(r['bytes_read_per_token'], '.1f', 1e6)} | "
            f"{r['oom_killed']}/{r['repeats']} | {','.join(map(str, r['returncodes']))} | {loads} |")
    lines.append("")
    c = result.get("check")
    if c:
        how = (f"{c['mode']}: {c['strict_error']}; near-tie positions {c['near_ties']} excused"
               if c.get("near_ties") else "strict, every token equal")
        lines.append(f"- greedy check of the f16 GGUF against transformers (float32), {c['tokens']} tokens "
                     f"before any timing: {how}")
    lines += [f"- {n}" for n in result["findings"]]
    lines += [f"- GGUF note: {n}" for n in result.get("gguf_notes", [])]
    return "\n".join(lines) + "\n"


def _dense_formats(bundle: Any) -> dict[str, int]:
    """Bytes of the bundle's dense weights by format (``{"int4": ..., "fp32": ...}``), largest first."""
    from edgemoe_ort.bundle.dense import dense_bytes_by_kind

    total: dict[str, int] = {}
    for role in bundle.graphs:
        for formats in dense_bytes_by_kind(bundle.graph_path(role)).values():
            for fmt, n in formats.items():
                total[fmt] = total.get(fmt, 0) + n
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def _formats_text(formats: dict[str, int] | None) -> str:
    """"int4 57 MiB + fp32 1 MiB"; runs recorded before the formats were: "float32"."""
    if not formats:
        return "float32"
    return " + ".join(f"{fmt} {n / MiB:.0f} MiB" for fmt, n in formats.items() if n >= MiB // 2) or "float32"


def _findings(result: dict[str, Any], caps: Sequence[Cap]) -> list[str]:
    out = []
    goal = next((c for c in caps if c.kind == "llama" and c.fraction == GOAL_FRACTION), None)
    rows = {(r["cap"], r["mode"]): r for r in result["summary"]}
    if goal is not None:
        o, q = rows.get((goal.label, "ours")), rows.get((goal.label, "llama"))
        if o and q:
            if o.get("ratio") is not None:
                met = "met" if o["ratio"] >= GOAL_RATIO else "**not met**"
                out.append(f"goal ≥ {GOAL_RATIO:.0f}x llama.cpp's decode tokens/s at {goal.label} "
                           f"({goal.bytes / MiB:.0f} MiB): measured {o['ratio']:.2f}x (paired "
                           f"{_fmt(o.get('ratio_paired'))}): {met}")
            else:
                out.append(f"goal ≥ {GOAL_RATIO:.0f}x at {goal.label} ({goal.bytes / MiB:.0f} MiB): "
                           f"**not met**: "
                           f"edgemoe did not complete there (OOM-killed {o['oom_killed']}/{o['repeats']}, rc "
                           f"{o['returncodes']}); llama.cpp ran at {_fmt(q['decode_tokens_per_s'])} tok/s")
        s = result["settings"]
        need = s["ours_min_estimate_bytes"]
        dense_fmt = _formats_text(s.get("bundle_dense_formats"))
        ratio = o.get("ratio") if o else None
        lead = "footprint" if ratio is not None and ratio >= GOAL_RATIO else "where the gap is"
        out.append(f"{lead}: edgemoe's smallest footprint (estimate_rss at the minimum budget) is "
                   f"{need / MiB:.0f} MiB, of which the bundle's dense weights are "
                   f"{s['bundle_dense_bytes'] / MiB:.0f} MiB ({dense_fmt}) and the fixed runtime overhead "
                   f"{s['fixed_overhead_bytes'] / MiB:.0f} MiB; llama.cpp's dense part is "
                   f"{result['llama_gguf']['dense_bytes'] / MiB:.0f} MiB ({Path(s['gguf']).stem}), and under "
                   f"mmap even that is page cache it can evict")
    q = [r for r in result["summary"] if r["mode"] == "qmoe"]
    if q:
        ran = [r for r in q if r["decode_tokens_per_s"] is not None]
        killed = [r["cap"] for r in q if r["decode_tokens_per_s"] is None]
        low = min(ran, key=lambda r: r["cap_bytes"]) if ran else None
        where = (f"completed from {low['cap']} ({low['cap_bytes'] / MiB:.0f} MiB) up, at "
                 f"{_fmt(low['decode_tokens_per_s'])} tok/s there" if low else "completed at no cap")
        lost = f"; it did not complete at {', '.join(killed)} (OOM-killed or failed)" if killed else ""
        out.append(f"ORT QMoE (every expert in memory) {where}{lost}")
    if result.get("code_changed_during_run"):
        out.append("the work tree or the op library changed while the benchmark ran (others edit this tree): "
                   "see code_start / code_end in the JSON")
    done = [r for r in result["runs"]
            if r["mode"] == "ours" and r["returncode"] == 0 and r["peak_anon_bytes"]]
    if done:
        low = min(done, key=lambda r: r["peak_anon_bytes"])
        out.append(f"measured: the smallest peak anonymous memory of a completed edgemoe run was "
                   f"{low['peak_anon_bytes'] / MiB:.0f} MiB (cap {low['cap']}, budget "
                   f"{low['budget_bytes'] / MiB:.0f} MiB); the estimate adds its margin above that (the "
                   f"fixed overhead, the dense weights held twice while the session is created)")
    loads = [x for r in result["runs"] for x in (r["load_before"][:1] + r["load_after"][:1])]
    if loads and max(loads) >= BUSY_LOAD:
        busy = sum(x >= BUSY_LOAD for x in loads)
        out.append(f"busy machine: the 1-minute load average was {min(loads):.2f}–{max(loads):.2f} during "
                   f"the runs (≥ {BUSY_LOAD} in {busy} of {len(loads)} readings): "
                   f"other tenants ran beside it; compare the interleaved ratios, not absolute tokens/s")
    return out


def _code_state() -> dict[str, Any]:
    """What code ran: the git commit, the files changed in the work tree, the op library's sha256 prefix."""
    import hashlib

    from edgemoe_ort.runtime.ops import library_path

    repo = Path(__file__).resolve().parents[2]
    out: dict[str, Any] = {}
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=60).stdout

    try:
        out["commit"] = git("rev-parse", "HEAD").strip()
        out["changed"] = git("status", "--porcelain").splitlines()
        out["diff_sha256"] = hashlib.sha256(git("diff", "HEAD", "--", "edgemoe_ort", "customops").encode()
                                            ).hexdigest()[:16]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        out["op_library_sha256"] = hashlib.sha256(Path(library_path()).read_bytes()).hexdigest()[:16]
    except (OSError, RuntimeError):
        pass
    return out


def run_benchmark(
    *,
    bin_dir: Path,
    gguf: Path,
    bundle_dir: Path,
    tokens: int = 32,
    repeats: int = 3,
    fractions: Sequence[float] = LLAMA_FRACTIONS,
    ours_budgets: Sequence[str] = ("10%", "25%"),
    ours_args: Sequence[str] = DEFAULT_OURS_ARGS,
    timeout: float = 900.0,
    uncapped: bool = True,
    qmoe: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Every cap of :func:`plan_caps`, llama.cpp, edgemoe and (``qmoe``) ORT's all-in-memory QMoE interleaved
    ``repeats`` times; returns the result object (``settings``, ``caps``, ``runs``, ``summary``,
    ``findings``) that ``--out`` writes."""
    from edgemoe_ort.bench.llama import gguf_split_bytes
    from edgemoe_ort.bench.memcap import memory_cap_support
    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.runtime.memory import FIXED_OVERHEAD_BYTES, estimate_rss, minimum_budget

    why = memory_cap_support()
    if why is not None:
        raise RuntimeError(f"cannot cap memory here: {why}")
    g = gguf_split_bytes(gguf)
    dense = g["dense_bytes"] + g["overhead_bytes"]
    b = Bundle.open(bundle_dir)
    context, prompt = 2 + tokens, 1  # the prompt (one id) + tokens + 1 new ones
    def est(budget: str | int) -> int:
        return int(estimate_rss(b, budget, context=context, prompt_tokens=prompt)["total_bytes"])

    ours = [(x, est(x)) for x in ours_budgets]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if uncapped else None
    caps = plan_caps(dense, g["expert_bytes"], ours, fractions, ram)
    floor = minimum_budget(b)
    budgets = {c.label: ours_budget_for_cap(b, c, context=context, prompt_tokens=prompt) for c in caps}
    inmem = None
    if qmoe:  # converted once, here, outside every cap (the capped runs only load it)
        from edgemoe_ort.bench.runner import inmemory_model_path

        inmem = inmemory_model_path(b)
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "settings": {
            "gguf": str(gguf), "bundle": str(bundle_dir), "tokens": tokens, "repeats": repeats,
            "llama_cmd": _llama_cmd(bin_dir, gguf, tokens),
            "qmoe_cmd": None if inmem is None else [  # paths relative to here, as the other commands
                "python", "-m", "edgemoe_ort.bench.rss",
                json.loads(_qmoe_cmd(bundle_dir, Path(os.path.relpath(inmem)), tokens)[-1])],
            "ours_cmd": ["edgemoe-run", str(bundle_dir), "--ids", "1", "--max-new-tokens", str(tokens + 1),
                         "--budget", "B", "--threads", "1", *ours_args, "--json"],
            "bundle_dense_bytes": b.dense_bytes, "bundle_store_bytes": b.store_bytes,
            "bundle_dense_formats": _dense_formats(b),
            "ours_min_estimate_bytes": est(floor),
            "fixed_overhead_bytes": FIXED_OVERHEAD_BYTES, "estimate_context": context,
        },
        "llama_gguf": {**g, "dense_bytes": dense},
        "caps": [asdict(c) for c in caps],
        "runs": [],
        "cgroup_version": 0,
        "load_start": _loadavg(),
        "code_start": _code_state(),
    }
    for cap in caps:
        budget, note = budgets[cap.label]
        for r in range(repeats):
            order = ["llama", "ours"] + (["qmoe"] if inmem is not None else [])
            if r % 2:
                order.reverse()
            for mode in order:
                if mode == "llama":
                    m = _run_llama(bin_dir, gguf, tokens, cap.bytes, timeout)
                elif mode == "qmoe":
                    assert inmem is not None
                    m = _run_qmoe(bundle_dir, inmem, tokens, cap.bytes, timeout)
                else:
                    m = _run_ours(bundle_dir, budget, tokens, cap.bytes, ours_args, timeout)
                    m["budget_note"] = note
                m.update(cap=cap.label, cap_bytes=cap.bytes, mode=mode, repeat=r)
                result["cgroup_version"] = m["cgroup_version"]
                result["runs"].append(m)
                if progress:
                    print(f"{cap.label:>10} ({cap.bytes / MiB:5.0f} MiB) r{r} {mode:5}: "
                          f"{_fmt(m['decode_tokens_per_s'])} tok/s, rc {m['returncode']}, "
                          f"OOM {m['oom_killed']}, peak {_fmt(m['peak_bytes'], '.0f', MiB)} MiB, read "
                          f"{_fmt(m['bytes_read'], '.0f', 1e6)} MB, load {m['load_before'][:1]}",
                          file=sys.stderr, flush=True)
    result["load_end"] = _loadavg()
    result["code_end"] = _code_state()
    if result["code_end"] != result["code_start"]:
        result["code_changed_during_run"] = True
    result["summary"] = summarize(result["runs"], caps)
    result["findings"] = _findings(result, caps)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m edgemoe_ort.bench.llama bench``: run :func:`run_benchmark`, write ``--out`` (JSON) and
    ``--markdown``. Refuses to time a GGUF whose f16 twin failed (or skipped) the greedy check."""
    ap = argparse.ArgumentParser(prog="python -m edgemoe_ort.bench.llama bench",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--bin", type=Path, help="folder of llama-bench")
    ap.add_argument("--gguf", type=Path, help="the GGUF to time (Q4_0)")
    ap.add_argument("--check", type=Path, help="check.json of the GGUF's folder (convert)")
    ap.add_argument("--bundle", type=Path, help="our bundle of the same checkpoint")
    ap.add_argument("--out", required=True, type=Path, help="results JSON")
    ap.add_argument("--markdown", type=Path, help="results table (markdown)")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fractions", default="10,25,50,100", help="llama caps: dense + these %% of experts")
    ap.add_argument("--ours-budgets", default="10%,25%", help="our caps: estimate_rss at these budgets")
    ap.add_argument("--ours-args", default=" ".join(DEFAULT_OURS_ARGS), help="more edgemoe-run flags")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--no-uncapped", action="store_true", help="no uncapped reference (the RAM as cap)")
    ap.add_argument("--no-qmoe", action="store_true", help="leave ORT's all-in-memory QMoE out")
    ap.add_argument("--from-json", action="store_true",
                    help="do not run: re-derive the findings and the table of an existing --out file")
    a = ap.parse_args(argv)
    if a.from_json:
        result = json.loads(a.out.read_text())
        caps = [Cap(**c) for c in result["caps"]]
        result["summary"] = summarize(result["runs"], caps)
        result["findings"] = _findings(result, caps)
        return _write_outputs(result, a.out, a.markdown)
    missing = [f"--{k}" for k in ("bin", "gguf", "check", "bundle") if getattr(a, k) is None]
    if missing:
        ap.error(f"expected {', '.join(missing)} (all but --out may be left out only with --from-json)")
    check = json.loads(a.check.read_text()) if a.check.is_file() else {}
    if not check.get("check", {}).get("passed"):
        print(f"error: --check: {a.check}: expected a passed greedy check of the f16 GGUF, found "
              f"{'none' if not check else check.get('check')}", file=sys.stderr)
        return 2
    result = run_benchmark(
        bin_dir=a.bin, gguf=a.gguf, bundle_dir=a.bundle, tokens=a.tokens, repeats=a.repeats,
        fractions=[float(x) / 100 for x in a.fractions.split(",") if x],
        ours_budgets=[x for x in a.ours_budgets.split(",") if x], ours_args=a.ours_args.split(),
        timeout=a.timeout, uncapped=not a.no_uncapped, qmoe=not a.no_qmoe,
    )
    result["check"] = {k: check["check"].get(k) for k in ("gguf", "tokens", "passed", "prompt_ids", "mode",
                                                           "near_ties", "tie_margin", "strict_error")}
    result["gguf_notes"] = [n for n in check.get("notes", []) if n.startswith(a.gguf.stem + ":")]
    return _write_outputs(result, a.out, a.markdown)


def _write_outputs(result: dict[str, Any], out: Path, markdown: Path | None) -> int:
    """The results JSON, the table (markdown file if asked, and stdout); exit status 0."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    table = markdown_table(result)
    if markdown:
        markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
