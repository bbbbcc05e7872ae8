"""The store's storage throttle (edgemoe.throttle_bw / edgemoe.throttle_latency_us): honoured, validated,
reported. No timed assertion beyond "at least the emulated time" (the throttle only ever adds time)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgemoe_ort.bundle.testing import make_synthetic_bundle, random_routing
from edgemoe_ort.runtime import ops
from edgemoe_ort.runtime.ops import RuntimeOptions, open_session


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_synthetic_bundle(
        tmp_path_factory.mktemp("thr") / "b",
        num_layers=2,
        num_experts=8,
        hidden=128,
        intermediate=256,
        dtype="int4",
        group_size=32,
    )


def _feeds(T, seed=0):
    rng = np.random.default_rng(seed)
    f = {"X": rng.standard_normal((T, 128)).astype(np.float32)}
    for li in range(2):
        idx, w = random_routing(T, 8, 2, rng)
        f[f"topk_indices_{li}"], f[f"topk_weights_{li}"] = idx, w
    return f


@pytest.mark.parametrize("io", ["direct", "mmap"])
@pytest.mark.parametrize("threads", [1, 3])
def test_throttled_reads_take_at_least_bytes_over_bw(bundle, io, threads):
    bw, lat = 40e6, 500.0
    s = open_session(
        bundle.graph_path(),
        bundle.path,
        RuntimeOptions(policy="none", io=io, io_threads=threads, throttle_bw=bw, throttle_latency_us=lat),
    )
    ref = open_session(bundle.graph_path(), bundle.path, RuntimeOptions(policy="none", io=io))
    f = _feeds(6)
    y = s.run(None, f)[0]
    np.testing.assert_array_equal(y, ref.run(None, f)[0])  # same numbers, only slower
    st = s.stats()
    assert st["throttle_bw"] == bw and st["throttle_latency_us"] == lat
    assert st["reads"] > 0
    # each read takes >= latency + its bytes / bw, so the sum over reads (read_s) is at least that
    assert st["read_s"] >= st["bytes_read"] / bw + st["reads"] * lat * 1e-6 * 0.999
    # one device: the reads of all I/O threads share the bandwidth, so the run takes >= bytes / bw overall
    assert st["stall_s"] > 0


def test_unthrottled_reports_zero(bundle):
    s = open_session(bundle.graph_path(), bundle.path, RuntimeOptions())
    s.run(None, _feeds(2))
    st = s.stats()
    assert st["throttle_bw"] == 0 and st["throttle_latency_us"] == 0 and st["throttle_s"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"throttle_bw": -1},
        {"throttle_latency_us": -5},
        {"throttle_bw": "fast"},
        {"throttle_bw": float("inf")},
        {"throttle_latency_us": True},
        {"throttle_latency_us": 1e300},
        {"throttle_bw": 1e-12},
        {"throttle_bw": 1e14},
    ],
)
def test_runtime_options_validate(bad):
    with pytest.raises(ValueError, match="throttle"):
        RuntimeOptions(**bad)


@pytest.mark.parametrize(
    "key,value",
    [
        ("edgemoe.throttle_bw", "fast"),
        ("edgemoe.throttle_bw", "-3"),
        ("edgemoe.throttle_bw", "10%"),
        ("edgemoe.throttle_latency_us", "1ms"),
        ("edgemoe.throttle_latency_us", ""),
        ("edgemoe.throttle_latency_us", "1e300"),
        ("edgemoe.throttle_bw", "1e-12"),
        ("edgemoe.throttle_bw", "99999TB"),
    ],
)
def test_config_entries_rejected_at_registration(bundle, key, value):
    so = ort.SessionOptions()
    so.add_session_config_entry("edgemoe.bundle_dir", str(bundle.path))
    so.add_session_config_entry(key, value)
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        so.register_custom_ops_library(str(ops.library_path()))


@pytest.mark.parametrize("value", ["90MB", "1.5GiB", "100000000", "2.5e7", "0"])
def test_config_bw_units_accepted(bundle, value):
    so = ort.SessionOptions()
    so.add_session_config_entry("edgemoe.bundle_dir", str(bundle.path))
    so.add_session_config_entry("edgemoe.throttle_bw", value)
    so.register_custom_ops_library(str(ops.library_path()))
