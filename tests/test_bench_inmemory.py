"""bench.inmemory: a bundle converted to ORT's QMoE / MoE computes what our OffloadedExpert op computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgemoe_ort.bench.inmemory import convert_bundle_to_inmemory, layer_plan
from edgemoe_ort.bundle.testing import make_synthetic_bundle, random_routing
from edgemoe_ort.runtime.ops import RuntimeOptions, open_session

CASES = [
    # dtype, group, gated, activation, bias, expected op, tolerance (relative to max |y|)
    ("int4", 64, True, "silu", False, "QMoE", 1e-5),
    ("int4", 32, True, "swiglu_oai", True, "QMoE", 1e-5),
    ("int4", 32, False, "relu", False, "QMoE", 1e-5),
    ("int8", 32, True, "silu", False, "QMoE", 5e-2),  # ORT's int8 QMoE quantizes activations to int8
    ("fp32", 0, True, "silu", False, "MoE", 1e-5),
    ("fp16", 0, False, "relu", False, "MoE", 1e-5),
    ("int4", 24, True, "silu", False, "MoE", 1e-5),  # group 24 is not a power of two: MoE fallback
]


@pytest.mark.parametrize("dtype,gs,gated,act,bias,op,tol", CASES)
def test_conversion_matches_our_op(tmp_path, dtype, gs, gated, act, bias, op, tol):
    H, inter = 96 if gs == 24 else 128, 192
    b = make_synthetic_bundle(
        tmp_path / "b",
        num_layers=2,
        num_experts=8,
        top_k=2,
        hidden=H,
        intermediate=inter,
        dtype=dtype,
        group_size=gs or 32,
        gated=gated,
        activation=act,
        bias=bias,
    )
    assert layer_plan(b, 0)["op"] == op
    rep = convert_bundle_to_inmemory(b.path, tmp_path / "mem" / "model.onnx")
    assert rep["ops"] == [op]
    m = onnx.load(rep["model"], load_external_data=False)
    assert not any(n.domain == "edgemoe" for n in m.graph.node)
    rng = np.random.default_rng(1)
    for T in (1, 7):
        f = {"X": rng.standard_normal((T, H)).astype(np.float32)}
        for li in range(2):
            idx, w = random_routing(T, 8, 2, rng)
            f[f"topk_indices_{li}"], f[f"topk_weights_{li}"] = (
                idx,
                (w * 1.7).astype(np.float32),
            )  # un-normalised
        ours = open_session(b.graph_path(), b.path, RuntimeOptions()).run(None, f)[0]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        theirs = ort.InferenceSession(rep["model"], so, providers=["CPUExecutionProvider"]).run(None, f)[0]
        assert theirs.shape == ours.shape
        err = np.abs(theirs - ours).max() / np.abs(ours).max()
        assert err <= tol, (dtype, act, T, err)


def test_qmoe_weights_are_the_bundles_bytes(tmp_path):
    """int4 conversion reuses the quantized bytes: the expert initializers are exactly the store's "
    "size order."""
    b = make_synthetic_bundle(
        tmp_path / "b", num_layers=1, num_experts=4, hidden=128, intermediate=128, dtype="int4", group_size=64
    )
    rep = convert_bundle_to_inmemory(b.path, tmp_path / "m" / "model.onnx")
    nibbles = 4 * (2 * 128 * 128 + 128 * 128) // 2
    assert (
        nibbles < rep["expert_bytes"] < nibbles * 1.2
    )  # + f32 scales and packed zero points, not fp32 weights
