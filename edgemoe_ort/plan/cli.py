"""``edgemoe-plan``: EdgeMoE's expert-wise bitwidth planner, on the host (torch + transformers).

User mistakes (a missing model or corpus, bad --bits / --tolerance, an existing -o without --force) print one
line and exit with status 2, before the model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgemoe_ort.cli_common import (
    CONTEXT_SETTINGS,
    QuietOption,
    StageBars,
    VerboseOption,
    VersionOption,
    check_output_file,
    command_kwargs,
    fmt_bytes,
    friendly_errors,
    out,
    print_table,
    write_output_file,
)
from edgemoe_ort.plan.format import METHODS, Plan, parse_bits, parse_tolerance, write_plan
from edgemoe_ort.plan.planner import DEFAULT_TOKENS, DEFAULT_WINDOW

__all__ = ["plan_app", "summary"]

plan_app = typer.Typer(add_completion=False, context_settings=CONTEXT_SETTINGS)


@plan_app.command(**command_kwargs(
    "Choose a dtype per routed expert (EdgeMoE's expert-wise bitwidths): rank the experts by the calibration "
    "perplexity when each alone is at the lowest --bits and the others high, then lower the least important "
    "as far as the perplexity stays within --tolerance of the uniform model at the highest --bits. "
    "Calibration text: the train split of --corpus (edgemoe-eval --corpus scores its held-out split). Writes "
    "plan.json for edgemoe-export --plan (docs/quality.md, 'Expert-wise bitwidths').",
    ["edgemoe-plan models/edgemoe-tiny-mixtral --corpus text/ --tolerance 1% -o plan.json",
     "edgemoe-plan models/edgemoe-tiny-mixtral --corpus text/ --tolerance 0.5% --bits 2,3,4,8 -o plan.json",
     "edgemoe-plan models/edgemoe-tiny-mixtral --corpus text/ --tolerance 1% --method proxy -o p.json --json",
     "edgemoe-export models/edgemoe-tiny-mixtral --plan plan.json -o bundles/tiny-planned"],
))
@friendly_errors
def plan(
    model: Annotated[str, typer.Argument(help="local checkpoint folder (config.json + weights) or hub id")],
    corpus: Annotated[
        list[Path], typer.Option("--corpus", help="UTF-8 text file or folder (recursively); repeatable")
    ],
    tolerance: Annotated[
        str, typer.Option(help="allowed calibration perplexity increase over the reference: 1% or 0.01")
    ],
    output_file: Annotated[Path, typer.Option("-o", "--output", help="the plan file to write (JSON)")],
    bits: Annotated[
        str | None,
        typer.Option(help="the levels offered, bits or dtype names: 2,3,4,8 (the expert formats of this "
                     "build); the highest is the reference", show_default="every quantized format"),
    ] = None,
    group_size: Annotated[int, typer.Option(help="quantization group size (as edgemoe-export's)")] = 64,
    tokens: Annotated[int, typer.Option(help="calibration tokens (from the corpus's train split)")] = (
        DEFAULT_TOKENS),
    window: Annotated[
        int, typer.Option(help="tokens per fresh-context window (at most the model's context)")
    ] = DEFAULT_WINDOW,
    heldout_share: Annotated[
        float, typer.Option(help="the share of the corpus held out (as edgemoe-profile / edgemoe-eval)")
    ] = 0.1,
    method: Annotated[
        str, typer.Option(help="ranking: loss = one pass per expert (EdgeMoE); proxy = the gate-weighted "
                          "output error of each expert, one pass in all")
    ] = "loss",
    force: Annotated[bool, typer.Option(help="replace an existing --output file")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print a JSON summary on stdout (docs/json-output.md)")
    ] = False,
    version: VersionOption = False,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    import importlib.util

    from edgemoe_ort.hub import check_source
    from edgemoe_ort.profile.corpus import read_corpus

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"edgemoe-plan needs the exporter's dependencies ({', '.join(missing)} not "
                         "installed): pip install 'edgemoe-ort[export]'")
    tol = parse_tolerance(tolerance)
    levels = parse_bits(bits)
    if method not in METHODS:
        raise ValueError(f"--method: expected one of {', '.join(METHODS)}, found {method!r}")
    for flag, v, lo in (("--group-size", group_size, 1), ("--tokens", tokens, 2), ("--window", window, 2)):
        if v < lo:
            raise ValueError(f"{flag}: expected an integer >= {lo}, found {v}")
    if not 0 < heldout_share < 1:
        raise ValueError(f"--heldout-share: expected a number in (0, 1), found {heldout_share}")
    read_corpus(corpus)  # a bad corpus fails before the model is loaded
    check_output_file(output_file, "--output", force=force)
    source = check_source(model)

    from edgemoe_ort.plan.planner import passive_openmp, plan_model

    passive_openmp()  # before torch is imported (edgemoe_ort/plan/planner.py says why)

    with StageBars(transient=as_json) as bars:
        result = plan_model(source, tolerance=tol, corpus=[str(p) for p in corpus], bits=levels,
                            group_size=group_size, tokens=tokens, window=window, heldout_share=heldout_share,
                            method=method, progress=bars)
    write_output_file(output_file, "--output", force=force, write=lambda p: write_plan(p, result))
    if as_json:
        print(json.dumps(summary(result, output_file), indent=2))
        return
    _print_report(result, output_file)


def summary(p: Plan, path: str | Path) -> dict[str, Any]:
    """What ``--json`` prints (docs/json-output.md, ``edgemoe-plan --json``)."""
    s = p.search
    return {
        "plan": str(path),
        "model": p.source,
        "family": p.family,
        "method": p.method,
        "tolerance": p.tolerance,
        "offered": p.offered,
        "group_size": p.group_size,
        "reference": {"dtype": p.reference["dtype"], "perplexity": p.reference["perplexity"]},
        "perplexity": p.result["perplexity"],
        "degradation": p.result["degradation"],
        "store_bytes": p.result["store_bytes"],
        "uniform_store_bytes": p.result["uniform_store_bytes"],
        "counts": p.counts(),
        "layers": p.layer_counts(),
        "uniform": s.get("uniform", []),
        "levels": [{"dtype": lv["dtype"], "candidates": lv["candidates"], "k": lv["k"],
                    "evaluations": len(lv["evaluations"])} for lv in s.get("levels", [])],
        "proxy_vs_loss": s.get("proxy_vs_loss", {}),
        "calibration_tokens": p.calibration.get("scored_tokens"),
        "passes": s.get("passes"),
        "seconds": s.get("seconds", {}),
    }


def _print_report(p: Plan, path: Path) -> None:
    from rich.table import Table

    s, r = p.search, p.result
    ref = p.reference
    secs = s.get("seconds", {})
    out.print(f"[green]plan written:[/] {path} ({p.method} ranking, tolerance {100 * p.tolerance:g}%, "
              f"{secs.get('total', 0):.1f} s, {s.get('passes')} passes over "
              f"{p.calibration.get('scored_tokens')} calibration tokens)", highlight=False)
    out.print(f"reference (uniform {ref['dtype']}): perplexity {ref['perplexity']:.3f}; planned: "
              f"{r['perplexity']:.3f} ({100 * r['degradation']:+.3f}%, calibration split)", highlight=False)
    uni = Table(title="uniform levels (calibration perplexity)")
    for col in ("dtype", "perplexity", "vs reference", "store"):
        uni.add_column(col, justify="left" if col == "dtype" else "right")
    for u in s.get("uniform", []):
        uni.add_row(u["dtype"], f"{u['perplexity']:.3f}", f"{100 * u['degradation']:+.3f}%",
                    fmt_bytes(r["uniform_store_bytes"][u["dtype"]]))
    uni.add_row("[bold]plan[/]", f"{r['perplexity']:.3f}", f"{100 * r['degradation']:+.3f}%",
                fmt_bytes(r["store_bytes"]))
    print_table(uni)
    for lv in s.get("levels", []):
        out.print(f"{lv['dtype']}: K = {lv['k']} of {lv['candidates']} experts ({len(lv['evaluations'])} "
                  "bisection passes)", highlight=False)
    cmp_ = s.get("proxy_vs_loss", {})
    if cmp_.get("spearman") is not None:
        ov = cmp_.get("low_set_overlap")
        out.print(f"proxy vs loss ranking: Spearman {cmp_['spearman']:.3f}"
                  + (f", {100 * ov:.0f}% of the low set agree" if ov is not None else ""), highlight=False)
    from edgemoe_ort.quant import BITS

    dts = sorted({d for c in p.layer_counts() for d in c}, key=lambda d: -BITS[d])
    lay = Table(title="experts per dtype, per MoE layer")
    lay.add_column("layer", justify="right")
    for d in dts:
        lay.add_column(d, justify="right")
    for i, c in enumerate(p.layer_counts()):
        lay.add_row(str(i), *[str(c.get(d, 0)) for d in dts])
    print_table(lay)
