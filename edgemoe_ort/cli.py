"""Command-line entry points: edgemoe-export, edgemoe-run, edgemoe-inspect.

User mistakes print one clear line and exit non-zero; tracebacks are for our bugs only.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edgemoe_ort.cli_common import err, friendly_errors, out, user_errors
from edgemoe_ort.cli_common import fmt_bytes as _fmt_bytes
from edgemoe_ort.runtime.ops import POLICIES, PREDICTORS

# --- edgemoe-export --------------------------------------------------------------------------------
export_app = typer.Typer(
    add_completion=False, help="Export a HuggingFace MoE checkpoint to an edgemoe bundle."
)


@export_app.command()
@friendly_errors
def export(
    model: Annotated[str, typer.Argument(help="HF hub id or local checkpoint folder")],
    output: Annotated[Path, typer.Option("-o", "--output", help="bundle folder to create")],
    bits: Annotated[int, typer.Option(help="expert weight bits: 32, 16, 8 or 4")] = 4,
    group_size: Annotated[int, typer.Option(help="quantization group size (int8/int4)")] = 64,
    force: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
    lookahead: Annotated[
        int,
        typer.Option(
            min=0,
            help="later MoE layers whose router logits each expert node gets for prefetching (0 = none)",
        ),
    ] = 3,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from edgemoe_ort.export import export_model_with_report

    columns = (TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err) as bar:
        tasks: dict[str, TaskID] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        report = export_model_with_report(
            model,
            output,
            bits=bits,
            group_size=group_size,
            force=force,
            progress=on_progress,
            lookahead=lookahead,
        )
    for role, wiring in report.wiring.items():
        err.print(f"prefetch wiring ({role}, lookahead {wiring.requested}):", highlight=False)
        for line in wiring.summary():
            err.print(f"  {line}", highlight=False, markup=False)
    err.print(f"[green]bundle written:[/] {report.bundle}")


# --- edgemoe-run -----------------------------------------------------------------------------------
run_app = typer.Typer(add_completion=False, help="Generate text from a bundle under a memory budget.")


@run_app.command()
@friendly_errors
def run(
    bundle: Annotated[Path, typer.Argument(help="bundle folder")],
    prompt: Annotated[str, typer.Option(help="prompt text")],
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
    budget: Annotated[str | None, typer.Option(help="expert cache budget: bytes, 256MB, 1GiB or 25%")] = None,
    io: Annotated[str, typer.Option(help="direct | buffered | mmap")] = "direct",
    policy: Annotated[str, typer.Option(help="cache policy: " + " | ".join(POLICIES))] = "lru",
    frequencies: Annotated[
        Path | None,
        typer.Option(help="JSON expert frequencies {\"expert_frequency\": [[...], ...]} (pinned, edgemoe)"),
    ] = None,
    policy_weights: Annotated[
        str | None, typer.Option(help="hobbit weights, e.g. lru=0.25,lfu=0.25,lhu=0.25,fld=0.25")
    ] = None,
    pin_experts: Annotated[
        int | None,
        typer.Option(help="pinned: how many of the most frequent experts (default: as many as fit)"),
    ] = None,
    io_threads: Annotated[int, typer.Option(help="I/O threads")] = 2,
    threads: Annotated[int | None, typer.Option(help="compute threads (ORT intra-op)")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling threshold")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    predictor: Annotated[
        str, typer.Option(help="prefetch predictor: " + " | ".join(PREDICTORS))
    ] = "auto",
    prefetch_depth: Annotated[int, typer.Option(help="layers to look ahead (adaptive)")] = 1,
    prefetch_threshold: Annotated[float, typer.Option(help="prefetch experts with p >= this")] = 0.3,
    profile: Annotated[
        Path | None, typer.Option(help="routing profile (default: the bundle's profile.json, if any)")
    ] = None,
    warm_start: Annotated[
        str | None, typer.Option(help="'profile' or a --save-resident file: fill the cache at start")
    ] = None,
    save_resident: Annotated[
        Path | None, typer.Option(help="after generating, save the resident experts here (for --warm-start)")
    ] = None,
    force: Annotated[bool, typer.Option(help="let --save-resident replace an existing file")] = False,
    show_stats: Annotated[
        bool, typer.Option("--stats", help="print a per-layer cache and prefetch table")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    from edgemoe_ort.runtime import RuntimeOptions, load_model

    _check_policy_flags(policy, frequencies, policy_weights, pin_experts)
    _check_prefetch_flags(predictor, prefetch_depth, prefetch_threshold, profile, warm_start)
    if save_resident is not None and save_resident.exists() and not force:
        raise FileExistsError(f"--save-resident {save_resident}: exists; add --force to replace it")
    options = RuntimeOptions(budget=budget, policy=policy, io=io, io_threads=io_threads,
                             intra_op_threads=threads, frequencies=frequencies, policy_weights=policy_weights,
                             pin_experts=pin_experts, predictor=predictor, prefetch_depth=prefetch_depth,
                             prefetch_threshold=prefetch_threshold, profile=profile, warm_start=warm_start)
    try:
        model = load_model(bundle, options)
    except user_errors() as exc:  # name our flags, not the session config keys they map to
        msg = _ORT_PREFIX.sub("", str(exc).strip())
        for key, flag in _FLAG_OF_KEY.items():
            msg = msg.replace(key, flag)
        raise ValueError(msg) from None
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed)
    if as_json:
        result = model.generate(prompt, **kwargs)
        payload = {"text": result.text, "tokens": result.tokens, "stop_reason": result.stop_reason}
        payload.update(result.stats.as_dict())
        if save_resident is not None:
            payload["saved_resident"] = str(model.session.save_resident(save_resident, force=True))
        print(json.dumps(payload))
        return
    out.print(prompt, end="", style="bold", highlight=False)
    result = model.generate(prompt, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
                            **kwargs)
    print()
    _print_stats(result.stats.as_dict())
    if show_stats:
        _print_layer_table(result.stats.as_dict().get("cache", {}))
    if save_resident is not None:
        err.print(f"resident experts saved: {model.session.save_resident(save_resident, force=True)}")


#: session config keys (C++ error messages) -> the edgemoe-run flag that sets them
_FLAG_OF_KEY = {
    "edgemoe.frequencies": "--frequencies",
    "edgemoe.policy_weights": "--policy-weights",
    "edgemoe.pin_experts": "--pin-experts",
    "edgemoe.policy": "--policy",
    "edgemoe.budget": "--budget",
    "edgemoe.io_threads": "--io-threads",
    "edgemoe.io_mode": "--io",
    "edgemoe.predictor": "--predictor",
    "edgemoe.prefetch_depth": "--prefetch-depth",
    "edgemoe.prefetch_threshold": "--prefetch-threshold",
    "edgemoe.profile": "--profile",
    "edgemoe.warm_start": "--warm-start",
}
_ORT_PREFIX = re.compile(r"^(\[ONNXRuntimeError\] : \d+ : \w+ : )?(Exception during initialization: )?")
_WEIGHTS_RE = re.compile(r"^\s*[A-Za-z_]+\s*=\s*[0-9.eE+-]+\s*(,\s*[A-Za-z_]+\s*=\s*[0-9.eE+-]+\s*)*$")


def _check_policy_flags(
    policy: str, frequencies: Path | None, policy_weights: str | None, pin_experts: int | None
) -> None:
    """One clear line, naming the flag, for policy options that do not fit the chosen ``--policy``."""
    if policy not in POLICIES:
        raise ValueError(f"--policy: expected one of {', '.join(POLICIES)}, found {policy!r}")
    if frequencies is not None:
        if policy not in ("pinned", "edgemoe"):
            raise ValueError(f"--frequencies: used by --policy pinned or edgemoe, found --policy {policy}")
        if not frequencies.is_file():
            raise FileNotFoundError(f"--frequencies {frequencies}: expected a JSON file, found "
                                    f"{'a folder' if frequencies.exists() else 'nothing'}")
        try:
            json.loads(frequencies.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"--frequencies {frequencies}: expected JSON, found invalid JSON ({exc})"
            ) from None
    elif policy == "pinned":
        raise ValueError("--policy pinned: expected --frequencies FILE (JSON expert frequencies), found none")
    if policy_weights is not None:
        if policy != "hobbit":
            raise ValueError(f"--policy-weights: used by --policy hobbit, found --policy {policy}")
        if not _WEIGHTS_RE.match(policy_weights):
            raise ValueError("--policy-weights: expected name=weight pairs like "
                             f"'lru=0.25,lfu=0.25,lhu=0.25,fld=0.25', found {policy_weights!r}")
    if pin_experts is not None:
        if policy != "pinned":
            raise ValueError(f"--pin-experts: used by --policy pinned, found --policy {policy}")
        if pin_experts < 0:
            raise ValueError(f"--pin-experts: expected an integer >= 0, found {pin_experts}")


def _check_prefetch_flags(
    predictor: str, depth: int, threshold: float, profile: Path | None, warm_start: str | None
) -> None:
    """One clear line, naming the flag, for prefetch options that cannot work."""
    if predictor not in PREDICTORS:
        raise ValueError(f"--predictor: expected one of {', '.join(PREDICTORS)}, found {predictor!r}")
    if not 1 <= depth <= 8:
        raise ValueError(f"--prefetch-depth: expected an integer in [1, 8], found {depth}")
    if not 0 < threshold <= 1:
        raise ValueError(f"--prefetch-threshold: expected a probability in (0, 1], found {threshold}")
    if profile is not None and not profile.is_file():
        raise FileNotFoundError(f"--profile {profile}: expected a profile.json, found "
                                f"{'a folder' if profile.exists() else 'nothing'}")
    if warm_start is not None and warm_start != "profile" and not Path(warm_start).is_file():
        found = "a folder" if Path(warm_start).exists() else "nothing"
        raise FileNotFoundError(f"--warm-start {warm_start}: expected 'profile' or a file written by "
                                f"--save-resident, found {found}")


def _print_layer_table(c: dict[str, Any]) -> None:
    """Per layer (this call): hits, misses, stall, bytes read, prefetches issued / used / hidden behind
    compute / wasted bytes, precision, recall. Plain aligned text: it never wraps into a mess."""
    layers = c.get("layers") or []
    if not layers:
        return
    head = ("layer", "hits", "misses", "stall_ms", "read", "pf_issued", "pf_used", "pf_hidden", "pf_wasted",
            "precision", "recall")
    rows = [head]
    for i, lay in enumerate(layers):
        p = lay.get("prefetch", {})
        rows.append((str(i), str(lay["hits"]), str(lay["misses"]), f"{lay['stall_s'] * 1e3:.1f}",
                     _fmt_bytes(lay["bytes_read"]), str(p.get("issued", 0)), str(p.get("used", 0)),
                     str(p.get("hidden", 0)), _fmt_bytes(p.get("wasted_bytes", 0)),
                     f"{p.get('precision', 0.0):.2f}", f"{p.get('recall', 0.0):.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        err.print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)), highlight=False,
                  markup=False, soft_wrap=True)


def _print_stats(s: dict[str, Any]) -> None:
    c = s.get("cache", {})
    lines = [
        f"prefill {s['prompt_tokens']} tok @ {s['prefill_tokens_per_s']:.1f} tok/s, "
        f"decode {s['generated_tokens']} tok @ {s['decode_tokens_per_s']:.1f} tok/s, "
        f"TTFT {s['ttft_s']:.3f} s",
        f"peak RSS {_fmt_bytes(s['peak_rss_bytes'])}",
    ]
    if c:
        total = c.get("hits", 0) + c.get("misses", 0)
        hit_rate = c.get("hits", 0) / total if total else 0.0
        lines.append(
            f"expert cache: budget {_fmt_bytes(c.get('budget_bytes', 0))} "
            f"of {_fmt_bytes(c.get('store_bytes', 0))} store, "
            f"peak resident {_fmt_bytes(c.get('peak_resident_bytes', 0))}, "
            f"hits {c.get('hits', 0)} misses {c.get('misses', 0)} ({hit_rate:.0%} hit), "
            f"read {_fmt_bytes(c.get('bytes_read', 0))} in {c.get('read_s', 0.0):.3f} s, "
            f"stall {c.get('stall_s', 0.0):.3f} s, io {c.get('io_mode', '?')}"
            f"{' (O_DIRECT)' if c.get('direct_io') else ''}, kernel {c.get('kernel', '?')}"
        )
        p = c.get("prefetch")
        if p:
            lines.append(
                f"prefetch: issued {p['issued']}, used {p['used']} ({p['hidden']} hidden behind compute), "
                f"wasted {_fmt_bytes(p['wasted_bytes'])}, precision {p['precision']:.2f}, "
                f"recall {p['recall']:.2f}"
            )
    for line in lines:
        err.print(f"[dim]{line}[/]", highlight=False, soft_wrap=True)


# --- edgemoe-inspect -------------------------------------------------------------------------------
inspect_app = typer.Typer(add_completion=False, help="Show what a bundle holds.")


@inspect_app.command()
@friendly_errors
def inspect(
    bundle: Annotated[Path, typer.Argument(help="bundle folder")],
    budget: Annotated[
        str | None,
        typer.Option(help="estimate the process's memory at this expert budget (default: 10/25/50/100%)"),
    ] = None,
    context: Annotated[
        int | None, typer.Option(help="tokens of KV cache to size for (default: the model's context)")
    ] = None,
    prompt_tokens: Annotated[
        int | None, typer.Option(help="longest prompt, prefilled in one pass (default: min(context, 512))")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    from rich.table import Table

    from edgemoe_ort.bundle import Bundle

    b = Bundle.open(bundle)
    summary = b.summary()
    memory = _memory_report(b, budget, context, prompt_tokens)
    if as_json:
        print(json.dumps({**summary, "memory": memory}, indent=2))
        return
    table = Table(title=str(bundle), show_header=False)
    for key, value in summary.items():
        if isinstance(value, int) and key.endswith("bytes"):
            value = f"{_fmt_bytes(value)} ({value} B)"
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    out.print(table)
    out.print(
        f"memory a process needs in MiB; total = the memory cap to give it (docs/memory.md). Minimum budget "
        f"{_fmt_bytes(memory['minimum_budget_bytes'])} (the largest expert); KV cache for "
        f"{memory['context_tokens']} tokens, a prefill of {memory['prompt_tokens']} tokens",
        highlight=False,
    )
    mem = Table()
    cols = (("experts", "expert_bytes"), ("dense", "dense_bytes"), ("KV", "kv_cache_bytes"),
            ("activ.", "activation_bytes"), ("scratch", "op_scratch_bytes"), ("load", "load_transient_bytes"),
            ("fixed", "fixed_overhead_bytes"), ("total", "total_bytes"))
    mem.add_column("budget", no_wrap=True)
    for name, _ in cols:
        mem.add_column(name, justify="right")
    for est in memory["estimates"]:
        if "error" in est:
            mem.add_row(f"{est['budget']}: {est['error']}", *["–"] * len(cols))
        else:
            mem.add_row(est["budget"], *[f"{est[k] / 2**20:.1f}" for _, k in cols])
    out.print(mem)


def _memory_report(
    bundle: Any, budget: str | None, context: int | None, prompt_tokens: int | None
) -> dict[str, Any]:
    """The memory model of ``bundle`` (edgemoe_ort.runtime.memory) at ``budget`` or at 10/25/50/100%."""
    from edgemoe_ort.runtime.memory import FIXED_OVERHEAD_BYTES, estimate_rss, minimum_budget
    from edgemoe_ort.runtime.ops import parse_budget

    for flag, v in (("--context", context), ("--prompt-tokens", prompt_tokens)):
        if v is not None and v < 1:
            raise ValueError(f"{flag}: expected at least 1 token, found {v}")
    floor = minimum_budget(bundle)
    if budget is not None:
        try:
            resolved = parse_budget(budget, bundle.store_bytes)
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None
        if resolved < floor:
            raise ValueError(
                f"--budget: expected at least {floor} bytes ({_fmt_bytes(floor)}, the largest expert of "
                f"{bundle.path}), found {budget!r} = {resolved} bytes"
            )
    estimates: list[dict[str, Any]] = []
    for b in [budget] if budget is not None else ["10%", "25%", "50%", "100%"]:
        resolved = parse_budget(b, bundle.store_bytes)
        if resolved < floor:
            estimates.append({"budget": b, "budget_bytes": resolved,
                              "error": "< minimum"})
            continue
        estimates.append({"budget": b, **estimate_rss(bundle, resolved, context=context,
                                                       prompt_tokens=prompt_tokens)})
    ok = next((e for e in estimates if "error" not in e), None)
    ctx = ok["context_tokens"] if ok else None
    return {
        "minimum_budget_bytes": floor,
        "fixed_overhead_bytes": FIXED_OVERHEAD_BYTES,
        "context_tokens": ctx,
        "prompt_tokens": ok["prompt_tokens"] if ok else None,
        "estimates": estimates,
    }


# --- edgemoe-bench ---------------------------------------------------------------------------------
# The benchmark command lives with the benchmarks (edgemoe_ort/bench/cli.py); re-exported for old imports.
from edgemoe_ort.bench.cli import bench_app  # noqa: E402,F401
