"""``edgemoe-profile``: record a bundle's routing on a text corpus and write ``profile.json`` into it.

User mistakes (missing bundle or corpus, a file that is not UTF-8, an existing profile without ``--force``)
print one line and exit with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgemoe_ort.cli_common import (
    CONTEXT_SETTINGS,
    QuietOption,
    VerboseOption,
    VersionOption,
    command_kwargs,
    err,
    friendly_errors,
    out,
    output,
)

from .corpus import DEFAULT_TOKENS
from .recall import BUDGETS
from .routing import DEFAULT_WINDOW
from .tables import DEFAULT_MIN_COUNT, DEFAULT_TOP_M

__all__ = ["profile_app", "summary"]

profile_app = typer.Typer(add_completion=False, context_settings=CONTEXT_SETTINGS)


@profile_app.command(**command_kwargs(
    "Record which experts a bundle routes a text corpus to, and write BUNDLE/profile.json (the tables the "
    "prefetch predictors read), and probes fitted to the routers (installed into the decoder graph).",
    ["edgemoe-profile bundles/tiny --corpus my_text/ --tokens 100000",
     "edgemoe-profile bundles/tiny --corpus a.txt --corpus b.txt --json --force",
     "edgemoe-profile bundles/switch --ids ids.npy --tokens 20000   # a bundle without a tokenizer"],
))
@friendly_errors
def profile(
    bundle: Annotated[Path, typer.Argument(help="bundle folder")],
    corpus: Annotated[
        list[Path] | None,
        typer.Option("--corpus", help="UTF-8 text file or folder (recursively); repeatable"),
    ] = None,
    ids: Annotated[
        Path | None,
        typer.Option(
            "--ids",
            help="instead of --corpus: a stream of token ids (.npy, or integers split by spaces or commas)",
        ),
    ] = None,
    tokens: Annotated[int, typer.Option(help="at most this many tokens (train + held out)")] = DEFAULT_TOKENS,
    heldout_share: Annotated[
        float, typer.Option(help="share held out to measure recall (files, or the stream of a single file)")
    ] = 0.1,
    window: Annotated[int, typer.Option(help="tokens per fresh-context window")] = DEFAULT_WINDOW,
    top_m: Annotated[int, typer.Option(help="entries kept per key of the tables")] = DEFAULT_TOP_M,
    min_count: Annotated[
        int, typer.Option(help="keep a key seen at least this many times")
    ] = DEFAULT_MIN_COUNT,
    probe: Annotated[
        bool,
        typer.Option(
            help="fit probes of the later routers (ResidualPrefetch scores, stacked gates) into the graph"
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary instead of tables")] = False,
    force: Annotated[bool, typer.Option(help="replace an existing profile.json")] = False,
    version: VersionOption = False,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.bundle.profile import check_writable, write_profile
    from edgemoe_ort.profile import check_options, profile_bundle
    from edgemoe_ort.profile.corpus import read_corpus, read_ids

    if (corpus is None) == (ids is None):
        raise ValueError(
            "--corpus / --ids: expected exactly one of --corpus (text) and --ids (token ids), found "
            + ("both" if corpus else "neither")
        )
    b = Bundle.open(bundle)
    check_options(
        b,
        tokens=tokens,
        heldout_share=heldout_share,
        window=window,
        top_m=top_m,
        min_count=min_count,
        ids=ids is not None,
    )
    check_writable(b.path, force)
    # a bad corpus fails before the model is loaded
    vocab = b.config.get("vocab_size")
    token_ids = read_ids(ids, vocab if isinstance(vocab, int) else None) if ids is not None else None
    files = read_corpus(corpus) if corpus is not None else None
    sources = [str(p) for p in corpus] if corpus is not None else [str(ids)]
    columns = (TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=as_json, disable=output.quiet) as bar:
        tasks: dict[str, TaskID] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        doc = profile_bundle(
            b.path,
            sources,
            tokens=tokens,
            heldout_share=heldout_share,
            window=window,
            top_m=top_m,
            min_count=min_count,
            progress=on_progress,
            files=files,
            probe=probe,
            ids=token_ids,
        )
    path = write_profile(b.path, doc, force=force)
    if as_json:
        print(json.dumps(summary(doc, path), indent=2))
        return
    _print_tables(doc, path)


def summary(doc: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """What ``--json`` prints: where the profile went, its corpus, the held-out recall, hit rates, auto and
    the probes' recall."""
    from edgemoe_ort.profile.probe import probe_summary

    return {
        "profile": str(path),
        "corpus": doc["corpus"],
        "top_m": doc["top_m"],
        "min_count": doc["min_count"],
        "layers": len(doc["layers"]),
        "recall_at": doc["heldout"]["recall_at"],
        "recall": doc["heldout"]["recall"],
        "hit_rates": doc["heldout"]["hit_rates"],
        "auto": doc["auto"],
        "probes": probe_summary(doc),
    }


def _print_tables(doc: dict[str, Any], path: Path) -> None:
    from rich.table import Table

    from edgemoe_ort.profile.probe import next_layer_sites, probe_summary

    c = doc["corpus"]
    out.print(
        f"[green]profile written:[/] {path} ({c['train_tokens']} train, {c['heldout_tokens']} held-out "
        "tokens)",
        highlight=False,
    )
    recall = doc["heldout"]["recall"]
    names = [n for n, vals in recall.items() if any(v is not None for v in vals)]
    out.print("held-out recall@K per layer (K = the layer's top_k; * = auto)", highlight=False)
    t = Table()
    t.add_column("layer", justify="right")
    for n in names:
        t.add_column(n, justify="right")
    for li, auto in enumerate(doc["auto"]):
        best = "+".join(auto)
        cells = []
        for n in names:
            v = recall[n][li]
            cells.append("–" if v is None else f"{v:.3f}{'*' if n == best else ''}")
        t.add_row(str(li), *cells)
    out.print(t)
    rates = doc["heldout"]["hit_rates"]
    if rates:
        budgets = [b for b in BUDGETS if any(r["budget"] == b for r in rates)]
        budgets += sorted({r["budget"] for r in rates} - set(budgets))
        out.print(
            "expert cache hit rate, held-out tokens decoded one by one (simulator; belady = offline bound)",
            highlight=False,
        )
        h = Table()
        h.add_column("policy")
        for b in budgets:
            h.add_column(f"budget {b}", justify="right")
        by = {(r["policy"], r["budget"]): r["hit_rate"] for r in rates}
        for pol in dict.fromkeys(r["policy"] for r in rates):
            h.add_row(pol, *[f"{by[(pol, b)]:.3f}" if (pol, b) in by else "–" for b in budgets])
        out.print(h)
    probe = probe_summary(doc)
    if probe is not None:
        if probe["sites"]:
            out.print(
                f"probes fitted on {probe['train_tokens']} tokens and installed in the decoder graph; "
                "held-out recall@K of the next layer, its router -> the probe:",
                highlight=False,
            )
            for kind in ("residual", "gates"):
                cells = ", ".join(
                    f"layer {e['layer']} {e['recall_router']:.3f} -> {e['recall_probe']:.3f}"
                    for e in next_layer_sites(probe, kind)
                    if e["recall_router"] is not None
                )
                if cells:
                    out.print(f"  {kind}: {cells}", highlight=False)
        if probe.get("note"):
            out.print(f"[yellow]{probe['note']}[/]", highlight=False)
    if all(v is None for v in recall.get("gates", [])):
        out.print(
            "[dim]gates: the graph has no stacked next-router logits (OffloadedExpert input 3)[/]",
            highlight=False,
        )
    if all(v is None for v in recall.get("residual", [])):
        out.print(
            "[dim]residual: the graph has no ResidualPrefetch nodes (wire them: edgemoe_ort.bundle.wiring."
            "wire_bundle)[/]",
            highlight=False,
        )
