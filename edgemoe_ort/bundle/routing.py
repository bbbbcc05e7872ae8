"""Cache-aware routing wired into an exported graph (opset 3): the top-k step of each MoE layer's router
becomes an ``edgemoe.CacheAwareTopK`` node (docs/op-contract.md, "CacheAwareTopK"), which chooses the
layer's experts under the session's ``edgemoe.routing`` rule with the expert cache in view. With the default
rule, ``exact``, the graph computes bit for bit what it computed before.

The router's own arithmetic stays in the graph; only its selection step is replaced, so each family's
weighting (renormalize over the chosen, softmax over the chosen logits, no renormalization, capacity masks)
applies unchanged to whatever was chosen. Two seams, found walking back from the ``OffloadedExpert`` node's
``topk_indices`` (nearest first, never through a matrix product):

* ``topk``: a ``TopK`` (last axis, largest, sorted, ``K`` = the node's ``top_k``) over either the router's
  ``Softmax`` output (``scores = "probs"``: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) or the router's logits, a
  ``MatMul`` / ``Gemm`` (+ bias) output (``"logits"``: GPT-OSS, Granite-MoE). Replaced one for one: same
  inputs and outputs.
* ``argmax``: a top-1 router's ``ArgMax`` (last axis, first maximum) over its ``Softmax`` output together with
  the ``ReduceMax`` of the same tensor that gives the routing weight (Switch Transformers). Both become one
  ``CacheAwareTopK`` with ``K = 1`` and one ``Squeeze`` (or ``Identity`` with ``keepdims = 1``) per output.

A family's recipe names its seam (``[routing]`` in ``export/<model_type>.toml``); :func:`wire_routing` checks
the graph against it. Without one (an existing bundle, :func:`edgemoe_ort.bundle.wiring.wire_bundle`) the seam
is whatever the graph shows. Torch-free (onnx + numpy).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
from onnx import helper, numpy_helper

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
    "ROUTING_OPSET",
    "ROUTING_OP_TYPE",
    "SCORE_KINDS",
    "SEAMS",
    "LayerRouting",
    "RoutingReport",
    "RoutingSeam",
    "wire_routing",
]

ROUTING_OP_TYPE = "CacheAwareTopK"
#: the edgemoe opset that adds CacheAwareTopK
ROUTING_OPSET = 3
SEAMS = ("topk", "argmax")
SCORE_KINDS = ("probs", "logits")
#: prefix of every tensor / node name this rewrite adds
PREFIX = "edgemoe_routing"
_OFFLOADED = "OffloadedExpert"
_MATMUL = frozenset({"MatMul", "Gemm"})
_MAX_VISITED = 1024


@dataclass(frozen=True)
class RoutingSeam:
    """Where a family's router selects its experts: ``seam`` in :data:`SEAMS`, over ``scores`` in
    :data:`SCORE_KINDS`."""

    seam: str
    scores: str

    def __post_init__(self) -> None:
        if self.seam not in SEAMS:
            raise ValueError(f"routing seam: expected one of {', '.join(SEAMS)}, found {self.seam!r}")
        if self.scores not in SCORE_KINDS:
            raise ValueError(
                f"routing scores: expected one of {', '.join(SCORE_KINDS)}, found {self.scores!r}"
            )


@dataclass
class LayerRouting:
    """What the rewrite did for one ``OffloadedExpert`` node."""

    layer: int
    node: str
    seam: str | None = None  # "topk" | "argmax" once found
    scores: str | None = None  # "probs" | "logits"
    router_node: str | None = None  # the CacheAwareTopK node (new or already there)
    replaced: list[str] = field(default_factory=list)  # names of the nodes it replaced
    already_wired: bool = False
    note: str | None = None  # why it was not wired

    @property
    def wired(self) -> bool:
        """Whether this layer routes through a CacheAwareTopK node (after the call)."""
        return self.router_node is not None


@dataclass
class RoutingReport:
    """Result of :func:`wire_routing`: one :class:`LayerRouting` per ``OffloadedExpert`` node, by layer."""

    layers: list[LayerRouting] = field(default_factory=list)
    opset: int = 1
    changed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def wired(self) -> bool:
        """Whether every layer routes through a CacheAwareTopK node."""
        return bool(self.layers) and all(w.wired for w in self.layers)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d["wired"] = self.wired
        return d

    def summary(self) -> list[str]:
        """One human-readable line per layer."""
        lines = []
        for w in self.layers:
            if w.wired:
                how = f"{w.seam} over {w.scores}"
                again = " (already wired)" if w.already_wired else ""
                lines.append(f"layer {w.layer}: {ROUTING_OP_TYPE} ({how}){again}")
            else:
                lines.append(f"layer {w.layer}: routing not wired ({w.note})")
        return [*lines, *self.notes]


def _is_op(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def _is_ours(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain == DOMAIN


def _int_const(g: GraphIndex, name: str) -> list[int] | None:
    t = g.constant(name)
    if t is None:
        return None
    a = numpy_helper.to_array(t)
    if a.dtype.kind not in "iu" or a.size > 16:
        return None
    return [int(x) for x in a.reshape(-1)]


def _default_opset(model: onnx.ModelProto) -> int:
    return max((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)


def _find_selector(g: GraphIndex, node: onnx.NodeProto) -> tuple[onnx.NodeProto | None, str]:
    """The nearest TopK / ArgMax / CacheAwareTopK on the path back from ``topk_indices``, or (None, why)."""
    if len(node.input) < 2 or not node.input[1]:
        return None, "the node has no topk_indices input"
    queue: deque[str] = deque([node.input[1]])
    seen: set[str] = {node.input[1]}
    visited = 0
    while queue:
        name = queue.popleft()
        prod = g.producer.get(name)
        if prod is None:
            continue
        visited += 1
        if visited > _MAX_VISITED:
            break
        if _is_ours(prod, ROUTING_OP_TYPE) or _is_op(prod, "TopK") or _is_op(prod, "ArgMax"):
            return prod, ""
        if _is_ours(prod, _OFFLOADED) or prod.op_type in _MATMUL or prod.op_type in ("Shape", "Size"):
            continue
        for i in prod.input:
            if i and i not in seen and g.constant(i) is None:
                seen.add(i)
                queue.append(i)
    return None, "no TopK or ArgMax on the path from the router to topk_indices"


def _scores_kind(g: GraphIndex, scores: str) -> tuple[str | None, str]:
    """``"probs"`` if ``scores`` is a last-axis Softmax output, ``"logits"`` if it is a matrix product's
    output (or that plus a constant bias), else (None, what it is)."""
    prod = g.producer.get(scores)
    if prod is None:
        return None, f"its input {scores!r} is a graph input or a constant"
    if _is_op(prod, "Softmax"):
        axis = int(node_attrs(prod).get("axis", -1))
        if axis != -1:
            return None, f"its input is a Softmax over axis {axis}, not the last"
        return "probs", ""
    if prod.op_type in _MATMUL:
        return "logits", ""
    if _is_op(prod, "Add"):
        others = [i for i in prod.input if i and g.constant(i) is None]
        if len(others) == 1 and (p2 := g.producer.get(others[0])) is not None and p2.op_type in _MATMUL:
            return "logits", ""
    return None, f"its input comes from {prod.op_type} (not the router's Softmax or logits)"


def _check_topk(g: GraphIndex, topk: onnx.NodeProto, top_k: int) -> str:
    a = node_attrs(topk)
    if int(a.get("axis", -1)) != -1:
        return f"TopK {topk.name!r} selects over axis {a.get('axis')}, not the last"
    if int(a.get("largest", 1)) != 1 or int(a.get("sorted", 1)) != 1:
        return f"TopK {topk.name!r} is not largest=1, sorted=1"
    k = _int_const(g, topk.input[1]) if len(topk.input) > 1 else None
    if k != [top_k]:
        return (
            f"TopK {topk.name!r}: K is {k if k is not None else 'not a constant'}, expected [{top_k}] (top_k)"
        )
    return ""


def _argmax_sibling(g: GraphIndex, argmax: onnx.NodeProto, top_k: int) -> tuple[onnx.NodeProto | None, str]:
    """The ReduceMax over the same tensor and axis as ``argmax`` (the routing weight), or (None, why)."""
    a = node_attrs(argmax)
    if top_k != 1:
        return None, f"ArgMax {argmax.name!r} routes top-1, the node has top_k {top_k}"
    if int(a.get("axis", 0)) != -1 or int(a.get("select_last_index", 0)) != 0:
        return None, f"ArgMax {argmax.name!r} is not over the last axis with the first maximum"
    keep = int(a.get("keepdims", 1))
    for c in g.consumers.get(argmax.input[0], []):
        if not _is_op(c, "ReduceMax"):
            continue
        ca = node_attrs(c)
        axes = _int_const(g, c.input[1]) if len(c.input) > 1 and c.input[1] else ca.get("axes")
        if axes is not None and [int(x) for x in axes] == [-1] and int(ca.get("keepdims", 1)) == keep:
            return c, ""
    return None, f"no ReduceMax over the last axis of {argmax.input[0]!r} (the routing weight) beside ArgMax"


def _router_node(
    inputs: list[str], outputs: list[str], name: str, layer: int, scores: str, manifest: str
) -> onnx.NodeProto:
    return helper.make_node(
        ROUTING_OP_TYPE,
        inputs,
        outputs,
        name=name,
        domain=DOMAIN,
        layer=layer,
        scores=scores,
        manifest=manifest,
    )


def wire_routing(model: onnx.ModelProto, expect: RoutingSeam | None = None) -> RoutingReport:
    """Replace each MoE layer's router selection in ``model`` (in place) by an ``edgemoe.CacheAwareTopK``.

    ``expect`` (from the family's recipe): the seam the graph must show; a layer whose seam differs is left
    as it is, with a note (the exporter turns that into an error). A layer already routed by a
    CacheAwareTopK node is kept. Any wiring sets the ``("edgemoe", 3)`` opset import; the graph's inputs and
    outputs never change, and in ``exact`` mode the outputs are bit-identical to the replaced nodes'.
    """
    report = RoutingReport(opset=edgemoe_opset(model))
    g = GraphIndex(model.graph)
    offloaded = [n for n in model.graph.node if _is_ours(n, _OFFLOADED)]
    if not offloaded:
        report.notes.append("no OffloadedExpert node in the graph")
        return report
    position = {id(n): i for i, n in enumerate(model.graph.node)}
    removed: set[int] = set()
    inserted: dict[int, list[onnx.NodeProto]] = {}  # index in graph.node -> nodes to put there
    added_inits: list[onnx.TensorProto] = []
    squeeze_axes_input = _default_opset(model) >= 13
    for node in sorted(offloaded, key=lambda n: int(node_attrs(n).get("layer", -1))):
        attrs = node_attrs(node)
        layer, top_k = int(attrs.get("layer", -1)), int(attrs.get("top_k", 0))
        manifest = attrs.get("manifest", b"manifest.json")
        manifest = manifest.decode() if isinstance(manifest, bytes) else str(manifest)
        lr = LayerRouting(layer=layer, node=node.name)
        report.layers.append(lr)
        sel, why = _find_selector(g, node)
        if sel is None:
            lr.note = why
            continue
        if _is_ours(sel, ROUTING_OP_TYPE):
            sa = node_attrs(sel)
            scores = sa.get("scores", b"")
            lr.scores = scores.decode() if isinstance(scores, bytes) else str(scores)
            lr.seam, lr.router_node, lr.already_wired = "topk", sel.name or sel.output[0], True
            continue
        seam = "topk" if _is_op(sel, "TopK") else "argmax"
        kind, why = _scores_kind(g, sel.input[0])
        if kind is None:
            lr.note = f"{sel.op_type} {sel.name!r}: {why}"
            continue
        lr.seam, lr.scores = seam, kind
        if expect is not None and (expect.seam, expect.scores) != (seam, kind):
            lr.note = (
                f"the recipe's seam is {expect.seam} over {expect.scores}, the graph shows {seam} over "
                f"{kind} ({sel.op_type} {sel.name!r})"
            )
            continue
        tag = f"{PREFIX}_l{layer}"
        name = g.fresh(f"{tag}_topk", nodes=True)
        at = position[id(sel)]
        if seam == "topk":
            if bad := _check_topk(g, sel, top_k):
                lr.note = bad
                continue
            named = [*sel.output, "", ""][:2]
            outs = [o or g.fresh(f"{tag}_{w}") for o, w in zip(named, ("values", "indices"), strict=True)]
            new = [_router_node([sel.input[0], sel.input[1]], outs, name, layer, kind, manifest)]
            lr.replaced = [sel.name]
            removed.add(id(sel))
        else:
            rmax, why = _argmax_sibling(g, sel, top_k)
            if rmax is None:
                lr.note = why
                continue
            keep = int(node_attrs(sel).get("keepdims", 1))
            k1 = shape_const(g, added_inits, f"{PREFIX}_k1", [1])
            vals, idx = g.fresh(f"{tag}_values"), g.fresh(f"{tag}_indices")
            new = [_router_node([sel.input[0], k1], [vals, idx], name, layer, kind, manifest)]
            for src, dst in ((vals, rmax.output[0]), (idx, sel.output[0])):
                nm = g.fresh(f"{tag}_squeeze", nodes=True)
                if keep:
                    new.append(helper.make_node("Identity", [src], [dst], name=nm))
                elif squeeze_axes_input:
                    axes = shape_const(g, added_inits, f"{PREFIX}_axes_last", [-1])
                    new.append(helper.make_node("Squeeze", [src, axes], [dst], name=nm))
                else:
                    new.append(helper.make_node("Squeeze", [src], [dst], name=nm, axes=[-1]))
            lr.replaced = [sel.name, rmax.name]
            removed.update({id(sel), id(rmax)})
            at = min(at, position[id(rmax)])
        inserted.setdefault(at, []).extend(new)
        lr.router_node = name
    if inserted:
        insert_nodes(model, inserted, initializers=added_inits, drop=removed)
        set_opset(model, ROUTING_OPSET)
        report.changed = True
    report.opset = edgemoe_opset(model)
    return report
