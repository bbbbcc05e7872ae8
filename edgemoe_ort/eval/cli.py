"""``edgemoe-eval``: perplexity of a bundle on text through the real runtime, with the cache counters.

User mistakes (missing bundle or corpus, bad option values, an encoder-decoder bundle) print one line and
exit with status 2, before anything is run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgemoe_ort.bundle.profile import PREDICTORS as PROFILE_PREDICTORS
from edgemoe_ort.cli_common import (
    CONTEXT_SETTINGS,
    MissPrecisionOption,
    QuietOption,
    ThresholdsOption,
    VerboseOption,
    VersionOption,
    command_kwargs,
    err,
    fmt_bytes,
    friendly_errors,
    out,
    output,
    parse_thresholds,
)

from .perplexity import DEFAULT_WINDOW, MODES

__all__ = ["eval_app"]

#: default cap on the tokens evaluated
DEFAULT_TOKENS = 8192
SPLITS = ("heldout", "all")

eval_app = typer.Typer(add_completion=False, context_settings=CONTEXT_SETTINGS)


@eval_app.command(**command_kwargs(
    "Perplexity of a bundle on UTF-8 text, run through the real runtime: the expert budget, cache policy, "
    "prefetching and routing rule are all in the measurement. Prints the perplexity and the cache's hits, "
    "misses and rerouted selections; --json: {perplexity, tokens, cache, ...} (docs/json-output.md).",
    ["edgemoe-eval bundles/tiny --corpus heldout/ --budget 25%",
     "edgemoe-eval bundles/tiny --corpus heldout/ --budget 25% --routing cache-prior --routing-lambda 0.35 "
     "--json"],
))
@friendly_errors
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="bundle folder (decoder-only)")],
    corpus: Annotated[
        list[Path], typer.Option("--corpus", help="UTF-8 text file or folder (recursively); repeatable")
    ],
    tokens: Annotated[int, typer.Option(help="evaluate at most this many tokens")] = DEFAULT_TOKENS,
    split: Annotated[
        str, typer.Option(help="heldout: the share edgemoe-profile holds out (its predictors never saw it); "
                          "all: the whole corpus in order")
    ] = "heldout",
    heldout_share: Annotated[float, typer.Option(help="the held-out share (as edgemoe-profile)")] = 0.1,
    window: Annotated[int, typer.Option(help="tokens per fresh-context window")] = DEFAULT_WINDOW,
    mode: Annotated[
        str, typer.Option(help="decode: one token per pass with the KV cache, as generation runs; prefill: "
                          "a window per pass")
    ] = "decode",
    budget: Annotated[
        str | None, typer.Option(help="expert cache budget: bytes, 256MB, 1GiB, 25% (of the store)",
                                 show_default="whole store")
    ] = None,
    policy: Annotated[
        str, typer.Option(help="cache policy: lru, lfu, edgemoe, hobbit, pinned, none")
    ] = "lru",
    predictor: Annotated[
        str, typer.Option(help="prefetch predictor: " + ", ".join(("none", *PROFILE_PREDICTORS, "auto")))
    ] = "auto",
    routing: Annotated[str, typer.Option(help="routing rule: exact, cache-prior, max-rank")] = "exact",
    routing_lambda: Annotated[
        float, typer.Option(help="cache-prior: bias in units of the layer's mean router-logit range")
    ] = 0.5,
    routing_keep: Annotated[int, typer.Option(help="J: the true top experts always kept")] = 1,
    routing_window: Annotated[
        int, typer.Option(help="max-rank: M, the true top-M a resident expert may come from (0 = 2k)")
    ] = 0,
    io: Annotated[str, typer.Option(help="expert reads: direct, buffered, mmap")] = "direct",
    miss_precision: MissPrecisionOption = "exact",
    thresholds: ThresholdsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    version: VersionOption = False,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.profile import separator_token
    from edgemoe_ort.profile.corpus import heldout_stream, read_corpus
    from edgemoe_ort.runtime.generate import MoEModel, load_tokenizer
    from edgemoe_ort.runtime.ops import RuntimeOptions

    from .perplexity import evaluate as run_eval

    if split not in SPLITS:
        raise ValueError(f"--split: expected one of {', '.join(SPLITS)}, found {split!r}")
    if mode not in MODES:
        raise ValueError(f"--mode: expected one of {', '.join(MODES)}, found {mode!r}")
    if tokens < 2:
        raise ValueError(f"--tokens: expected an int >= 2, found {tokens}")
    if window < 2:
        raise ValueError(f"--window: expected an int >= 2, found {window}")
    options = RuntimeOptions(
        budget=budget, policy=policy, predictor=predictor, io=io, routing=routing,
        routing_lambda=routing_lambda, routing_keep=routing_keep, routing_window=routing_window,
        miss_precision=miss_precision, thresholds=parse_thresholds(thresholds),
    )
    b = Bundle.open(bundle)
    from edgemoe_ort.bundle.format import model_graph_roles

    if model_graph_roles(b.graphs) != ["decoder"]:  # the tokenizer graphs aside
        raise ValueError(
            f"{b.path / 'manifest.json'}: graphs {sorted(b.graphs)}: edgemoe-eval measures decoder-only "
            "bundles (perplexity of a text continuation)"
        )
    tok = load_tokenizer(b)
    if tok is None:
        raise ValueError(f"{b.path}: the bundle has no tokenizer.json (edgemoe-eval reads text)")
    files = read_corpus(corpus)
    sep = separator_token(b)
    if split == "heldout":
        ids = heldout_stream(files, tok, heldout_share=heldout_share, max_tokens=tokens, separator=sep)
    else:
        ids = _all_tokens(files, tok, sep, tokens)
    if len(ids) < 2:
        raise ValueError(f"--corpus: the {split} split has {len(ids)} token(s), expected at least 2")
    model = MoEModel.load(b.path, options)
    try:
        columns = (TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True, disable=output.quiet) as bar:
            task = bar.add_task(mode, total=len(ids))
            result = run_eval(model, ids, window=window, mode=mode,
                              progress=lambda done, total: bar.update(task, completed=done, total=total))
    finally:
        model.close()
    doc: dict[str, Any] = {**result.as_dict(), "bundle": str(b.path), "split": split,
                           "options": _options_doc(options)}
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    c = result.cache
    r = c.get("routing", {})
    out.print(f"perplexity {result.perplexity:.3f} over {result.tokens} tokens ({split} split, {mode}, "
              f"windows of {window}; {result.tokens_per_s:.0f} tokens/s)", highlight=False)
    budget_text = fmt_bytes(c["budget_bytes"]) if c.get("budget_bytes") is not None else "?"
    out.print(f"expert cache: budget {budget_text}, policy {c['policy']}: {c['hits']} hits, {c['misses']} "
              f"misses (hit rate {c['hit_rate']:.3f}), {fmt_bytes(c['bytes_read'])} read, "
              f"stall {c['stall_s']:.3f} s", highlight=False)
    if r:
        out.print(f"routing {r.get('rule', routing)}: {r.get('changed', 0)} of {r.get('selections', 0)} "
                  f"selections changed, {r.get('misses_avoided', 0)} reads avoided", highlight=False)
    u, mp = c.get("uses") or {}, c.get("miss_precision") or {}
    if mp.get("mode") == "dynamic":
        out.print(f"miss precision dynamic (T1 {mp['t1']:.3f}, T2 {mp['t2']:.3f}): uses "
                  f"{u.get('high', 0)} high, {u.get('low', 0)} low (twin), {u.get('skipped', 0)} skipped",
                  highlight=False)


def _all_tokens(files: list[Any], tokenizer: Any, separator: int | None, cap: int) -> Any:
    """The whole corpus in order (each file + the separator), the first ``cap`` tokens."""
    import numpy as np

    parts, n = [], 0
    for f in files:
        if n >= cap:
            break
        ids = list(tokenizer.encode(f.text, add_special_tokens=False).ids)
        parts.append(np.asarray(ids + ([separator] if separator is not None else []), dtype=np.int64))
        n += len(parts[-1])
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64))[:cap]


def _options_doc(o: Any) -> dict[str, Any]:
    keys = ("budget", "policy", "predictor", "io", "routing", "routing_lambda", "routing_keep",
            "routing_window", "miss_precision", "thresholds")
    return {k: getattr(o, k) for k in keys}
