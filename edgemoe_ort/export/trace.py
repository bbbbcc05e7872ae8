"""Stage 3b: trace the wrappers with the dynamo exporter and check the resulting graphs.

The check is what makes a wrong export loud instead of silent: every MoE layer of the graph must be exactly
one ``edgemoe.OffloadedExpert`` node with the right attributes, no routed-expert weight may be left among the
initializers / constants (compared by content, so transposed or renamed copies are caught), and every router
and shared-expert parameter must still be there.

The content comparison (:class:`ExpertLeakGuard`) fingerprints only the graph tensors whose element count is
that of a routed-expert tensor (one expert's w_in / gate / up / w_out, or a whole layer's stack of them), then
the expert tensors of those sizes. The fingerprint is a multiset hash (invariant to transposition and
reshaping, and additive over concatenation), so a streamed export (:mod:`.stream`), which never holds a whole
layer, checks each expert as it is read (:meth:`ExpertLeakGuard.check_expert`) and the layer's stack from the
sum of its experts' fingerprints (:meth:`ExpertLeakGuard.check_layer`).
"""

from __future__ import annotations

import bisect
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
from onnxscript import ir
from torch import nn
from torch.export import Dim

from edgemoe_ort.export.op import LayerSpec, custom_translation_table, shape_probe
from edgemoe_ort.export.patch import MoELayer, PatchedModel
from edgemoe_ort.export.schema import (
    DOMAIN,
    OP_TYPE,
    RESIDUAL_OP_TYPE,
    ROUTING_OP_TYPE,
    TOKEN_OP_TYPE,
    register_schema,
)
from edgemoe_ort.export.wrappers import CausalLMWithFlatCache, Seq2SeqDecoderWithFlatCache, Seq2SeqEncoder

log = logging.getLogger(__name__)

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
    with torch.no_grad(), shape_probe():  # a streamed skeleton's routed experts give zeros here
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


def trace_graph(plan: GraphPlan, *, free_weights: bool = False) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)`` with the OffloadedExpert translation.

    ``free_weights``: the model's parameters and buffers are freed while the graph is serialized, each as
    soon as its bytes are in the proto (:func:`_serialize_freeing`), so that the dense weights are never held
    twice; the torch model can no longer run (nor be traced again) afterwards.
    """
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
    proto = _serialize_freeing(program.model, plan.wrapper) if free_weights else program.model_proto
    _drop_ir_tensors(program.model)
    return proto


class _Storages:
    """The CPU storages of a module's parameters and buffers, found by address (a tensor or array viewing one
    of them, e.g. a constant-folded transpose, maps to it), with the module's tensors that hold each."""

    def __init__(self, module: nn.Module) -> None:
        #: start address -> (end address, the module's tensors on that storage)
        self.spans: dict[int, tuple[int, list[torch.Tensor]]] = {}
        for t in (*module.parameters(), *module.buffers()):  # each tensor once (tied weights included)
            if t.device.type == "cpu" and not t.is_meta and t.untyped_storage().nbytes():
                st = t.untyped_storage()
                _, holders = self.spans.setdefault(st.data_ptr(), (st.data_ptr() + st.nbytes(), []))
                holders.append(t)
        self._starts = sorted(self.spans)

    def of(self, ptr: int) -> int | None:
        """The start address of the storage holding ``ptr`` (None: none of the module's)."""
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i < 0 or ptr >= self.spans[self._starts[i]][0]:
            return None
        return self._starts[i]

    def free(self, start: int) -> None:
        """Let go of the storage at ``start``: every module tensor on it gets an empty one (the memory goes as
        soon as nothing else holds it; nothing is resized under a reader)."""
        _, holders = self.spans.pop(start)
        with torch.no_grad():
            for t in holders:
                t.data = torch.empty(0, dtype=t.dtype)


#: tensor kinds whose bytes never come from torch memory (a proto's copy, a file, strings)
_OWN_BYTES = (ir.TensorProtoTensor, ir.ExternalTensor, ir.StringTensor)


def _address(tensor: Any) -> int | None:
    """Where the serializer reads ``tensor``'s bytes from (None: nowhere in torch memory); raises TypeError
    for a kind whose memory cannot be told (then nothing is freed)."""
    if isinstance(tensor, _OWN_BYTES):
        return None
    raw = getattr(tensor, "raw", None) if isinstance(tensor, ir.Tensor) else None
    if isinstance(raw, torch.Tensor):
        return int(raw.data_ptr()) if raw.device.type == "cpu" and raw.numel() else None
    if isinstance(raw, np.ndarray):
        return int(raw.ctypes.data) if raw.size else None
    raise TypeError(f"{type(tensor).__name__} holding {type(raw).__name__}")


class _FreeingTensor(ir.LazyTensor):
    """An initializer's tensor, serialized once: it then lets go of the tensor it wraps and, when it was the
    last initializer reading a storage of the module, of that storage (:func:`_serialize_freeing`). The same
    dtype, shape, name, metadata and bytes as the tensor it wraps."""

    __slots__ = ("_wrapped", "_start", "_users", "_storages")

    def __init__(self, tensor: Any, start: int, users: dict[int, int], storages: _Storages) -> None:
        self._wrapped = tensor
        self._start = start
        self._users = users
        self._storages = storages
        name = tensor.name

        def source() -> Any:
            if self._wrapped is None:
                raise RuntimeError(f"{name}: serialized once already, its tensor is gone")
            return self._wrapped

        super().__init__(source, dtype=tensor.dtype, shape=tensor.shape, name=name,
                         doc_string=tensor.doc_string, metadata_props=dict(tensor.metadata_props))

    def tobytes(self) -> bytes:
        data = super().tobytes()
        self._wrapped = None  # e.g. a numpy view of a parameter
        self._users[self._start] -= 1
        if self._users[self._start] == 0:
            self._storages.free(self._start)
        return data


def _serialize_freeing(model: Any, module: nn.Module) -> onnx.ModelProto:  # an onnx_ir Model
    """``ir.serde.serialize_model(model)`` (the same bytes), letting go of each parameter / buffer storage of
    ``module`` as soon as the proto has the bytes of every initializer that reads it. Afterwards the model's
    initializers have no value (as after :func:`_drop_ir_tensors`) and ``module`` cannot run.

    Without this the proto (a copy of every dense weight) and the torch weights are alive together: twice the
    dense part in float32, the export's peak. Every tensor the serializer reads is located first (initializers
    are often constant-folded views of a parameter, e.g. its transpose): a storage goes only once all
    initializers in it are serialized, never if a node attribute (serialized after the initializers) reads
    it, and none goes if some tensor's memory cannot be told."""
    storages = _Storages(module)
    graphs = [model.graph, *model.graph.subgraphs()]
    users: dict[int, int] = {}
    plan: list[tuple[Any, int]] = []  # (initializer, its storage); not its tensor: the wrapper's only
    try:
        for graph in graphs:
            for value in graph.initializers.values():
                tensor = value.const_value
                addr = None if tensor is None else _address(tensor)
                start = None if addr is None else storages.of(addr)
                if start is not None:
                    users[start] = users.get(start, 0) + 1
                    plan.append((value, start))
        for owner in (model.graph, *model.functions.values()):
            for node in owner.all_nodes():  # subgraphs' nodes included
                for attr in node.attributes.values():
                    if attr.type == ir.AttributeType.TENSOR:
                        tensors = [attr.value]
                    elif attr.type == ir.AttributeType.TENSORS:
                        tensors = list(attr.value)
                    else:
                        continue
                    for t in tensors:
                        addr = _address(t)
                        start = None if addr is None else storages.of(addr)
                        if start is not None:
                            users[start] = -1  # pinned: never reaches 0
    except TypeError as exc:
        log.debug("weights not freed while serializing: a tensor of unknown memory (%s)", exc)
        return ir.serde.serialize_model(model)
    for value, start in plan:
        value.const_value = _FreeingTensor(value.const_value, start, users, storages)
    tensor = None  # the wrappers hold the only references the model had
    try:
        return ir.serde.serialize_model(model)
    finally:
        for value, _ in plan:
            value.const_value = None


def _drop_ir_tensors(model: Any) -> None:  # an onnx_ir Model
    """Forget the tensors of the exporter's IR once the proto (a copy) is made.

    onnxscript's rewrite rules (``optimize=True``) are module globals whose matchers keep the last graph they
    matched, and that graph's initializers wrap the torch parameters: without this, every dense weight stays
    alive after tracing (the torch model's memory cannot be freed).
    """
    graphs = [model.graph, *model.graph.subgraphs()]
    graphs += list(model.functions.values())
    for graph in graphs:
        if hasattr(graph, "initializers"):
            for value in graph.initializers.values():
                value.const_value = None
        for node in graph:
            for value in node.outputs:
                if value.const_value is not None:
                    value.const_value = None


# --- checks ------------------------------------------------------------------------------------------------


#: a fingerprint: two 64-bit lanes of an additive multiset hash
Fingerprint = tuple[int, int]

_FP_CHUNK = 1 << 20
_MASK64 = (1 << 64) - 1
_U = np.uint64
_LANE_KEYS = (_U(0x9E3779B97F4A7C15), _U(0xD1B54A32D192ED03))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wraps modulo 2**64)."""
    x = x ^ (x >> _U(30))
    x = x * _U(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U(27))
    x = x * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


def fingerprint(a: np.ndarray | torch.Tensor) -> Fingerprint:
    """Content hash of the float32 values of ``a`` as a multiset: invariant to transposition, reshaping and
    any reordering, and additive (the fingerprint of a concatenation is :func:`fp_add` of its parts').
    -0.0 counts as 0.0; memory: a few MB of temporaries whatever the size."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().float().numpy()
    flat = np.asarray(a, dtype=np.float32).reshape(-1)
    lanes = [0, 0]
    for i in range(0, flat.size, _FP_CHUNK):
        bits = (flat[i : i + _FP_CHUNK] + np.float32(0.0)).view(np.uint32).astype(np.uint64)
        for j, key in enumerate(_LANE_KEYS):
            lanes[j] += int(_mix(bits * key + key).sum(dtype=np.uint64))
    return (lanes[0] & _MASK64, lanes[1] & _MASK64)


def fp_add(a: Fingerprint, b: Fingerprint) -> Fingerprint:
    """The fingerprint of the concatenation of two tensors, from theirs."""
    return ((a[0] + b[0]) & _MASK64, (a[1] + b[1]) & _MASK64)


_FP_ZERO: Fingerprint = (0, 0)


def _expert_sizes(spec: LayerSpec) -> dict[str, int]:
    """Element counts of one expert's tensors (w_in, gate, up, w_out) and of the layer's stacks."""
    rows = 2 * spec.intermediate if spec.gated else spec.intermediate
    one_in, one_out = rows * spec.hidden, spec.hidden * spec.intermediate
    return {
        "w_in": one_in,
        "half": spec.intermediate * spec.hidden,
        "w_out": one_out,
        "stack_in": spec.num_experts * one_in,
        "stack_out": spec.num_experts * one_out,
    }


class ExpertLeakGuard:
    """Finds routed-expert weights left in traced graphs, by content (see the module doc).

    Built from the graphs (role, proto) and the MoE layers whose experts must not be in them; then every
    expert is passed to :meth:`check_expert` (in order, or at least all of a layer before its
    :meth:`check_layer`). Raises :class:`ExportCheckError` naming the graph tensor and the expert it copies.
    """

    def __init__(self, graphs: Iterable[tuple[str, onnx.ModelProto]], layers: Iterable[MoELayer]) -> None:
        self.specs = {m.spec.layer: m.spec for m in layers}
        sizes = {n for spec in self.specs.values() for n in _expert_sizes(spec).values()}
        #: element count -> fingerprint -> "role: tensor name", for the graph tensors of an expert's size
        self.candidates: dict[int, dict[Fingerprint, str]] = {}
        for role, model in graphs:
            for name, t in _graph_tensors(model):
                size = int(np.prod(t.dims)) if t.dims else 1
                if size in sizes and t.data_type in _FLOAT_TYPES:
                    fp = fingerprint(numpy_helper.to_array(t))
                    self.candidates.setdefault(size, {})[fp] = f"{role}: {name}"
        self._sums: dict[int, list[Fingerprint]] = {}

    def _wants(self, *sizes: int) -> bool:
        return any(n in self.candidates for n in sizes)

    def _hit(self, size: int, fp: Fingerprint, what: str) -> None:
        where = self.candidates.get(size, {}).get(fp)
        if where is not None:
            role, _, name = where.partition(": ")
            raise ExportCheckError(f"{role}: routed-expert weight left in the graph: {name} is {what}")

    def check_expert(
        self, layer: int, expert: int, w_in: np.ndarray | torch.Tensor, w_out: np.ndarray | torch.Tensor
    ) -> None:
        """Check one expert (canonical layout: ``w_in [2I or I, H]``, ``w_out [H, I]``)."""
        spec = self.specs[layer]
        n = _expert_sizes(spec)
        sums = self._sums.setdefault(layer, [_FP_ZERO, _FP_ZERO])
        need_in = self._wants(n["w_in"], n["half"], n["stack_in"])
        need_out = self._wants(n["w_out"], n["stack_out"])
        tag = f"layer {layer} expert {expert}"
        if need_in:
            if spec.gated:
                gate = fingerprint(w_in[: spec.intermediate])
                up = fingerprint(w_in[spec.intermediate :])
                self._hit(n["half"], gate, f"{tag} gate")
                self._hit(n["half"], up, f"{tag} up")
                fp_in = fp_add(gate, up)
            else:
                fp_in = fingerprint(w_in)
            self._hit(n["w_in"], fp_in, f"{tag} w_in")
            sums[0] = fp_add(sums[0], fp_in)
        if need_out:
            fp_out = fingerprint(w_out)
            self._hit(n["w_out"], fp_out, f"{tag} w_out")
            sums[1] = fp_add(sums[1], fp_out)

    def check_layer(self, layer: int) -> None:
        """After all experts of ``layer``: check the whole layer's stacks (from the experts' fingerprints)."""
        spec = self.specs[layer]
        n = _expert_sizes(spec)
        sums = self._sums.pop(layer, [_FP_ZERO, _FP_ZERO])
        if self._wants(n["stack_in"]):
            self._hit(n["stack_in"], sums[0], f"layer {layer} w_in (all experts)")
        if self._wants(n["stack_out"]):
            self._hit(n["stack_out"], sums[1], f"layer {layer} w_out (all experts)")

    def check_in_memory(self, layers: Iterable[MoELayer]) -> None:
        """Check layers whose canonical weights are in memory (a non-streamed export)."""
        for m in layers:
            w = m.weights
            for e in range(m.spec.num_experts):
                self.check_expert(m.spec.layer, e, w.w_in[e], w.w_out[e])
            self.check_layer(m.spec.layer)


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


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


def dense_fingerprints(layers: Iterable[MoELayer]) -> dict[str, tuple[int, Fingerprint]]:
    """Per router / shared-expert parameter of ``layers``: (element count, fingerprint), what
    :func:`check_graph` looks for in the graph."""
    return {pname: (p.numel(), fingerprint(p)) for m in layers for pname, p in m.dense.items()}


#: the domain's ops the wiring adds after tracing (not checked against the plan)
_WIRED_OPS = (TOKEN_OP_TYPE, ROUTING_OP_TYPE, RESIDUAL_OP_TYPE)


def check_graph(
    model: onnx.ModelProto,
    plan: GraphPlan,
    all_layers: list[MoELayer] | None = None,
    seconds: float = 0.0,
    dense: dict[str, tuple[int, Fingerprint]] | None = None,
) -> GraphReport:
    """Raise :class:`ExportCheckError` unless ``model`` is a correct offloaded graph for ``plan.layers``.

    ``all_layers`` (default ``plan.layers``): the experts that must not appear anywhere in this graph.
    ``dense``: :func:`dense_fingerprints` of ``plan.layers``, taken before tracing freed the weights (default:
    taken now).
    """
    role = plan.role
    expected = {m.spec.layer: m.spec for m in plan.layers}
    found: dict[int, dict[str, Any]] = {}
    for node in _all_nodes(model):
        if node.domain != DOMAIN or node.op_type in _WIRED_OPS:
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

    layers = plan.layers if all_layers is None else all_layers
    # streamed layers (meta weights) are checked as their experts stream (ExpertLeakGuard, export/api.py)
    in_memory = [m for m in layers if not m.weights.w_in.is_meta]
    ExpertLeakGuard([(role, model)], in_memory).check_in_memory(in_memory)
    if dense is None:
        dense = dense_fingerprints(plan.layers)
    dense_sizes = {size for size, _ in dense.values()}
    present: set[Fingerprint] = set()
    n_params = 0
    for _, t in _graph_tensors(model):
        size = int(np.prod(t.dims)) if t.dims else 1
        n_params += size
        if size in dense_sizes and t.data_type in _FLOAT_TYPES:
            present.add(fingerprint(numpy_helper.to_array(t)))
    for pname, (_, fp) in dense.items():
        if fp not in present:
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


def export_graphs(
    patched: PatchedModel, *, free_weights: bool = False
) -> list[tuple[GraphPlan, onnx.ModelProto, GraphReport]]:
    """Trace and check every graph of ``patched`` (in bundle order).

    ``free_weights``: the last graph's serialization frees the torch model's weights as it copies them
    (:func:`trace_graph`), so that they are not held twice; the model can no longer run afterwards (a
    streamed export needs it no more: see :meth:`~edgemoe_ort.export.patch.PatchedModel.drop_weights`).
    """
    out = []
    plans = plan_graphs(patched)
    for i, plan in enumerate(plans):
        t0 = time.perf_counter()
        dense = dense_fingerprints(plan.layers)  # before the weights may be freed
        proto = trace_graph(plan, free_weights=free_weights and i == len(plans) - 1)
        out.append((plan, proto, check_graph(proto, plan, patched.layers, time.perf_counter() - t0, dense)))
    return out
