"""Prefetch wiring (edgemoe_ort.bundle.wiring): HOBBIT's stacked gates as OffloadedExpert input 3, token ids
through a TokenPrefetch node placed before their consumers (docs/op-contract.md, opset 2).

Part 1, torch-free: small graphs with routers of every shape the matcher knows (Gemm transB 0/1 with
alpha / beta / bias, MatMul with and without a bias Add), run with onnx.reference and stand-in ops.
Part 2, on exported bundles (default model, Mixtral, Qwen2-MoE, OLMoE, Switch): input 3 of node ``l`` equals
the routers of layers ``l+1..`` (weights taken from the torch model, not from the graph) on node ``l``'s X,
and the whole model's outputs are bit-identical in ORT before / after wiring, whatever the predictor and
budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from edgemoe_ort.bundle.residual import RESIDUAL_OP_TYPE, RESIDUAL_OPSET
from edgemoe_ort.bundle.routing import ROUTING_OPSET
from edgemoe_ort.bundle.testing import (
    chain_feeds,
    make_moe_graph,
    make_synthetic_bundle,
    random_routing,
)
from edgemoe_ort.bundle.wiring import PREFETCH_OPSET, find_router, wire_prefetch_inputs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "edgemoe-tiny-mixtral"
TOL = dict(rtol=1e-5, atol=1e-5)


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def _offloaded(m: onnx.ModelProto) -> dict[int, onnx.NodeProto]:
    out = {}
    for n in m.graph.node:
        if n.op_type == "OffloadedExpert":
            out[next(a.i for a in n.attribute if a.name == "layer")] = n
    return out


def _edgemoe_opset(m: onnx.ModelProto) -> int:
    return next(o.version for o in m.opset_import if o.domain == "edgemoe")


def _token_nodes(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.op_type == "TokenPrefetch" and n.domain == "edgemoe"]


def _readers(m: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if name in n.input]


def _check_token_prefetch(before: onnx.ModelProto, after: onnx.ModelProto, ids: str = "input_ids") -> str:
    """``after`` has one TokenPrefetch node, first, on graph input ``ids``, read instead of ``ids`` by every
    node that read it in ``before``; no OffloadedExpert has a 5th input. Returns the node's output."""
    (tp,) = _token_nodes(after)
    assert after.graph.node[0] == tp  # first: nothing can run before it
    assert list(tp.input) == [ids] and len(tp.output) == 1
    out = tp.output[0]
    first = next(n for n in after.graph.node if n.op_type == "OffloadedExpert")
    want = next((a.s for a in first.attribute if a.name == "manifest"), b"manifest.json")
    assert [(a.name, a.s) for a in tp.attribute] == [("manifest", want)]
    assert _readers(after, ids) == [tp]  # only the TokenPrefetch node still reads the graph input
    old = [n.name or n.output[0] for n in _readers(before, ids)]
    assert old and sorted(n.name or n.output[0] for n in _readers(after, out)) == sorted(old)
    info = {v.name: v for v in after.graph.value_info}
    assert info[out].type.tensor_type.elem_type == TensorProto.INT64
    assert all(len(n.input) <= 4 for n in _offloaded(after).values())  # input 4 no longer exists
    return out


# --- part 1: synthetic router graphs ----------------------------------------------------------------------


class OffloadedExpert(OpRun):
    """Stand-in for the C++ op in onnx.reference: a fixed function of (X, indices, weights) only."""

    op_domain = "edgemoe"

    def _run(self, x, idx, w, next_logits=None, **attrs):  # noqa: ANN001, ANN003, ANN202
        if next_logits is not None:
            assert next_logits.ndim == 3 and next_logits.shape[0] == int(np.prod(x.shape[:-1]))
        scale = (w * (idx + 1)).sum(-1, keepdims=True)
        return (np.tanh(x) * scale.astype(x.dtype),)


class TokenPrefetch(OpRun):
    """Stand-in for the C++ TokenPrefetch: the identity on int64 ids (records the calls)."""

    op_domain = "edgemoe"
    calls: list[np.ndarray] = []

    def _run(self, ids, **attrs):  # noqa: ANN001, ANN003, ANN202
        assert ids.dtype == np.int64
        TokenPrefetch.calls.append(ids.copy())
        return (ids.copy(),)


H = 8


VOCAB = 50


def _router_graph(
    kinds: list[str],
    experts: list[int],
    *,
    input_ids: bool = True,
    embed: bool = True,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[int, tuple[np.ndarray, np.ndarray | None]]]:
    """X [B, S, H] -> per layer: router (``kind``) -> Softmax -> TopK(2) -> OffloadedExpert -> residual.

    With ``input_ids`` (int64 [B, S]) and ``embed``, the first hidden state is X + Gather(embedding,
    input_ids) (the ids' only reader); ``embed=False`` leaves the input unread.

    kinds: ``gemm_t`` (Gemm transB=1), ``gemm`` (transB=0, alpha 0.5, beta 2, bias), ``matmul``,
    ``matmul_bias`` (MatMul + Add of an [E] bias), ``none`` (topk_indices / weights are graph inputs).
    Returns the model and, per layer, the reference router ``(W [E, H], b [E] or None)``: logits =
    x @ W.T + b.
    """
    rng = np.random.default_rng(seed)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "S", H])]
    if input_ids:
        inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]))
    inits = [
        numpy_helper.from_array(np.asarray([-1, H], np.int64), "flat"),
        numpy_helper.from_array(np.asarray([2], np.int64), "k"),
    ]
    nodes = []
    refs: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    h = "X"
    if input_ids and embed:
        emb = rng.standard_normal((VOCAB, H)).astype(np.float32)
        inits.append(numpy_helper.from_array(emb, "embedding"))
        nodes += [
            helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"], name="embed"),
            helper.make_node("Add", ["X", "embedded"], ["h_in"], name="embed_add"),
        ]
        h = "h_in"
    for layer, (kind, e) in enumerate(zip(kinds, experts, strict=True)):
        x = f"x{layer}"
        nodes.append(helper.make_node("Reshape", [h, "flat"], [x]))
        w = rng.standard_normal((e, H)).astype(np.float32)
        b = rng.standard_normal(e).astype(np.float32)
        logits = f"logits{layer}"
        if kind == "gemm_t":
            inits.append(numpy_helper.from_array(w, f"w{layer}"))
            nodes.append(helper.make_node("Gemm", [x, f"w{layer}"], [logits], transB=1))
            refs[layer] = (w, None)
        elif kind == "gemm":
            inits += [
                numpy_helper.from_array(w.T.copy(), f"w{layer}"),
                numpy_helper.from_array(b, f"b{layer}"),
            ]
            nodes.append(
                helper.make_node("Gemm", [x, f"w{layer}", f"b{layer}"], [logits], alpha=0.5, beta=2.0)
            )
            refs[layer] = (0.5 * w, 2.0 * b)
        elif kind == "matmul":
            inits.append(numpy_helper.from_array(w.T.copy(), f"w{layer}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{layer}"], [logits]))
            refs[layer] = (w, None)
        elif kind == "matmul_bias":
            inits += [
                numpy_helper.from_array(w.T.copy(), f"w{layer}"),
                numpy_helper.from_array(b, f"b{layer}"),
            ]
            nodes += [
                helper.make_node("MatMul", [x, f"w{layer}"], [f"mm{layer}"]),
                helper.make_node("Add", [f"mm{layer}", f"b{layer}"], [logits]),
            ]
            refs[layer] = (w, b)
        if kind == "none":
            idx, wts = f"topk_indices_{layer}", f"topk_weights_{layer}"
            inputs += [
                helper.make_tensor_value_info(idx, TensorProto.INT64, [None, 2]),
                helper.make_tensor_value_info(wts, TensorProto.FLOAT, [None, 2]),
            ]
        else:
            idx, wts = f"idx{layer}", f"wts{layer}"
            nodes += [
                helper.make_node("Softmax", [logits], [f"p{layer}"], axis=-1),
                helper.make_node("TopK", [f"p{layer}", "k"], [wts, idx], axis=-1),
            ]
        nodes += [
            helper.make_node(
                "OffloadedExpert",
                [x, idx, wts],
                [f"y{layer}"],
                name=f"moe{layer}",
                domain="edgemoe",
                layer=layer,
                num_experts=e,
                top_k=2,
            ),
            helper.make_node("Shape", [h], [f"shape{layer}"]),
            helper.make_node("Reshape", [f"y{layer}", f"shape{layer}"], [f"y3d{layer}"]),
            helper.make_node("Add", [h, f"y3d{layer}"], [f"h{layer}"]),
        ]
        h = f"h{layer}"
    nodes.append(helper.make_node("Identity", [h], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "routers",
        inputs,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "S", H])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgemoe", 1)]
    )
    model.ir_version = 8
    return model, refs


def _run_reference(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], extra: list[str]
) -> dict[str, np.ndarray]:
    """Run with onnx.reference, exposing the tensors ``extra`` as outputs too."""
    m = _copy(model)
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in extra)
    names = [o.name for o in m.graph.output]
    run = ReferenceEvaluator(m, new_ops=[OffloadedExpert, TokenPrefetch]).run(None, feeds)
    return dict(zip(names, run, strict=True))


def _synthetic_feeds(model: onnx.ModelProto, b: int = 2, s: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {"X": rng.standard_normal((b, s, H)).astype(np.float32)}
    names = {i.name for i in model.graph.input}
    if "input_ids" in names:
        feeds["input_ids"] = rng.integers(0, VOCAB, (b, s)).astype(np.int64)
    for n in names:
        if n.startswith("topk_indices_"):
            e = _offloaded(model)[int(n.rsplit("_", 1)[1])]
            ne = next(a.i for a in e.attribute if a.name == "num_experts")
            idx, w = random_routing(b * s, ne, 2, rng)
            feeds[n], feeds[n.replace("indices", "weights")] = idx, w
    return feeds


def test_every_router_shape_is_found_and_stacked() -> None:
    kinds = ["gemm_t", "gemm", "matmul_bias", "matmul", "gemm_t"]
    model, refs = _router_graph(kinds, [4] * 5)
    wired = _copy(model)
    report = wire_prefetch_inputs(wired)
    assert [w.lookahead for w in report.layers] == [3, 3, 2, 1, 0]
    assert [w.next_layers for w in report.layers] == [[1, 2, 3], [2, 3, 4], [3, 4], [4], []]
    assert [w.router for w in report.layers] == [f"w{i}" for i in range(5)]
    assert report.layers[2].notes == ["only 2 later MoE layer(s) in this graph"]
    assert report.layers[4].notes == ["no later MoE layer in this graph"]
    assert report.token_ids == "input_ids" and report.token_ids_note is None
    assert report.token_output == "edgemoe_prefetch_input_ids" and report.token_consumers == 1
    assert report.changed and report.wired and report.opset == PREFETCH_OPSET == _edgemoe_opset(wired)
    assert [o.SerializeToString() for o in wired.graph.output] == [
        o.SerializeToString() for o in model.graph.output
    ]
    assert [i.SerializeToString() for i in wired.graph.input] == [
        i.SerializeToString() for i in model.graph.input
    ]
    out = _check_token_prefetch(model, wired)
    assert [n.name for n in _readers(wired, out)] == ["embed"]
    assert _token_nodes(wired)[0].name == report.token_prefetch
    nodes = _offloaded(wired)
    assert all(len(nodes[i].input) == 4 and nodes[i].input[3] for i in range(4)) and len(nodes[4].input) == 3
    assert report.summary()[-1] == "token ids: input_ids -> TokenPrefetch (before 1 consumer)"

    feeds = _synthetic_feeds(model)
    xs = [f"x{i}" for i in range(5)]
    nexts = {layer: n.input[3] for layer, n in nodes.items() if len(n.input) > 3 and n.input[3]}
    TokenPrefetch.calls.clear()
    got = _run_reference(wired, feeds, xs + list(nexts.values()) + [out])
    assert len(TokenPrefetch.calls) == 1
    np.testing.assert_array_equal(TokenPrefetch.calls[0], feeds["input_ids"])
    np.testing.assert_array_equal(got[out], feeds["input_ids"])
    want = _run_reference(model, feeds, xs)
    np.testing.assert_array_equal(got["Y"], want["Y"])  # outputs unchanged
    for layer, name in nexts.items():
        x = want[f"x{layer}"].astype(np.float64)
        p = report.lookahead_of(layer)
        assert got[name].shape == (6, p, 4)
        for j in range(p):
            w, b = refs[layer + 1 + j]
            ref = x @ w.T.astype(np.float64) + (0.0 if b is None else b)
            np.testing.assert_allclose(got[name][:, j], ref, **TOL)


def test_zero_tokens_and_leading_dims() -> None:
    model, _ = _router_graph(["gemm_t", "matmul_bias"], [4, 4])
    wired = _copy(model)
    wire_prefetch_inputs(wired)
    name = _offloaded(wired)[0].input[3]
    for b, s in [(0, 3), (1, 1), (3, 2)]:
        feeds = _synthetic_feeds(model, b=b, s=s)
        got = _run_reference(wired, feeds, [name])
        assert got[name].shape == (b * s, 1, 4)


def test_lookahead_lowered_where_num_experts_differ() -> None:
    model, _ = _router_graph(["gemm_t"] * 5, [4, 4, 6, 6, 6])
    report = wire_prefetch_inputs(model, lookahead=3)
    assert [w.lookahead for w in report.layers] == [1, 3, 2, 1, 0]
    assert report.layers[0].notes == ["layer 2: E=6 differs from layer 1's E=4"]
    assert report.layers[1].notes == []
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.value_info}
    nodes = _offloaded(model)
    assert shapes[nodes[0].input[3]][1:] == [1, 4] and shapes[nodes[1].input[3]][1:] == [3, 6]


def test_missing_router_lowers_lookahead_and_says_why() -> None:
    model, _ = _router_graph(["gemm_t", "none", "matmul", "gemm_t"], [4] * 4)
    report = wire_prefetch_inputs(model, lookahead=3)
    by = {w.layer: w for w in report.layers}
    assert [w.lookahead for w in report.layers] == [0, 2, 1, 0]
    assert by[1].router is None
    assert by[1].router_note == "topk_indices is the graph input 'topk_indices_1' (no router in the graph)"
    assert by[0].notes == [f"layer 1: router not found ({by[1].router_note})"]
    assert len(_offloaded(model)[0].input) == 3  # P=0: no input 3 (and the ids go to TokenPrefetch)
    assert report.token_ids == "input_ids" and len(_token_nodes(model)) == 1
    lines = report.summary()
    assert lines[0].startswith("layer 0: P=0: layer 1: router not found")
    assert lines[-1] == "token ids: input_ids -> TokenPrefetch (before 1 consumer)"
    json.dumps(report.as_dict())  # JSON-ready


def test_router_with_a_computed_weight_is_not_a_router() -> None:
    model, _ = _router_graph(["gemm_t", "gemm_t"], [4, 4])
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm" and n.input[1] == "w1")
    model.graph.node.insert(0, helper.make_node("Identity", ["w1"], ["w1_copy"]))
    gemm.input[1] = "w1_copy"
    router, why = find_router(model, _offloaded(model)[1])
    assert router is None
    assert "weight 'w1_copy' is not a constant" in why
    report = wire_prefetch_inputs(model)
    assert report.lookahead_of(0) == 0 and "layer 1: router not found" in report.layers[0].notes[0]


def test_graph_without_input_ids() -> None:
    model, _ = _router_graph(["gemm_t", "gemm_t", "gemm_t"], [4] * 3, input_ids=False)
    report = wire_prefetch_inputs(model)
    assert report.token_ids is None and report.token_ids_note == "the graph has no input 'input_ids'"
    assert report.token_prefetch is None and not _token_nodes(model)
    assert [len(n.input) for n in _offloaded(model).values()] == [4, 4, 3]
    assert report.opset == 2
    assert report.summary()[-1] == "token ids: not wired (the graph has no input 'input_ids')"


def test_input_ids_without_a_reader_gets_no_token_prefetch() -> None:
    model, _ = _router_graph(["gemm_t", "gemm_t"], [4, 4], embed=False)
    before = model.SerializeToString()
    report = wire_prefetch_inputs(model, lookahead=0)
    assert report.token_ids is None and report.token_ids_note == "no node reads the graph input 'input_ids'"
    assert not report.changed and not report.wired and model.SerializeToString() == before
    assert report.summary()[-1] == "token ids: not wired (no node reads the graph input 'input_ids')"
    report = wire_prefetch_inputs(model)  # input 3 is still wired
    assert report.changed and report.lookahead_of(0) == 1 and not _token_nodes(model)


def test_token_ids_that_are_not_int64_are_not_wired() -> None:
    model, _ = _router_graph(["gemm_t", "gemm_t"], [4, 4])
    for i in model.graph.input:
        if i.name == "input_ids":
            i.type.tensor_type.elem_type = TensorProto.INT32
    report = wire_prefetch_inputs(model, lookahead=0)
    assert report.token_ids is None and report.token_ids_note == "graph input 'input_ids' is not int64"
    assert not report.changed and not _token_nodes(model)


def test_every_reader_is_rewired_and_graph_outputs_are_kept() -> None:
    """input_ids read by several nodes (one reads it twice) and also a graph output itself."""
    model, _ = _router_graph(["gemm_t", "gemm_t"], [4, 4])
    model.graph.node.extend(
        [
            helper.make_node("Shape", ["input_ids"], ["ids_shape"], name="ids_shape"),
            helper.make_node("Mul", ["input_ids", "input_ids"], ["ids_sq"], name="ids_sq"),
        ]
    )
    model.graph.output.extend(
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
            helper.make_tensor_value_info("ids_shape", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("ids_sq", TensorProto.INT64, ["B", "S"]),
        ]
    )
    plain = _copy(model)
    report = wire_prefetch_inputs(model, lookahead=0)
    out = _check_token_prefetch(plain, model)
    assert report.token_consumers == 3
    assert report.summary()[-1] == "token ids: input_ids -> TokenPrefetch (before 3 consumers)"
    assert list(next(n for n in model.graph.node if n.name == "ids_sq").input) == [out, out]
    assert [o.SerializeToString() for o in model.graph.output] == [
        o.SerializeToString() for o in plain.graph.output
    ]  # the graph output input_ids is the graph input itself, as before
    feeds = _synthetic_feeds(plain)
    got, want = _run_reference(model, feeds, []), _run_reference(plain, feeds, [])
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_existing_token_prefetch_is_kept() -> None:
    model, _ = _router_graph(["gemm_t", "gemm_t"], [4, 4])
    first = wire_prefetch_inputs(model, lookahead=0)
    once = model.SerializeToString()
    again = wire_prefetch_inputs(model, lookahead=0)
    assert not again.changed and model.SerializeToString() == once
    assert (again.token_ids, again.token_prefetch, again.token_output, again.token_consumers) == (
        first.token_ids,
        first.token_prefetch,
        first.token_output,
        1,
    )
    # a TokenPrefetch node the graph came with (other names) is left alone too, even for token_ids=None
    renamed = onnx.load_from_string(once)
    tp = _token_nodes(renamed)[0]
    tp.name, tp.output[0] = "mine", "my_ids"
    next(n for n in renamed.graph.node if n.name == "embed").input[1] = "my_ids"
    before = renamed.SerializeToString()
    report = wire_prefetch_inputs(renamed, token_ids=None)
    assert report.token_ids == "input_ids" and report.token_prefetch == "mine"
    assert report.token_output == "my_ids" and report.token_ids_note is None
    assert report.changed and report.lookahead_of(0) == 1  # input 3 is still wired
    (kept,) = _token_nodes(renamed)
    assert kept == _token_nodes(onnx.load_from_string(before))[0] and renamed.graph.node[0] == kept


def test_only_token_ids_or_nothing() -> None:
    model, _ = _router_graph(["gemm_t", "gemm_t"], [4, 4])
    plain = _copy(model)
    report = wire_prefetch_inputs(model, lookahead=0)
    assert [w.lookahead for w in report.layers] == [0, 0] and report.token_ids == "input_ids"
    assert report.changed and report.wired and report.opset == 2 == _edgemoe_opset(model)
    assert [list(n.input) for n in _offloaded(model).values()] == [
        list(n.input) for n in _offloaded(plain).values()
    ]
    _check_token_prefetch(plain, model)
    assert len(model.graph.node) == len(plain.graph.node) + 1
    plain, _ = _router_graph(["gemm_t", "gemm_t"], [4, 4])
    before = plain.SerializeToString()
    report = wire_prefetch_inputs(plain, lookahead=0, token_ids=None)
    assert not report.changed and not report.wired and report.opset == 1
    assert plain.SerializeToString() == before
    with pytest.raises(ValueError, match="lookahead"):
        wire_prefetch_inputs(plain, lookahead=-1)


def test_rewiring_is_a_noop() -> None:
    model, _ = _router_graph(["gemm_t", "matmul", "gemm"], [4] * 3)
    first = wire_prefetch_inputs(model)
    once = model.SerializeToString()
    for lookahead in (3, 1, 5):
        again = wire_prefetch_inputs(model, lookahead=lookahead)
        assert not again.changed
        assert model.SerializeToString() == once
        assert [w.lookahead for w in again.layers] == [w.lookahead for w in first.layers]
        assert [w.already_wired for w in again.layers] == [True, True, False]
        assert again.token_ids == "input_ids" and again.token_consumers == 1
        assert len(_token_nodes(model)) == 1


def test_no_router_anywhere_changes_nothing() -> None:
    layers = [dict(num_experts=4, top_k=2, hidden=16, intermediate=8, gated=True, activation="silu")] * 3
    model = make_moe_graph(layers)
    before = model.SerializeToString()
    report = wire_prefetch_inputs(model)
    assert not report.changed and report.opset == 1 and model.SerializeToString() == before
    assert all(w.lookahead == 0 and w.router is None for w in report.layers)
    assert report.token_ids_note == "the graph has no input 'input_ids'"


# --- make_moe_graph with the prefetch inputs ----------------------------------------------------------------

LAYER = dict(num_experts=4, top_k=2, hidden=16, intermediate=8, gated=True, activation="silu")


def test_make_moe_graph_defaults_unchanged() -> None:
    model = make_moe_graph([LAYER] * 3)
    assert [i.name for i in model.graph.input] == ["X"] + [
        f"topk_{w}_{i}" for i in range(3) for w in ("indices", "weights")
    ]
    assert all(len(n.input) == 3 for n in model.graph.node)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), ("edgemoe", 1)}
    assert (
        model.SerializeToString()
        == make_moe_graph([LAYER] * 3, lookahead=0, token_ids=False).SerializeToString()
    )


def test_make_moe_graph_prefetch_inputs() -> None:
    layers = [LAYER, LAYER, LAYER, {**LAYER, "num_experts": 6}]
    model = make_moe_graph(layers, lookahead=2, token_ids=True)
    old = [i.name for i in make_moe_graph(layers).graph.input]
    names = [i.name for i in model.graph.input]
    assert names == old + ["next_logits_0", "next_logits_1", "next_logits_2", "token_ids"]
    shapes = {
        i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert shapes["next_logits_0"] == ["T", 2, 4]
    assert shapes["next_logits_1"] == ["T", 1, 4]  # layer 3 has E = 6: P lowered
    assert shapes["next_logits_2"] == ["T", 1, 6]
    assert shapes["token_ids"] == ["T"]
    assert [o.name for o in model.graph.output] == ["Y", "token_ids_out"]
    tp = model.graph.node[0]
    assert (tp.op_type, tp.domain, list(tp.input), list(tp.output)) == (
        "TokenPrefetch",
        "edgemoe",
        ["token_ids"],
        ["token_ids_out"],
    )
    assert [(a.name, a.s) for a in tp.attribute] == [("manifest", b"manifest.json")]
    ins = [list(n.input) for n in model.graph.node[1:]]
    assert ins[0] == ["X", "topk_indices_0", "topk_weights_0", "next_logits_0"]
    assert ins[1][3:] == ["next_logits_1"] and ins[3] == ["Y_2", "topk_indices_3", "topk_weights_3"]
    assert _edgemoe_opset(model) == 2
    before = model.SerializeToString()
    report = wire_prefetch_inputs(model, token_ids="token_ids")  # already wired: kept as is
    assert not report.changed and model.SerializeToString() == before
    assert [w.lookahead for w in report.layers] == [2, 1, 1, 0] and report.token_ids == "token_ids"
    assert report.token_output == "token_ids_out" and report.token_consumers == 0
    assert all(w.already_wired for w in report.layers[:3])
    only_tokens = make_moe_graph([LAYER], token_ids=True, manifest="other.json")
    assert [n.op_type for n in only_tokens.graph.node] == ["TokenPrefetch", "OffloadedExpert"]
    assert list(only_tokens.graph.node[1].input) == ["X", "topk_indices_0", "topk_weights_0"]
    assert [a.s for a in only_tokens.graph.node[0].attribute] == [b"other.json"]
    from edgemoe_ort.export.schema import register_schema

    register_schema()
    onnx.checker.check_model(model, full_check=True)


# --- ORT: the op library and the prefetch inputs ------------------------------------------------------------


def _ort_ops() -> Any:
    ops = pytest.importorskip("edgemoe_ort.runtime.ops")
    if not Path(ops.library_path()).is_file():
        pytest.skip(f"op library {ops.library_path()} not built (make lib)")
    return ops


#: the wired runs compared with the unwired graph run with predictor "none": (id, RuntimeOptions kwargs)
WIRED_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("auto", {}),
    ("gates", dict(predictor="gates")),
    ("auto-50%", dict(budget="50%")),
    ("gates-50%", dict(predictor="gates", budget="50%")),
    ("residual-50%", dict(predictor="residual", budget="50%")),
]


def test_synthetic_bundle_with_prefetch_inputs_runs(tmp_path: Path) -> None:
    """The library accepts OffloadedExpert with 3 or 4 inputs and TokenPrefetch: outputs bit-identical."""
    ops = _ort_ops()
    kw = dict(num_layers=3, num_experts=4, top_k=2, hidden=16, intermediate=8, seed=3)
    plain = make_synthetic_bundle(tmp_path / "plain", **kw)
    wired = make_synthetic_bundle(tmp_path / "wired", lookahead=2, token_ids=True, **kw)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5, 16)).astype(np.float32)
    routing = [random_routing(5, 4, 2, rng) for _ in range(3)]
    nxt = {
        0: rng.standard_normal((5, 2, 4)).astype(np.float32),
        1: rng.standard_normal((5, 1, 4)).astype(np.float32),
    }
    ids = rng.integers(0, 1000, 5).astype(np.int64)
    reference = ops.open_session(plain.graph_path(), plain.path, ops.RuntimeOptions(predictor="none"))
    want = reference.run(None, chain_feeds(X, routing))[0]
    feeds = chain_feeds(X, routing, next_logits=nxt, token_ids=ids)
    for what, options in WIRED_RUNS:
        sess = ops.open_session(wired.graph_path(), wired.path, ops.RuntimeOptions(**options))
        assert [o.name for o in sess.get_outputs()] == ["Y", "token_ids_out"]
        for _ in range(2):  # the second call runs with the first call's predictions
            got, ids_out = sess.run(None, feeds)
            np.testing.assert_array_equal(got, want, err_msg=what)
            np.testing.assert_array_equal(ids_out, ids, err_msg=what)


def test_token_prefetch_alone_and_zero_tokens(tmp_path: Path) -> None:
    ops = _ort_ops()
    b = make_synthetic_bundle(
        tmp_path / "b", num_layers=2, num_experts=4, top_k=2, hidden=16, intermediate=8, token_ids=True
    )
    sess = ops.open_session(b.graph_path(), b.path)
    for t in (0, 1, 4):
        rng = np.random.default_rng(t)
        X = rng.standard_normal((t, 16)).astype(np.float32)
        routing = [random_routing(t, 4, 2, rng) for _ in range(2)]
        ids = np.arange(t, dtype=np.int64) + 7
        y, ids_out = sess.run(None, chain_feeds(X, routing, token_ids=ids))
        assert y.shape == (t, 16)
        np.testing.assert_array_equal(ids_out, ids)


# --- part 2: exported bundles -------------------------------------------------------------------------------

FAMILIES: dict[str, tuple[str, dict[str, Any], int]] = {  # id -> (model_type, overrides, seed)
    "mixtral": ("mixtral", {}, 3),
    "qwen2_moe": ("qwen2_moe", {"norm_topk_prob": False}, 3),
    "olmoe": ("olmoe", {}, 3),
    "switch": ("switch_transformers", {}, 5),
}
FIDS = ["default", *FAMILIES]
#: P per node of each graph (lookahead 3)
EXPECTED_P = {
    "default": {"decoder": [3, 2, 1, 0]},
    "mixtral": {"decoder": [1, 0]},
    "qwen2_moe": {"decoder": [1, 0]},
    "olmoe": {"decoder": [1, 0]},
    "switch": {"encoder": [1, 0], "decoder": [0]},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edgemoe_ort.export.testing import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("wiring-ckpt")
    out = {
        fid: save_tiny_checkpoint(mt, root / fid, seed=seed, **ov) for fid, (mt, ov, seed) in FAMILIES.items()
    }
    if (DEFAULT_MODEL / "config.json").is_file():
        out["default"] = DEFAULT_MODEL
    return out


_exports: dict[str, Path] = {}


@pytest.fixture(scope="module")
def export_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wiring-bundles")


def _unwired(fid: str, checkpoints: dict[str, Path], export_root: Path) -> Path:
    """fp32 bundle of ``fid`` exported with lookahead 0 (the opset-1 graphs), once per session."""
    if fid not in checkpoints:
        pytest.skip("default model not trained (models/edgemoe-tiny-mixtral)")
    if fid not in _exports:
        from edgemoe_ort.export import export_model_with_report

        report = export_model_with_report(checkpoints[fid], export_root / fid, bits=32, lookahead=0)
        assert report.wiring == {}
        _exports[fid] = report.bundle
    return _exports[fid]


def _graphs(bundle: Path) -> dict[str, onnx.ModelProto]:
    """The bundle's model graphs (not its tokenizer graphs) by role."""
    from edgemoe_ort.bundle.format import model_graph_roles

    graphs = json.loads((bundle / "manifest.json").read_text())["graphs"]
    return {role: onnx.load(bundle / graphs[role]) for role in model_graph_roles(graphs)}


def _torch_routers(ckpt: Path) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """Per manifest layer, the router's (W [E, H], b [E] or None) from the torch model (not the graph)."""
    from edgemoe_ort.export import load_model, patch_model

    loaded = load_model(ckpt)
    patched = patch_model(loaded.model, loaded.recipe)
    try:
        out = {}
        for m in patched.layers:
            prefix = f"{m.block_path}.{loaded.recipe.router}."
            params = {
                k: v.detach().numpy().astype(np.float64) for k, v in m.dense.items() if k.startswith(prefix)
            }
            e, h = m.spec.num_experts, m.spec.hidden
            (w,) = [v for k, v in params.items() if k.endswith("weight") and v.shape == (e, h)]
            bias = [v for k, v in params.items() if k.endswith("bias") and v.shape == (e,)]
            out[m.spec.layer] = (w, bias[0] if bias else None)
        return out
    finally:
        patched.release()


def _feeds(sess: Any, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, s, enc = 2, 5, 6
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(1, 100, (b, enc if "encoder_sequence_length" in i.shape else s))
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((b, enc if "encoder_sequence_length" in i.shape else s), np.int64)
        elif i.name == "encoder_attention_mask":
            feeds[i.name] = np.ones((b, enc), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(s), (b, 1))
        elif i.name == "encoder_hidden_states":
            feeds[i.name] = rng.standard_normal((b, enc, int(i.shape[2]))).astype(np.float32)
        elif i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((b, int(i.shape[1]), 0, int(i.shape[3])), np.float32)
        else:
            raise AssertionError(f"unexpected graph input {i.name}")
    return {k: v.astype(np.int64) if v.dtype.kind == "i" else v for k, v in feeds.items()}


def _run_ort(
    bundle: Path,
    model: onnx.ModelProto,
    extra: list[str] = (),
    options: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """All outputs of ``model`` (+ the tensors ``extra``) in ORT with the bundle's op library, with
    ``RuntimeOptions(**options)`` (None: the reference, predictor "none"); ``stats`` gets the store's
    counters after the run."""
    import onnxruntime as ort

    ops = _ort_ops()
    m = _copy(model)
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in extra)
    so, store_id = ops.make_session_options(bundle, ops.RuntimeOptions(**(options or dict(predictor="none"))))
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(names, _feeds(sess)), strict=True))
    if stats is not None:
        stats.update(ops.store_stats(store_id))
    return out


def _run_subgraph(model: onnx.ModelProto, x_name: str, out_name: str, x: np.ndarray) -> np.ndarray:
    """The nodes between ``x_name`` and ``out_name`` alone (plain ORT: no edgemoe op among them)."""
    import onnxruntime as ort

    sub = onnx.utils.Extractor(model).extract_model([x_name], [out_name])
    assert {n.domain for n in sub.graph.node} <= {""}, "the added nodes must be standard ONNX"
    sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([out_name], {x_name: x})[0]


@pytest.mark.export
@pytest.mark.parametrize("fid", FIDS)
def test_stacked_gates_are_the_next_routers_on_this_x(
    fid: str, checkpoints: dict[str, Path], export_root: Path
) -> None:
    bundle = _unwired(fid, checkpoints, export_root)
    routers = _torch_routers(checkpoints[fid])
    for role, model in _graphs(bundle).items():
        # exported with --lookahead 0: no input 3; the routers' CacheAwareTopK (opset 3) is there
        assert _edgemoe_opset(model) == ROUTING_OPSET
        assert all(len(n.input) == 3 for n in _offloaded(model).values())
        wired = _copy(model)
        report = wire_prefetch_inputs(wired, token_ids="input_ids" if role == "decoder" else None)
        assert [w.lookahead for w in report.layers] == EXPECTED_P[fid][role], report.summary()
        assert all(w.router is not None for w in report.layers), report.summary()
        nodes = _offloaded(model)
        xs = {layer: n.input[0] for layer, n in nodes.items()}
        taps = _run_ort(bundle, model, list(xs.values()))  # unwired graph: runs with any op library
        for w in report.layers:
            if w.lookahead == 0:
                continue
            x = taps[xs[w.layer]]
            name = _offloaded(wired)[w.layer].input[3]
            got = _run_subgraph(wired, xs[w.layer], name, x)
            x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
            assert got.shape == (x2.shape[0], w.lookahead, w.num_experts)
            for j, target in enumerate(w.next_layers):
                weight, bias = routers[target]
                ref = x2 @ weight.T + (0.0 if bias is None else bias)
                np.testing.assert_allclose(
                    got[:, j], ref, **TOL, err_msg=f"{fid} {role} layer {w.layer} row {j}"
                )


@pytest.mark.export
@pytest.mark.parametrize("fid", FIDS)
def test_wired_graph_passes_onnx_checks_and_is_idempotent(
    fid: str, checkpoints: dict[str, Path], export_root: Path
) -> None:
    from edgemoe_ort.export.schema import register_schema

    register_schema()
    for role, model in _graphs(_unwired(fid, checkpoints, export_root)).items():
        wired = _copy(model)
        report = wire_prefetch_inputs(wired, token_ids="input_ids" if role == "decoder" else None)
        # the routing's opset includes opset 2; ResidualPrefetch (where wired) is opset 4
        want = RESIDUAL_OPSET if any(r.wired for r in report.residual) else ROUTING_OPSET
        assert report.changed and report.opset == want
        onnx.checker.check_model(wired, full_check=True)
        assert [o.SerializeToString() for o in wired.graph.output] == [
            o.SerializeToString() for o in model.graph.output
        ]
        assert [i.SerializeToString() for i in wired.graph.input] == [
            i.SerializeToString() for i in model.graph.input
        ]
        if role == "decoder":
            out = _check_token_prefetch(model, wired)
            assert report.token_ids == "input_ids" and report.token_output == out
            assert report.token_consumers == len(_readers(wired, out)) >= 1
        else:  # the encoder reads input_ids too, but only the decoder graph is asked for it
            assert not _token_nodes(wired) and report.token_ids_note == "not requested"
        once = wired.SerializeToString()
        again = wire_prefetch_inputs(wired, token_ids="input_ids" if role == "decoder" else None)
        assert not again.changed and wired.SerializeToString() == once


@pytest.mark.export
@pytest.mark.parametrize("fid", FIDS)
def test_wired_logits_bit_identical(fid: str, checkpoints: dict[str, Path], export_root: Path) -> None:
    """Inputs 3 and TokenPrefetch, as the exporter writes them (and input 3 alone): the logits and every
    other output equal the unwired graph's with predictor "none", for auto / gates and a 50% budget."""
    bundle = _unwired(fid, checkpoints, export_root)
    for role, model in _graphs(bundle).items():
        want = _run_ort(bundle, model)
        variants = {"full": "input_ids" if role == "decoder" else None, "input3": None}
        for variant, ids in variants.items():
            wired = _copy(model)
            report = wire_prefetch_inputs(wired, token_ids=ids)
            assert (report.token_prefetch is not None) == (ids is not None)
            assert report.wired == (ids is not None or any(w.lookahead for w in report.layers))
            for what, options in WIRED_RUNS:
                got = _run_ort(bundle, wired, options=options)
                assert list(got) == list(want)
                for name in want:
                    np.testing.assert_array_equal(
                        got[name], want[name], err_msg=f"{fid} {role} {variant} {what}: {name}"
                    )


#: the MoE layers that get a ResidualPrefetch node, per graph (the others: why not, in the summary)
EXPECTED_RESIDUAL = {
    "default": {"decoder": [1, 2, 3]},
    "mixtral": {"decoder": [1]},
    "qwen2_moe": {"decoder": [1]},
    "olmoe": {"decoder": [1]},
    "switch": {"encoder": [1], "decoder": []},
}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.export
@pytest.mark.parametrize("fid", FIDS)
def test_residual_prefetch_per_family(fid: str, checkpoints: dict[str, Path], export_root: Path) -> None:
    """A ResidualPrefetch node on the residual stream entering every MoE layer after the first: the identity
    on it, read before the layer's attention; its scores are the layer's router (softmax) on that stream
    through the router's own normalization: fed the router's input residual instead, the clone gives the
    router's softmax. Logits bit-identical with predictor residual; prefetches happen."""
    from edgemoe_ort.bundle.graph import GraphIndex
    from edgemoe_ort.bundle.testing import subgraph_between

    bundle = _unwired(fid, checkpoints, export_root)
    for role, model in _graphs(bundle).items():
        wired = _copy(model)
        report = wire_prefetch_inputs(wired, token_ids="input_ids" if role == "decoder" else None)
        assert [r.layer for r in report.residual if r.wired] == EXPECTED_RESIDUAL[fid][role], report.summary()
        assert all(r.note for r in report.residual if not r.wired)
        g = GraphIndex(wired.graph)
        nodes = {int(next(a.i for a in n.attribute if a.name == "layer")): n for n in wired.graph.node
                 if n.op_type == RESIDUAL_OP_TYPE}  # fmt: skip
        moe = _offloaded(wired)
        checks = {}
        for t, n in nodes.items():
            h, scores = n.input
            assert h == report.residual[[r.layer for r in report.residual].index(t)].residual
            # the router's residual: the Add reading h' whose other input is computed from h'
            (add,) = [c for c in g.consumers[n.output[0]] if c.op_type == "Add"]
            router, _ = find_router(wired, moe[t])
            logits = next(m for m in wired.graph.node if (m.name or m.output[0]) == router.node).output[0]
            if router.bias is not None and router.op == "MatMul":
                logits = g.consumers[logits][0].output[0]
            checks[t] = (h, scores, add.output[0], logits)
        extra = sorted({x for c in checks.values() for x in c})
        taps = _run_ort(bundle, model if not checks else wired, extra)
        import onnxruntime as ort

        for t, (h, scores, r, logits) in checks.items():
            sub = subgraph_between(wired, h, scores)
            sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
            on_r = sess.run([scores], {h: taps[r]})[0]
            want = _softmax(taps[logits].reshape(on_r.shape).astype(np.float64))
            np.testing.assert_allclose(on_r, want, **TOL, err_msg=f"{fid} {role} layer {t}")
        want = _run_ort(bundle, model)
        issued = 0
        for options in (dict(predictor="residual", budget="50%"), dict(predictor="residual")):
            stats: dict[str, Any] = {}
            got = _run_ort(bundle, wired, options=options, stats=stats)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{fid} {role} {options}")
            issued += stats["prefetch"]["issued"]
        # (at 50% the two-layer models' cache is full of layer 0's experts, which a prefetch never evicts)
        assert issued > 0 or not checks or role != "decoder"


@pytest.mark.export
def test_token_prefetch_with_a_profile_is_bit_identical(
    checkpoints: dict[str, Path], export_root: Path, tmp_path: Path
) -> None:
    """With a routing profile, TokenPrefetch hands the ids to the token table (predictor token / auto):
    prefetches happen, the logits stay bit-identical to the unwired graph's."""
    import os

    from edgemoe_ort.profile import profile_bundle

    bundle = _unwired("default", checkpoints, export_root)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "shlex.py", "fnmatch.py"):
        (corpus / name).write_text((Path(os.__file__).parent / name).read_text())
    doc = profile_bundle(bundle, [corpus], tokens=3000)
    profile = tmp_path / "profile.json"  # not in the shared bundle: the other tests run without one
    profile.write_text(json.dumps(doc))
    model = _graphs(bundle)["decoder"]
    want = _run_ort(bundle, model)
    wired = _copy(model)
    assert wire_prefetch_inputs(wired).token_prefetch is not None
    runs = [
        ("token", dict(predictor="token")),
        ("token-50%", dict(predictor="token", budget="50%")),
        *[(w, o) for w, o in WIRED_RUNS if "predictor" not in o],  # auto, with the profile
    ]
    for what, options in runs:
        stats: dict[str, Any] = {}
        got = _run_ort(bundle, wired, options={**options, "profile": profile}, stats=stats)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")
        assert stats["prefetch"]["issued"] > 0, (what, stats["prefetch"])


@pytest.mark.export
def test_missing_router_on_the_default_model(checkpoints: dict[str, Path], export_root: Path) -> None:
    model = _graphs(_unwired("default", checkpoints, export_root))["decoder"]
    nodes = _offloaded(model)
    router, _ = find_router(model, nodes[2])
    assert router is not None and router.op == "Gemm" and router.trans_b == 1
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm" and n.input[1] == router.weight)
    gemm.input[1] = f"{router.weight}_computed"
    model.graph.node.insert(0, helper.make_node("Identity", [router.weight], [gemm.input[1]]))
    report = wire_prefetch_inputs(model)  # never raises for a layer it cannot wire
    by = {w.layer: w for w in report.layers}
    assert [w.lookahead for w in report.layers] == [1, 0, 1, 0]
    assert (
        by[2].router is None and f"weight '{router.weight}_computed' is not a constant" in by[2].router_note
    )
    assert by[0].notes == [f"layer 2: router not found ({by[2].router_note})"]
    assert by[1].notes == by[0].notes
    assert by[3].notes == ["no later MoE layer in this graph"]
    assert report.token_ids == "input_ids"


@pytest.mark.export
def test_exported_graph_without_input_ids(checkpoints: dict[str, Path], export_root: Path) -> None:
    model = _graphs(_unwired("mixtral", checkpoints, export_root))["decoder"]
    for i in model.graph.input:
        if i.name == "input_ids":
            i.name = "tokens"
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            if name == "input_ids":
                n.input[k] = "tokens"
    report = wire_prefetch_inputs(model)
    assert report.token_ids is None and report.token_ids_note == "the graph has no input 'input_ids'"
    assert [len(n.input) for n in _offloaded(model).values()] == [4, 3]
    assert report.lookahead_of(0) == 1


@pytest.mark.export
def test_export_cli_wires_by_default(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import inspect

    from typer.testing import CliRunner

    from edgemoe_ort.cli import export_app
    from edgemoe_ort.export import export_model, export_model_with_report

    assert inspect.signature(export_model).parameters["lookahead"].default == 3
    assert inspect.signature(export_model_with_report).parameters["lookahead"].default == 3
    out = tmp_path / "mixtral"
    result = CliRunner().invoke(export_app, [str(checkpoints["mixtral"]), "-o", str(out), "--bits", "32"])
    assert result.exit_code == 0, result.output
    assert "prefetch wiring (decoder, lookahead 3):" in result.output
    assert "layer 0: P=1 (layer 1): only 1 later MoE layer(s) in this graph" in result.output
    assert "token ids: input_ids -> TokenPrefetch (before " in result.output
    assert "residual: layer 1: ResidualPrefetch on " in result.output
    model = onnx.load(out / "model.onnx")
    assert _edgemoe_opset(model) == RESIDUAL_OPSET
    assert [n.op_type for n in model.graph.node if n.domain == "edgemoe"].count(RESIDUAL_OP_TYPE) == 1
    nodes = _offloaded(model)
    assert len(nodes[0].input) == 4 and nodes[0].input[3] and len(nodes[1].input) == 3
    (tp,) = _token_nodes(model)
    assert model.graph.node[0] == tp and list(tp.input) == ["input_ids"]
    assert _readers(model, "input_ids") == [tp]
    bad = CliRunner().invoke(
        export_app, [str(checkpoints["mixtral"]), "-o", str(tmp_path / "x"), "--lookahead", "-1"]
    )
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()
