"""Command-line entry points: edgemoe-export, edgemoe-run, edgemoe-inspect.

User mistakes print one clear line and exit with status 2; tracebacks are for our bugs only (and ``-v``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from edgemoe_ort.cli_common import (
    CONTEXT_SETTINGS,
    MissPrecisionOption,
    QuietOption,
    StageBars,
    ThresholdsOption,
    VerboseOption,
    VersionOption,
    check_output_file,
    command_kwargs,
    err,
    friendly_errors,
    info,
    make_parents,
    out,
    output,
    parse_thresholds,
    print_table,
    write_output_file,
)
from edgemoe_ort.cli_common import fmt_bytes as _fmt_bytes
from edgemoe_ort.quant import BITS, BITS_TO_DTYPE, QUANTIZED_DTYPES
from edgemoe_ort.quant.nbits import (
    DEFAULT_DENSE_BITS,
    DEFAULT_DENSE_BLOCK_SIZE,
    DENSE_BITS,
    is_valid_block_size,
)
from edgemoe_ort.runtime.ops import POLICIES, PREDICTORS, ROUTING_RULES

#: the ``--bits`` choices, from edgemoe_ort.quant's format table: "32, 16, 8, 4, 3 or 2"
_BITS_CHOICES = ", ".join(map(str, list(BITS_TO_DTYPE)[:-1])) + f" or {list(BITS_TO_DTYPE)[-1]}"

# --- edgemoe-export --------------------------------------------------------------------------------
export_app = typer.Typer(add_completion=False, context_settings=CONTEXT_SETTINGS)


@export_app.command(**command_kwargs(
    "Export a HuggingFace MoE checkpoint (a local folder, or a hub id) to an edgemoe bundle: the dense ONNX "
    "graph(s) with one OffloadedExpert node per MoE layer, and every routed expert quantized into an expert "
    "store on disk. An existing output folder is replaced only with --force, and only if it is an edgemoe "
    "bundle holding nothing else.",
    ["edgemoe-export models/edgemoe-tiny-mixtral -o bundles/tiny",
     "edgemoe-export mistralai/Mixtral-8x7B-v0.1 -o bundles/mixtral-int4 --bits 4 --group-size 64",
     "edgemoe-export models/edgemoe-tiny-mixtral -o bundles/tiny --bits 8 --force",
     "edgemoe-export models/edgemoe-tiny-mixtral -o bundles/tiny-d4 --dense-bits 4",
     "edgemoe-export models/edgemoe-tiny-mixtral -o bundles/tiny-twins --bits 8 --twin int4",
     "edgemoe-export models/edgemoe-tiny-mixtral -o bundles/tiny-planned --plan plan.json   # edgemoe-plan"],
))
@friendly_errors
def export(
    model: Annotated[str, typer.Argument(help="local checkpoint folder (config.json + weights) or hub id")],
    output_dir: Annotated[Path, typer.Option("-o", "--output", help="bundle folder to create")],
    bits: Annotated[
        int | None,
        typer.Option(help=f"expert weight bits: {_BITS_CHOICES} (not with --plan)", show_default="4"),
    ] = None,
    group_size: Annotated[
        int | None, typer.Option(help=f"quantization group size ({'/'.join(QUANTIZED_DTYPES)})",
                                 show_default="64, or the plan's")
    ] = None,
    plan: Annotated[
        Path | None,
        typer.Option(help="a plan.json of edgemoe-plan: each expert in its planned dtype, at the plan's "
                     "group size (leave --bits out)"),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="replace an existing bundle (only an edgemoe bundle that holds nothing else)")
    ] = False,
    lookahead: Annotated[
        int,
        typer.Option(
            min=0,
            help="later MoE layers whose router logits each expert node gets for prefetching (0 = none)",
        ),
    ] = 3,
    dense_bits: Annotated[
        int,
        typer.Option(help="bits of the dense weights (embeddings, attention, shared experts, dense MLPs, "
                          "LM head; routers stay 32): 32, 16, 8 or 4 (docs/bundle-format.md)"),
    ] = DEFAULT_DENSE_BITS,
    dense_group_size: Annotated[
        int, typer.Option(help="block size of --dense-bits 8/4 (a power of two >= 16)")
    ] = DEFAULT_DENSE_BLOCK_SIZE,
    twin: Annotated[
        str | None,
        typer.Option(help="add a low-bit twin of every expert in this format (fewer bits than --bits, e.g. "
                          "int2): edgemoe-run --miss-precision dynamic reads it for unimportant misses"),
    ] = None,
    version: VersionOption = False,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    import importlib.util

    from edgemoe_ort.bundle.errors import BundleError
    from edgemoe_ort.bundle.writer import check_target
    from edgemoe_ort.hub import check_source

    missing = [m for m in ("torch", "transformers", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:  # a runtime-only install (pip install edgemoe-ort): one line, not an ImportError traceback
        raise ValueError(f"edgemoe-export needs the exporter's dependencies ({', '.join(missing)} not "
                         "installed): pip install 'edgemoe-ort[export]'")
    if bits is not None and bits not in BITS_TO_DTYPE:
        raise ValueError(f"--bits: expected {_BITS_CHOICES}, found {bits}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"--group-size: expected an integer >= 1, found {group_size}")
    if plan is not None:  # every bad plan is one line here, before torch (the model checks: in the export)
        from edgemoe_ort.plan.format import resolve_plan

        resolve_plan(plan, bits=bits, group_size=group_size)
    if dense_bits not in DENSE_BITS:
        raise ValueError(f"--dense-bits: expected {', '.join(map(str, DENSE_BITS))}, found {dense_bits}")
    if not is_valid_block_size(dense_group_size):
        raise ValueError(f"--dense-group-size: expected a power of two >= 16, found {dense_group_size}")
    if twin is not None and plan is None:  # with a plan: checked against its widest experts, before the load
        from edgemoe_ort.bundle.format import twin_choices

        primary = BITS_TO_DTYPE[4 if bits is None else bits]
        if twin not in twin_choices(primary):
            listed = ", ".join(twin_choices(primary)) or "none"
            raise ValueError(f"--twin: expected a format with fewer bits than --bits {BITS[primary]} "
                             f"({listed}), found {twin!r}")
    try:  # all before torch is even imported
        check_target(output_dir, force=force)
    except BundleError as exc:
        raise ValueError(f"--output {exc}") from None
    source = check_source(model)  # the hub is asked here only; the export takes its answer
    make_parents(output_dir, "--output")
    from edgemoe_ort.export import export_model_with_report

    with StageBars(eta=True) as bars:  # the experts stage ticks per expert
        report = export_model_with_report(
            source,
            output_dir,
            bits=bits,
            group_size=group_size,
            force=force,
            progress=bars,
            lookahead=lookahead,
            dense_bits=dense_bits,
            dense_group_size=dense_group_size,
            twin=twin,
            plan=plan,
        )
    if not output.quiet:
        for role, wiring in report.wiring.items():
            err.print(f"prefetch wiring ({role}, lookahead {wiring.requested}):", highlight=False)
            for line in wiring.summary():
                err.print(f"  {line}", highlight=False, markup=False)
        for role, routed in report.routing.items():
            err.print(f"cache-aware routing ({role}):", highlight=False)
            for line in routed.summary():
                err.print(f"  {line}", highlight=False, markup=False)
        for role, dq in report.dense.items():
            if dq.bits == 32:
                continue
            err.print(f"dense weights ({role}, --dense-bits {dq.bits}):", highlight=False)
            for line in dq.summary():
                err.print(f"  {line}", highlight=False, markup=False)
    if report.plan is not None:
        info(f"experts per plan {report.plan}: "
             + ", ".join(f"{d} {n}" for d, n in sorted(report.dtypes.items(), key=lambda kv: -BITS[kv[0]])))
    info(f"[green]bundle written:[/] {report.bundle}")


# --- edgemoe-run -----------------------------------------------------------------------------------
run_app = typer.Typer(add_completion=False, context_settings=CONTEXT_SETTINGS)


@run_app.command(**command_kwargs(
    "Generate text from a bundle with its experts on flash, in a cache of at most --budget bytes. The prompt "
    "and the generated text go to stdout, statistics to stderr (--json: one JSON object on stdout, "
    "docs/json-output.md). Generation stops at the end-of-sequence token, a --stop string, --max-new-tokens "
    "or the model's context. Ctrl-C stops it and prints what was measured so far. -i (or edgemoe-chat): a "
    "chat, one turn per line of stdin, keeping the KV cache across turns (/reset starts over, an empty line "
    "or end of input ends).",
    ["edgemoe-run bundles/tiny --prompt 'def fibonacci(n):' --max-new-tokens 48 --budget 25%",
     "edgemoe-run bundles/tiny --prompt-file prompt.txt --budget auto --temperature 0.8 --top-k 40 --seed 1",
     "echo 'import os' | edgemoe-run bundles/tiny --prompt - --stop '\\n\\n' --json",
     "edgemoe-run bundles/switch --ids 5,17,42,9 --max-new-tokens 16   # a bundle without a tokenizer",
     "edgemoe-run bundles/tiny -i --max-new-tokens 48   # or: edgemoe-chat bundles/tiny"],
))
@friendly_errors
def run(
    bundle: Annotated[Path, typer.Argument(help="bundle folder (made by edgemoe-export)")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="prompt text; - reads it from stdin")
    ] = None,
    prompt_file: Annotated[
        Path | None, typer.Option("--prompt-file", "-f", help="read the prompt from this UTF-8 file")
    ] = None,
    ids: Annotated[
        str | None,
        typer.Option(help="the prompt as token ids, e.g. 1,2,3 (bundles without a tokenizer, e.g. Switch)"),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="at most this many new tokens (and never past the "
                          "model's context)")
    ] = 64,
    budget: Annotated[
        str | None,
        typer.Option(help="expert cache budget: bytes, 256MB, 1GiB, 25% (of the store), or auto (the largest "
                     "that fits the available memory)", show_default="the whole store"),
    ] = None,
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
    threads: Annotated[
        int | None, typer.Option(help="compute threads (ORT intra-op)", show_default="ORT's, one per core")
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_k: Annotated[int, typer.Option(help="sample from the k most likely tokens (0 = all)")] = 0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling threshold")] = 1.0,
    repetition_penalty: Annotated[
        float, typer.Option(help="> 1 makes tokens already in the prompt or output less likely (1 = off)")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed", show_default="random")] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="stop before this text; repeatable")
    ] = None,
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
    routing: Annotated[
        str, typer.Option(help=" | ".join(ROUTING_RULES) + ": exact = the router's own top-k; cache-prior "
                          "prefers resident experts by lambda x the layer's logit range; max-rank takes "
                          "resident experts from the true top-M (docs/op-contract.md)")
    ] = "exact",
    routing_lambda: Annotated[float, typer.Option(help="cache-prior: the bias lambda")] = 0.5,
    routing_keep: Annotated[int, typer.Option(help="J: the true top experts always kept")] = 1,
    routing_window: Annotated[
        int, typer.Option(help="max-rank: M, the true top-M a resident expert may come from (0 = 2k)")
    ] = 0,
    miss_precision: MissPrecisionOption = "exact",
    thresholds: ThresholdsOption = None,
    save_resident: Annotated[
        Path | None, typer.Option(help="after generating, save the resident experts here (for --warm-start)")
    ] = None,
    force: Annotated[bool, typer.Option(help="let --save-resident replace an existing file")] = False,
    show_stats: Annotated[
        bool, typer.Option("--stats", help="print a per-layer cache and prefetch table")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object (docs/json-output.md)")
    ] = False,
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="chat: one turn per line of stdin, the KV cache kept "
                           "across turns; /reset starts over, an empty line or end of input ends")
    ] = False,
    tokenizer: Annotated[
        str, typer.Option(help="auto | ortx | tokenizers: ortx runs the bundle's tokenizer graphs in ONNX "
                          "Runtime (onnxruntime-extensions; without them: tokenizers, with a warning); "
                          "auto = tokenizers if installed, else the graphs")
    ] = "auto",
    version: VersionOption = False,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    from edgemoe_ort.runtime import RuntimeOptions, load_model
    from edgemoe_ort.runtime.generate import check_generation_args
    from edgemoe_ort.runtime.tokenizer import TOKENIZER_BACKENDS

    if tokenizer not in TOKENIZER_BACKENDS:
        raise ValueError(f"--tokenizer: expected one of {', '.join(TOKENIZER_BACKENDS)}, found {tokenizer!r}")
    _check_policy_flags(policy, frequencies, policy_weights, pin_experts)
    _check_prefetch_flags(predictor, prefetch_depth, prefetch_threshold, profile, warm_start)
    for flag, v in (("--io-threads", io_threads), ("--threads", threads)):
        if v is not None and v < 1:
            raise ValueError(f"{flag}: expected an integer >= 1, found {v}")
    stops = check_generation_args(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
                                  stop=stop or ())
    if interactive:
        given = [f for f, v in (("--prompt", prompt), ("--prompt-file", prompt_file), ("--ids", ids),
                                ("--json", as_json or None)) if v is not None]
        if given:
            raise ValueError(f"--interactive: reads the turns from stdin, found {' and '.join(given)}")
        source: str | list[int] = ""
    else:
        source = _prompt_source(prompt, prompt_file, ids)
    if budget is not None and budget.strip().lower() == "auto":
        budget = str(_auto_budget(bundle))
    elif budget is not None:
        from edgemoe_ort.runtime.ops import parse_budget

        try:
            parse_budget(budget, 1 << 50)
        except ValueError as exc:
            raise ValueError(f"--{exc}; or auto") from None
    check_output_file(save_resident, "--save-resident", force=force)  # the last check: it makes folders
    options = RuntimeOptions(budget=budget, policy=policy, io=io, io_threads=io_threads,
                             intra_op_threads=threads, frequencies=frequencies, policy_weights=policy_weights,
                             pin_experts=pin_experts, predictor=predictor, prefetch_depth=prefetch_depth,
                             prefetch_threshold=prefetch_threshold, profile=profile, warm_start=warm_start,
                             routing=routing, routing_lambda=routing_lambda, routing_keep=routing_keep,
                             routing_window=routing_window, miss_precision=miss_precision,
                             thresholds=parse_thresholds(thresholds))
    try:
        model = load_model(bundle, options, tokenizer=tokenizer)
    except KeyboardInterrupt:
        _interrupted_before_generation()
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, stop=stops)
    if interactive:
        _chat(model, bundle, kwargs, show_stats)
        if save_resident is not None:
            saved_chat: list[Path] = []
            write_output_file(save_resident, "--save-resident", force=force,
                              write=lambda p: saved_chat.append(model.session.save_resident(p, force=True)))
            info(f"resident experts saved: {saved_chat[0]}")
        return
    try:
        prompt_ids = model.prompt_ids(source)  # empty, outside the vocabulary or past the context: fails here
    except ValueError as exc:
        raise ValueError(str(exc).replace("prompt:", "--ids:", 1) if ids is not None else str(exc)) from None
    results: list[Any] = []
    interrupted = False
    pieces = model.stream(prompt_ids, result=results, **kwargs)
    try:
        if as_json:
            for _ in pieces:
                pass
        else:
            if not output.quiet:
                shown = source if isinstance(source, str) else model.decode(prompt_ids) + " "
                out.print(shown, end="", style="bold", highlight=False, markup=False)
            with _LiveRate("edgemoe-run", enabled=not output.quiet) as rate:
                for piece in pieces:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    rate.tick()
            print()
    except KeyboardInterrupt:
        interrupted = True
        if not results:  # interrupted here, not inside the generator: let it record what it has
            try:
                pieces.throw(KeyboardInterrupt())
            except (KeyboardInterrupt, StopIteration):
                pass
        if not results:  # the generator had not started: nothing was generated or measured
            if not as_json and not output.quiet:
                print()
            _interrupted_before_generation()
        if not as_json:
            print()
    result = results[0]
    payload: dict[str, Any] = {"text": result.text, "tokens": result.tokens,
                               "stop_reason": result.stop_reason, "context_tokens": model.context_length}
    payload.update(result.stats.as_dict())
    if save_resident is not None and not interrupted:
        saved: list[Path] = []  # without --force, write_output_file has made the file: replace that one
        write_output_file(save_resident, "--save-resident", force=force,
                          write=lambda p: saved.append(model.session.save_resident(p, force=True)))
        payload["saved_resident"] = str(saved[0])
    if as_json:
        print(json.dumps(payload))
    elif not output.quiet:
        if interrupted:
            err.print(f"[yellow]interrupted[/] after {len(result.tokens)} generated tokens; measured so far:",
                      highlight=False)
        elif result.stop_reason == "context":
            err.print(f"[yellow]stopped at the model's context:[/] {model.context_length} tokens (prompt "
                      f"{len(prompt_ids)} + {len(result.tokens)} generated)", highlight=False)
        _print_stats(result.stats.as_dict())
        if show_stats:
            _print_layer_table(result.stats.as_dict().get("cache", {}))
        if "saved_resident" in payload:
            err.print(f"resident experts saved: {payload['saved_resident']}")
    if interrupted:
        raise typer.Exit(code=130)


class _LiveRate:
    """Live tokens/s while streaming, in the terminal's title (an OSC 0 escape on stderr, saved and restored
    with xterm's title stack): nothing is written among the streamed text. Only when stderr is a terminal
    (not dumb); counts the streamed pieces (about one per token), from the first one."""

    def __init__(self, prog: str, *, enabled: bool = True, every_s: float = 0.5) -> None:
        self.prog, self.every_s = prog, every_s
        self.enabled = enabled and sys.stderr.isatty() and os.environ.get("TERM", "dumb") != "dumb"
        self.pieces, self.t0, self.shown = 0, 0.0, 0.0

    def __enter__(self) -> _LiveRate:
        self._write("\x1b[22;0t")  # push the title
        return self

    def __exit__(self, *exc: object) -> None:
        self._write("\x1b[23;0t")  # pop it

    def _write(self, code: str) -> None:
        if self.enabled:
            sys.stderr.write(code)
            sys.stderr.flush()

    def tick(self) -> None:
        """One more piece of text was streamed (stdout already flushed)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        self.pieces += 1
        if self.pieces == 1:
            self.t0 = self.shown = now
        elif now - self.shown >= self.every_s:
            self.shown = now
            self._write(f"\x1b]0;{self.prog}: {(self.pieces - 1) / (now - self.t0):.1f} tok/s\x07")


def _chat(model: Any, bundle: Path, kwargs: dict[str, Any], show_stats: bool) -> None:
    """``edgemoe-run -i`` / ``edgemoe-chat``: one user turn per line of stdin, each reply streamed to stdout
    with the KV cache kept across turns (:class:`~edgemoe_ort.runtime.generate.ChatSession`); ``/reset``
    starts over, an empty line or end of input ends, Ctrl-C ends with status 130. A one-line summary per turn
    on stderr (unless --quiet)."""
    from edgemoe_ort.runtime.generate import MoEModel

    if not isinstance(model, MoEModel):
        raise ValueError(f"--interactive: {bundle} is an encoder-decoder bundle; chat needs a decoder-only "
                         "one")
    if model.tokenizer is None:
        raise ValueError(f"--interactive: {bundle} has no tokenizer; chat needs one to read text turns")
    session = model.chat()
    tty = sys.stdin.isatty()
    how = "its chat template" if session.template is not None else "no chat template: turns are plain text"
    info(f"[dim]chat ({how}): one turn per line; /reset starts over, an empty line or Ctrl-D ends[/]")
    ctx = model.context_length
    try:
        while True:
            if tty and not output.quiet:
                err.print("[bold]> [/]", end="", highlight=False)
            line = sys.stdin.readline()
            if not line or not line.strip():
                return
            line = line.rstrip("\r\n")
            if line.strip() == "/reset":
                session.reset()
                info("[dim]conversation reset[/]")
                continue
            with _LiveRate("edgemoe-chat", enabled=not output.quiet) as rate:
                for piece in session.send(line, **kwargs):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    rate.tick()
            print(flush=True)
            r = session.last_result
            if r.stop_reason == "context":
                err.print(f"[yellow]stopped at the model's context:[/] {ctx} tokens (conversation "
                          f"{session.context_tokens} tokens); /reset starts over", highlight=False)
            if not output.quiet:
                s = r.stats
                err.print(f"[dim]{s.prompt_tokens} new tok @ {s.prefill_tokens_per_s:.1f} tok/s, "
                          f"{s.generated_tokens} generated @ {s.decode_tokens_per_s:.1f} tok/s, "
                          f"TTFT {s.ttft_s:.3f} s, context {session.context_tokens}"
                          f"{f'/{ctx}' if ctx else ''} tok, {r.stop_reason}[/]", highlight=False)
                if show_stats:
                    _print_layer_table(s.cache)
    except KeyboardInterrupt:
        print(flush=True)
        err.print("[yellow]interrupted[/]: chat ended", highlight=False)
        raise typer.Exit(code=130) from None


def chat_app() -> None:
    """``edgemoe-chat BUNDLE [OPTIONS]``: ``edgemoe-run BUNDLE --interactive [OPTIONS]``."""
    run_app(args=["--interactive", *sys.argv[1:]], prog_name="edgemoe-chat")


def _interrupted_before_generation() -> NoReturn:
    """Ctrl-C before the first token: one line, exit status 130 (nothing to report)."""
    err.print("[yellow]interrupted[/] before generation: nothing generated", highlight=False)
    raise typer.Exit(code=130)


def _prompt_source(prompt: str | None, prompt_file: Path | None, ids: str | None) -> str | list[int]:
    """The prompt from exactly one of ``--prompt`` (``-`` = stdin), ``--prompt-file``, ``--ids``."""
    given = [flag for flag, v in (("--prompt", prompt), ("--prompt-file", prompt_file), ("--ids", ids))
             if v is not None]
    if len(given) != 1:
        found = "none" if not given else " and ".join(given)
        raise ValueError(f"--prompt: expected one of --prompt TEXT, --prompt - (stdin), --prompt-file FILE "
                         f"or --ids 1,2,3, found {found}")
    if ids is not None:
        try:
            parsed = [int(t) for t in ids.replace(" ", ",").split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--ids: expected comma-separated token ids like 1,2,3, found {ids!r}") from None
        if not parsed:
            raise ValueError(f"--ids: expected comma-separated token ids like 1,2,3, found {ids!r}")
        return parsed
    if prompt_file is not None:
        if not prompt_file.is_file():
            found = "a folder" if prompt_file.exists() else "nothing"
            raise FileNotFoundError(f"--prompt-file {prompt_file}: expected a text file, found {found}")
        try:
            return prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"--prompt-file {prompt_file}: not UTF-8 text (byte {exc.start})") from None
    if prompt == "-":
        if sys.stdin.isatty():
            info("[dim]reading the prompt from stdin (end with Ctrl-D)[/]")
        return sys.stdin.read()
    return prompt or ""


def _auto_budget(bundle: Path) -> int:
    """``--budget auto``, said on stderr: what it chose and why."""
    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.runtime.memory import auto_budget

    b = Bundle.open(bundle)
    try:
        chosen, why = auto_budget(b)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None
    share = chosen / b.primary_bytes
    info(f"[dim]--budget auto: {_fmt_bytes(chosen)} ({share:.0%} of the experts): {why}[/]")
    return chosen


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
        r = c.get("routing")
        if r and r.get("rule", "exact") != "exact":
            lines.append(
                f"routing {r['rule']}: {r['changed']} of {r['selections']} selections changed, "
                f"{r['misses_avoided']} reads avoided"
            )
    for line in lines:
        err.print(f"[dim]{line}[/]", highlight=False, soft_wrap=True)


# --- edgemoe-inspect -------------------------------------------------------------------------------
inspect_app = typer.Typer(add_completion=False, context_settings=CONTEXT_SETTINGS)


@inspect_app.command(**command_kwargs(
    "Show what a bundle holds (model shape, experts per layer, top-k, bits and group size, the bits of each "
    "expert of a mixed bundle (edgemoe-export --plan), context, vocabulary) and the memory a process running "
    "it needs: the smallest budget it accepts and the expected RSS at a budget (docs/memory.md). --json: one "
    "JSON object (docs/json-output.md).",
    ["edgemoe-inspect bundles/tiny",
     "edgemoe-inspect bundles/tiny --budget 25% --context 1024",
     "edgemoe-inspect bundles/tiny --json"],
))
@friendly_errors
def inspect(
    bundle: Annotated[Path, typer.Argument(help="bundle folder")],
    budget: Annotated[
        str | None,
        typer.Option(help="estimate the process's memory at this expert budget (or auto)",
                     show_default="10/25/50/100%"),
    ] = None,
    context: Annotated[
        int | None, typer.Option(help="tokens of KV cache to size for", show_default="the model's context")
    ] = None,
    prompt_tokens: Annotated[
        int | None,
        typer.Option(help="longest prompt, prefilled in one pass", show_default="min(context, 512)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (docs/json-output.md)")] = False,
    version: VersionOption = False,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    from rich.table import Table

    from edgemoe_ort.bundle import Bundle

    b = Bundle.open(bundle)
    summary = b.summary()
    model = _model_report(b)
    memory = _memory_report(b, budget, context, prompt_tokens)
    if as_json:
        print(json.dumps({**summary, "model": model, "memory": memory}, indent=2))
        return
    table = Table(title=str(bundle), show_header=False)
    for key, value in summary.items():
        if isinstance(value, int) and key.endswith("bytes"):
            value = f"{_fmt_bytes(value)} ({value} B)"
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    for key in ("context_length", "vocab_size"):
        table.add_row(key, "–" if model[key] is None else str(model[key]))
    print_table(table)
    moe = Table(title="MoE layers")
    for col in ("layers", "experts", "top-k", "hidden", "intermediate", "activation", "dtype", "bits",
                "group", "bytes/expert", "twin"):
        moe.add_column(col, justify="left" if col in ("layers", "activation", "dtype", "twin") else "right")
    for g in model["layer_groups"]:
        moe.add_row(g["layers"], str(g["num_experts"]), str(g["top_k"]), str(g["hidden"]),
                    str(g["intermediate"]), g["activation"] + (" (gated)" if g["gated"] else ""), g["dtype"],
                    str(g["bits"]), str(g["group_size"] or "–"), _fmt_bytes(g["expert_bytes"]),
                    g["twin"] or "–")
    print_table(moe)
    if len(summary["dtypes"]) > 1:  # a mixed bundle (edgemoe-plan): the bits of each expert
        _print_expert_bits(model["layers"])
    dense = Table(title="dense weights (docs/bundle-format.md, 'Dense weights')")
    for col in ("graph", "kind", "format", "bytes"):
        dense.add_column(col, justify="right" if col == "bytes" else "left")
    for role, kinds in model["dense"].items():
        for kind, formats in kinds.items():
            for fmt, n in formats.items():
                dense.add_row(role, kind, fmt, _fmt_bytes(n))
    print_table(dense)
    out.print(
        f"memory a process needs in MiB; total = the memory cap to give it (docs/memory.md). Minimum budget "
        f"{_fmt_bytes(memory['minimum_budget_bytes'])} (the largest expert); KV cache for "
        f"{memory['context_tokens']} tokens, a prefill of {memory['prompt_tokens']} tokens",
        highlight=False,
    )
    mem = Table()
    cols = (("experts", "expert_bytes"), ("dense", "dense_bytes"), ("KV", "kv_cache_bytes"),
            ("activ.", "activation_bytes"), ("scratch", "op_scratch_bytes"), ("prepack", "prepacked_bytes"),
            ("load", "load_transient_bytes"),
            ("fixed", "fixed_overhead_bytes"), ("total", "total_bytes"))
    mem.add_column("budget", no_wrap=True)
    for name, _ in cols:
        mem.add_column(name, justify="right")
    for est in memory["estimates"]:
        if "error" in est:
            mem.add_row(f"{est['budget']}: {est['error']}", *["–"] * len(cols))
        else:
            mem.add_row(est["budget"], *[f"{est[k] / 2**20:.1f}" for _, k in cols])
    print_table(mem)


def _primary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if int(r.get("variant", 0)) == 0]


def _print_expert_bits(layers: list[dict[str, Any]]) -> None:
    """Per MoE layer: experts per dtype, the layer's store bytes and (up to 64 experts) each expert's bits."""
    from rich.table import Table

    dts = sorted({d for lay in layers for d in lay["dtypes"]}, key=lambda d: -BITS[d])
    table = Table(title="bits per expert (a mixed bundle: edgemoe-plan)")
    table.add_column("layer", justify="right")
    for d in dts:
        table.add_column(d, justify="right")
    table.add_column("store", justify="right")
    wide = max(len(lay["expert_dtypes"]) for lay in layers) > 64
    if not wide:
        table.add_column("bits of experts 0, 1, ...")
    for lay in layers:
        row = [str(lay["layer"]), *[str(lay["dtypes"].get(d, 0)) for d in dts],
               _fmt_bytes(lay["store_bytes"])]
        if not wide:
            row.append(" ".join(str(BITS[d]) for d in lay["expert_dtypes"]))
        table.add_row(*row)
    print_table(table)


def _model_report(bundle: Any) -> dict[str, Any]:
    """What ``edgemoe-inspect`` shows of the model: context, vocabulary, and the MoE layers grouped by shape
    and expert format (``layer_groups``; ``layers`` one entry per MoE layer)."""
    from collections import Counter

    from edgemoe_ort.runtime.memory import config_context

    cfg = bundle.config
    records: dict[int, list[dict[str, Any]]] = {}
    twins: dict[int, set[str]] = {}
    for r in bundle.manifest["experts"]:
        if r.get("variant", 0):
            twins.setdefault(int(r["layer"]), set()).add(r["format"]["dtype"])
        else:
            records.setdefault(int(r["layer"]), []).append(r)
    layers = []
    for lay in bundle.layers:
        recs = records.get(int(lay["layer"]), [])
        fmts = sorted({(r["format"]["dtype"], int(r["format"].get("group_size", 0))) for r in recs})
        dtype = ",".join(sorted({f[0] for f in fmts})) or "–"
        groups = sorted({f[1] for f in fmts})
        layers.append({
            "layer": int(lay["layer"]), "num_experts": int(lay["num_experts"]), "top_k": int(lay["top_k"]),
            "hidden": int(lay["hidden"]), "intermediate": int(lay["intermediate"]),
            "gated": bool(lay["gated"]), "activation": lay["activation"], "dtype": dtype,
            "bits": max((BITS[f[0]] for f in fmts), default=0),
            "group_size": groups[0] if len(groups) == 1 else None,
            "expert_bytes": max((int(r["length"]) for r in recs), default=0),
            "twin": ",".join(sorted(twins.get(int(lay["layer"]), ()))) or None,
            # per expert (edgemoe-plan's mixed bundles): the dtype of each, and experts per dtype (of the
            # primary records: a bundle of a later format version may hold other variants of an expert)
            "dtypes": dict(sorted(Counter(r["format"]["dtype"] for r in _primary(recs)).items(),
                                  key=lambda kv: -BITS[kv[0]])),
            "expert_dtypes": [r["format"]["dtype"]
                              for r in sorted(_primary(recs), key=lambda r: int(r["expert"]))],
            "store_bytes": sum(int(r["length"]) for r in recs),
        })
    groups_out: list[dict[str, Any]] = []
    for lay in layers:
        key = {k: v for k, v in lay.items() if k not in ("layer", "dtypes", "expert_dtypes", "store_bytes")}
        if groups_out and {k: v for k, v in groups_out[-1].items() if k not in ("layers", "_last")} == key \
                and groups_out[-1]["_last"] == lay["layer"] - 1:
            first = groups_out[-1]["layers"].split("-")[0]
            groups_out[-1].update(layers=f"{first}-{lay['layer']}", _last=lay["layer"])
        else:
            groups_out.append({"layers": str(lay["layer"]), **key, "_last": lay["layer"]})
    for g in groups_out:
        g.pop("_last")
    vocab = cfg.get("vocab_size")
    from edgemoe_ort.bundle.dense import dense_bytes_by_kind

    return {
        "context_length": config_context(bundle),
        "vocab_size": vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None,
        "moe_layers": len(layers),
        "layer_groups": groups_out,
        "layers": layers,
        "dense": {role: dense_bytes_by_kind(bundle.graph_path(role)) for role in bundle.graphs},
    }


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
    if budget is not None and budget.strip().lower() == "auto":
        budget = str(_auto_budget(bundle.path))
    if budget is not None:
        try:
            resolved = parse_budget(budget, bundle.store_bytes, bundle.primary_bytes)
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None
        if resolved < floor:
            raise ValueError(
                f"--budget: expected at least {floor} bytes ({_fmt_bytes(floor)}, the largest expert of "
                f"{bundle.path}), found {budget!r} = {resolved} bytes"
            )
    estimates: list[dict[str, Any]] = []
    for b in [budget] if budget is not None else ["10%", "25%", "50%", "100%"]:
        resolved = parse_budget(b, bundle.store_bytes, bundle.primary_bytes)
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
