"""The memory model: what a process running a bundle holds, beyond the expert budget (docs/memory.md).

One definition, used by ``edgemoe-inspect``, the tests and the docs. A process running a bundle holds:

- ``dense_bytes``: the dense graph's weights (graph files + external data, :attr:`Bundle.dense_bytes`); ORT
  keeps them resident for the life of the session.
- ``expert_bytes``: the expert cache, bounded by the budget (the store counts each resident or in-flight
  expert at its record ``length``), never more than the whole store.
- ``kv_cache_bytes``: the KV cache at ``context`` tokens (:func:`edgemoe_ort.runtime.kvcache.cache_bytes`).
  The runtime writes each step's ``present`` outputs into the buffers of the layers whose past the graph has
  already read (:mod:`edgemoe_ort.runtime.kvcache`), so the cache is held once plus one layer: ``(layers +
  1) / layers`` x the cache, in whole pages. A graph where that order cannot be read off the graph, and an
  encoder-decoder bundle, hold it twice (the past and the presents). Bytes per token come from the decoder
  graph's ``past_key_values.*`` inputs (float32 ``[batch, kv_heads, past, head_dim]``).
- ``activation_bytes``: ORT's arena at the largest step, the prefill of ``prompt_tokens`` tokens: logits
  ``T x vocab``, attention scores ``heads x T x T`` and a few hidden-sized buffers, float32, doubled because
  the arena grows by doubling and keeps what it grew.
- ``op_scratch_bytes``: the ``OffloadedExpert`` op's per-call buffers at ``prompt_tokens`` tokens (gathered
  inputs, per-slot outputs, gate/up and hidden activations: float32, largest layer).
- ``prepacked_bytes``: what the sessions make of the weights beyond the file, over every model graph
  (:func:`session_weight_bytes`): ``MatMulNBits`` (``--dense-bits 8|4``) repacks its weights into MLAS's
  layout when the session is created, and the packed copy is larger than the file's: measured 1.16-1.56x the
  weight bytes (int4 1.16-1.25x, int8 1.22-1.56x), so :data:`PREPACK_FACTOR` x the uint8 initializer bytes
  (the block-quantized weights; an embedding's, which is not repacked, is counted too); ``--dense-bits
  16``'s fp16 weights become float32 copies (2x their bytes). 0 for float32 graphs, whose prepacking the
  fixed overhead covers.
- ``load_transient_bytes``: while ORT creates the session it holds the parsed graph file and the weight
  tensors together, so for a moment the dense weights are there twice (measured: up to 2.1x ``dense_bytes``
  at session creation), before any expert is read. Only the part the run-time items above do not already
  cover counts: ``max(0, dense - (experts + KV + activations + scratch))``; the peak is the larger of the
  load peak and the generation peak.
- ``fixed_overhead_bytes``: :data:`FIXED_OVERHEAD_BYTES`: interpreter, onnxruntime, numpy, tokenizers, the
  CLI, ORT's session structures and prepacked weights, thread stacks, the tokenizer, allocator slack;
  measured, with margin (see the constant).

``estimate_rss(bundle, budget)["total_bytes"]`` is the sum of those items: the memory cap a process running
the bundle at that budget needs (``tests/test_memory_cap.py`` runs under exactly that cap).

Device-side: imports neither torch nor transformers (onnx only for the graph's input shapes).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, BinaryIO

from edgemoe_ort.bundle import Bundle

from .ops import parse_budget

__all__ = [
    "DEFAULT_CONTEXT",
    "FIXED_OVERHEAD_BYTES",
    "ITEMS",
    "PREPACK_FACTOR",
    "session_weight_bytes",
    "MAX_DEFAULT_PROMPT_TOKENS",
    "activation_bytes",
    "auto_budget",
    "available_memory",
    "config_context",
    "estimate_rss",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "minimum_budget",
    "model_context",
    "op_scratch_bytes",
]

MiB = 1 << 20

#: Everything a running process holds besides the items :func:`estimate_rss` computes from the bundle: the
#: Python interpreter + onnxruntime + numpy + tokenizers (61 MiB RSS after the imports, 11 MiB of it the
#: bare interpreter), the CLI (typer, rich: ~10 MiB), ORT's session structures and prepacked MatMul weights
#: (22-65 MiB above ``dense_bytes`` once the session exists), the tokenizer, thread stacks, allocator slack.
#:
#: Measured 2026-12-01 (x86-64, Python 3.11.7, onnxruntime 1.32.0, 2 vCPU, glibc malloc) as ``peak RSS -
#: dense - min(budget, store)`` of ``edgemoe-run B --prompt "def fibonacci(n):" --budget X
#: --max-new-tokens 64 --json`` (peak RSS: its ``peak_rss_bytes``, ru_maxrss, started from a shell) on three
#: int4 bundles at budgets 10/25/50/100%, three runs each: the default model (dense 7.7 MiB, 5 MiB store):
#: 104-109 MiB; a random Mixtral of 4 layers, hidden 1024, intermediate 3072 (dense 81 MiB, 4.9 MiB
#: experts): 80-145 MiB; one of 11 layers, intermediate 3584 (dense 166 MiB, 5.7 MiB experts): 26-129 MiB
#: (one early batch showed 201-205 MiB in 5 of 20 runs at 10-25%, not reproduced in 34 later runs; the
#: session-creation peak, ``load_transient_bytes``, reached 1.74x dense there). That is with the store
#: rewrite that bounds expert memory (library built 10:22 UTC that day); the store committed before it let
#: heap fragmentation grow RSS far past the budget (the 11-layer bundle: 1438 MiB at 25%), and with
#: ``MALLOC_MMAP_THRESHOLD_=1048576`` as a workaround it measured 101-110 MiB. Those runs used < 80 tokens
#: of context, so the KV, activation and scratch items were < 2 MiB there. Largest steady-state value:
#: 145 MiB; the constant adds 15 MiB of margin.
FIXED_OVERHEAD_BYTES = 160 * MiB

#: ``prepacked_bytes`` = this x the dense graph's uint8 initializer bytes. Measured 2026-12-01 (onnxruntime
#: 1.32.0, x86-64 AVX2, accuracy_level 4, block 32): RSS after creating a session of 16 MatMulNBits of
#: 4096x4096 / 1024x8192 weights, against the same with ``session.disable_prepacking``: int4 +25% / +16%,
#: int8 +22% / +56%. With margin:
PREPACK_FACTOR = 0.6

#: Context assumed when the model's config names none (e.g. relative-position models).
DEFAULT_CONTEXT = 2048
#: The largest step of a generation is the prefill of the prompt; by default it is assumed to be
#: ``min(context, MAX_DEFAULT_PROMPT_TOKENS)`` tokens long.
MAX_DEFAULT_PROMPT_TOKENS = 512

#: The keys of :func:`estimate_rss` whose sum is ``total_bytes``.
ITEMS = (
    "dense_bytes",
    "expert_bytes",
    "kv_cache_bytes",
    "activation_bytes",
    "op_scratch_bytes",
    "prepacked_bytes",
    "load_transient_bytes",
    "fixed_overhead_bytes",
)

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_FLOAT_BYTES = 4


def _bundle(bundle: Bundle | str | Path) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)


def minimum_budget(bundle: Bundle | str | Path) -> int:
    """The smallest budget the store accepts: the largest expert record ``length`` (a budget below it is
    refused when the session is created)."""
    return max((int(r["length"]) for r in _bundle(bundle).manifest["experts"]), default=0)


def _config_int(config: dict[str, Any], *keys: str) -> int | None:
    for sub in (config, config.get("text_config") or {}):
        for k in keys:
            v = sub.get(k) if isinstance(sub, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def config_context(bundle: Bundle | str | Path) -> int | None:
    """The context length the model's config names (``max_position_embeddings`` and the like), or None
    (relative-position models)."""
    return _config_int(_bundle(bundle).config, *_CONTEXT_KEYS)


def model_context(bundle: Bundle | str | Path) -> int:
    """The model's context length from its config (``max_position_embeddings`` and the like), else
    :data:`DEFAULT_CONTEXT`."""
    return _config_int(_bundle(bundle).config, *_CONTEXT_KEYS) or DEFAULT_CONTEXT


# --- reading the decoder graph's inputs/outputs without loading its weights -----------------------------
def _varint(f: BinaryIO) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise EOFError("truncated protobuf varint")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7


def _fields(f: BinaryIO, end: int) -> Any:
    """Yield ``(field number, wire type, payload start, payload length)`` of a protobuf message in
    ``[f.tell(), end)``, leaving the file after each field (length-delimited payloads are skipped, so
    the weights of a graph are never read)."""
    while f.tell() < end:
        key = _varint(f)
        num, wt = key >> 3, key & 7
        if wt == 0:
            _varint(f)
            yield num, wt, 0, 0
        elif wt == 1:
            f.seek(8, io.SEEK_CUR)
        elif wt == 5:
            f.seek(4, io.SEEK_CUR)
        elif wt == 2:
            n = _varint(f)
            start = f.tell()
            yield num, wt, start, n
            f.seek(start + n)
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")


_UINT8 = 2  # onnx.TensorProto.UINT8
_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


def _tensor_bytes(f: BinaryIO, end: int) -> tuple[int, int]:
    """(data type, data bytes) of the TensorProto in ``[f.tell(), end)`` (data_type = field 2; raw_data = 9;
    external_data = 13, its ``length`` entry); the data itself is skipped."""
    data_type = raw = external = 0
    while f.tell() < end:
        key = _varint(f)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v = _varint(f)
            if num == 2:
                data_type = v
        elif wt == 2:
            n = _varint(f)
            start = f.tell()
            if num == 9:
                raw = n
            elif num == 13:  # StringStringEntryProto: key = 1, value = 2
                entry = f.read(n)
                if b"length" in entry:
                    import onnx

                    kv = onnx.StringStringEntryProto.FromString(entry)
                    if kv.key == "length" and kv.value.isdigit():
                        external = int(kv.value)
            f.seek(start + n)
        elif wt == 1:
            f.seek(8, io.SEEK_CUR)
        elif wt == 5:
            f.seek(4, io.SEEK_CUR)
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
    return data_type, raw or external


def _graph_fields(f: BinaryIO) -> Any:
    """:func:`_fields` of the main graph of the ONNX model file ``f`` (ModelProto.graph = field 7, the first
    one). A caller that reads a payload must seek back to where it was before the next field."""
    size = os.fstat(f.fileno()).st_size
    for num, wt, start, n in list(_fields(f, size)):
        if num != 7 or wt != 2:
            continue
        f.seek(start)
        yield from _fields(f, start + n)
        return


def _graph_io(path: Path) -> tuple[list[Any], list[Any], dict[int, int]]:
    """(inputs, outputs) of an ONNX model file as ``onnx.ValueInfoProto`` (ModelProto.graph = field 7,
    GraphProto.input = 11, .output = 12), and its initializers' data bytes by data type (.initializer = 5),
    reading only the inputs, outputs and the initializers' headers."""
    import onnx

    ins: list[Any] = []
    outs: list[Any] = []
    by_type: dict[int, int] = {}
    with open(path, "rb") as f:
        for gnum, gwt, gstart, gn in _graph_fields(f):
            if gwt == 2 and gnum in (11, 12, 5):
                here = f.tell()
                f.seek(gstart)
                if gnum == 5:
                    dt, n_bytes = _tensor_bytes(f, gstart + gn)
                    by_type[dt] = by_type.get(dt, 0) + n_bytes
                else:
                    vi = onnx.ValueInfoProto.FromString(f.read(gn))
                    (ins if gnum == 11 else outs).append(vi)
                f.seek(here)
    return ins, outs, by_type


def _dims(vi: Any) -> list[int | None]:
    t = vi.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _graph_shapes(b: Bundle) -> tuple[int, int | None, list[tuple[str, int, int]]]:
    """(KV bytes per token, vocab from the logits output, ``(name, kv_heads, head_dim)`` of the past
    inputs) of the decoder graph."""
    path = b.graph_path("decoder")
    try:
        ins, outs, _ = _graph_io(path)
    except (EOFError, ValueError) as exc:  # truncated or not protobuf; onnx's DecodeError is a ValueError too
        raise ValueError(f"{path}: not a valid ONNX model (truncated or corrupt: {exc or 'ends early'}); "
                         "export the bundle again") from None
    specs = []
    for vi in ins:
        if vi.name.startswith("past_key_values."):
            d = _dims(vi)
            if len(d) == 4 and d[1] and d[3]:
                specs.append((vi.name, int(d[1]), int(d[3])))
    vocab = None
    for vi in outs:
        if vi.name == "logits":
            d = _dims(vi)
            vocab = d[-1] if d and d[-1] else None
    return sum(h * d * _FLOAT_BYTES for _, h, d in specs), vocab, specs


def kv_cache_bytes(bundle: Bundle | str | Path, tokens: int) -> int:
    """``kv_cache_bytes`` of :func:`estimate_rss`: the KV cache at ``tokens`` tokens (batch 1) as the
    runtime holds it, once plus a layer where the decoder graph allows (see the module docstring)."""
    from .kvcache import cache_bytes, kv_layout, layer_groups

    b = _bundle(bundle)
    if "decoder" not in b.graphs:
        return 0
    specs = _graph_shapes(b)[2]
    groups = layer_groups(specs)
    # encoder-decoder bundles (Seq2SeqMoEModel) step through session.run: the cache twice
    held_once = groups and "encoder" not in b.graphs
    return cache_bytes(groups, kv_layout(b.graph_path("decoder"), groups) if held_once else None, int(tokens))


def session_weight_bytes(bundle: Bundle | str | Path) -> int:
    """``prepacked_bytes``: what the sessions make of the model graphs' weights beyond their file bytes:
    :data:`PREPACK_FACTOR` x the uint8 initializer bytes (MatMulNBits repacks them), plus 2x the float16 ones
    (ORT folds each fp16 weight's Cast into a float32 copy, and may keep the fp16 one until it is done)."""
    from edgemoe_ort.bundle.format import model_graph_roles

    b = _bundle(bundle)
    total = 0
    for role in model_graph_roles(b.graphs):
        path = b.graph_path(role)
        try:
            by_type = _graph_io(path)[2]
        except (EOFError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid ONNX model (truncated or corrupt: {exc or 'ends early'}); "
                             "export the bundle again") from None
        total += int(PREPACK_FACTOR * by_type.get(_UINT8, 0)) + 2 * by_type.get(_FLOAT16, 0)
    return total


def kv_bytes_per_token(bundle: Bundle | str | Path) -> int:
    """Bytes the KV cache grows by per token (batch 1): the sum over the decoder graph's
    ``past_key_values.*`` inputs of ``kv_heads * head_dim * 4``."""
    return _graph_shapes(_bundle(bundle))[0]


def activation_bytes(bundle: Bundle | str | Path, tokens: int, *, vocab: int | None = None) -> int:
    """ORT arena at a forward pass of ``tokens`` tokens (batch 1): ``2 * 4 * T * (vocab + heads * T +
    8 * hidden)`` bytes (logits, attention scores, hidden-sized buffers, float32; x2 for the arena's
    doubling growth)."""
    b = _bundle(bundle)
    cfg = b.config
    hidden = _config_int(cfg, "hidden_size", "d_model", "n_embd") or max(
        (int(layer["hidden"]) for layer in b.layers), default=0
    )
    heads = _config_int(cfg, "num_attention_heads", "num_heads", "n_head") or 1
    if vocab is None:
        vocab = _config_int(cfg, "vocab_size") or 0
    t = int(tokens)
    return 2 * _FLOAT_BYTES * t * (vocab + heads * t + 8 * hidden)


def op_scratch_bytes(bundle: Bundle | str | Path, tokens: int) -> int:
    """The op's per-call buffers at ``tokens`` tokens, largest layer: ``4 * T * (K*H + H + rows_in + I)``
    (gathered inputs, per-slot outputs, gate/up rows, hidden activations; rows_in = 2I if gated)."""
    b = _bundle(bundle)
    t = int(tokens)
    best = 0
    for layer in b.layers:
        h, i, k = int(layer["hidden"]), int(layer["intermediate"]), int(layer["top_k"])
        rows_in = 2 * i if layer["gated"] else i
        best = max(best, _FLOAT_BYTES * t * (k * h + h + rows_in + i))
    return best


def estimate_rss(
    bundle: Bundle | str | Path,
    budget_bytes: int | str | None,
    *,
    context: int | None = None,
    prompt_tokens: int | None = None,
) -> dict[str, int]:
    """What a process running ``bundle`` at ``budget_bytes`` holds at its peak, by item (docs/memory.md).

    ``budget_bytes``: bytes, or anything :func:`parse_budget` takes (``"256MB"``, ``"25%"``; None = the whole
    store). ``context``: tokens of KV cache (default: the model's, :func:`model_context`); ``prompt_tokens``:
    the longest prefill (default ``min(context, MAX_DEFAULT_PROMPT_TOKENS)``).

    Returns the :data:`ITEMS` (bytes), ``total_bytes`` (their sum: the memory cap to give the process), and
    for reference ``budget_bytes`` (resolved), ``minimum_budget_bytes``, ``store_bytes``, ``context_tokens``
    and ``prompt_tokens``. Raises ValueError for a budget below :func:`minimum_budget` (the store refuses it).
    """
    b = _bundle(bundle)
    budget = parse_budget(budget_bytes, b.store_bytes, b.primary_bytes)
    floor = minimum_budget(b)
    if budget < floor:
        raise ValueError(
            f"budget: expected at least {floor} bytes (the largest expert of {b.path}), found {budget}"
        )
    ctx = model_context(b) if context is None else int(context)
    if ctx < 1:
        raise ValueError(f"context: expected at least 1 token, found {ctx}")
    prompt = min(ctx, MAX_DEFAULT_PROMPT_TOKENS) if prompt_tokens is None else int(prompt_tokens)
    if prompt < 1:
        raise ValueError(f"prompt_tokens: expected at least 1 token, found {prompt}")
    vocab = _graph_shapes(b)[1] if "decoder" in b.graphs else None
    items = {
        "dense_bytes": b.dense_bytes,
        "expert_bytes": min(budget, b.store_bytes),
        "kv_cache_bytes": kv_cache_bytes(b, ctx),
        "activation_bytes": activation_bytes(b, prompt, vocab=vocab),
        "op_scratch_bytes": op_scratch_bytes(b, prompt),
        "prepacked_bytes": session_weight_bytes(b),
    }
    running = sum(v for k, v in items.items() if k != "dense_bytes")
    items["load_transient_bytes"] = max(0, items["dense_bytes"] - running)  # the weights twice, at load
    items["fixed_overhead_bytes"] = FIXED_OVERHEAD_BYTES
    return {
        **items,
        "total_bytes": sum(items.values()),
        "budget_bytes": budget,
        "minimum_budget_bytes": floor,
        "store_bytes": b.store_bytes,
        "context_tokens": ctx,
        "prompt_tokens": prompt,
    }


def available_memory() -> tuple[int, str]:
    """(bytes this process may still use, where that figure comes from): the smaller of the kernel's
    ``MemAvailable`` (psutil) and what the cgroup memory limit leaves, if there is one."""
    import psutil

    avail, source = int(psutil.virtual_memory().available), "available memory"
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = Path(limit_file).read_text().strip()
            if limit_text == "max" or int(limit_text) >= 1 << 60:
                continue
            left = int(limit_text) - int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if left < avail:
            avail, source = max(left, 0), "the cgroup memory limit"
        break
    return avail, source


def auto_budget(
    bundle: Bundle | str | Path, *, available: int | None = None, context: int | None = None
) -> tuple[int, str]:
    """``--budget auto``: the largest expert budget whose :func:`estimate_rss` total fits ``available``
    (default: 90% of :func:`available_memory`), capped at the whole store. Returns (budget bytes, why). Raises
    ValueError when even the minimum budget does not fit."""
    b = _bundle(bundle)
    source = "given"
    if available is None:
        free, source = available_memory()
        available = free - free // 10  # leave a tenth for the page cache and everything else
        source = f"(90% of the {free / MiB:.0f} MiB {source})"
    floor = minimum_budget(b)
    base = estimate_rss(b, floor, context=context)
    others = base["total_bytes"] - base["expert_bytes"]  # what the process holds besides the experts
    room = available - others
    if room < floor:
        raise ValueError(
            f"budget: auto: {available / MiB:.0f} MiB {source}, but the dense part and the runtime's needs "
            f"alone take {others / MiB:.0f} MiB and the smallest budget is {floor / MiB:.1f} MiB"
        )
    budget = min(room, b.store_bytes)
    # The estimate's items below depend on the budget only through the load transient: recheck the total.
    while budget > floor and estimate_rss(b, budget, context=context)["total_bytes"] > available:
        budget = max(floor, budget - (budget - floor) // 8 - 1)
    why = (f"{available / MiB:.0f} MiB {source} - {others / MiB:.0f} MiB for the dense weights, KV cache, "
           f"activations and runtime (docs/memory.md)")
    if budget == b.store_bytes:
        why += f" leaves room for the whole {b.store_bytes / MiB:.1f} MiB store"
    return int(budget), why
