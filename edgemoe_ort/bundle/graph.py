"""Lookups on an ONNX graph shared by the graph rewrites of a bundle (:mod:`.wiring`, :mod:`.routing`):
producers, consumers, constants, static shapes, fresh names, the edgemoe opset import.

Torch-free (onnx + numpy).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "DOMAIN",
    "GraphIndex",
    "edgemoe_opset",
    "inferred_types",
    "insert_nodes",
    "node_attrs",
    "set_opset",
    "shape_const",
]

DOMAIN = "edgemoe"


class GraphIndex:
    """Producers, constants and static shapes of one ``GraphProto``."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name: i for i in graph.input if i.name not in self.initializers}
        self.types = {v.name: v.type for v in [*graph.value_info, *graph.input, *graph.output]}
        self.names: set[str] = set(self.initializers) | set(self.inputs) | set(self.producer)
        self.names |= {o.name for o in graph.output} | {v.name for v in graph.value_info}
        self.node_names = {n.name for n in graph.node if n.name}

    def constant(self, name: str) -> onnx.TensorProto | None:
        """The tensor of an initializer or of a ``Constant(value=...)`` node output."""
        if name in self.initializers:
            return self.initializers[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    return a.t
        return None

    def static_last_dim(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        dims = t.tensor_type.shape.dim
        if not dims or not dims[-1].HasField("dim_value"):
            return None
        return int(dims[-1].dim_value)

    def elem_type(self, name: str) -> int | None:
        t = self.types.get(name)
        return int(t.tensor_type.elem_type) if t is not None and t.HasField("tensor_type") else None

    def fresh(self, base: str, nodes: bool = False) -> str:
        """``base`` or ``base_2``, ``base_3``... unused as a tensor (or node) name; reserved on return."""
        taken = self.node_names if nodes else self.names
        name, i = base, 1
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name


def inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types from onnx shape inference on a data-free copy of ``model`` (float initializers become inputs of
    the same type; small int64 ones, shapes of Reshape etc., stay), for graphs without value_info."""
    g = model.graph
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.node.extend(g.node)
    light.graph.input.extend(g.input)
    light.graph.output.extend(g.output)
    light.graph.value_info.extend(g.value_info)
    have = {i.name for i in g.input}
    for t in g.initializer:
        if t.data_type == TensorProto.INT64 and int(np.prod(t.dims)) <= 64 and not t.external_data:
            light.graph.initializer.append(t)
        elif t.name not in have:
            light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # inference is a convenience here: without it the hidden size stays unknown
        return {}
    return {v.name: v.type for v in [*inferred.graph.value_info, *inferred.graph.output]}


def insert_nodes(
    model: onnx.ModelProto,
    before: dict[int, list[onnx.NodeProto]],
    *,
    head: Sequence[onnx.NodeProto] = (),
    initializers: Sequence[onnx.TensorProto] = (),
    value_info: Sequence[onnx.ValueInfoProto] = (),
    drop: Collection[int] = (),
) -> None:
    """Rebuild ``model.graph.node`` with ``head`` first and ``before[i]`` just before the node at index ``i``
    (indices of the current list, so a topological order stays one), without the nodes whose ``id`` is in
    ``drop``, then add ``initializers`` and ``value_info``."""
    rebuilt: list[onnx.NodeProto] = list(head)
    for i, n in enumerate(model.graph.node):
        rebuilt.extend(before.get(i, []))
        if id(n) in drop:
            continue
        kept = onnx.NodeProto()
        kept.CopyFrom(n)
        rebuilt.append(kept)
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    model.graph.initializer.extend(initializers)
    model.graph.value_info.extend(value_info)


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """The node's attributes as Python values (strings stay ``bytes``)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def shape_const(g: GraphIndex, added: list[onnx.TensorProto], base: str, values: list[int]) -> str:
    """An int64 initializer ``values`` (shared between nodes: reused when the same one was already added)."""
    for t in added:
        if t.name.startswith(base) and numpy_helper.to_array(t).tolist() == values:
            return t.name
    name = g.fresh(base)
    added.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
    return name


def set_opset(model: onnx.ModelProto, version: int) -> bool:
    """Raise the model's ``edgemoe`` opset import to at least ``version``; True if it changed."""
    for o in model.opset_import:
        if o.domain == DOMAIN:
            if o.version >= version:
                return False
            o.version = version
            return True
    model.opset_import.append(helper.make_opsetid(DOMAIN, version))
    return True


def edgemoe_opset(model: onnx.ModelProto) -> int:
    """The ``edgemoe`` opset version the model imports (1 if none)."""
    return max((int(o.version) for o in model.opset_import if o.domain == DOMAIN), default=1)
