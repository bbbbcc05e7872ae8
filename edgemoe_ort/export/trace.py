"""Stage 3b: trace the wrappers with the dynamo exporter and check the resulting graphs.

The check is what makes a wrong export loud instead of silent: every MoE layer of the graph must be exactly
one ``edgemoe.OffloadedExpert`` node with the right attributes, no routed-expert weight may be left among the
initializers / constants (compared by content, so transposed or renamed copies are caught), and every router
and shared-expert parameter must still be there.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.export import Dim

from edgemoe_ort.export.op import custom_translation_table
from edgemoe_ort.export.patch import MoELayer, PatchedModel
from edgemoe_ort.export.schema import DOMAIN, OP_TYPE, ROUTING_OP_TYPE, TOKEN_OP_TYPE, register_schema
from edgemoe_ort.export.wrappers import CausalLMWithFlatCache, Seq2SeqDecoderWithFlatCache, Seq2SeqEncoder

# Example sizes: every dynamic axis >= 2 (a size of 1 gets specialised) and all different.
BATCH, SEQ, PAST, ENC_SEQ = 2, 3, 4, 5


class ExportCheckError(RuntimeError):
    """The exported graph does not have the shape the bundle needs (would run wrong)."""


@dataclass
class GraphPlan:
    role: str
    wrapper: nn.Module
    args: tuple[Any, ...]
    dynamic_shapes: dict[str, Any]
    input_names: list[str]
    output_names: list[str]
    layers: list[MoELayer]


@dataclass
class GraphReport:
    role: str
    seconds: float
    offloaded_nodes: int
    initializer_params: int
    nodes: int
    attrs: dict[int, dict[str, Any]] = field(default_factory=dict)


def _probe_cache_shapes(
    patched: PatchedModel, seq2seq: bool
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(key, value) shapes per layer, minus the batch and sequence axes, from one eager forward."""
    model = patched.model
    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.randint(0, vocab, (1, 2))
    with torch.no_grad():
        if seq2seq:
            out = model(
                input_ids=ids, decoder_input_ids=ids, return_dict=True
            )  # use_cache would reach the encoder
            cache = out.past_key_values.self_attention_cache
        else:
            out = model(input_ids=ids, use_cache=True, return_dict=True)
            cache = out.past_key_values
    shapes = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if k.dim() != 4 or v.dim() != 4 or k.shape[2] != 2 or v.shape[2] != 2:
            raise ExportCheckError(
                f"{patched.recipe.model_type}: unexpected cache layout key {tuple(k.shape)} "
                f"value {tuple(v.shape)} "
                "(expected [batch, heads, seq, head_dim] for every layer)"
            )
        shapes.append(((int(k.shape[1]), int(k.shape[3])), (int(v.shape[1]), int(v.shape[3]))))
    return shapes


def _past(
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], length: int
) -> list[tuple[torch.Tensor, ...]]:
    return [
        (torch.randn(BATCH, kh, length, kd), torch.randn(BATCH, vh, length, vd))
        for (kh, kd), (vh, vd) in shapes
    ]


def plan_graphs(patched: PatchedModel) -> list[GraphPlan]:
    """Wrappers, example inputs and dynamic axes of every graph of the bundle."""
    model = patched.model
    vocab = int(model.get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(0)
    batch = Dim("batch_size")
    seq = Dim("sequence_length")
    past = Dim("past_sequence_length")
    total = Dim("total_sequence_length")  # the mask length: its own Dim (past + seq is rejected)
    if patched.recipe.architecture == "causal_lm":
        shapes = _probe_cache_shapes(patched, seq2seq=False)
        n = len(shapes)
        args = (
            torch.randint(0, vocab, (BATCH, SEQ), generator=g),
            torch.ones(BATCH, PAST + SEQ, dtype=torch.int64),
            torch.arange(PAST, PAST + SEQ).unsqueeze(0).expand(BATCH, SEQ).contiguous(),
            _past(shapes, PAST),
        )
        dyn = {
            "input_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: seq},
            "past_key_values": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(n)],
        }
        return [
            GraphPlan(
                "decoder",
                CausalLMWithFlatCache(model).eval(),
                args,
                dyn,
                CausalLMWithFlatCache.input_names(n),
                CausalLMWithFlatCache.output_names(n),
                patched.layers_for("decoder"),
            )
        ]
    # encoder-decoder
    shapes = _probe_cache_shapes(patched, seq2seq=True)
    n = len(shapes)
    enc_seq = Dim("encoder_sequence_length")
    hidden = int(model.config.d_model if hasattr(model.config, "d_model") else model.config.hidden_size)
    enc_args = (
        torch.randint(0, vocab, (BATCH, ENC_SEQ), generator=g),
        torch.ones(BATCH, ENC_SEQ, dtype=torch.int64),
    )
    enc_dyn = {"input_ids": {0: batch, 1: enc_seq}, "attention_mask": {0: batch, 1: enc_seq}}
    dec_args = (
        torch.randint(0, vocab, (BATCH, SEQ), generator=g),
        torch.ones(BATCH, ENC_SEQ, dtype=torch.int64),
        torch.randn(BATCH, ENC_SEQ, hidden, generator=g),
        _past(shapes, PAST),
    )
    dec_dyn = {
        "input_ids": {0: batch, 1: seq},
        "encoder_attention_mask": {0: batch, 1: enc_seq},
        "encoder_hidden_states": {0: batch, 1: enc_seq},
        "past_key_values": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(n)],
    }
    return [
        GraphPlan(
            "encoder",
            Seq2SeqEncoder(model).eval(),
            enc_args,
            enc_dyn,
            Seq2SeqEncoder.input_names,
            Seq2SeqEncoder.output_names,
            patched.layers_for("encoder"),
        ),
        GraphPlan(
            "decoder",
            Seq2SeqDecoderWithFlatCache(model).eval(),
            dec_args,
            dec_dyn,
            Seq2SeqDecoderWithFlatCache.input_names(n),
            Seq2SeqDecoderWithFlatCache.output_names(n),
            patched.layers_for("decoder"),
        ),
    ]


def trace_graph(plan: GraphPlan) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)`` with the OffloadedExpert translation."""
    register_schema()
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation chatter; the graph is checked afterwards
        onnx_log.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                plan.wrapper,
                plan.args,
                dynamo=True,
                dynamic_shapes=plan.dynamic_shapes,
                input_names=plan.input_names,
                output_names=plan.output_names,
                custom_translation_table=custom_translation_table(),
                optimize=True,
                verbose=False,
                report=False,
            )
        finally:
            onnx_log.setLevel(level)
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise ExportCheckError(f"{plan.role}: torch.onnx.export returned nothing")
    return program.model_proto


# --- checks ------------------------------------------------------------------------------------------------


def _fingerprint(a: np.ndarray) -> bytes:
    """Content hash invariant to transposition / reshaping (sorted float32 values)."""
    return hashlib.blake2b(
        np.sort(np.asarray(a, dtype=np.float32).ravel()).tobytes(), digest_size=16
    ).digest()


def _graph_tensors(model: onnx.ModelProto) -> Iterable[tuple[str, onnx.TensorProto]]:
    def walk(graph: onnx.GraphProto) -> Iterable[tuple[str, onnx.TensorProto]]:
        for t in graph.initializer:
            yield t.name, t
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield f"{node.name or node.op_type}.{attr.name}", attr.t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)

    yield from walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield f"{fn.name}/{node.name or node.op_type}.{attr.name}", attr.t


def _all_nodes(model: onnx.ModelProto) -> Iterable[onnx.NodeProto]:
    yield from model.graph.node
    for fn in model.functions:
        yield from fn.node


def _expert_fingerprints(layers: list[MoELayer]) -> dict[int, dict[bytes, str]]:
    by_size: dict[int, dict[bytes, str]] = {}

    def add(t: torch.Tensor, what: str) -> None:
        a = t.detach().cpu().numpy()
        by_size.setdefault(a.size, {})[_fingerprint(a)] = what

    for layer in layers:
        w, spec = layer.weights, layer.spec
        add(w.w_in, f"layer {spec.layer} w_in (all experts)")
        add(w.w_out, f"layer {spec.layer} w_out (all experts)")
        for e in range(spec.num_experts):
            add(w.w_in[e], f"layer {spec.layer} expert {e} w_in")
            add(w.w_out[e], f"layer {spec.layer} expert {e} w_out")
            if spec.gated:
                add(w.w_in[e, : spec.intermediate], f"layer {spec.layer} expert {e} gate")
                add(w.w_in[e, spec.intermediate :], f"layer {spec.layer} expert {e} up")
    return by_size


def check_graph(
    model: onnx.ModelProto, plan: GraphPlan, all_layers: list[MoELayer] | None = None, seconds: float = 0.0
) -> GraphReport:
    """Raise :class:`ExportCheckError` unless ``model`` is a correct offloaded graph for ``plan.layers``.

    ``all_layers`` (default ``plan.layers``): the experts that must not appear anywhere in this graph.
    """
    role = plan.role
    expected = {m.spec.layer: m.spec for m in plan.layers}
    found: dict[int, dict[str, Any]] = {}
    for node in _all_nodes(model):
        if node.domain != DOMAIN or node.op_type in (TOKEN_OP_TYPE, ROUTING_OP_TYPE):  # added by the wiring
            continue
        if node.op_type != OP_TYPE:
            raise ExportCheckError(f"{role}: unexpected node {node.domain}.{node.op_type}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        layer = int(attrs["layer"])
        if layer in found:
            raise ExportCheckError(f"{role}: layer {layer} has more than one OffloadedExpert node")
        found[layer] = attrs
    if set(found) != set(expected):
        raise ExportCheckError(
            f"{role}: OffloadedExpert nodes for layers {sorted(found)}, expected exactly one for each of "
            f"{sorted(expected)}"
        )
    for layer, spec in expected.items():
        a = found[layer]
        want = {
            "num_experts": spec.num_experts,
            "top_k": spec.top_k,
            "activation": spec.activation,
            "gated": int(spec.gated),
            "manifest": "manifest.json",
        }
        bad = {k: (v, a.get(k)) for k, v in want.items() if a.get(k) != v}
        if bad:
            raise ExportCheckError(f"{role}: layer {layer} node attributes (expected, found): {bad}")

    experts = _expert_fingerprints(plan.layers if all_layers is None else all_layers)
    present: set[bytes] = set()
    dense_sizes = {p.numel() for m in plan.layers for p in m.dense.values()}
    n_params = 0
    for name, t in _graph_tensors(model):
        size = int(np.prod(t.dims)) if t.dims else 1
        n_params += size
        if size not in experts and size not in dense_sizes:
            continue
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        fp = _fingerprint(numpy_helper.to_array(t))
        hit = experts.get(size, {}).get(fp)
        if hit is not None:
            raise ExportCheckError(f"{role}: routed-expert weight left in the graph: {name} is {hit}")
        present.add(fp)
    for m in plan.layers:
        for pname, p in m.dense.items():
            if _fingerprint(p.cpu().numpy()) not in present:
                raise ExportCheckError(
                    f"{role}: dense parameter {pname} (router / shared expert) is missing from the graph"
                )
    names = [i.name for i in model.graph.input]
    if names != plan.input_names:
        raise ExportCheckError(f"{role}: graph inputs {names}, expected {plan.input_names}")
    outs = [o.name for o in model.graph.output]
    if outs != plan.output_names:
        raise ExportCheckError(f"{role}: graph outputs {outs}, expected {plan.output_names}")
    return GraphReport(role, seconds, len(found), n_params, len(model.graph.node), found)


def export_graphs(patched: PatchedModel) -> list[tuple[GraphPlan, onnx.ModelProto, GraphReport]]:
    """Trace and check every graph of ``patched`` (in bundle order)."""
    out = []
    for plan in plan_graphs(patched):
        t0 = time.perf_counter()
        proto = trace_graph(plan)
        out.append((plan, proto, check_graph(proto, plan, patched.layers, time.perf_counter() - t0)))
    return out
