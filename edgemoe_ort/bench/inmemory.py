"""Bundle → "all experts in memory" graph for ONNX Runtime alone: the baseline of the benchmarks.

Every ``edgemoe.OffloadedExpert`` node of a bundle graph is replaced by ORT's own contrib op with all of the
layer's experts as initializers, so ORT runs the model with its MLAS kernels and no custom-op library:

- int4 / int8 layers (one format and group size for the whole layer, group size a power of two >= 16 that
  divides ``hidden`` and ``intermediate``) → ``com.microsoft.QMoE`` with ``block_size = group_size`` and the
  bundle's own quantized bytes, scales (f16 → f32, exact) and zero points. QMoE's dequantization
  ``(q - zero_point) * scale`` equals the bundle's ``asym_u`` formula, so the weights are bit-identical
  (no requantization). int8 QMoE uses int8 activations on CPU (ORT has no fp32 int8 kernel), so int8
  outputs differ from ours by activation rounding.
- anything else (fp32, fp16, mixed formats in a layer, unsupported group size) → ``com.microsoft.MoE`` with
  the dequantized fp32 weights (fp16 → fp32 is exact).

Routing. QMoE/MoE take per-token router scores over all experts and do their own top-k. The graph keeps the
dense model's ``topk_indices``/``topk_weights`` and builds, with ScatterElements:

- QMoE: ``router_probs`` = ``K - slot`` at the selected experts and -1e4 elsewhere (top-k then selects exactly
  our experts), and ``router_weights`` = our weights scattered at the selected experts (QMoE mixes with
  ``router_weights`` when given; ``normalize_routing_weights = 0``).
- MoE (no ``router_weights`` input): ``router_probs`` = ``log(w)`` at the selected experts and -1e30
  elsewhere with ``normalize_routing_weights = 1``, so ORT's softmax over the top-k gives ``w / sum(w)``; the
  output is multiplied by ``sum(w)`` per token, which restores ``w`` for any positive weights.

Limitation: an index of -1 ("no expert") is not supported by the converted graph (ScatterElements reads -1 as
the last expert); the dense graphs we export never emit it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgemoe_ort.bundle import Bundle

__all__ = ["convert_bundle_to_inmemory", "layer_plan", "ORT_ACTIVATION"]

#: our activation → (QMoE/MoE activation_type, alpha, beta, swiglu limit or None)
ORT_ACTIVATION = {
    ("silu", True): ("swiglu", 1.0, 0.0, None),
    ("swiglu_oai", True): ("swiglu", None, 1.0, None),  # alpha/limit from the node (defaults 1.702, 7.0)
    ("silu", False): ("silu", None, None, None),
    ("gelu", False): ("gelu", None, None, None),
    ("relu", False): ("relu", None, None, None),
}


def layer_plan(bundle: Bundle, layer: int) -> dict[str, Any]:
    """How layer ``layer`` is converted: ``{"op": "QMoE"|"MoE", "bits": 4|8|32, "group_size": g}``."""
    lay = bundle.layers[layer]
    H, inter = int(lay["hidden"]), int(lay["intermediate"])
    fmts = {
        (
            bundle.expert_record(layer, e)["format"]["dtype"],
            int(bundle.expert_record(layer, e)["format"]["group_size"]),
        )
        for e in range(int(lay["num_experts"]))
    }
    if len(fmts) == 1:
        dtype, gs = next(iter(fmts))
        if dtype in ("int4", "int8") and gs >= 16 and gs & (gs - 1) == 0 and H % gs == 0 and inter % gs == 0:
            return {"op": "QMoE", "bits": 4 if dtype == "int4" else 8, "group_size": gs}
    return {"op": "MoE", "bits": 32, "group_size": 0}


def _pack_zeros4(z: np.ndarray) -> np.ndarray:
    """u8 zero points [N, G] → 4-bit packed [N, ceil(G/2)], even index in the low nibble."""
    n, g = z.shape
    if g % 2:
        z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)


def _layer_initializers(
    bundle: Bundle, layer: int, plan: dict[str, Any], prefix: str
) -> dict[str, np.ndarray]:
    lay = bundle.layers[layer]
    E = int(lay["num_experts"])
    inits: dict[str, list[np.ndarray]] = {}

    def add(name: str, arr: np.ndarray) -> None:
        inits.setdefault(name, []).append(arr)

    inter = int(lay["intermediate"])
    # CPU QMoE/MoE only take interleaved SwiGLU (swiglu_fusion=1): rows [g0, u0, g1, u1, ...]; the bundle
    # stores [gate | up]. Reordering rows (with their scales / zero points / bias) changes no value.
    perm = (
        np.stack([np.arange(inter), inter + np.arange(inter)], axis=1).ravel()
        if bool(lay["gated"])
        else slice(None)
    )
    for e in range(E):
        if plan["op"] == "QMoE":
            t = bundle.read_expert(layer, e, verify=True)
            for w, fc in (("w_in", "fc1"), ("w_out", "fc2")):
                rows = perm if w == "w_in" else slice(None)
                add(f"{fc}_experts_weights", np.ascontiguousarray(t[w][rows]))
                add(f"{fc}_scales", t[f"{w}.scales"][rows].astype(np.float32))
                z = np.ascontiguousarray(t[f"{w}.zeros"][rows])
                add(f"{fc}_zero_points", _pack_zeros4(z) if plan["bits"] == 4 else z)
        else:
            w_in, w_out, _, _ = bundle.dequantized_expert(layer, e, verify=True)
            add("fc1_experts_weights", np.ascontiguousarray(w_in[perm], dtype=np.float32))
            add("fc2_experts_weights", np.ascontiguousarray(w_out, dtype=np.float32))
        _, _, b_in, b_out = bundle.expert_matrices(layer, e, verify=False)
        if b_in is not None:
            add("fc1_experts_bias", np.asarray(b_in, np.float32)[perm])
        if b_out is not None:
            add("fc2_experts_bias", np.asarray(b_out, np.float32))
    return {f"{prefix}{k}": np.stack(v) for k, v in inits.items()}


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _replace_node(
    bundle: Bundle, node: onnx.NodeProto, idx: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], dict[str, Any]]:
    a = _attrs(node)
    layer = int(a["layer"])
    K = int(a["top_k"])
    lay = bundle.layers[layer]
    E, H = int(lay["num_experts"]), int(lay["hidden"])
    gated, act = bool(lay["gated"]), str(lay["activation"])
    key = (act, gated)
    if key not in ORT_ACTIVATION:
        raise ValueError(
            f"{bundle.path}: layer {layer}: activation {act!r} (gated={gated}) has no ORT MoE/QMoE equivalent"
        )
    plan = layer_plan(bundle, layer)
    p = f"edgemoe_inmem_{idx}_"
    X, I_, W = node.input[0], node.input[1], node.input[2]
    Y = node.output[0]
    nodes: list[onnx.NodeProto] = []
    consts: dict[str, np.ndarray] = {
        f"{p}shape_x2": np.array([-1, H], np.int64),
        f"{p}shape_k2": np.array([-1, K], np.int64),
        f"{p}zero1": np.array([0], np.int64),
        f"{p}one1": np.array([1], np.int64),
        f"{p}E1": np.array([E], np.int64),
        f"{p}rank": (K - np.arange(K, dtype=np.float32)).reshape(1, K),
        f"{p}neg": np.array([-1e4 if plan["op"] == "QMoE" else -1e30], np.float32),
        f"{p}zerof": np.array([0.0], np.float32),
        f"{p}tiny": np.array(1e-30, np.float32),
    }
    mk = helper.make_node
    nodes += [
        mk("Shape", [X], [f"{p}xshape"]),
        mk("Reshape", [X, f"{p}shape_x2"], [f"{p}x2"]),
        mk("Reshape", [I_, f"{p}shape_k2"], [f"{p}i2"]),
        mk("Reshape", [W, f"{p}shape_k2"], [f"{p}w2"]),
        mk("Shape", [f"{p}i2"], [f"{p}ishape"]),
        mk("Slice", [f"{p}ishape", f"{p}zero1", f"{p}one1"], [f"{p}T1"]),
        mk("Concat", [f"{p}T1", f"{p}E1"], [f"{p}TE"], axis=0),
        mk("Expand", [f"{p}neg", f"{p}TE"], [f"{p}negTE"]),
    ]
    inits = _layer_initializers(bundle, layer, plan, p)
    name_of = {k[len(p) :]: k for k in inits}
    opt = lambda k: name_of.get(k, "")  # noqa: E731
    at: dict[str, Any] = {"k": K}
    ort_act, alpha, beta, limit = ORT_ACTIVATION[key]
    at["activation_type"] = ort_act
    if ort_act == "swiglu":
        at["swiglu_fusion"] = 1  # interleaved gate/up rows (the only layout ORT's CPU kernels take)
        at["activation_alpha"] = float(a.get("alpha", 1.702)) if alpha is None else alpha
        at["activation_beta"] = beta
        if act == "swiglu_oai":
            at["swiglu_limit"] = float(a.get("limit", 7.0))
    if plan["op"] == "QMoE":
        nodes += [
            mk("Expand", [f"{p}rank", f"{p}ishape"], [f"{p}rankTK"]),
            mk("ScatterElements", [f"{p}negTE", f"{p}i2", f"{p}rankTK"], [f"{p}sel"], axis=1),
            mk("Expand", [f"{p}zerof", f"{p}TE"], [f"{p}zeroTE"]),
            mk("ScatterElements", [f"{p}zeroTE", f"{p}i2", f"{p}w2"], [f"{p}rw"], axis=1),
        ]
        ins = [
            f"{p}x2",
            f"{p}sel",
            opt("fc1_experts_weights"),
            opt("fc1_scales"),
            opt("fc1_experts_bias"),
            opt("fc2_experts_weights"),
            opt("fc2_scales"),
            opt("fc2_experts_bias"),
            "",
            "",
            "",
            opt("fc1_zero_points"),
            opt("fc2_zero_points"),
            "",
            f"{p}rw",
        ]
        at.update(
            expert_weight_bits=plan["bits"],
            block_size=plan["group_size"],
            normalize_routing_weights=0,
            quant_type="int",
            accuracy_level=0,
        )
        nodes.append(mk("QMoE", ins, [f"{p}y2"], domain="com.microsoft", name=f"{node.name}_qmoe", **at))
        y2 = f"{p}y2"
    else:
        nodes += [
            mk("Max", [f"{p}w2", f"{p}tiny"], [f"{p}wpos"]),
            mk("Log", [f"{p}wpos"], [f"{p}logw"]),
            mk("ScatterElements", [f"{p}negTE", f"{p}i2", f"{p}logw"], [f"{p}sel"], axis=1),
            mk("ReduceSum", [f"{p}w2", f"{p}one1"], [f"{p}wsum"], keepdims=1),
        ]
        ins = [
            f"{p}x2",
            f"{p}sel",
            opt("fc1_experts_weights"),
            opt("fc1_experts_bias"),
            opt("fc2_experts_weights"),
            opt("fc2_experts_bias"),
        ]
        at.update(normalize_routing_weights=1)
        nodes.append(mk("MoE", ins, [f"{p}ym"], domain="com.microsoft", name=f"{node.name}_moe", **at))
        nodes.append(mk("Mul", [f"{p}ym", f"{p}wsum"], [f"{p}y2"]))
        y2 = f"{p}y2"
    nodes.append(mk("Reshape", [y2, f"{p}xshape"], [Y]))
    used = {i for nd in nodes for i in nd.input}
    tensors = [numpy_helper.from_array(v, k) for k, v in {**consts, **inits}.items() if k in used]
    info = {"layer": layer, **plan, "initializer_bytes": int(sum(v.nbytes for v in inits.values()))}
    return nodes, tensors, info


def convert_bundle_to_inmemory(
    bundle_dir: str | Path, out_path: str | Path, *, role: str = "decoder"
) -> dict[str, Any]:
    """Write ``out_path`` (an ONNX file + ``<name>.data``): the bundle's ``role`` graph with every
    OffloadedExpert node replaced by QMoE/MoE holding all experts, a TokenPrefetch or ResidualPrefetch by
    Identity (on its first input: ORT then drops the residual scores' nodes) and a CacheAwareTopK by TopK
    (its ``exact`` rule). Returns a report (per-layer plan, bytes)."""
    bundle = Bundle.open(bundle_dir)
    model = onnx.load(str(bundle.graph_path(role)), load_external_data=True)
    g = model.graph
    new_nodes: list[onnx.NodeProto] = []
    layers = []
    n = 0
    for node in g.node:
        if node.op_type == "OffloadedExpert" and node.domain == "edgemoe":
            nodes, tensors, info = _replace_node(bundle, node, n)
            new_nodes.extend(nodes)
            g.initializer.extend(tensors)
            layers.append(info)
            n += 1
        elif node.op_type == "TokenPrefetch" and node.domain == "edgemoe":  # the identity on the ids
            new_nodes.append(helper.make_node("Identity", list(node.input), list(node.output),
                                              name=node.name))
        elif node.op_type == "ResidualPrefetch" and node.domain == "edgemoe":  # the identity on h
            new_nodes.append(helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name))
        elif node.op_type == "CacheAwareTopK" and node.domain == "edgemoe":
            # nothing is cached: the exact rule, which is ONNX TopK (largest, sorted, last axis) bit for bit
            new_nodes.append(helper.make_node("TopK", list(node.input), list(node.output), name=node.name,
                                              axis=-1, largest=1, sorted=1))
        else:
            new_nodes.append(node)
    if n == 0:
        raise ValueError(f"{bundle.graph_path(role)}: no edgemoe.OffloadedExpert node to convert")
    del g.node[:]
    g.node.extend(new_nodes)
    opsets = [o for o in model.opset_import if o.domain not in ("edgemoe", "com.microsoft")]
    del model.opset_import[:]
    model.opset_import.extend(opsets + [helper.make_opsetid("com.microsoft", 1)])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.with_name(out.name + ".data")
    for f in (out, data):
        if f.exists():
            f.unlink()
    onnx.save_model(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    # copy the tokenizer alongside for convenience (not needed to run)
    tok = bundle.tokenizer_path
    if tok is not None and tok.is_dir() and not (out.parent / "tokenizer").exists():
        shutil.copytree(tok, out.parent / "tokenizer")
    return {
        "model": str(out),
        "layers": layers,
        "expert_bytes": int(sum(li["initializer_bytes"] for li in layers)),
        "ops": sorted({li["op"] for li in layers}),
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m edgemoe_ort.bench.inmemory BUNDLE OUT.onnx``: write the all-in-memory graph."""
    import json
    import sys

    a = argv or sys.argv[1:]
    if len(a) != 2:
        raise SystemExit("usage: python -m edgemoe_ort.bench.inmemory BUNDLE OUT.onnx")
    print(json.dumps(convert_bundle_to_inmemory(a[0], a[1]), indent=1))


if __name__ == "__main__":
    main()
