"""Dense quantization (issue 13, item 2): ORT's MatMulNBits / GatherBlockQuantized layouts, the graph rewrite,
the weight kinds, and the exporter's --dense-bits / --dense-group-size options."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemoe_ort.bundle.dense import (
    KIND_KEY,
    QUANTIZED_KINDS,
    dense_bytes_by_kind,
    initializer_kinds,
    node_kind,
)
from edgemoe_ort.bundle.dense_quant import check_dense_options, quantize_dense
from edgemoe_ort.quant import dequantize, quantize
from edgemoe_ort.quant.nbits import block_quantize

MS = "com.microsoft"


def _run(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], feeds: dict[str, np.ndarray]
) -> np.ndarray:
    ins = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for k, v in feeds.items()
    ]
    g = helper.make_graph(
        nodes, "g", ins, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(MS, 1)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [96, 72])  # 72: the last block is partial (its tail holds the zero point)
def test_matmul_nbits_layout_computes_the_reference_weights(bits: int, k: int) -> None:
    rng = np.random.default_rng(bits * 100 + k)
    n, bs = 40, 32
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = block_quantize(w, bits, bs, keep_reference=True)
    # the same numbers as the expert quantizer at that group size (one arithmetic for both)
    np.testing.assert_array_equal(q.reference(), dequantize(quantize(w, f"int{bits}", bs)))
    assert q.matmul_b.shape == (n, -(-k // bs), bs * bits // 8)
    a = rng.standard_normal((2, 3, k)).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "S", "Z"],
        ["Y"],
        domain=MS,
        K=k,
        N=n,
        bits=bits,
        block_size=bs,
        accuracy_level=0,
    )
    inits = [
        numpy_helper.from_array(x, name)
        for x, name in ((q.matmul_b, "B"), (q.scales, "S"), (q.zero_points, "Z"))
    ]
    y = _run([node], inits, {"A": a})
    ref = a @ q.reference().T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_layout_is_bit_exact(bits: int) -> None:
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((50, 64)).astype(np.float32)
    q = block_quantize(w, bits, 32, keep_reference=True)
    idx = np.array([[0, 49, 7], [3, 3, 12]], np.int64)
    node = helper.make_node(
        "GatherBlockQuantized",
        ["D", "I", "S", "Z"],
        ["Y"],
        domain=MS,
        bits=bits,
        block_size=32,
        gather_axis=0,
        quantize_axis=1,
    )
    inits = [
        numpy_helper.from_array(x, name)
        for x, name in ((q.gather_data(), "D"), (q.scales, "S"), (q.zero_points, "Z"))
    ]
    np.testing.assert_array_equal(_run([node], inits, {"I": idx}), q.reference()[idx])


def test_gather_layout_needs_whole_blocks() -> None:
    q = block_quantize(np.ones((4, 40), np.float32), 4, 32)
    with pytest.raises(ValueError, match="40 columns.*block size 32"):
        q.gather_data()


@pytest.mark.parametrize(
    ("bits", "block", "match"),
    [
        (3, 32, "dense bits: expected one of 32, 16, 8, 4, found 3"),
        (True, 32, "dense bits"),
        (4, 48, "power of two >= 16.*found 48"),
        (4, 8, "found 8"),
    ],
)
def test_bad_dense_options_are_named(bits: int, block: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_dense_options(bits, block)


# --- the rewrite on the default model's exported graph --------------------------------------------------
def _graph(bundle: Path) -> onnx.ModelProto:
    return onnx.load(str(bundle / "model.onnx"))


def _dequantized_twin(quantized: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """``original`` with every weight the rewrite quantized replaced by what the quantized ops dequantize to:
    the quantized graph at accuracy_level 0 must compute the same function."""
    twin = onnx.ModelProto()
    twin.CopyFrom(original)
    q_inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    gone = {t.name for t in original.graph.initializer} - set(q_inits)
    for t in twin.graph.initializer:
        if t.name not in gone:
            continue
        w = numpy_helper.to_array(t)
        found = [(b, k) for b in (4, 8) for k in ("nk", "kn") if f"{t.name}_q{b}{k}_scales" in q_inits]
        assert len(found) == 1, (t.name, found)
        bits, key = found[0]  # "kn": a MatMul's [K, N] weight, quantized as its transpose
        ref = block_quantize(w.T if key == "kn" else w, bits, 32, keep_reference=True).reference()
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(ref.T if key == "kn" else ref), t.name))
    return twin


def _logits(model: onnx.ModelProto, bundle: Path, ids: np.ndarray) -> np.ndarray:
    from edgemoe_ort.runtime import RuntimeOptions
    from edgemoe_ort.runtime.ops import make_session_options

    so, _ = make_session_options(bundle, RuntimeOptions())
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        else:  # past_key_values.*: [batch, kv_heads, 0, head_dim]
            shape = [
                ids.shape[0] if d == "batch" or d == "batch_size" else (0 if isinstance(d, str) else d)
                for d in i.shape
            ]
            feeds[i.name] = np.zeros(shape, np.float32)
    return sess.run(["logits"], feeds)[0]


@pytest.mark.export
@pytest.mark.parametrize("bits", [4, 8])
def test_rewrite_computes_the_dequantized_weights(tiny_bundle_fp32: Path, bits: int) -> None:
    """Every converted MatMul / tied head / embedding computes with exactly the reference weights: at
    accuracy_level 0 the quantized graph's logits equal those of the fp32 graph holding those weights."""
    original = _graph(tiny_bundle_fp32)
    q = onnx.ModelProto()
    q.CopyFrom(original)
    report = quantize_dense(q, bits=bits, block_size=32, accuracy_level=0)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 4 * 4 + 1 and ops.count("GatherBlockQuantized") == 1, report.summary()
    assert not report.skipped, report.skipped
    twin = _dequantized_twin(q, original)
    ids = np.array([[1, 17, 300, 5, 4000, 42]], np.int64)
    got, want = _logits(q, tiny_bundle_fp32, ids), _logits(twin, tiny_bundle_fp32, ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    # and against the fp32 model itself: close, not equal
    full = _logits(original, tiny_bundle_fp32, ids)
    rel = float(np.abs(got - full).max() / np.abs(full).max())
    assert 0 < rel < (0.2 if bits == 4 else 0.02), rel


@pytest.mark.export
def test_rewrite_keeps_gates_and_labels(tiny_bundle_fp32: Path) -> None:
    original = _graph(tiny_bundle_fp32)
    before = {t.name: t.raw_data for t in original.graph.initializer}
    kinds = initializer_kinds(original.graph)
    assert {"attention", "embedding", "gate", "norm"} <= set(kinds.values())
    q = onnx.ModelProto()
    q.CopyFrom(original)
    report = quantize_dense(q, bits=4)
    after = {t.name: t.raw_data for t in q.graph.initializer}
    for name, kind in kinds.items():
        if (
            kind in QUANTIZED_KINDS
            and len(next(t for t in original.graph.initializer if t.name == name).dims) == 2
        ):
            assert name not in after, name
        else:  # routers, norms, constants: untouched, byte for byte
            assert after[name] == before[name], name
    for n in q.graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            assert n.domain == MS and node_kind(n) in QUANTIZED_KINDS
            assert (
                n.attribute
                and any(a.name == "accuracy_level" and a.i == 4 for a in n.attribute)
                or n.op_type == "GatherBlockQuantized"
            )
    assert any(o.domain == MS for o in q.opset_import)
    assert report.bytes_after["attention"] < report.bytes_before["attention"] / 5
    assert report.bytes_after["gate"] == report.bytes_before["gate"]
    onnx.checker.check_model(q)


@pytest.mark.export
def test_fp16_stores_half_and_casts(tiny_bundle_fp32: Path) -> None:
    original = _graph(tiny_bundle_fp32)
    q = onnx.ModelProto()
    q.CopyFrom(original)
    report = quantize_dense(q, bits=16)
    casts = [n for n in q.graph.node if n.op_type == "Cast" and n.name.endswith("_cast")]
    assert len(casts) == 17 and all(node_kind(c) in QUANTIZED_KINDS for c in casts)
    assert abs(report.bytes_after["attention"] * 2 - report.bytes_before["attention"]) < 1024  # + constants
    ids = np.array([[1, 2, 3]], np.int64)
    got, want = _logits(q, tiny_bundle_fp32, ids), _logits(original, tiny_bundle_fp32, ids)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * float(np.abs(want).max()))


def test_unlabelled_graph_is_left_alone() -> None:
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [w],
    )
    m = helper.make_model(g)
    report = quantize_dense(m, bits=4)
    assert [n.op_type for n in m.graph.node] == ["MatMul"] and not report.weights


def test_weight_with_a_user_that_cannot_convert_stays_fp32() -> None:
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    mm = helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")
    add = helper.make_node("Add", ["W", "W"], ["Z"], name="add")
    for n in (mm, add):
        n.metadata_props.add(key=KIND_KEY, value="attention")
    g = helper.make_graph(
        [mm, add],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 64])],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, None),
        ],
        [w],
    )
    m = helper.make_model(g)
    report = quantize_dense(m, bits=4)
    assert [n.op_type for n in m.graph.node] == ["MatMul", "Add"]
    assert report.skipped == ["W (attention): used by Add 'add'"]


# --- the exporter ---------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from edgemoe_ort.cli import export_app; export_app()", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dense-bits", "3"], "--dense-bits: expected 32, 16, 8, 4, found 3"),
        (["--dense-group-size", "48"], "--dense-group-size: expected a power of two >= 16, found 48"),
        (["--group-size", "0"], "--group-size: expected an integer >= 1, found 0"),
    ],
)
def test_cli_refuses_bad_options_first(tmp_path: Path, flags: list[str], message: str) -> None:
    r = _cli("/nonexistent/checkpoint", "-o", str(tmp_path / "b"), *flags)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "b").exists()


@pytest.mark.export
def test_api_checks_options_before_loading(tmp_path: Path) -> None:
    from edgemoe_ort.export import export_model

    for kwargs, match in (
        ({"group_size": 0}, "group_size"),
        ({"dense_bits": 5}, "dense bits"),
        ({"dense_group_size": 100}, "dense group size"),
    ):
        with pytest.raises(ValueError, match=match):  # not "checkpoint not found": nothing was looked up
            export_model("/nonexistent/checkpoint", tmp_path / "b", **kwargs)  # type: ignore[arg-type]


@pytest.mark.export
@pytest.mark.slow
def test_export_qwen2_moe_with_dense_int4_keeps_gates(tmp_path: Path) -> None:
    """A shared expert is quantized, its sigmoid gate and the router are not; the bundle runs close to the
    fp32-dense one, and edgemoe-inspect reports the kinds."""
    from edgemoe_ort.export import export_model_with_report
    from edgemoe_ort.export.testing import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint("qwen2_moe", tmp_path / "ckpt", seed=3, hidden_size=64)
    ref = export_model_with_report(ckpt, tmp_path / "d32", bits=32)
    rep = export_model_with_report(ckpt, tmp_path / "d4", bits=32, dense_bits=4)
    d = rep.dense["decoder"]
    assert d.weights["shared_expert"] == 3 * 2 and d.weights["attention"] >= 4 * 2, d.summary()
    assert d.bytes_after["gate"] == d.bytes_before["gate"] > 0
    kinds = dense_bytes_by_kind(rep.bundle / "model.onnx")
    assert set(kinds["shared_expert"]) == {"int4"} and set(kinds["gate"]) == {"fp32"}, kinds
    ids = np.array([[1, 5, 9, 30]], np.int64)
    got = _logits(_graph(rep.bundle), rep.bundle, ids)
    want = _logits(_graph(ref.bundle), ref.bundle, ids)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 0.25
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from edgemoe_ort.cli import inspect_app; inspect_app()",
            str(rep.bundle),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    dense = json.loads(r.stdout)["model"]["dense"]["decoder"]
    assert dense["shared_expert"] == kinds["shared_expert"]
    shutil.rmtree(ckpt)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_bias_becomes_matmul_nbits(trans_b: int) -> None:
    """A Gemm's constant weight (either orientation) and its bias vector go to MatMulNBits (B, bias input)."""
    rng = np.random.default_rng(trans_b)
    w = rng.standard_normal((24, 64)).astype(np.float32)  # [N, K]
    bias = rng.standard_normal(24).astype(np.float32)
    stored = w if trans_b else np.ascontiguousarray(w.T)
    gemm = helper.make_node("Gemm", ["A", "W", "C"], ["Y"], name="g", transB=trans_b)
    gemm.metadata_props.add(key=KIND_KEY, value="attention")
    g = helper.make_graph([gemm], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, 64])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(stored, "W"), numpy_helper.from_array(bias, "C")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    quantize_dense(m, bits=8, block_size=32, accuracy_level=0)
    assert [n.op_type for n in m.graph.node] == ["MatMulNBits"] and m.graph.node[0].input[5] == "C"
    a = rng.standard_normal((3, 64)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    ref = a @ block_quantize(w, 8, 32, keep_reference=True).reference().T + bias
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    kinds = dense_bytes_by_kind_of(m)
    assert set(kinds["attention"]) == {"int8", "fp32"}  # the bias stays a float32 input


def dense_bytes_by_kind_of(m: onnx.ModelProto) -> dict[str, dict[str, int]]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        onnx.save(m, f"{d}/m.onnx")
        return dense_bytes_by_kind(f"{d}/m.onnx")


def test_weight_beyond_an_f16_scale_stays_fp32_with_its_reason() -> None:
    w = np.ones((16, 64), np.float32)
    w[3, 5] = 3e38  # (hi - lo) / 15 does not fit a float16 scale
    mm = helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")
    mm.metadata_props.add(key=KIND_KEY, value="lm_head")
    g = helper.make_graph([mm], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g)
    report = quantize_dense(m, bits=4)
    assert [n.op_type for n in m.graph.node] == ["MatMul"]
    assert len(report.skipped) == 1 and report.skipped[0].startswith("W (lm_head): weight range too large")
