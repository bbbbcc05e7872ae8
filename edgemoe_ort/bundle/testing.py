"""Test fixtures: synthetic bundles with an ``OffloadedExpert`` graph, and a numpy reference of the op.

The reference runs on the *dequantized* weights stored in the bundle (exactly what the C++ kernels see), with
float64 accumulation, so an op output can be compared with a tight tolerance whatever the expert formats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .format import MANIFEST
from .reader import Bundle
from .writer import BundleWriter

__all__ = [
    "reader_errors",
    "make_synthetic_bundle",
    "make_moe_graph",
    "reference_moe",
    "reference_chain",
    "reference_expert",
    "random_routing",
    "activation",
    "subgraph_between",
]

DTypeSpec = str | Sequence[str] | Sequence[Sequence[str]] | Callable[[int, int], str]


def _dtype_for(spec: DTypeSpec, layer: int, expert: int) -> str:
    if isinstance(spec, str):
        return spec
    if callable(spec):
        return spec(layer, expert)
    item = spec[expert] if not isinstance(spec[0], (list, tuple)) else spec[layer][expert]
    return str(item)


def make_moe_graph(
    layers: Sequence[dict[str, Any]],
    *,
    manifest: str = MANIFEST,
    alpha: float | None = None,
    limit: float | None = None,
    lookahead: int = 0,
    token_ids: bool = False,
) -> onnx.ModelProto:
    """A graph chaining one ``OffloadedExpert`` node per MoE layer.

    Inputs ``X`` float ``[T, H]`` (``T`` dynamic) and, per layer ``l``, ``topk_indices_{l}`` int64 ``[T, K]``
    and ``topk_weights_{l}`` float ``[T, K]``; output ``Y`` float ``[T, H]``.
    ``Y_l = OffloadedExpert(Y_{l-1}, topk_indices_l, topk_weights_l)`` with ``Y_{-1} = X``.

    ``lookahead`` > 0 adds, after those, an input ``next_logits_{l}`` float ``[T, P_l, E]`` wired as input 3
    (``next_router_logits``) of every node that has a later layer: ``P_l = min(lookahead, later layers)``,
    lowered where a later layer's ``num_experts`` differs from the next layer's, ``E`` = the next layer's
    ``num_experts``. ``token_ids`` adds an input ``token_ids`` int64 ``[T]``, a ``TokenPrefetch`` node reading
    it, first in the node list (``manifest`` as the other nodes), and that node's output as an extra graph
    output ``token_ids_out`` (so that ORT keeps the node). Either one makes the graph import
    ``("edgemoe", 2)``; the defaults give the opset-1 graph.
    """
    if not layers:
        raise ValueError("make_moe_graph needs at least one layer")
    if lookahead < 0:
        raise ValueError(f"lookahead must be >= 0, found {lookahead}")
    hidden = int(layers[0]["hidden"])
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", hidden])]
    extra_inputs = []
    nodes = []
    prev = "X"
    for i, lay in enumerate(layers):
        if int(lay["hidden"]) != hidden:
            raise ValueError(f"layer {i}: hidden {lay['hidden']} != {hidden} of layer 0")
        k = int(lay["top_k"])
        li = int(lay.get("layer", i))
        inputs.append(helper.make_tensor_value_info(f"topk_indices_{li}", TensorProto.INT64, ["T", k]))
        inputs.append(helper.make_tensor_value_info(f"topk_weights_{li}", TensorProto.FLOAT, ["T", k]))
        out = "Y" if i == len(layers) - 1 else f"Y_{li}"
        attrs: dict[str, Any] = {
            "layer": li,
            "num_experts": int(lay["num_experts"]),
            "top_k": k,
            "activation": str(lay["activation"]),
            "gated": int(bool(lay["gated"])),
            "manifest": manifest,
        }
        if lay["activation"] == "swiglu_oai":
            if alpha is not None:
                attrs["alpha"] = float(alpha)
            if limit is not None:
                attrs["limit"] = float(limit)
        node_inputs = [prev, f"topk_indices_{li}", f"topk_weights_{li}"]
        later = layers[i + 1 : i + 1 + lookahead]
        if later:
            e = int(later[0]["num_experts"])
            p = next((j for j, nxt in enumerate(later) if int(nxt["num_experts"]) != e), len(later))
            name = f"next_logits_{li}"
            extra_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["T", p, e]))
            node_inputs.append(name)
        nodes.append(
            helper.make_node(
                "OffloadedExpert", node_inputs, [out], name=f"moe_{li}", domain="edgemoe", **attrs
            )
        )
        prev = out
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", hidden])]
    if token_ids:
        extra_inputs.append(helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["T"]))
        outputs.append(helper.make_tensor_value_info("token_ids_out", TensorProto.INT64, ["T"]))
        token_node = helper.make_node(
            "TokenPrefetch",
            ["token_ids"],
            ["token_ids_out"],
            name="token_prefetch",
            domain="edgemoe",
            manifest=manifest,
        )
        nodes.insert(0, token_node)
    graph = helper.make_graph(nodes, "edgemoe_synthetic", inputs + extra_inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgemoe", 2 if extra_inputs else 1)],
        producer_name="edgemoe-ort-testing",
    )
    model.ir_version = 8  # opset 17's IR version: loadable by every ORT we support
    return model


def make_synthetic_bundle(
    path: str | Path,
    *,
    num_layers: int = 1,
    num_experts: int = 8,
    top_k: int = 2,
    hidden: int = 64,
    intermediate: int = 96,
    dtype: DTypeSpec = "fp32",
    group_size: int = 32,
    gated: bool = True,
    activation: str = "silu",
    bias: bool = False,
    seed: int = 0,
    family: str = "synthetic",
    force: bool = False,
    lookahead: int = 0,
    token_ids: bool = False,
    twin: str | None = None,
) -> Bundle:
    """Write a bundle of random experts (weights ~ N(0, 1/sqrt(in))) plus a ``model.onnx`` chaining one
    ``OffloadedExpert`` node per layer (see :func:`make_moe_graph`, which gets ``lookahead`` and
    ``token_ids``). Returns the opened bundle. ``twin``: add a low-bit twin of every expert in that format
    (the same random primaries as without, for the same ``seed``).

    ``dtype``: one format for every expert; a list indexed by expert (same for every layer); a list of
    lists indexed ``[layer][expert]``; or a callable ``(layer, expert) -> dtype``.
    """
    rng = np.random.default_rng(seed)
    rows_in = 2 * intermediate if gated else intermediate
    with BundleWriter(path, family=family, config={}, force=force) as w:
        for li in range(num_layers):
            w.add_layer(
                li,
                num_experts=num_experts,
                top_k=top_k,
                hidden=hidden,
                intermediate=intermediate,
                gated=gated,
                activation=activation,
            )
            for e in range(num_experts):
                w_in = (rng.standard_normal((rows_in, hidden)) / math.sqrt(hidden)).astype(np.float32)
                w_out = (rng.standard_normal((hidden, intermediate)) / math.sqrt(intermediate)).astype(
                    np.float32
                )
                b_in = b_out = None
                if bias:
                    b_in = (0.1 * rng.standard_normal(rows_in)).astype(np.float32)
                    b_out = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
                w.add_expert(
                    li,
                    e,
                    w_in,
                    w_out,
                    dtype=_dtype_for(dtype, li, e),
                    group_size=group_size,
                    b_in=b_in,
                    b_out=b_out,
                )
                if twin is not None:
                    w.add_expert(li, e, w_in, w_out, dtype=twin, group_size=group_size, b_in=b_in,
                                 b_out=b_out, variant=1)
        layers = [
            dict(
                num_experts=num_experts,
                top_k=top_k,
                hidden=hidden,
                intermediate=intermediate,
                gated=gated,
                activation=activation,
                layer=li,
            )
            for li in range(num_layers)
        ]
        w.add_graph("decoder", make_moe_graph(layers, lookahead=lookahead, token_ids=token_ids))
    return Bundle.open(path)


# -- numpy reference of the op -----------------------------------------------------------------------------
_erf = np.vectorize(math.erf, otypes=[np.float64])


def reader_errors(bundle_dir: str | Path) -> tuple[str | None, str | None]:
    """What both readers say of ``bundle_dir``: (the Python reader's BundleError message, the native reader's
    session-creation error), each None if that reader accepts the bundle."""
    from edgemoe_ort.runtime import ops

    from .errors import BundleError

    b = Path(bundle_dir)
    py_err = native_err = None
    try:
        Bundle.open(b)
    except BundleError as e:
        py_err = str(e)
    try:
        ops.open_session(b / "model.onnx", b)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        native_err = str(e)
    return py_err, native_err


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def activation(name: str, x: np.ndarray) -> np.ndarray:
    """Elementwise activation of a non-gated expert, or of the gate of a gated one (float64)."""
    x = np.asarray(x, dtype=np.float64)
    if name == "silu":
        return x * _sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(
        f"unknown activation {name!r} (swiglu_oai is gated-only and handled by reference_expert)"
    )


def reference_expert(
    x: np.ndarray,
    w_in: np.ndarray,
    w_out: np.ndarray,
    b_in: np.ndarray | None,
    b_out: np.ndarray | None,
    *,
    intermediate: int,
    gated: bool,
    act: str,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> np.ndarray:
    """One expert on tokens ``x [n, H]`` in float64: ``w_out · h(w_in · x + b_in) + b_out``."""
    x = np.asarray(x, dtype=np.float64)
    a = x @ np.asarray(w_in, dtype=np.float64).T
    if b_in is not None:
        a = a + np.asarray(b_in, dtype=np.float64)
    if gated:
        gate, up = a[:, :intermediate], a[:, intermediate:]
        if act == "swiglu_oai":
            g = np.minimum(gate, limit)
            u = np.clip(up, -limit, limit)
            h = (u + 1.0) * g * _sigmoid(alpha * g)
        else:
            h = activation(act, gate) * up
    else:
        if act == "swiglu_oai":
            raise ValueError("swiglu_oai needs gated=True")
        h = activation(act, a)
    y = h @ np.asarray(w_out, dtype=np.float64).T
    if b_out is not None:
        y = y + np.asarray(b_out, dtype=np.float64)
    return y


def reference_moe(
    bundle: Bundle,
    layer: int,
    X: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray,
    *,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> np.ndarray:
    """Numpy reference of ``OffloadedExpert`` for manifest layer ``layer`` (float64 result, shape of ``X``).

    ``Y[t] = sum_k weights[t, k] * expert_{indices[t, k]}(X[t])`` on the bundle's dequantized weights;
    an index of -1 contributes 0, any other index outside ``[0, num_experts)`` raises ValueError.
    """
    lay = bundle.layers[layer]
    hidden, inter, ne = int(lay["hidden"]), int(lay["intermediate"]), int(lay["num_experts"])
    X = np.asarray(X)
    if X.shape[-1] != hidden:
        raise ValueError(f"X: expected last dim {hidden}, found shape {X.shape}")
    lead = X.shape[:-1]
    idx = np.asarray(indices, dtype=np.int64)
    wts = np.asarray(weights, dtype=np.float64)
    if idx.shape[:-1] != lead or wts.shape != idx.shape:
        raise ValueError(f"indices {idx.shape} / weights {wts.shape} do not match X {X.shape}")
    x2 = X.reshape(-1, hidden).astype(np.float64)
    k = idx.shape[-1]
    idx2 = idx.reshape(-1, k)
    w2 = wts.reshape(-1, k)
    bad = (idx2 != -1) & ((idx2 < 0) | (idx2 >= ne))
    if bad.any():
        t, s = np.argwhere(bad)[0]
        raise ValueError(f"layer {layer}: topk_indices[{t}, {s}] = {idx2[t, s]} outside [0, {ne}) and not -1")
    y = np.zeros_like(x2)
    for e in np.unique(idx2[idx2 >= 0]):
        tok, slot = np.nonzero(idx2 == e)
        w_in, w_out, b_in, b_out = bundle.dequantized_expert(layer, int(e))
        out = reference_expert(
            x2[tok],
            w_in,
            w_out,
            b_in,
            b_out,
            intermediate=inter,
            gated=bool(lay["gated"]),
            act=str(lay["activation"]),
            alpha=alpha,
            limit=limit,
        )
        np.add.at(y, tok, w2[tok, slot][:, None] * out)
    return y.reshape(X.shape)


def reference_chain(
    bundle: Bundle, X: np.ndarray, routing: Sequence[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Reference of the graph built by :func:`make_moe_graph`: layer ``l`` runs on the output of ``l - 1``
    with ``routing[l] = (topk_indices_l, topk_weights_l)``. Float64 throughout."""
    if len(routing) != len(bundle.layers):
        raise ValueError(
            f"routing: expected {len(bundle.layers)} (indices, weights) pairs, found {len(routing)}"
        )
    y = np.asarray(X, dtype=np.float64)
    for li, (idx, w) in enumerate(routing):
        y = reference_moe(bundle, li, y, idx, w)
    return y


def random_routing(
    T: int, E: int, K: int, rng: np.random.Generator | int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices int64 [T, K], weights float32 [T, K])``: K distinct experts per token, softmax weights."""
    if K > E:
        raise ValueError(f"top_k {K} > num_experts {E}")
    rng = np.random.default_rng(rng)
    idx = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    logits = rng.standard_normal((T, K))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return idx, p.astype(np.float32)


def chain_feeds(
    X: np.ndarray,
    routing: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    next_logits: dict[int, np.ndarray] | None = None,
    token_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Feeds of the :func:`make_moe_graph` chain: ``X``, ``topk_indices_L``, ``topk_weights_L``, and when
    given ``next_logits_L`` (``{layer: [T, P, E] float32}``) and ``token_ids`` (int64 ``[T]``)."""
    f = {"X": X}
    for li, (idx, w) in enumerate(routing):
        f[f"topk_indices_{li}"] = idx
        f[f"topk_weights_{li}"] = w
    for li, logits in (next_logits or {}).items():
        f[f"next_logits_{li}"] = logits
    if token_ids is not None:
        f["token_ids"] = token_ids
    return f


def subgraph_between(model: onnx.ModelProto, h: str, scores: str) -> onnx.ModelProto:
    """The nodes computing ``scores`` from ``h`` alone (and initializers), as a model ``h -> scores`` (e.g. a
    ``ResidualPrefetch`` node's scores from its residual stream). Fails (AssertionError, KeyError) if they
    read any other non-constant tensor or a node of another domain than ONNX's."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {i.name: i for i in model.graph.initializer}
    keep: dict[int, onnx.NodeProto] = {}
    stack = [scores]
    while stack:
        name = stack.pop()
        if name == h or name in consts:
            continue
        node = producer[name]  # KeyError: a graph input other than h
        assert node.domain == "", node
        if id(node) not in keep:
            keep[id(node)] = node
            stack.extend(i for i in node.input if i)
    order = [n for n in model.graph.node if id(n) in keep]
    used = {i for n in order for i in n.input}
    graph = helper.make_graph(
        order,
        "scores",
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(scores, TensorProto.FLOAT, None)],
        [t for name, t in consts.items() if name in used],
    )
    sub = helper.make_model(graph, opset_imports=[o for o in model.opset_import if o.domain == ""])
    sub.ir_version = model.ir_version
    return sub
