"""What the dense graph's weights are: each initializer's kind and the bytes per kind (``edgemoe-inspect``).

The exporter labels every node that consumes a weight with the weight's kind, in the node's metadata under
:data:`KIND_KEY` (export/dense_kinds.py decides the kind from the module the node was traced from and the
family's recipe); :mod:`edgemoe_ort.bundle.dense_quant` rewrites the labelled nodes and keeps the labels, so
the same function reports a bundle before and after dense quantization. An initializer nobody labelled
(bundles exported before the labels existed, constants the graph computes with) counts as ``other``.

Device-side: onnx only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

__all__ = [
    "KINDS",
    "KIND_KEY",
    "QUANTIZED_KINDS",
    "bytes_by_kind",
    "dense_bytes_by_kind",
    "initializer_bytes",
    "initializer_kinds",
    "node_kind",
    "set_node_kind",
]

#: node metadata key holding the kind of the weights the node consumes
KIND_KEY = "edgemoe.weight_kind"

#: the kinds, in report order
KINDS: tuple[str, ...] = (
    "embedding",  # token (and position) tables read by Gather
    "attention",  # q/k/v/o projections (and what else lives in an attention module)
    "shared_expert",  # always-active experts of the MoE block (Qwen2-MoE, DeepSeek)
    "dense_mlp",  # MLPs of layers that are not MoE (DeepSeek's first layers, Qwen2-MoE's mlp_only_layers)
    "lm_head",  # the output projection to the vocabulary
    "gate",  # routers and shared-expert gates: they pick experts, kept in float32 by dense quantization
    "norm",  # normalisation weights
    "other",
)

#: the kinds ``--dense-bits 8|4`` quantizes (docs/bundle-format.md, "Dense weights"); the rest stay float32
QUANTIZED_KINDS: tuple[str, ...] = ("embedding", "attention", "shared_expert", "dense_mlp", "lm_head")

#: ops that only re-shape or re-type a weight on its way to the node that uses it
_PASS_THROUGH = ("Transpose", "Cast", "Reshape")


def node_kind(node: onnx.NodeProto) -> str | None:
    """The kind a node was labelled with, or None."""
    for p in node.metadata_props:
        if p.key == KIND_KEY:
            return p.value
    return None


def set_node_kind(node: onnx.NodeProto, kind: str) -> None:
    """Label ``node`` with ``kind`` (one of :data:`KINDS`), replacing an earlier label."""
    if kind not in KINDS:
        raise ValueError(f"unknown weight kind {kind!r}; expected one of {', '.join(KINDS)}")
    for p in node.metadata_props:
        if p.key == KIND_KEY:
            p.value = kind
            return
    node.metadata_props.add(key=KIND_KEY, value=kind)


def initializer_bytes(t: onnx.TensorProto) -> int:
    """Bytes a tensor's data takes in the graph file or its external data."""
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= int(d)
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return n * np_dtype.itemsize


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def _users(name: str, consumers: dict[str, list[onnx.NodeProto]], depth: int = 0) -> Iterator[onnx.NodeProto]:
    """The nodes that use tensor ``name``, looking through re-shaping nodes (a tied head's Transpose)."""
    for node in consumers.get(name, []):
        yield node
        if node.op_type in _PASS_THROUGH and depth < 4:
            for out in node.output:
                yield from _users(out, consumers, depth + 1)


def initializer_kinds(graph: onnx.GraphProto) -> dict[str, str]:
    """Kind of every initializer of ``graph``: the label of the first labelled node that uses it (directly
    or through a Transpose / Cast / Reshape), else ``other``."""
    consumers = _consumers(graph)
    kinds: dict[str, str] = {}
    for t in graph.initializer:
        kind = "other"
        for node in _users(t.name, consumers):
            found = node_kind(node)
            if found is not None:
                kind = found
                break
        kinds[t.name] = kind
    return kinds


#: the inputs of ORT's block-quantized ops that hold a quantized weight's pieces (data, scales, zero points)
_BLOCK_INPUTS = {"MatMulNBits": (1, 2, 3), "GatherBlockQuantized": (0, 2, 3)}


def _format(t: onnx.TensorProto, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    """``int4`` / ``int8`` for the pieces of a block-quantized weight, else the tensor's element type."""
    for node in consumers.get(t.name, []):
        pieces = _BLOCK_INPUTS.get(node.op_type, ())
        if any(i < len(node.input) and node.input[i] == t.name for i in pieces):
            for a in node.attribute:
                if a.name == "bits":
                    return f"int{a.i}"
            return "int4"  # both ops' default
    name = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, name)


def bytes_by_kind(graph: onnx.GraphProto) -> dict[str, dict[str, int]]:
    """Bytes of ``graph``'s weights: ``{kind: {format: bytes}}`` for the kinds present, in :data:`KINDS`
    order; formats ``fp32``, ``fp16``, ``int8``, ``int4`` (data, scales and zero points of a block-quantized
    weight together), or the element type of other constants (``int64``...)."""
    kinds = initializer_kinds(graph)
    consumers = _consumers(graph)
    out: dict[str, dict[str, int]] = {}
    for t in graph.initializer:
        per = out.setdefault(kinds[t.name], {})
        fmt = _format(t, consumers)
        per[fmt] = per.get(fmt, 0) + initializer_bytes(t)
    return {k: out[k] for k in KINDS if k in out}


def dense_bytes_by_kind(graph_file: str | Path) -> dict[str, dict[str, int]]:
    """:func:`bytes_by_kind` of one graph file (its weights' bytes, without loading external data)."""
    try:
        model = onnx.load(str(graph_file), load_external_data=False)
    except (ValueError, DecodeError) as exc:
        why = str(exc) or "ends early"
        raise ValueError(f"{graph_file}: not a valid ONNX model (truncated or corrupt: {why}); export the "
                         "bundle again") from None
    return bytes_by_kind(model.graph)
