"""The residual predictor: the ``ResidualPrefetch`` wiring (edgemoe_ort/bundle/residual.py) on synthetic
transformer-like graphs, and the op in ORT (identity, prefetches, errors). Exported families:
tests/test_wiring.py (part 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemoe_ort.bundle.residual import RESIDUAL_OP_TYPE, RESIDUAL_OPSET, wire_residual
from edgemoe_ort.bundle.testing import make_synthetic_bundle, subgraph_between
from edgemoe_ort.bundle.wiring import wire_prefetch_inputs

H, E, K, LAYERS = 16, 4, 2, 3
TOL = dict(rtol=1e-5, atol=1e-5)


def _norm(
    kind: str, x: str, out: str, tag: str, inits: list[onnx.TensorProto], rng: Any
) -> list[onnx.NodeProto]:
    """``out = norm(x)`` over the last axis: ``rms`` (decomposed, as torch exports it), ``layernorm`` (ONNX
    LayerNormalization), ``simplified`` (ORT's fused SimplifiedLayerNormalization), ``shape`` (rms whose
    weight is expanded to x's shape: a side input read from x)."""
    g = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    inits.append(numpy_helper.from_array(g, f"{tag}_g"))
    if kind == "simplified":
        return [
            helper.make_node("SimplifiedLayerNormalization", [x, f"{tag}_g"], [out], axis=-1, epsilon=1e-6)
        ]
    if kind == "layernorm":
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(H)).astype(np.float32), f"{tag}_b"))
        return [
            helper.make_node("LayerNormalization", [x, f"{tag}_g", f"{tag}_b"], [out], axis=-1, epsilon=1e-5)
        ]
    nodes = [
        helper.make_node("Pow", [x, "two"], [f"{tag}_sq"]),
        helper.make_node("ReduceMean", [f"{tag}_sq"], [f"{tag}_ms"], axes=[-1], keepdims=1),
        helper.make_node("Add", [f"{tag}_ms", "eps"], [f"{tag}_mse"]),
        helper.make_node("Sqrt", [f"{tag}_mse"], [f"{tag}_rms"]),
        helper.make_node("Reciprocal", [f"{tag}_rms"], [f"{tag}_inv"]),
        helper.make_node("Mul", [x, f"{tag}_inv"], [f"{tag}_n"]),
    ]
    if kind == "shape":
        nodes += [
            helper.make_node("Shape", [x], [f"{tag}_shape"]),
            helper.make_node("Expand", [f"{tag}_g", f"{tag}_shape"], [f"{tag}_gx"]),
            helper.make_node("Mul", [f"{tag}_gx", f"{tag}_n"], [out]),
        ]
    else:
        nodes.append(helper.make_node("Mul", [f"{tag}_g", f"{tag}_n"], [out]))
    return nodes


def block_graph(norm: str = "rms", seed: int = 0) -> onnx.ModelProto:
    """X [B, S, H] -> per layer l: ``a = MatMul(norm_in(h), Wa)`` (attention's stand-in), ``r = h + a``, the
    router on ``norm_post(r)`` (``none``: on ``r`` itself) -> Softmax -> TopK -> OffloadedExpert ->
    ``h = r + y``. The residual leaving layer l is ``h{l}``."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.asarray([-1, H], np.int64), "flat"),
        numpy_helper.from_array(np.asarray([K], np.int64), "k"),
        numpy_helper.from_array(np.asarray(2.0, np.float32), "two"),
        numpy_helper.from_array(np.asarray(1e-6, np.float32), "eps"),
    ]
    nodes: list[onnx.NodeProto] = []
    h = "X"
    for layer in range(LAYERS):
        wa = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)
        wr = rng.standard_normal((H, E)).astype(np.float32)
        inits += [numpy_helper.from_array(wa, f"wa{layer}"), numpy_helper.from_array(wr, f"wr{layer}")]
        nodes += _norm(
            "rms" if norm in ("none", "shape") else norm, h, f"nin{layer}", f"in{layer}", inits, rng
        )
        nodes += [
            helper.make_node("MatMul", [f"nin{layer}", f"wa{layer}"], [f"a{layer}"]),
            helper.make_node("Add", [h, f"a{layer}"], [f"r{layer}"]),
        ]
        if norm == "none":
            x = f"r{layer}"
        else:
            nodes += _norm(norm, f"r{layer}", f"npost{layer}", f"post{layer}", inits, rng)
            x = f"npost{layer}"
        nodes += [
            helper.make_node("Reshape", [x, "flat"], [f"x{layer}"]),
            helper.make_node(
                "MatMul", [f"x{layer}", f"wr{layer}"], [f"logits{layer}"], name=f"router{layer}"
            ),
            helper.make_node("Softmax", [f"logits{layer}"], [f"p{layer}"], axis=-1),
            helper.make_node("TopK", [f"p{layer}", "k"], [f"w{layer}", f"i{layer}"], axis=-1),
            helper.make_node(
                "OffloadedExpert",
                [f"x{layer}", f"i{layer}", f"w{layer}"],
                [f"y{layer}"],
                name=f"moe{layer}",
                domain="edgemoe",
                layer=layer,
                num_experts=E,
                top_k=K,
                activation="silu",
                gated=1,
            ),
            helper.make_node("Shape", [f"r{layer}"], [f"rshape{layer}"]),
            helper.make_node("Reshape", [f"y{layer}", f"rshape{layer}"], [f"y3{layer}"]),
            helper.make_node("Add", [f"r{layer}", f"y3{layer}"], [f"h{layer}"]),
        ]
        h = f"h{layer}"
    nodes.append(helper.make_node("Identity", [h], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "blocks",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "S", H])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "S", H])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgemoe", 1)]
    )
    model.ir_version = 8
    return model


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def _nodes(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.domain == "edgemoe" and n.op_type == RESIDUAL_OP_TYPE]


# --- the wiring (no op library needed) -------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["rms", "layernorm", "simplified"])
def test_residual_node_on_the_stream_leaving_each_layer(norm: str) -> None:
    from edgemoe_ort.export.schema import register_schema

    model = block_graph(norm)
    wired = _copy(model)
    report = wire_residual(wired)
    assert report.changed and report.opset == RESIDUAL_OPSET, report.summary()
    assert [(w.layer, w.residual, w.wired) for w in report.layers] == [(1, "h0", True), (2, "h1", True)]
    nodes = _nodes(wired)
    assert [next(a.i for a in n.attribute if a.name == "layer") for n in nodes] == [1, 2]
    for n, w in zip(nodes, report.layers, strict=True):
        assert n.input[0] == w.residual and n.output[0] == w.output
        readers = [m for m in wired.graph.node if w.residual in m.input]
        assert all(m.domain == "" for m in readers if m is not n)  # only the clone reads h itself
        # every original reader of h reads h' now (the input norm and the residual Add among them)
        assert sum(w.output in m.input for m in wired.graph.node) == w.consumers >= 2
    register_schema()
    if norm != "simplified":  # an ORT op in the ONNX domain: unknown to the checker
        onnx.checker.check_model(wired, full_check=True)
    assert [o.SerializeToString() for o in wired.graph.output] == [
        o.SerializeToString() for o in model.graph.output
    ]
    once = wired.SerializeToString()
    assert not wire_residual(wired).changed and wired.SerializeToString() == once


@pytest.mark.parametrize(
    ("norm", "why"),
    [("none", "no normalization before the router"), ("shape", "computed from the residual stream")],
)
def test_layers_without_the_pattern_are_skipped_with_why(norm: str, why: str) -> None:
    model = block_graph(norm)
    report = wire_residual(model)
    assert not report.changed and not _nodes(model)
    assert all(not w.wired and why in (w.note or "") for w in report.layers), report.summary()
    assert all(why in line for line in report.summary())


def test_wire_prefetch_inputs_adds_it_and_reports_it() -> None:
    model = block_graph()
    report = wire_prefetch_inputs(model, token_ids=None)
    assert [r.wired for r in report.residual] == [True, True] and report.opset == RESIDUAL_OPSET
    assert any(line.startswith("residual: layer 1: ResidualPrefetch on h0") for line in report.summary())
    plain = block_graph()
    assert not wire_prefetch_inputs(plain, token_ids=None, residual=False).residual and not _nodes(plain)


# --- ORT: the op --------------------------------------------------------------------------------------------


def _ops() -> Any:
    ops = pytest.importorskip("edgemoe_ort.runtime.ops")
    if not Path(ops.library_path()).is_file():
        pytest.skip(f"op library {ops.library_path()} not built (make lib)")
    return ops


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_bundle(
        tmp_path_factory.mktemp("residual") / "b", num_layers=LAYERS, num_experts=E, top_k=K, hidden=H,
        intermediate=8, seed=2,
    ).path  # fmt: skip


def _run(
    bundle: Path, model: onnx.ModelProto, extra: list[str] = (), stats: dict | None = None, **options: Any
) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    ops = _ops()
    m = _copy(model)
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in extra)
    so, sid = ops.make_session_options(bundle, ops.RuntimeOptions(**{"predictor": "none", **options}))
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    X = np.random.default_rng(5).standard_normal((2, 3, H)).astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    out = {}
    for _ in range(2):  # the second run with the first one's predictions
        out = dict(zip(names, sess.run(names, {"X": X}), strict=True))
    if stats is not None:
        stats.update(ops.store_stats(sid))
    return out


@pytest.mark.parametrize("norm", ["rms", "layernorm", "simplified"])
def test_scores_are_the_router_on_the_normalized_residual(bundle: Path, norm: str) -> None:
    """The clone of the router's normalization, fed the router's own residual r instead of h, gives the
    router's softmax: the scores are layer t's router on norm(h)."""
    import onnxruntime as ort

    model = block_graph(norm)
    wired = _copy(model)
    wire_residual(wired)
    taps = _run(bundle, model, [f"r{t}" for t in range(LAYERS)] + [f"p{t}" for t in range(LAYERS)])
    for t in (1, 2):
        scores = f"residual_scores_{t}"
        sub = subgraph_between(wired, f"h{t - 1}", scores)
        sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run([scores], {f"h{t - 1}": taps[f"r{t}"]})[0]
        np.testing.assert_allclose(got, taps[f"p{t}"], **TOL)


@pytest.mark.parametrize(
    "options",
    [
        dict(predictor="residual"),
        dict(predictor="residual", budget="50%"),
        dict(predictor="auto", budget="50%"),
        dict(predictor="gates", budget="50%"),
    ],
    ids=["residual", "residual-50%", "auto-50%", "gates-50%"],
)
def test_outputs_bit_identical_and_prefetches(bundle: Path, options: dict[str, Any]) -> None:
    model = block_graph()
    want = _run(bundle, model)
    wired = _copy(model)
    wire_prefetch_inputs(wired, token_ids=None)
    stats: dict[str, Any] = {}
    got = _run(bundle, wired, stats=stats, **options)
    np.testing.assert_array_equal(got["Y"], want["Y"])
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
    if options["predictor"] == "residual":
        assert stats["prefetch"]["issued"] > 0, stats["prefetch"]


def test_graph_without_the_node_runs_with_residual(bundle: Path) -> None:
    """An older graph under predictor residual: the same outputs; its layers are predicted by the stacked
    gates where the graph has them (input 3), else nothing is prefetched."""
    model = block_graph()
    want = _run(bundle, model)
    stats: dict[str, Any] = {}
    np.testing.assert_array_equal(_run(bundle, model, stats=stats, predictor="residual")["Y"], want["Y"])
    assert stats["prefetch"]["issued"] == 0
    gated = _copy(model)
    assert not wire_prefetch_inputs(gated, token_ids=None, residual=False).residual
    stats = {}
    np.testing.assert_array_equal(_run(bundle, gated, stats=stats, predictor="residual")["Y"], want["Y"])
    assert stats["prefetch"]["issued"] > 0, stats["prefetch"]


def _single_node(layer: int | None, experts: int = E) -> onnx.ModelProto:
    attrs = {} if layer is None else {"layer": layer}
    node = helper.make_node(RESIDUAL_OP_TYPE, ["h", "s"], ["h2"], name="rp", domain="edgemoe", **attrs)
    graph = helper.make_graph(
        [node],
        "one",
        [
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, None, H]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [None, experts]),
        ],
        [helper.make_tensor_value_info("h2", TensorProto.FLOAT, [None, None, H])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgemoe", 4)]
    )
    model.ir_version = 8
    return model


def _session(bundle: Path, model: onnx.ModelProto, **options: Any) -> Any:
    import onnxruntime as ort

    ops = _ops()
    so, _ = ops.make_session_options(bundle, ops.RuntimeOptions(**options))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_the_op_is_the_identity(bundle: Path) -> None:
    sess = _session(bundle, _single_node(1), predictor="residual")
    rng = np.random.default_rng(0)
    for b, s in ((2, 3), (1, 1), (0, 4)):
        h = rng.standard_normal((b, s, H)).astype(np.float32)
        p = rng.dirichlet(np.ones(E), b * s).astype(np.float32)
        np.testing.assert_array_equal(sess.run(None, {"h": h, "s": p})[0], h)


@pytest.mark.parametrize(
    ("layer", "words"),
    [
        (None, ["ResidualPrefetch node 'rp'", "missing int attribute 'layer'"]),
        (LAYERS, ["ResidualPrefetch node 'rp'", "attribute layer", f"[0, {LAYERS})", f"found {LAYERS}"]),
        (-1, ["attribute layer", "found -1"]),
    ],
)
def test_bad_attribute_is_one_clear_error(bundle: Path, layer: int | None, words: list[str]) -> None:
    with pytest.raises(Exception) as err:
        _session(bundle, _single_node(layer), predictor="residual")
    for w in words:
        assert w in str(err.value), str(err.value)


def test_bad_inputs_are_one_clear_error(bundle: Path) -> None:
    sess = _session(bundle, _single_node(1, experts=E + 1), predictor="residual")
    h = np.zeros((1, 2, H), np.float32)
    with pytest.raises(Exception) as err:
        sess.run(None, {"h": h, "s": np.zeros((2, E + 1), np.float32)})
    assert "layer 1: ResidualPrefetch node 'rp': scores shape: expected [..., 4]" in str(err.value)
    sess = _session(bundle, _single_node(1), predictor="residual")
    with pytest.raises(Exception) as err:
        sess.run(None, {"h": h, "s": np.zeros((3, E), np.float32)})
    assert "scores shape: expected leading dims holding the 2 tokens of h" in str(err.value)
