"""``edgemoe-bench``: benchmark one bundle side by side (see :mod:`edgemoe_ort.bench.runner`).

    edgemoe-bench BUNDLE --budgets 10%,25%,50% [--policy lfu | --policies lru,lfu,edgemoe,hobbit] \
        [--profile rpi4] [--json out.json] [--plot out.png]

Every flag is checked before anything runs: a bad value prints one ``error:`` line and exits with status 2.
Also runnable as ``python -m edgemoe_ort.bench.cli``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from edgemoe_ort.cli_common import (
    BUSY_LOAD,
    CONTEXT_SETTINGS,
    QuietOption,
    VerboseOption,
    VersionOption,
    check_output_file,
    command_kwargs,
    err,
    load_average,
    out,
    output,
    print_table,
    write_output_file,
)
from edgemoe_ort.cli_common import fmt_bytes as _fmt_bytes
from edgemoe_ort.cli_common import friendly_errors as _friendly_errors

MODE_NAMES = ("inmemory", "naive", "mmap", "edgemoe")


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def validate_args(
    bundle: Path,
    *,
    budgets: str,
    tokens: int,
    repeats: int,
    profile: str | None,
    trace: Path | None,
    modes: str | None,
    policy: str | None,
    policies: str | None,
    frequencies: Path | None,
    policy_weights: str | None,
    pin_experts: int | None,
    io_threads: int,
    predictors: str | None = None,
    routings: str | None = None,
    precisions: str | None = None,
    threads: int | None,
    rss: bool,
    rss_tokens: int,
) -> dict[str, Any]:
    """Check every flag (ValueError / FileNotFoundError with one line naming it) and return the parsed
    values: ``budgets``, ``modes`` (or None), ``policies`` (or None), ``predictors`` (or None), ``routings``
    (or None), ``precisions`` (or None), ``profile`` (dict or None)."""
    from edgemoe_ort.bench.runner import (
        check_policies,
        parse_policies,
        parse_precisions,
        parse_predictors,
        parse_routings,
    )
    from edgemoe_ort.bench.storage import load_profile
    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.runtime.ops import RuntimeOptions, parse_budget

    if tokens < 2:
        raise ValueError(
            f"--tokens: expected at least 2 (one prefill token and one decode step), found {tokens}"
        )
    if repeats < 1:
        raise ValueError(f"--repeats: expected at least 1, found {repeats}")
    if rss and rss_tokens < 1:
        raise ValueError(f"--rss-tokens: expected at least 1 decode token, found {rss_tokens}")
    budget_list = _split(budgets)
    if not budget_list:
        raise ValueError(f"--budgets: expected a comma-separated list like 10%,25%,256MB, found {budgets!r}")
    b = Bundle.open(bundle)
    for x in budget_list:
        try:
            parse_budget(x, b.store_bytes, b.primary_bytes)
        except ValueError as e:
            raise ValueError(f"--budgets: {e}") from None
    mode_list = None
    if modes is not None:
        mode_list = _split(modes)
        bad = [m for m in mode_list if m not in MODE_NAMES]
        if bad or not mode_list:
            raise ValueError(f"--modes: expected a subset of {','.join(MODE_NAMES)}, found {modes!r}")
    if policy is not None and policies is not None:
        raise ValueError("--policy and --policies: give one of them (--policy P is --policies P)")
    policy_list = None
    if policy is not None:
        policy_list = parse_policies([policy], flag="--policy")
    elif policies is not None:
        policy_list = parse_policies(policies, flag="--policies")
    if policy_list is not None and mode_list is not None and "edgemoe" not in mode_list:
        raise ValueError("--policy/--policies choose the edgemoe mode's policy, but --modes leaves it out")
    if frequencies is not None and not frequencies.is_file():
        raise FileNotFoundError(f"--frequencies: {frequencies}: no such file")
    if policy_list is not None:
        check_policies(
            policy_list,
            frequencies=frequencies,
            policy_weights=policy_weights,
            pin_experts=pin_experts,
            flag="--policy" if policy is not None else "--policies",
        )
    elif policy_weights is not None or pin_experts is not None or frequencies is not None:
        check_policies(
            ["lru"], frequencies=frequencies, policy_weights=policy_weights, pin_experts=pin_experts
        )
    predictor_list = None
    if predictors is not None:
        predictor_list = parse_predictors(predictors)
        if mode_list is not None and "edgemoe" not in mode_list:
            raise ValueError("--predictors choose the edgemoe mode's predictor, but --modes leaves it out")
        needs_profile = [p for p in predictor_list if p in ("table", "token")]
        if needs_profile and not (bundle / "profile.json").is_file():
            raise ValueError(
                f"--predictors {','.join(needs_profile)}: {bundle / 'profile.json'} not found "
                "(make it with: edgemoe-profile BUNDLE --corpus TEXT)"
            )
    routing_list = None
    if routings is not None:
        routing_list = parse_routings(routings)
        if mode_list is not None and "edgemoe" not in mode_list:
            raise ValueError("--routing chooses the edgemoe mode's routing rule, but --modes leaves it out")
    precision_list = None
    if precisions is not None:
        precision_list = parse_precisions(precisions)
        if mode_list is not None and "edgemoe" not in mode_list:
            raise ValueError("--miss-precision chooses the edgemoe mode's miss precision, but --modes leaves "
                             "it out")
    prof = load_profile(profile) if profile else None
    if trace is not None and not trace.is_file():
        raise FileNotFoundError(f"--trace: {trace}: no such file")
    try:
        RuntimeOptions(io_threads=io_threads, intra_op_threads=threads)
    except ValueError as e:
        raise ValueError(f"--io-threads/--threads: {e}") from None
    return {
        "budgets": budget_list,
        "modes": mode_list,
        "policies": policy_list,
        "predictors": predictor_list,
        "routings": routing_list,
        "precisions": precision_list,
        "profile": prof,
    }


def _miss_cell(m: dict[str, Any]) -> str:
    """``exact``, or ``dynamic 70/27/3`` (the decode uses high / low / skipped, percent)."""
    spec = m.get("miss_precision") or "exact"
    u = m.get("uses_per_token") or {}
    total = sum(u.values())
    if spec == "exact" or not total:
        return spec
    return f"{spec} " + "/".join(f"{100 * u.get(k, 0) / total:.0f}" for k in ("high", "low", "skipped"))


bench_app = typer.Typer(add_completion=False, context_settings=CONTEXT_SETTINGS)


@bench_app.command(**command_kwargs(
    "Benchmark a bundle side by side: all-in-memory (ORT QMoE/MoE), naive on-demand, mmap and the edgemoe "
    "cache at several budgets (and cache policies), interleaved in one process, with the storage roofline "
    "and the peak RSS of each mode in a fresh process. Every flag and output file is checked before anything "
    "runs; --json/--plot never replace a file without --force. Results measured while the machine was busy "
    "(1-minute load average >= 1.5) are marked so.",
    ["edgemoe-bench bundles/tiny --budgets 10%,25%,50%",
     "edgemoe-bench bundles/tiny --policies lru,lfu,edgemoe,hobbit --profile rpi4",
     "edgemoe-bench bundles/tiny --json bench-out/tiny.json --plot bench-out/tiny.png --force"],
))
@_friendly_errors
def bench(
    bundle: Annotated[Path, typer.Argument(help="bundle folder")],
    budgets: Annotated[str, typer.Option(help="comma-separated budgets: 10%,25%,256MB,...")] = (
        "10%,25%,50%,100%"
    ),
    tokens: Annotated[int, typer.Option(help="tokens per generation (decode steps + 1)")] = 16,
    prompt_file: Annotated[
        Path | None, typer.Option(help="prompt text (token ids if the bundle has no tokenizer)")
    ] = None,
    repeats: Annotated[int, typer.Option(help="interleaved repeats per mode (median reported)")] = 3,
    profile: Annotated[
        str | None,
        typer.Option(help="storage profile (profiles/NAME.toml): throttle reads to its bandwidth/latency"),
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option(help="replay a routing trace (.npz) into a make_moe_graph bundle instead of generating"),
    ] = None,
    modes: Annotated[str | None, typer.Option(help="subset: inmemory,naive,mmap,edgemoe")] = None,
    policy: Annotated[
        str | None,
        typer.Option(help="cache policy of the edgemoe mode: lru (default), lfu, edgemoe, hobbit, pinned"),
    ] = None,
    policies: Annotated[
        str | None,
        typer.Option(
            help="compare several policies in one interleaved run, e.g. lru,lfu,edgemoe,hobbit: each is a "
            "mode edgemoe[P]@budget"
        ),
    ] = None,
    frequencies: Annotated[
        Path | None, typer.Option(help="expert frequencies (JSON) for the policies that use them (pinned)")
    ] = None,
    policy_weights: Annotated[
        str | None, typer.Option(help="hobbit weights, e.g. lru=0.25,lfu=0.25,lhu=0.25,fld=0.25")
    ] = None,
    pin_experts: Annotated[int | None, typer.Option(help="pinned: how many experts to pin")] = None,
    predictors: Annotated[
        str | None,
        typer.Option(
            help="prefetch predictors to compare, e.g. none,table,gates,token,residual,auto: each is a mode "
            "edgemoe[P+pred]@budget beside the policies, in the same interleaved run"
        ),
    ] = None,
    routing: Annotated[
        str | None,
        typer.Option(
            help="routing rules to compare, e.g. exact,cache-prior:0.35,max-rank:1:4 (cache-prior:LAMBDA[:J],"
            " max-rank:J[:M]): each is a mode edgemoe[P/rule]@budget in the same interleaved run"
        ),
    ] = None,
    miss_precision: Annotated[
        str | None,
        typer.Option(
            help="miss precisions to compare, e.g. exact,dynamic or dynamic:0.6:0.9 (a bundle with twins: "
            "edgemoe-export --twin): each is a mode edgemoe[P~spec]@budget in the same interleaved run"
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="ORT intra-op threads")] = None,
    io_threads: Annotated[int, typer.Option(help="I/O threads")] = 2,
    rss: Annotated[bool, typer.Option(help="measure peak RSS per mode in a fresh subprocess")] = True,
    rss_tokens: Annotated[
        int, typer.Option(help="decode tokens of each peak-RSS generation (a short run hides RSS growth)")
    ] = 64,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the full result as JSON")] = None,
    plot: Annotated[Path | None, typer.Option(help="write tokens/s and roofline-ratio plots (PNG)")] = None,
    force: Annotated[bool, typer.Option(help="let --json / --plot replace existing files")] = False,
    version: VersionOption = False,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run the benchmark and print one row per mode (one per policy and budget for edgemoe)."""
    from rich.table import Table

    from edgemoe_ort.bench.report import rss_verdicts
    from edgemoe_ort.bench.runner import run_bench

    v = validate_args(
        bundle, budgets=budgets, tokens=tokens, repeats=repeats, profile=profile, trace=trace, modes=modes,
        policy=policy, policies=policies, frequencies=frequencies, policy_weights=policy_weights,
        pin_experts=pin_experts, io_threads=io_threads, threads=threads, rss=rss, rss_tokens=rss_tokens,
        predictors=predictors, routings=routing, precisions=miss_precision,
    )
    if json_out is not None and plot is not None and json_out.resolve() == plot.resolve():
        raise ValueError(f"--json and --plot: both name {json_out}")
    if plot is not None:
        try:
            import matplotlib  # noqa: F401 - plot_run needs it after the run
        except ImportError:
            raise ValueError(f"--plot {plot}: needs matplotlib, which is not installed (pip install "
                             "matplotlib, or leave --plot out)") from None
    check_output_file(json_out, "--json", force=force)  # before the benchmark, not after it
    check_output_file(plot, "--plot", force=force)
    load_before = load_average()
    if load_before is not None and load_before >= BUSY_LOAD:
        err.print(f"[yellow]warning:[/] load average {load_before:.2f} >= {BUSY_LOAD}: other work is "
                  "running, the figures will be noisy (they are marked busy)", highlight=False)
    prompt_ids = None
    if prompt_file is not None:
        from edgemoe_ort.bundle import Bundle
        from edgemoe_ort.runtime.generate import load_tokenizer

        if not prompt_file.is_file():
            raise FileNotFoundError(f"--prompt-file {prompt_file}: expected a text file, found "
                                    f"{'a folder' if prompt_file.exists() else 'nothing'}")
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"--prompt-file {prompt_file}: not UTF-8 text (byte {exc.start})") from None
        tok = load_tokenizer(Bundle.open(bundle))
        if tok is not None:
            prompt_ids = list(tok.encode(text, add_special_tokens=False).ids)
        else:
            try:
                prompt_ids = [int(t) for t in text.split()]
            except ValueError:
                raise ValueError(
                    f"{prompt_file}: the bundle has no tokenizer: expected whitespace-separated token ids"
                ) from None
        if not prompt_ids:
            raise ValueError(f"{prompt_file}: empty prompt")
    result = run_bench(
        bundle, budgets=v["budgets"], tokens=tokens, prompt_ids=prompt_ids, trace=trace, repeats=repeats,
        profile=profile, io_threads=io_threads, threads=threads, rss=rss, rss_decode_tokens=rss_tokens,
        modes=v["modes"], policies=v["policies"], predictors=v["predictors"], routings=v["routings"],
        precisions=v["precisions"], frequencies=frequencies,
        policy_weights=policy_weights,
        pin_experts=pin_experts,
        log=lambda s: None if output.quiet else err.print(f"[dim]{escape(s)}[/]", highlight=False),
    )
    load_after = load_average()
    loads = [x for x in (load_before, load_after) if x is not None]
    result["load_average"] = {"before": load_before, "after": load_after,
                              "busy": bool(loads) and max(loads) >= BUSY_LOAD}
    busy = " [BUSY MACHINE: load average " + "/".join(f"{x:.2f}" for x in loads) + "]" if (
        result["load_average"]["busy"]) else ""
    table = Table(title=f"{escape(str(bundle))} — {result['decode_tokens']} decode tokens, "
                        f"median of {repeats}, "
                        f"roofline bw {result['roofline_bw_bytes_per_s'] / 1e6:.0f} MB/s, "
                        f"compute {result['compute_s_per_token'] * 1e3:.1f} ms/token{busy}")
    left = ("mode", "policy", "predictor", "routing", "miss", "budget")
    for col in (*left, "decode tok/s", "prefill tok/s", "TTFT s", "MB/tok", "hit", "stall ms/tok",
                "pf precision", "peak RSS", "ratio to roofline"):
        table.add_column(col, justify="left" if col in left else "right")
    for m in result["modes"]:
        prec = m.get("prefetch_precision")
        table.add_row(
            m["mode"], m.get("policy") or "–", m.get("predictor") or "–",
            (m.get("routing") or "exact") if m["mode"] == "edgemoe" else "–",
            _miss_cell(m) if m["mode"] == "edgemoe" else "–", m["budget"] or "–",
            f"{m['decode_tokens_per_s']:.2f}",
            f"{m['prefill_tokens_per_s']:.1f}",
            f"{m['ttft_s']:.3f}", f"{m['bytes_read_per_token'] / 1e6:.2f}",
            "–" if m["hit_rate"] is None else f"{m['hit_rate']:.0%}", f"{m['stall_s_per_token'] * 1e3:.1f}",
            "–" if prec is None else f"{prec:.2f}",
            "–" if m["peak_rss_bytes"] is None else _fmt_bytes(m["peak_rss_bytes"]),
            "withheld" if result.get("ratios_withheld") else f"{m['roofline_ratio']:.2f}",
        )
    print_table(table)
    if result.get("ratios_withheld"):
        err.print(f"[yellow]warning:[/] ratios to roofline withheld: {escape(result['ratios_withheld'])}",
                  highlight=False)
    for line in rss_verdicts(result):
        out.print(escape(line["text"]), highlight=False, soft_wrap=True)
    if busy:
        err.print(f"[yellow]warning:[/] measured on a busy machine{busy}: re-run on a quiet one to compare",
                  highlight=False)
    if json_out is not None:
        text = json.dumps(result, indent=1, default=str)
        write_output_file(json_out, "--json", force=force, write=lambda p: p.write_text(text))
    if plot is not None:
        import shutil
        import tempfile

        from edgemoe_ort.bench.report import plot_run

        with tempfile.TemporaryDirectory() as td:
            name = plot_run(bundle.name, result, Path(td))[0]
            write_output_file(plot, "--plot", force=force,
                              write=lambda p: shutil.move(str(Path(td) / name), p))


if __name__ == "__main__":
    bench_app()
