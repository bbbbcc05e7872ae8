"""OffloadedExpert vs the numpy reference (edgemoe_ort.bundle.testing) on the bundle's dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe_ort.bundle.testing import chain_feeds as feeds
from edgemoe_ort.bundle.testing import make_synthetic_bundle, random_routing, reference_chain
from edgemoe_ort.runtime.ops import RuntimeOptions, open_session

TOL = {"fp32": 1e-5, "fp16": 1e-4, "int8": 1e-4, "int4": 1e-4, "int3": 1e-4, "int2": 1e-4, "mixed": 1e-4}




def rel_err(y, ref):
    return float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))


def run_case(tmp_path, *, T, K, dtype="fp32", num_layers=1, E=8, seed=0, drop=False, options=None, **kw):
    b = make_synthetic_bundle(tmp_path / "b", num_layers=num_layers, num_experts=E, top_k=K, dtype=dtype,
                              seed=seed, **kw)
    sess = open_session(b.graph_path(), b.path, options or RuntimeOptions())
    rng = np.random.default_rng(seed + 1)
    X = rng.standard_normal((T, b.layers[0]["hidden"])).astype(np.float32)
    routing = [random_routing(T, E, K, rng) for _ in range(num_layers)]
    if drop:  # some dropped slots (-1)
        for idx, _ in routing:
            idx[::3, -1] = -1
    y = sess.run(None, feeds(X, routing))[0]
    ref = reference_chain(b, X, routing)
    assert y.shape == X.shape and y.dtype == np.float32
    return y, ref, sess


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4", "int3", "int2"])
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("K", [1, 2, 8])
def test_one_layer_formats(tmp_path, dtype, T, K):
    y, ref, sess = run_case(tmp_path, T=T, K=K, dtype=dtype)
    assert rel_err(y, ref) <= TOL[dtype]
    st = sess.stats()
    assert st["calls"] == 1 and st["misses"] >= 1 and st["direct_io"] in (True, False)


ACTS = [(a, g) for a in ("silu", "gelu", "gelu_tanh", "relu") for g in (True, False)] + [("swiglu_oai", True)]


@pytest.mark.parametrize(("activation", "gated"), ACTS)
@pytest.mark.parametrize("T", [1, 64])
def test_activations(tmp_path, activation, gated, T):
    y, ref, _ = run_case(tmp_path, T=T, K=2, activation=activation, gated=gated, bias=True, dtype="fp32")
    assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("T", [1, 64])
def test_mixed_format_layer(tmp_path, T):
    dtypes = ["fp32", "fp16", "int8", "int4", "int3", "int2", "fp16", "int3"]
    y, ref, _ = run_case(tmp_path, T=T, K=2, dtype=dtypes, group_size=32)
    assert rel_err(y, ref) <= TOL["mixed"]


@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_multi_layer_chain(tmp_path, T, dtype):
    y, ref, sess = run_case(tmp_path, T=T, K=2, dtype=dtype, num_layers=3, drop=True)
    assert rel_err(y, ref) <= TOL[dtype]
    assert sess.stats()["calls"] == 3


@pytest.mark.parametrize("group_size", [16, 12])  # 12: not a multiple of 8, the kernels' scalar fallback
def test_odd_group_size_and_dims(tmp_path, group_size):
    # group size not dividing the row length, odd intermediate (packed rows padded to a byte)
    y, ref, _ = run_case(tmp_path, T=5, K=2, dtype=["int4", "int8", "int3", "int2"] * 2, hidden=40,
                         intermediate=37, group_size=group_size)
    assert rel_err(y, ref) <= 1e-4


@pytest.mark.parametrize("dtype", ["int3", "int2"])
@pytest.mark.parametrize("T", [1, 3, 64])
def test_low_bit_bundle_matches_numpy(tmp_path, dtype, T):
    """A whole int3 / int2 bundle (odd widths, partial last groups) through an ORT session vs numpy."""
    y, ref, sess = run_case(tmp_path, T=T, K=2, dtype=dtype, num_layers=2, hidden=72, intermediate=43,
                            group_size=32, drop=True)
    assert rel_err(y, ref) <= TOL[dtype]
    assert sess.stats()["calls"] == 2


def test_all_slots_dropped_and_zero_tokens(tmp_path):
    b = make_synthetic_bundle(tmp_path / "b", top_k=2)
    sess = open_session(b.graph_path(), b.path)
    X = np.ones((3, 64), np.float32)
    idx = -np.ones((3, 2), np.int64)
    w = np.ones((3, 2), np.float32)
    y = sess.run(None, {"X": X, "topk_indices_0": idx, "topk_weights_0": w})[0]
    assert np.array_equal(y, np.zeros_like(X))
    y0 = sess.run(None, {"X": X[:0], "topk_indices_0": idx[:0], "topk_weights_0": w[:0]})[0]
    assert y0.shape == (0, 64)
    assert sess.stats()["misses"] == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_intra_op_threads_same_bits(tmp_path, threads):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    y1, ref, _ = run_case(tmp_path / "a", T=64, K=2, dtype="int4", options=RuntimeOptions(intra_op_threads=1))
    opts = RuntimeOptions(intra_op_threads=threads)
    y2, _, _ = run_case(tmp_path / "b", T=64, K=2, dtype="int4", options=opts)
    assert np.array_equal(y1, y2)
    assert rel_err(y1, ref) <= 1e-4
