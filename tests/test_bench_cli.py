"""edgemoe-bench on a tiny synthetic bundle (trace replay workload): every field of every mode is there."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from edgemoe_ort.bench.runner import RESULT_FIELDS
from edgemoe_ort.bundle.testing import make_synthetic_bundle, random_routing
from edgemoe_ort.cli import bench_app


def _trace(path, layers=2, E=8, K=2, prompt=5, steps=6):
    rng = np.random.default_rng(0)
    arrays = {
        "num_layers": np.int64(layers),
        "num_steps": np.int64(steps),
        "num_experts": np.int64(E),
        "top_k": np.int64(K),
    }
    for s in range(steps):
        T = prompt if s == 0 else 1
        for li in range(layers):
            idx, w = random_routing(T, E, K, rng)
            arrays[f"s{s}_l{li}_idx"], arrays[f"s{s}_l{li}_w"] = idx, w
    np.savez(path, **arrays)


def test_bench_json_has_every_field(tmp_path):
    b = make_synthetic_bundle(
        tmp_path / "b", num_layers=2, num_experts=8, hidden=64, intermediate=128, dtype="int4", group_size=32
    )
    _trace(tmp_path / "t.npz")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        bench_app,
        [
            str(b.path),
            "--trace",
            str(tmp_path / "t.npz"),
            "--budgets",
            "25%,100%",
            "--tokens",
            "6",
            "--repeats",
            "2",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "p.png"),
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    labels = [m["label"] for m in r["modes"]]
    assert labels == ["resident", "inmemory", "naive", "mmap@25%", "mmap@100%", "edgemoe@25%", "edgemoe@100%"]
    for m in r["modes"]:
        missing = [k for k in RESULT_FIELDS if k not in m]
        assert not missing, (m["label"], missing)
        assert m["peak_rss_bytes"] and m["peak_rss_bytes"] > m["rss"]["base_rss_bytes"]
        assert m["decode_tokens_per_s"] > 0 and m["runs"] == 2
    by = {m["label"]: m for m in r["modes"]}
    assert by["naive"]["hit_rate"] == 0 and by["naive"]["bytes_read_per_token"] > 0
    assert by["edgemoe@100%"]["bytes_read_per_token"] <= by["naive"]["bytes_read_per_token"]
    assert by["inmemory"]["bytes_read_per_token"] == 0
    for k in (
        "compute_s_per_token",
        "roofline_bw_bytes_per_s",
        "storage",
        "machine",
        "store_bytes",
        "dense_bytes",
    ):
        assert k in r
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_bench_rejects_bad_arguments(tmp_path):
    b = make_synthetic_bundle(tmp_path / "b", num_layers=1, num_experts=4, hidden=32, intermediate=32)
    res = CliRunner().invoke(bench_app, [str(b.path), "--tokens", "1"])
    assert res.exit_code == 2
    res = CliRunner().invoke(bench_app, [str(b.path), "--profile", "nope", "--tokens", "3"])
    assert res.exit_code == 2
