"""ONNX schemas of the ``edgemoe::OffloadedExpert``, ``edgemoe::TokenPrefetch``, ``edgemoe::CacheAwareTopK``
and ``edgemoe::ResidualPrefetch`` nodes (docs/op-contract.md).

The schemas only exist host-side, so that onnx / onnxscript know the nodes' inputs and attributes while the
graph is built and checked (without them the dynamo exporter fails with "Attribute OffloadedExpert not
found"). ONNX Runtime never sees them: the ops themselves live in ``libedgemoe_customops.so``.

``OffloadedExpert`` has two versions: 1 (``X``, ``topk_indices``, ``topk_weights``; what the tracer emits) and
2, which adds the optional input 3 ``next_router_logits``. ``TokenPrefetch`` (since version 2) is the identity
on the graph's int64 token ids, placed before the embedding. Both opset-2 additions are wired after tracing by
:func:`edgemoe_ort.bundle.wiring.wire_prefetch_inputs`. ``CacheAwareTopK`` (since version 3) replaces each
router's selection step; :func:`edgemoe_ort.bundle.routing.wire_routing` wires it. ``ResidualPrefetch``
(since version 4) is the identity on the residual stream entering an MoE layer, with that layer's router
scores on it as a second input; :func:`edgemoe_ort.bundle.residual.wire_residual` wires it.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

DOMAIN = "edgemoe"
OP_TYPE = "OffloadedExpert"
TOKEN_OP_TYPE = "TokenPrefetch"
OPSET_VERSION = 1  # the version the tracer emits (3 inputs)
PREFETCH_OPSET_VERSION = 2  # OffloadedExpert + optional input 3 (next_router_logits); TokenPrefetch
ROUTING_OP_TYPE = "CacheAwareTopK"
ROUTING_OPSET_VERSION = 3  # CacheAwareTopK
RESIDUAL_OP_TYPE = "ResidualPrefetch"
RESIDUAL_OPSET_VERSION = 4  # ResidualPrefetch
MANIFEST_DEFAULT = "manifest.json"
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")


def _attr(name: str, kind: OpSchema.AttrType, doc: str, default: object | None = None) -> OpSchema.Attribute:
    if default is None:
        return OpSchema.Attribute(name, kind, doc, required=True)
    return OpSchema.Attribute(name, default, doc)


def _manifest_attr(doc: str) -> OpSchema.Attribute:
    """The ``manifest`` attribute every op of the domain has (default ``manifest.json``)."""
    default = onnx.helper.make_attribute("manifest", MANIFEST_DEFAULT)
    return _attr("manifest", OpSchema.AttrType.STRING, doc, default)


def build_schema(version: int = OPSET_VERSION) -> OpSchema:
    """The ``OpSchema`` of ``edgemoe.OffloadedExpert`` ``version`` (1, or 2 with the optional input 3)."""
    if version not in (OPSET_VERSION, PREFETCH_OPSET_VERSION):
        raise ValueError(f"OffloadedExpert schema version {version!r}: expected 1 or 2")
    t = OpSchema.AttrType
    inputs = [
        OpSchema.FormalParameter("X", "T", "hidden states [..., H]"),
        OpSchema.FormalParameter("topk_indices", "tensor(int64)", "selected experts [..., K]; -1 = none"),
        OpSchema.FormalParameter("topk_weights", "T", "routing weights [..., K]"),
    ]
    if version >= PREFETCH_OPSET_VERSION:
        inputs.append(
            OpSchema.FormalParameter(
                "next_router_logits",
                "T",
                "[T, P, E]: row j = raw router logits of manifest layer layer+1+j on this node's X",
                param_option=OpSchema.FormalParameterOption.Optional,
            )
        )
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        version,
        "Routed experts of one MoE layer, streamed from the bundle's expert store: "
        "Y[t] = sum_k topk_weights[t,k] * expert_{layer, topk_indices[t,k]}(X[t]); index -1 contributes 0.",
        inputs=inputs,
        outputs=[OpSchema.FormalParameter("Y", "T", "weighted sum of the selected experts' outputs")],
        type_constraints=[("T", ["tensor(float)"], "float32 activations")],
        attributes=[
            _attr("layer", t.INT, "index into the manifest's layers"),
            _attr("num_experts", t.INT, "experts of that layer"),
            _attr("top_k", t.INT, "K"),
            _attr("activation", t.STRING, "silu | gelu | gelu_tanh | relu | swiglu_oai"),
            _attr("gated", t.INT, "1: act(gate)*up, 0: act(up)"),
            _manifest_attr("manifest path relative to the bundle"),
            _attr("alpha", t.FLOAT, "swiglu_oai alpha", onnx.helper.make_attribute("alpha", SWIGLU_ALPHA)),
            _attr("limit", t.FLOAT, "swiglu_oai limit", onnx.helper.make_attribute("limit", SWIGLU_LIMIT)),
        ],
    )


def _identity_inference(ctx: onnx.shape_inference.InferenceContext) -> None:
    t = ctx.get_input_type(0)
    if t is not None:
        ctx.set_output_type(0, t)


def build_token_prefetch_schema() -> OpSchema:
    """The ``OpSchema`` of ``edgemoe.TokenPrefetch`` (since version 2): ``ids' = TokenPrefetch(ids)``, output
    type and shape = the input's (when this onnx lets Python define shape inference)."""
    schema = OpSchema(
        TOKEN_OP_TYPE,
        DOMAIN,
        PREFETCH_OPSET_VERSION,
        "The identity on int64 token ids of any shape; hands them to the expert store's prefetcher "
        "(placed between the graph input input_ids and its consumers, so it runs before the embedding).",
        inputs=[OpSchema.FormalParameter("token_ids", "tensor(int64)", "token ids, any shape")],
        outputs=[OpSchema.FormalParameter("token_ids_out", "tensor(int64)", "the same ids, same shape")],
        attributes=[
            _manifest_attr("manifest path relative to the bundle (the OffloadedExpert nodes' store)"),
        ],
    )
    if hasattr(schema, "set_type_and_shape_inference_function"):
        schema.set_type_and_shape_inference_function(_identity_inference)
    return schema


def build_routing_schema() -> OpSchema:
    """The ``OpSchema`` of ``edgemoe.CacheAwareTopK`` (since version 3): ``Values, Indices = CacheAwareTopK(X,
    K)`` over the last axis, as ONNX TopK (largest, sorted) under ``edgemoe.routing = exact``."""
    t = OpSchema.AttrType
    return OpSchema(
        ROUTING_OP_TYPE,
        DOMAIN,
        ROUTING_OPSET_VERSION,
        "The top-k step of one MoE layer's router, chosen with the layer's expert cache in view under the "
        "session's edgemoe.routing rule; Values are the unbiased scores of the chosen experts.",
        inputs=[
            OpSchema.FormalParameter("X", "tensor(float)", "router scores [..., E]"),
            OpSchema.FormalParameter("K", "tensor(int64)", "[1]: the layer's top_k"),
        ],
        outputs=[
            OpSchema.FormalParameter("Values", "tensor(float)", "scores of the chosen experts [..., K]"),
            OpSchema.FormalParameter("Indices", "tensor(int64)", "the chosen experts [..., K]"),
        ],
        attributes=[
            _attr("layer", t.INT, "index into the manifest's layers"),
            _attr("scores", t.STRING, "probs (a softmax output) | logits"),
            _manifest_attr("manifest path relative to the bundle (the OffloadedExpert nodes' store)"),
        ],
    )


def build_residual_schema() -> OpSchema:
    """The ``OpSchema`` of ``edgemoe.ResidualPrefetch`` (since version 4): ``h' = ResidualPrefetch(h,
    scores)``, the identity on ``h`` (output type and shape = ``h``'s, when this onnx lets Python define
    shape inference)."""
    t = OpSchema.AttrType
    schema = OpSchema(
        RESIDUAL_OP_TYPE,
        DOMAIN,
        RESIDUAL_OPSET_VERSION,
        "The identity on the residual stream h entering MoE layer `layer`; hands `scores` (that layer's "
        "router softmax on h) to the expert store's prefetcher (placed between h and all its readers, so it "
        "runs before the layer's attention).",
        inputs=[
            OpSchema.FormalParameter("h", "tensor(float)", "the residual stream [..., H]"),
            OpSchema.FormalParameter("scores", "tensor(float)", "the layer's router softmax on h [T, E]"),
        ],
        outputs=[OpSchema.FormalParameter("h_out", "tensor(float)", "the same h, same shape")],
        attributes=[
            _attr("layer", t.INT, "index into the manifest's layers: the MoE layer the scores are of"),
            _manifest_attr("manifest path relative to the bundle (the OffloadedExpert nodes' store)"),
        ],
    )
    if hasattr(schema, "set_type_and_shape_inference_function"):
        schema.set_type_and_shape_inference_function(_identity_inference)
    return schema


def _registered(op_type: str, version: int) -> bool:
    return (
        onnx.defs.has(op_type, version, DOMAIN)
        and onnx.defs.get_schema(op_type, version, DOMAIN).since_version == version
    )


def register_schema() -> None:
    """Register the schemas with onnx once per process (idempotent): ``OffloadedExpert`` 1 and 2,
    ``TokenPrefetch`` 2, ``CacheAwareTopK`` 3, ``ResidualPrefetch`` 4."""
    for version in (OPSET_VERSION, PREFETCH_OPSET_VERSION):
        if not _registered(OP_TYPE, version):
            onnx.defs.register_schema(build_schema(version))
    if not _registered(TOKEN_OP_TYPE, PREFETCH_OPSET_VERSION):
        onnx.defs.register_schema(build_token_prefetch_schema())
    if not _registered(ROUTING_OP_TYPE, ROUTING_OPSET_VERSION):
        onnx.defs.register_schema(build_routing_schema())
    if not _registered(RESIDUAL_OP_TYPE, RESIDUAL_OPSET_VERSION):
        onnx.defs.register_schema(build_residual_schema())
