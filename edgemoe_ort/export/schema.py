"""ONNX schema of the ``edgemoe::OffloadedExpert`` node (docs/op-contract.md).

The schema only exists host-side, so that onnx / onnxscript know the node's inputs and attributes while the
graph is built and checked (without it the dynamo exporter fails with "Attribute OffloadedExpert not found").
ONNX Runtime never sees it: the op itself lives in ``libedgemoe_customops.so``.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

DOMAIN = "edgemoe"
OP_TYPE = "OffloadedExpert"
OPSET_VERSION = 1
MANIFEST_DEFAULT = "manifest.json"
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")


def _attr(name: str, kind: OpSchema.AttrType, doc: str, default: object | None = None) -> OpSchema.Attribute:
    if default is None:
        return OpSchema.Attribute(name, kind, doc, required=True)
    return OpSchema.Attribute(name, default, doc)


def build_schema() -> OpSchema:
    """The ``OpSchema`` of ``edgemoe.OffloadedExpert`` version 1."""
    t = OpSchema.AttrType
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        OPSET_VERSION,
        "Routed experts of one MoE layer, streamed from the bundle's expert store: "
        "Y[t] = sum_k topk_weights[t,k] * expert_{layer, topk_indices[t,k]}(X[t]); index -1 contributes 0.",
        inputs=[
            OpSchema.FormalParameter("X", "T", "hidden states [..., H]"),
            OpSchema.FormalParameter("topk_indices", "tensor(int64)", "selected experts [..., K]; -1 = none"),
            OpSchema.FormalParameter("topk_weights", "T", "routing weights [..., K]"),
        ],
        outputs=[OpSchema.FormalParameter("Y", "T", "weighted sum of the selected experts' outputs")],
        type_constraints=[("T", ["tensor(float)"], "float32 activations")],
        attributes=[
            _attr("layer", t.INT, "index into the manifest's layers"),
            _attr("num_experts", t.INT, "experts of that layer"),
            _attr("top_k", t.INT, "K"),
            _attr("activation", t.STRING, "silu | gelu | gelu_tanh | relu | swiglu_oai"),
            _attr("gated", t.INT, "1: act(gate)*up, 0: act(up)"),
            _attr(
                "manifest",
                t.STRING,
                "manifest path relative to the bundle",
                onnx.helper.make_attribute("manifest", MANIFEST_DEFAULT),
            ),
            _attr("alpha", t.FLOAT, "swiglu_oai alpha", onnx.helper.make_attribute("alpha", SWIGLU_ALPHA)),
            _attr("limit", t.FLOAT, "swiglu_oai limit", onnx.helper.make_attribute("limit", SWIGLU_LIMIT)),
        ],
    )


def register_schema() -> None:
    """Register the schema with onnx once per process (idempotent)."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    onnx.defs.register_schema(build_schema())
