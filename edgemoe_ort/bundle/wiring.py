"""Prefetch signals wired into an exported graph (opset 2): HOBBIT's stacked gates as ``OffloadedExpert``
input 3, and a ``TokenPrefetch`` node on the token ids; and (opset 4, :mod:`.residual`) a ``ResidualPrefetch``
node on the residual stream entering each MoE layer after the first.

For the ``OffloadedExpert`` node of manifest layer ``l``, :func:`wire_prefetch_inputs` finds the routers of
layers ``l+1 .. l+P`` in the graph (family-agnostic: the first ``MatMul`` / ``Gemm`` with a constant
``[H, E]`` weight found walking back from each node's ``topk_indices``), applies them to node ``l``'s ``X``
(flattened to ``[T, H]``; same weights, bias, ``alpha`` / ``beta``: the initializers are shared, nothing is
duplicated) and stacks the results to ``[T, P, E]`` as input 3 ``next_router_logits``. The graph input
``input_ids`` goes through a ``TokenPrefetch`` node (the identity, placed first) whose output replaces it
for every node that read it, so the token ids reach the prefetcher before the embedding runs. The graph's
inputs and outputs are not touched.

Torch-free (onnx + numpy): it runs on any ``ModelProto``, at export time or on an existing bundle's graph.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgemoe_ort.bundle.graph import (
    DOMAIN,
    GraphIndex,
    edgemoe_opset,
    inferred_types,
    insert_nodes,
    node_attrs,
    set_opset,
    shape_const,
)
from edgemoe_ort.bundle.residual import LayerResidual, ResidualReport, wire_residual

__all__ = ["LayerWiring", "Router", "WiringReport", "find_router", "wire_bundle", "wire_prefetch_inputs"]

OP_TYPE = "OffloadedExpert"
TOKEN_OP_TYPE = "TokenPrefetch"
#: the edgemoe opset with OffloadedExpert's optional input 3 (next_router_logits) and TokenPrefetch
PREFETCH_OPSET = 2
NEXT_LOGITS_INPUT = 3
MANIFEST_DEFAULT = "manifest.json"
#: prefix of every tensor / node name the wiring adds
PREFIX = "edgemoe_prefetch"

# ops whose output carries no value of their input (walking back from topk_indices stops there)
_SHAPE_ONLY = frozenset({"Shape", "Size"})
_MATMUL = frozenset({"MatMul", "Gemm"})
_MAX_VISITED = 1024  # nodes visited per router search (a router is a few nodes away from its TopK)


@dataclass(frozen=True)
class Router:
    """The linear layer computing one MoE layer's raw router logits ``[T, E]`` from ``[T, H]``."""

    op: str  # "MatMul" or "Gemm"
    node: str  # name of that node in the graph
    weight: str  # constant: [H, E] (MatMul, Gemm transB=0) or [E, H] (Gemm transB=1)
    bias: str | None  # Gemm's C, or the constant [E] added right after the MatMul
    num_experts: int
    hidden: int
    trans_b: int = 0
    alpha: float = 1.0
    beta: float = 1.0


@dataclass
class LayerWiring:
    """What the wiring did for one ``OffloadedExpert`` node."""

    layer: int  # the node's ``layer`` attribute (manifest index)
    node: str  # the node's name
    num_experts: int
    lookahead: int = 0  # P: rows of input 3 (0 = no input 3)
    next_layers: list[int] = field(default_factory=list)  # manifest layers of the rows, l+1 .. l+P
    router: str | None = None  # weight name of this layer's own router; None = not found
    router_note: str | None = None  # why it was not found
    already_wired: bool = False  # input 3 was there before (kept as is)
    notes: list[str] = field(default_factory=list)  # why P is below the requested lookahead


@dataclass
class WiringReport:
    """Result of :func:`wire_prefetch_inputs`, one :class:`LayerWiring` per node in layer order."""

    requested: int  # the lookahead asked for
    layers: list[LayerWiring] = field(default_factory=list)
    token_ids: str | None = None  # graph input feeding the TokenPrefetch node, None if none
    token_ids_note: str | None = None  # why not
    token_prefetch: str | None = None  # name of the TokenPrefetch node
    token_output: str | None = None  # its output, read instead of ``token_ids`` by the consumers
    token_consumers: int = 0  # nodes reading that output
    opset: int = 1  # edgemoe opset version imported by the graph afterwards
    changed: bool = False  # the graph was modified by this call
    #: the ResidualPrefetch node per MoE layer after the graph's first (empty: not requested)
    residual: list[LayerResidual] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # graph-level remarks

    @property
    def wired(self) -> bool:
        """Whether the graph has a ``TokenPrefetch`` node, a node with input 3 or a ``ResidualPrefetch`` node
        (after this call)."""
        return (
            self.token_prefetch is not None
            or any(w.lookahead > 0 for w in self.layers)
            or any(r.wired for r in self.residual)
        )

    def lookahead_of(self, layer: int) -> int:
        """P of manifest layer ``layer`` (KeyError if the graph has no node for it)."""
        for w in self.layers:
            if w.layer == layer:
                return w.lookahead
        raise KeyError(f"no OffloadedExpert node for layer {layer}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d["wired"] = self.wired
        return d

    def summary(self) -> list[str]:
        """One human-readable line per node, one per ``ResidualPrefetch`` layer, then the token ids line."""
        lines = []
        for w in self.layers:
            rows = f"P={w.lookahead}"
            if len(w.next_layers) == 1:
                rows += f" (layer {w.next_layers[0]})"
            elif w.next_layers:
                rows += f" (layers {w.next_layers[0]}..{w.next_layers[-1]})"
            why = f": {'; '.join(w.notes)}" if w.notes else ""
            lines.append(f"layer {w.layer}: {rows}{' (already wired)' if w.already_wired else ''}{why}")
        lines.extend(f"residual: {line}" for line in ResidualReport(layers=self.residual).summary())
        if self.token_prefetch is not None:
            n = self.token_consumers
            lines.append(
                f"token ids: {self.token_ids} -> {TOKEN_OP_TYPE} (before {n} consumer{'' if n == 1 else 's'})"
            )
        elif self.token_ids_note:
            lines.append(f"token ids: not wired ({self.token_ids_note})")
        lines.extend(self.notes)
        return lines


# --- graph lookups ---------------------------------------------------------------------------------------


def _is_offloaded(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def _is_token_prefetch(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == TOKEN_OP_TYPE


def _match_router(g: GraphIndex, node: onnx.NodeProto, num_experts: int) -> tuple[Router | None, str]:
    """``node`` (a MatMul / Gemm) as a router with ``num_experts`` outputs, or (None, why not)."""
    label = node.name or node.output[0]
    if len(node.input) < 2:
        return None, f"{node.op_type} {label}: fewer than 2 inputs"
    w = g.constant(node.input[1])
    if w is None:
        return None, f"{node.op_type} {label}: weight {node.input[1]!r} is not a constant"
    if w.data_type != TensorProto.FLOAT:
        return None, f"{node.op_type} {label}: weight {node.input[1]!r} is not float32"
    dims = list(w.dims)
    if len(dims) != 2:
        return None, f"{node.op_type} {label}: weight {node.input[1]!r} has shape {dims}, not 2-D"
    if g.constant(node.input[0]) is not None:
        return None, f"{node.op_type} {label}: its input {node.input[0]!r} is a constant"
    if node.op_type == "MatMul":
        hidden, experts = dims
        if experts != num_experts:
            return None, f"MatMul {label}: weight {dims} is not [H, {num_experts}]"
        bias = None
        cons = g.consumers.get(node.output[0], [])
        if len(cons) == 1 and cons[0].op_type == "Add" and cons[0].domain in ("", "ai.onnx"):
            other = [i for i in cons[0].input if i != node.output[0]]
            b = g.constant(other[0]) if len(other) == 1 else None
            if b is not None and b.data_type == TensorProto.FLOAT and int(np.prod(b.dims)) == num_experts:
                if list(b.dims)[-1:] == [num_experts]:
                    bias = other[0]
        return Router("MatMul", label, node.input[1], bias, experts, hidden), ""
    a = node_attrs(node)
    if int(a.get("transA", 0)) != 0:
        return None, f"Gemm {label}: transA=1 is not supported"
    trans_b = int(a.get("transB", 0))
    experts, hidden = dims if trans_b else dims[::-1]
    if experts != num_experts:
        want = f"[{num_experts}, H]" if trans_b else f"[H, {num_experts}]"
        return None, f"Gemm {label}: weight {dims} (transB={trans_b}) is not {want}"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and g.constant(bias) is None:
        return None, f"Gemm {label}: bias {bias!r} is not a constant"
    return (
        Router(
            "Gemm",
            label,
            node.input[1],
            bias,
            experts,
            hidden,
            trans_b,
            float(a.get("alpha", 1.0)),
            float(a.get("beta", 1.0)),
        ),
        "",
    )


def find_router(model: onnx.ModelProto | onnx.GraphProto, node: onnx.NodeProto) -> tuple[Router | None, str]:
    """The router of ``OffloadedExpert`` ``node``: ``(Router, "")`` or ``(None, why it was not found)``.

    Walks back (breadth first) from ``node.input[1]`` (``topk_indices``) through the producers, stopping at
    graph inputs, constants, ``Shape`` / ``Size``, other ``OffloadedExpert`` nodes and every ``MatMul`` /
    ``Gemm``. The nearest ``MatMul`` / ``Gemm`` whose weight is a float32 constant ``[H, E]`` (``MatMul``,
    ``Gemm`` transB=0) or ``[E, H]`` (``Gemm`` transB=1), ``E`` = the node's ``num_experts``, is the router.
    """
    g = GraphIndex(model.graph if isinstance(model, onnx.ModelProto) else model)
    return _find_router(g, node)


def _find_router(g: GraphIndex, node: onnx.NodeProto) -> tuple[Router | None, str]:
    num_experts = int(node_attrs(node).get("num_experts", 0))
    if len(node.input) < 2 or not node.input[1]:
        return None, "the node has no topk_indices input"
    start = node.input[1]
    if start in g.inputs:
        return None, f"topk_indices is the graph input {start!r} (no router in the graph)"
    seen_tensors = {start}
    seen_nodes: set[int] = set()
    queue: deque[tuple[str, int]] = deque([(start, 0)])
    found: list[tuple[int, Router]] = []
    rejected: list[str] = []
    while queue:
        name, depth = queue.popleft()
        if found and depth > found[0][0]:
            break
        prod = g.producer.get(name)
        if prod is None or id(prod) in seen_nodes:
            continue
        seen_nodes.add(id(prod))
        if len(seen_nodes) > _MAX_VISITED:
            return None, f"no router within {_MAX_VISITED} nodes of topk_indices"
        if _is_offloaded(prod) or prod.op_type in _SHAPE_ONLY:
            continue
        if prod.op_type in _MATMUL and prod.domain in ("", "ai.onnx"):
            router, why = _match_router(g, prod, num_experts)
            if router is not None:
                found.append((depth, router))
            else:
                rejected.append(why)
            continue  # never walk through a matrix product: beyond it lie the hidden states
        for i in prod.input:
            if i and i not in seen_tensors and g.constant(i) is None:
                seen_tensors.add(i)
                queue.append((i, depth + 1))
    distinct = {r.weight: r for _, r in found}
    if len(distinct) == 1:
        return found[0][1], ""
    if len(distinct) > 1:
        return (
            None,
            f"ambiguous: several candidate routers at the same distance ({', '.join(sorted(distinct))})",
        )
    why = f" (nearest: {'; '.join(rejected[:2])})" if rejected else ""
    return None, f"no MatMul/Gemm with a constant [H, {num_experts}] weight on the path to topk_indices{why}"


# --- the wiring ------------------------------------------------------------------------------------------


def _existing_lookahead(g: GraphIndex, name: str) -> int:
    t = g.types.get(name)
    if t is not None and t.HasField("tensor_type"):
        dims = t.tensor_type.shape.dim
        if len(dims) == 3 and dims[1].HasField("dim_value"):
            return int(dims[1].dim_value)
    return -1  # unknown


def _router_nodes(g: GraphIndex, r: Router, x2d: str, out: str, tag: str) -> list[onnx.NodeProto]:
    """Nodes computing ``out = router r applied to x2d`` (``[T, E]``)."""
    if r.op == "Gemm":
        inputs = [x2d, r.weight] + ([r.bias] if r.bias else [])
        return [
            helper.make_node(
                "Gemm",
                inputs,
                [out],
                name=g.fresh(f"{tag}_gemm", nodes=True),
                alpha=r.alpha,
                beta=r.beta,
                transA=0,
                transB=r.trans_b,
            )
        ]
    if r.bias is None:
        return [helper.make_node("MatMul", [x2d, r.weight], [out], name=g.fresh(f"{tag}_matmul", nodes=True))]
    mm = g.fresh(f"{tag}_matmul_out")
    return [
        helper.make_node("MatMul", [x2d, r.weight], [mm], name=g.fresh(f"{tag}_matmul", nodes=True)),
        helper.make_node("Add", [mm, r.bias], [out], name=g.fresh(f"{tag}_bias", nodes=True)),
    ]


def _set_input(node: onnx.NodeProto, index: int, name: str) -> None:
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name


def _wire_token_prefetch(
    g: GraphIndex,
    first: onnx.NodeProto,
    token_ids: str | None,
    report: WiringReport,
    added_info: list[onnx.ValueInfoProto],
) -> onnx.NodeProto | None:
    """The ``TokenPrefetch`` node to put first in the graph (its consumers already rewired to its output),
    or None (the graph has one already, or cannot get one: ``report.token_ids_note`` says why)."""
    existing = [n for n in g.graph.node if _is_token_prefetch(n)]
    if existing:
        node = existing[0]
        report.token_prefetch = node.name or node.output[0]
        report.token_ids = node.input[0] if node.input and node.input[0] else None
        report.token_output = node.output[0] if node.output else None
        report.token_consumers = len(g.consumers.get(report.token_output or "", []))
        if len(existing) > 1:
            report.notes.append(f"{len(existing)} {TOKEN_OP_TYPE} nodes in the graph (kept as they are)")
        return None
    if token_ids is None:
        report.token_ids_note = "not requested"
        return None
    if token_ids not in g.inputs:
        report.token_ids_note = f"the graph has no input {token_ids!r}"
        return None
    if g.elem_type(token_ids) != TensorProto.INT64:
        report.token_ids_note = f"graph input {token_ids!r} is not int64"
        return None
    consumers = g.consumers.get(token_ids, [])
    if not consumers:
        report.token_ids_note = f"no node reads the graph input {token_ids!r}"
        return None
    out = g.fresh(f"{PREFIX}_{token_ids}")
    name = g.fresh(f"{PREFIX}_token", nodes=True)
    manifest = node_attrs(first).get("manifest", MANIFEST_DEFAULT)
    if isinstance(manifest, bytes):
        manifest = manifest.decode()
    node = helper.make_node(
        TOKEN_OP_TYPE, [token_ids], [out], name=name, domain=DOMAIN, manifest=str(manifest)
    )
    seen: set[int] = set()
    for consumer in consumers:  # a node reading the ids twice is listed twice
        if id(consumer) in seen:
            continue
        seen.add(id(consumer))
        for k, i in enumerate(consumer.input):
            if i == token_ids:
                consumer.input[k] = out
    info = onnx.ValueInfoProto()
    info.CopyFrom(g.inputs[token_ids])
    info.name = out
    info.doc_string = ""
    added_info.append(info)
    report.token_ids, report.token_prefetch, report.token_output = token_ids, name, out
    report.token_consumers = len(seen)
    return node


def wire_prefetch_inputs(
    model: onnx.ModelProto, *, lookahead: int = 3, token_ids: str | None = "input_ids", residual: bool = True
) -> WiringReport:
    """Add HOBBIT's stacked gates (``OffloadedExpert`` input 3) and a ``TokenPrefetch`` node on the token
    ids to ``model``, in place (docs/op-contract.md, opset 2). Returns what was wired, and why not, per layer.

    Node ``l`` gets ``next_router_logits [T, P, E]``: row ``j`` = the router of manifest layer ``l+1+j``
    applied to node ``l``'s ``X`` reshaped to ``[T, H]``, ``P <= lookahead``. ``P`` stops at the first later
    layer that is not in this graph, whose router cannot be found (see :func:`find_router`), whose ``H``
    differs from ``X``'s or whose ``E`` differs from layer ``l+1``'s; the last node gets no input 3.

    The graph input ``token_ids`` (int64, if the graph has it and some node reads it; ``None`` = never)
    feeds a new ``TokenPrefetch`` node, first in the node list, with the ``manifest`` attribute of the first
    ``OffloadedExpert`` node; every node that read ``token_ids`` reads the node's output (same ids, same
    shape) instead, so it runs before the embedding. Graph outputs that are ``token_ids`` itself stay so.

    With ``residual``, every MoE layer after the graph's first gets a ``ResidualPrefetch`` node on the
    residual stream entering it (:func:`edgemoe_ort.bundle.residual.wire_residual`, opset 4;
    ``report.residual`` says per layer what was wired, or why not).

    Any wiring sets the ``("edgemoe", 2)`` opset import. Nothing is ever raised for a layer that cannot be
    wired, the graph's inputs and outputs are unchanged, and re-wiring a wired graph is a no-op (a node that
    already has input 3 keeps it; a graph that already has a ``TokenPrefetch`` or ``ResidualPrefetch`` node
    keeps it as is).
    """
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise ValueError(f"lookahead must be an integer >= 0, found {lookahead!r}")
    report = WiringReport(requested=lookahead, opset=edgemoe_opset(model))
    g = GraphIndex(model.graph)
    positions = [i for i, n in enumerate(model.graph.node) if _is_offloaded(n)]
    if not positions:
        inner = sum(1 for f in model.functions for n in f.node if _is_offloaded(n))
        report.notes.append(
            f"{inner} OffloadedExpert node(s) inside functions are not wired"
            if inner
            else "no OffloadedExpert node in the graph"
        )
        return report
    by_layer: dict[int, onnx.NodeProto] = {}
    position: dict[int, int] = {}  # layer -> index of its node in graph.node
    for i in positions:
        n = model.graph.node[i]
        layer = int(node_attrs(n).get("layer", -1))
        if layer in by_layer:
            report.notes.append(f"layer {layer} has more than one OffloadedExpert node: nothing wired")
            return report
        by_layer[layer], position[layer] = n, i
    order = sorted(by_layer)
    routers: dict[int, tuple[Router | None, str]] = {
        layer: _find_router(g, by_layer[layer]) for layer in order
    }

    added_nodes: dict[int, list[onnx.NodeProto]] = {}  # index in graph.node -> nodes to insert before it
    added_inits: list[onnx.TensorProto] = []
    added_info: list[onnx.ValueInfoProto] = []
    changed = False
    if lookahead > 0 and any(g.static_last_dim(by_layer[m].input[0]) is None for m in order):
        g.types = {**inferred_types(model), **g.types}  # no value_info for some X: infer (graph untouched)
    for layer in order:
        node = by_layer[layer]
        router, why = routers[layer]
        lw = LayerWiring(
            layer=layer,
            node=node.name,
            num_experts=int(node_attrs(node).get("num_experts", 0)),
            router=router.weight if router else None,
            router_note=why or None,
        )
        report.layers.append(lw)
        if len(node.input) > NEXT_LOGITS_INPUT and node.input[NEXT_LOGITS_INPUT]:
            lw.already_wired = True
            lw.lookahead = _existing_lookahead(g, node.input[NEXT_LOGITS_INPUT])
            if lw.lookahead > 0:
                lw.next_layers = list(range(layer + 1, layer + 1 + lw.lookahead))
            continue
        if lookahead == 0:
            continue
        hidden = g.static_last_dim(node.input[0])
        if hidden is None and router is not None:
            hidden = router.hidden
        chosen: list[Router] = []
        for step in range(1, lookahead + 1):
            target = layer + step
            if target not in by_layer:
                later = [m for m in order if m > layer]
                if not later:
                    lw.notes.append("no later MoE layer in this graph")
                elif target - 1 == later[-1]:
                    lw.notes.append(f"only {len(later)} later MoE layer(s) in this graph")
                else:
                    lw.notes.append(f"layer {target} is not in this graph")
                break
            r, rwhy = routers[target]
            if r is None:
                lw.notes.append(f"layer {target}: router not found ({rwhy})")
                break
            if hidden is None:
                lw.notes.append("hidden size of X unknown")
                break
            if r.hidden != hidden:
                lw.notes.append(f"layer {target}: router H={r.hidden} differs from X's H={hidden}")
                break
            if chosen and r.num_experts != chosen[0].num_experts:
                first_e = chosen[0].num_experts
                lw.notes.append(
                    f"layer {target}: E={r.num_experts} differs from layer {layer + 1}'s E={first_e}"
                )
                break
            chosen.append(r)
        if not chosen:
            continue
        assert hidden is not None  # a router is only chosen once the hidden size is known
        p, e = len(chosen), chosen[0].num_experts
        tag = f"{PREFIX}_l{layer}"
        shape2d = shape_const(g, added_inits, f"{PREFIX}_shape_t_{hidden}", [-1, hidden])
        x2d = g.fresh(f"{tag}_x")
        new = [
            helper.make_node(
                "Reshape", [node.input[0], shape2d], [x2d], name=g.fresh(f"{tag}_flatten", nodes=True)
            )
        ]
        logits = []
        for r, target in zip(chosen, range(layer + 1, layer + 1 + p), strict=True):
            out = g.fresh(f"{tag}_router_{target}")
            new += _router_nodes(g, r, x2d, out, f"{tag}_router_{target}")
            logits.append(out)
        stacked = logits[0]
        if p > 1:
            stacked = g.fresh(f"{tag}_concat")
            new.append(
                helper.make_node(
                    "Concat", logits, [stacked], name=g.fresh(f"{tag}_concat", nodes=True), axis=1
                )
            )
        shape3d = shape_const(g, added_inits, f"{PREFIX}_shape_{p}_{e}", [0, p, e])
        result = g.fresh(f"next_router_logits_{layer}")
        new.append(
            helper.make_node(
                "Reshape", [stacked, shape3d], [result], name=g.fresh(f"{tag}_stack", nodes=True)
            )
        )
        added_info.append(helper.make_tensor_value_info(result, TensorProto.FLOAT, [None, p, e]))
        added_nodes[position[layer]] = new
        _set_input(node, NEXT_LOGITS_INPUT, result)
        lw.lookahead, lw.next_layers = p, list(range(layer + 1, layer + 1 + p))
        changed = True

    token_node = _wire_token_prefetch(g, model.graph.node[positions[0]], token_ids, report, added_info)
    if token_node is not None:
        changed = True

    if added_nodes or token_node is not None:
        head = [token_node] if token_node is not None else []
        insert_nodes(model, added_nodes, head=head, initializers=added_inits, value_info=added_info)
    if residual:
        res = wire_residual(model)
        report.residual = res.layers
        report.notes.extend(f"residual: {n}" for n in res.notes)
        changed = changed or res.changed
    if report.wired and set_opset(model, PREFETCH_OPSET):
        changed = True
    report.opset = edgemoe_opset(model)
    report.changed = changed
    return report


def wire_bundle(
    bundle_dir: str | Path, *, lookahead: int = 3, routing: bool = True
) -> dict[str, WiringReport]:
    """Wire the graphs of an existing bundle in place (one exported before the wiring existed, or with
    ``--lookahead 0``): each graph file is rewritten through a temporary file and a rename; weights in
    external data files are only referenced, never rewritten. Decoder graphs get the ``TokenPrefetch`` node;
    with ``routing``, each router's selection step found in the graph becomes a ``CacheAwareTopK`` node
    (:func:`edgemoe_ort.bundle.routing.wire_routing`; layers where none is found keep theirs, and the report's
    notes say why). Returns the report per graph role; a graph already wired is left untouched."""
    from edgemoe_ort.bundle.format import model_graph_roles
    from edgemoe_ort.bundle.reader import Bundle
    from edgemoe_ort.bundle.routing import wire_routing

    b = Bundle.open(bundle_dir)
    reports: dict[str, WiringReport] = {}
    for role in model_graph_roles(b.graphs):  # the tokenizer graphs hold no expert
        path = b.graph_path(role)
        model = onnx.load(str(path), load_external_data=False)
        report = wire_prefetch_inputs(
            model, lookahead=lookahead, token_ids="input_ids" if role == "decoder" else None
        )
        if routing:
            routed = wire_routing(model)
            report.changed = report.changed or routed.changed
            report.opset = edgemoe_opset(model)
            report.notes.extend(f"routing: {line}" for line in routed.summary())
        reports[role] = report
        if report.changed:
            tmp = path.with_name(path.name + ".tmp")
            onnx.save(model, str(tmp))
            os.replace(tmp, path)
    return reports
