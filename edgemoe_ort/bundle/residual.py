"""The residual predictor wired into an exported graph (opset 4): a ``ResidualPrefetch`` node on the residual
stream that enters each MoE layer after the first (docs/op-contract.md, "ResidualPrefetch").

For the ``OffloadedExpert`` node of manifest layer ``t`` (``t - 1`` in the same graph), :func:`wire_residual`

1. finds layer ``t``'s router (:func:`edgemoe_ort.bundle.wiring.find_router`) and its input ``X_t``;
2. walks back from ``X_t`` through the router's normalization: nodes of :data:`NORM_OPS` (a decomposed
   RMSNorm / LayerNorm, ORT's fused ``SimplifiedLayerNormalization`` / ``LayerNormalization``, reshapes),
   latest first, until one tensor ``r`` alone feeds them (the un-normalized residual, after at least one
   reduction or normalization node);
3. takes ``r = Add(h, a)`` where ``a`` depends on ``h`` (``a`` = the attention of layer ``t``'s block,
   computed on the normalized ``h``): ``h`` is the residual stream leaving the block before, which must
   depend on layer ``t - 1``'s ``OffloadedExpert`` output;
4. clones the normalization with ``h`` in place of ``r`` (same initializers: nothing is duplicated), flattens
   it to ``[T, H]``, applies the router (the same weight, bias, ``alpha`` / ``beta``) and a ``Softmax`` over
   the experts: ``scores`` ``[T, E]``;
5. adds ``h' = ResidualPrefetch(h, scores)`` (attributes ``layer = t``, ``manifest`` as the node's) and makes
   every node that read ``h`` read ``h'``: ORT must run it, and therefore the scores, before layer ``t``'s
   attention; the prefetcher reads layer ``t``'s likely experts while that attention runs.

A layer whose graph does not show this pattern is skipped with the reason (the bundle still works; under
``--predictor residual`` the stacked gates predict it). Graph inputs and outputs are unchanged; re-wiring a
wired graph is a no-op. Torch-free (onnx + numpy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
from onnx import TensorProto, helper

from edgemoe_ort.bundle.graph import (
    DOMAIN,
    GraphIndex,
    edgemoe_opset,
    insert_nodes,
    node_attrs,
    set_opset,
    shape_const,
)

__all__ = [
    "NORM_OPS",
    "RESIDUAL_OPSET",
    "RESIDUAL_OP_TYPE",
    "LayerResidual",
    "ResidualReport",
    "wire_residual",
]

RESIDUAL_OP_TYPE = "ResidualPrefetch"
#: the edgemoe opset that adds ResidualPrefetch
RESIDUAL_OPSET = 4
#: prefix of every tensor / node name this rewrite adds
PREFIX = "edgemoe_residual"
_OFFLOADED = "OffloadedExpert"
_ONNX = ("", "ai.onnx")
#: ops a router's normalization may consist of (elementwise, reductions over the hidden axis, reshapes)
NORM_OPS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Cast", "Identity",
        "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Clip", "Max", "Min",
        "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
        "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
    }
)  # fmt: skip
#: the nodes that make a chain a normalization (one at least)
_REDUCING = frozenset(
    {
        "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
        "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
    }
)  # fmt: skip
#: inputs that are not the data (shapes, axes, bounds): never walked through, reused as they are
_SIDE_INPUTS = {
    "Reshape": {1}, "Squeeze": {1}, "Unsqueeze": {1}, "Expand": {1}, "Clip": {1, 2},
    "ReduceMean": {1}, "ReduceSum": {1}, "ReduceSumSquare": {1}, "ReduceL2": {1},
}  # fmt: skip
_MAX_NORM_NODES = 64


@dataclass
class LayerResidual:
    """What the wiring did for the MoE layer ``layer`` (the node's ``layer`` attribute)."""

    layer: int
    node: str | None = None  # the ResidualPrefetch node's name; None: not wired
    residual: str | None = None  # h: the tensor it is the identity on
    output: str | None = None  # h': read instead of h by h's consumers
    norm_nodes: int = 0  # nodes of the cloned normalization
    consumers: int = 0  # nodes rewired to h'
    already_wired: bool = False
    note: str | None = None  # why it was not wired

    @property
    def wired(self) -> bool:
        return self.node is not None


@dataclass
class ResidualReport:
    """Result of :func:`wire_residual`, one :class:`LayerResidual` per MoE layer after the graph's first."""

    layers: list[LayerResidual] = field(default_factory=list)
    opset: int = 1
    changed: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> list[str]:
        lines = []
        for w in self.layers:
            if w.wired:
                how = (
                    "already wired"
                    if w.already_wired
                    else f"norm of {w.norm_nodes} nodes, {w.consumers} readers"
                )
                lines.append(f"layer {w.layer}: {RESIDUAL_OP_TYPE} on {w.residual} ({how})")
            else:
                lines.append(f"layer {w.layer}: no {RESIDUAL_OP_TYPE} ({w.note})")
        return lines + self.notes


def _is(node: onnx.NodeProto, op: str) -> bool:
    return node.domain == DOMAIN and node.op_type == op


def _ancestors(g: GraphIndex, start: str) -> set[str]:
    """Every tensor ``start`` is computed from (itself included)."""
    seen = {start}
    stack = [start]
    while stack:
        prod = g.producer.get(stack.pop())
        if prod is None:
            continue
        for i in prod.input:
            if i and i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def _descendants(g: GraphIndex, start: str) -> set[str]:
    """Every tensor computed from ``start`` (itself included)."""
    seen = {start}
    stack = [start]
    while stack:
        for node in g.consumers.get(stack.pop(), []):
            for o in node.output:
                if o and o not in seen:
                    seen.add(o)
                    stack.append(o)
    return seen


def _normalization(
    g: GraphIndex, x: str, position: dict[int, int]
) -> tuple[str, list[onnx.NodeProto], list[str]] | str:
    """``(r, nodes, side inputs)``: the normalization computing ``x`` from the one tensor ``r`` (nodes in
    graph order), or why there is none."""
    pending = {x}
    nodes: dict[int, onnx.NodeProto] = {}
    side: list[str] = []
    reduced = False
    while True:
        if len(pending) == 1 and reduced:
            (r,) = pending
            return r, sorted(nodes.values(), key=lambda n: position[id(n)]), side
        if len(nodes) >= _MAX_NORM_NODES:
            return f"no single tensor within {_MAX_NORM_NODES} nodes of the router's input"
        name = max(pending, key=lambda t: position.get(id(g.producer[t]), -1) if t in g.producer else -1)
        prod = g.producer.get(name)
        if prod is None:
            return f"the router's input depends on the graph input {name!r} through its normalization"
        if prod.op_type not in NORM_OPS or prod.domain not in (*_ONNX, "com.microsoft"):
            label = prod.name or prod.output[0]
            if reduced:
                return f"{prod.op_type} {label} reaches the router's normalization besides its input"
            return f"no normalization before the router ({prod.op_type} {label} computes its input)"
        pending.discard(name)
        nodes[id(prod)] = prod
        reduced = reduced or prod.op_type in _REDUCING
        sides = _SIDE_INPUTS.get(prod.op_type, set())
        for k, i in enumerate(prod.input):
            if not i or g.constant(i) is not None:
                continue
            if k in sides:
                side.append(i)
            else:
                pending.add(i)


def _clone(
    g: GraphIndex, nodes: list[onnx.NodeProto], r: str, h: str, tag: str
) -> tuple[list[onnx.NodeProto], str]:
    """``nodes`` with ``h`` in place of ``r`` and fresh names; returns them and the clone of their last output
    (the router's input)."""
    rename = {r: h}
    out: list[onnx.NodeProto] = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = g.fresh(f"{tag}_{n.op_type.lower()}", nodes=True)
        del c.input[:]
        c.input.extend(rename.get(i, i) for i in n.input)
        del c.output[:]
        for o in n.output:
            if o:
                rename[o] = g.fresh(f"{tag}_{o}")
            c.output.append(rename.get(o, ""))
        out.append(c)
    return out, rename[nodes[-1].output[0]]


def _find_node(g: GraphIndex, label: str) -> onnx.NodeProto | None:
    for n in g.graph.node:
        if (n.name or n.output[0]) == label:
            return n
    return None


def wire_residual(model: onnx.ModelProto) -> ResidualReport:
    """Add a ``ResidualPrefetch`` node for every MoE layer ``t`` whose layer ``t - 1`` is in the same graph
    (see the module docstring), in place. Any wiring sets the ``("edgemoe", 4)`` opset import. Nothing is
    raised for a layer that cannot be wired: its entry says why."""
    report = ResidualReport(opset=edgemoe_opset(model))
    g = GraphIndex(model.graph)
    by_layer: dict[int, onnx.NodeProto] = {}
    for n in model.graph.node:
        if _is(n, _OFFLOADED):
            layer = int(node_attrs(n).get("layer", -1))
            if layer in by_layer:
                report.notes.append(f"layer {layer} has more than one {_OFFLOADED} node: nothing wired")
                return report
            by_layer[layer] = n
    if not by_layer:
        report.notes.append(f"no {_OFFLOADED} node in the graph")
        return report
    existing = {int(node_attrs(n).get("layer", -1)): n for n in model.graph.node if _is(n, RESIDUAL_OP_TYPE)}
    position = {id(n): i for i, n in enumerate(model.graph.node)}
    plans: list[_Plan] = []
    added_inits: list[onnx.TensorProto] = []
    for t in sorted(by_layer)[1:]:
        lw = LayerResidual(layer=t)
        report.layers.append(lw)
        if t in existing:
            n = existing[t]
            lw.node, lw.residual, lw.output, lw.already_wired = n.name, n.input[0], n.output[0], True
            lw.consumers = len(g.consumers.get(n.output[0], []))
        elif t - 1 not in by_layer:
            lw.note = f"layer {t - 1} is not in this graph"
        else:
            plan = _plan(g, by_layer, t, position, added_inits)
            if isinstance(plan, str):
                lw.note = plan
                continue
            plans.append(plan)
            lw.node, lw.residual, lw.output = plan.name, plan.h, plan.out
            lw.norm_nodes, lw.consumers = plan.norm_nodes, len({id(n) for n in g.consumers[plan.h]})
    if plans:
        _apply(model, g, plans, position, added_inits)
        set_opset(model, RESIDUAL_OPSET)
        report.changed = True
    report.opset = edgemoe_opset(model)
    return report


@dataclass
class _Plan:
    h: str  # the residual stream
    out: str  # h'
    name: str  # the ResidualPrefetch node
    nodes: list[onnx.NodeProto]  # to insert before h's first reader, the ResidualPrefetch node last
    info: list[onnx.ValueInfoProto]
    norm_nodes: int


def _plan(
    g: GraphIndex,
    by_layer: dict[int, onnx.NodeProto],
    t: int,
    position: dict[int, int],
    added_inits: list[onnx.TensorProto],
) -> _Plan | str:
    """Layer ``t``'s nodes (nothing in the graph changes yet), or why it cannot be wired."""
    from edgemoe_ort.bundle.wiring import MANIFEST_DEFAULT, _find_router, _router_nodes

    router, why = _find_router(g, by_layer[t])
    if router is None:
        return f"router not found ({why})"
    rnode = _find_node(g, router.node)
    if rnode is None:
        return f"router node {router.node!r} not found"
    found = _normalization(g, rnode.input[0], position)
    if isinstance(found, str):
        return found
    r, norm, side = found
    add = g.producer.get(r)
    if add is None or add.op_type != "Add" or add.domain not in _ONNX or len(add.input) != 2:
        return f"the router's normalization starts from {r!r}, which is not a residual Add"
    a, b = add.input
    if a in _ancestors(g, b):
        h = a
    elif b in _ancestors(g, a):
        h = b
    else:
        return f"neither input of the residual Add {add.name or r!r} is computed from the other"
    if by_layer[t - 1].output[0] not in _ancestors(g, h):
        return f"the residual stream {h!r} does not follow layer {t - 1}'s {_OFFLOADED} node"
    later = _descendants(g, h)
    first = min(position[id(n)] for n in g.consumers[h])
    for s in side:  # reused as they are: must be there before h's first reader, and not follow h
        if s in later:
            return f"the normalization's input {s!r} is computed from the residual stream"
        p = g.producer.get(s)
        if p is not None and position[id(p)] >= first:
            return f"the normalization's input {s!r} is computed after the residual stream is first read"
    # Constant nodes the clone reads that come after h's first reader: cloned with it
    consts = {
        id(p): p
        for n in norm
        for i in n.input
        if i
        and (p := g.producer.get(i)) is not None
        and g.constant(i) is not None
        and position[id(p)] >= first
    }
    tag = f"{PREFIX}_l{t}"
    nodes, x = _clone(g, [*consts.values(), *norm], r, h, tag)
    shape2d = shape_const(g, added_inits, f"{PREFIX}_shape_t_{router.hidden}", [-1, router.hidden])
    x2d = g.fresh(f"{tag}_x")
    nodes.append(helper.make_node("Reshape", [x, shape2d], [x2d], name=g.fresh(f"{tag}_flatten", nodes=True)))
    logits = g.fresh(f"{tag}_logits")
    nodes += _router_nodes(g, router, x2d, logits, f"{tag}_router")
    scores = g.fresh(f"residual_scores_{t}")
    nodes.append(
        helper.make_node("Softmax", [logits], [scores], name=g.fresh(f"{tag}_softmax", nodes=True), axis=-1)
    )
    out = g.fresh(f"{PREFIX}_{h}")
    manifest = node_attrs(by_layer[t]).get("manifest", MANIFEST_DEFAULT)
    manifest = manifest.decode() if isinstance(manifest, bytes) else str(manifest)
    name = g.fresh(f"{tag}_prefetch", nodes=True)
    nodes.append(
        helper.make_node(
            RESIDUAL_OP_TYPE, [h, scores], [out], name=name, domain=DOMAIN, layer=t, manifest=manifest
        )
    )
    info = [helper.make_tensor_value_info(scores, TensorProto.FLOAT, [None, router.num_experts])]
    if h in g.types:
        v = onnx.ValueInfoProto()
        v.name = out
        v.type.CopyFrom(g.types[h])
        info.append(v)
    return _Plan(h, out, name, nodes, info, len(norm))


def _apply(
    model: onnx.ModelProto,
    g: GraphIndex,
    plans: list[_Plan],
    position: dict[int, int],
    added_inits: list[onnx.TensorProto],
) -> None:
    """Rewire each plan's ``h`` readers to ``h'`` and insert its nodes before the first of them."""
    before: dict[int, list[onnx.NodeProto]] = {}
    for p in plans:
        readers = {id(n): n for n in g.consumers[p.h]}
        before.setdefault(min(position[i] for i in readers), []).extend(p.nodes)
        for n in readers.values():
            for k, i in enumerate(n.input):
                if i == p.h:
                    n.input[k] = p.out
    insert_nodes(model, before, initializers=added_inits, value_info=[v for p in plans for v in p.info])
