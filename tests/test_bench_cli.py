"""edgemoe-bench on a tiny synthetic bundle (trace replay workload): every field of every mode is there."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgemoe_ort.bench.cli import bench_app
from edgemoe_ort.bench.runner import RESULT_FIELDS
from edgemoe_ort.bundle.testing import make_synthetic_bundle, random_routing


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


def _small(tmp_path):
    b = make_synthetic_bundle(
        tmp_path / "b", num_layers=2, num_experts=8, hidden=64, intermediate=128, dtype="int4", group_size=32
    )
    _trace(tmp_path / "t.npz")
    return b


def _supported(policies):
    from edgemoe_ort.bench.runner import check_policies

    out = []
    for p in policies:
        try:
            check_policies([p])
        except ValueError:
            continue
        out.append(p)
    return out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policy", "nope"], "--policy: expected one of"),
        (["--policies", "lru,nope"], "--policies: expected one of"),
        (["--policies", "lru,lru"], "more than once"),
        (["--policies", ""], "--policies"),
        (["--policies", "none"], "naive"),
        (["--policy", "lru", "--policies", "lru"], "one of them"),
        (["--policy", "pinned"], "--frequencies"),
        (["--policies", "lru", "--modes", "naive"], "--modes"),
        (["--modes", "naive,bogus"], "--modes"),
        (["--budgets", "25%,lots"], "--budgets"),
        (["--rss-tokens", "0"], "--rss-tokens"),
        (["--trace", "missing.npz"], "--trace"),
        (["--routing", "biased"], "--routing: expected exact, cache-prior:LAMBDA[:J] or max-rank:J[:M]"),
        (["--routing", "cache-prior:-1"], "--routing-lambda: expected a number in [0, 100]"),
        (["--routing", "max-rank:x:4"], "--routing"),
        (["--routing", "exact,exact"], "without repeats"),
        (["--routing", "exact", "--modes", "naive"], "--modes"),
    ],
)
def test_bad_flags_fail_before_running(tmp_path, monkeypatch, args, message):
    """One clear error line, exit status 2, and nothing run (run_bench is never reached)."""
    import edgemoe_ort.bench.runner as runner

    b = _small(tmp_path)

    def boom(*a, **k):
        raise AssertionError("run_bench called despite a bad flag")

    monkeypatch.setattr(runner, "run_bench", boom)
    base = [str(b.path), "--trace", str(tmp_path / "t.npz"), "--tokens", "4"]
    res = CliRunner().invoke(bench_app, base + args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:") and message in res.output, res.output


def test_policy_flag_labels_rows_and_rss_runs_64_tokens(tmp_path):
    b = _small(tmp_path)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        bench_app,
        [
            str(b.path),
            "--trace",
            str(tmp_path / "t.npz"),
            "--budgets",
            "25%",
            "--tokens",
            "6",
            "--repeats",
            "1",
            "--policy",
            "lru",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    by = {m["label"]: m for m in r["modes"]}
    assert "edgemoe[lru]@25%" in by and by["edgemoe[lru]@25%"]["policy"] == "lru"
    assert by["naive"]["policy"] == "none" and by["inmemory"]["policy"] is None
    assert r["rss_decode_tokens"] == 64
    for m in r["modes"]:  # the peak-RSS run decodes 64 tokens (the 6-step trace is cycled)
        assert m["rss"]["decode_tokens"] == 64, m["label"]
        assert len(m["rss"]["hwm_per_step"]) == 65
    assert "edgemoe[lru]@25%: peak RSS" in res.output and ": met" in res.output


def test_policies_compared_in_one_run(tmp_path):
    pols = _supported(["lru", "lfu", "edgemoe", "hobbit"])
    if len(pols) < 2:
        pytest.skip(f"the op library runs only {pols}: policies need the new store")
    b = _small(tmp_path)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        bench_app,
        [
            str(b.path),
            "--trace",
            str(tmp_path / "t.npz"),
            "--budgets",
            "25%,50%",
            "--tokens",
            "6",
            "--repeats",
            "2",
            "--policies",
            ",".join(pols),
            "--rss-tokens",
            "8",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["policies"] == pols
    edge = [m for m in r["modes"] if m["mode"] == "edgemoe"]
    assert [m["label"] for m in edge] == [f"edgemoe[{p}]@{bb}" for p in pols for bb in ("25%", "50%")]
    for m in edge:
        assert m["runs"] == 2 and m["decode_tokens_per_s"] > 0 and m["policy"] in pols
        assert (
            m["bytes_read_per_token"]
            <= next(x for x in r["modes"] if x["mode"] == "naive")["bytes_read_per_token"]
        )


def test_routing_specs_become_modes_and_options():
    from edgemoe_ort.bench.runner import modes_for, parse_routing

    assert parse_routing("exact") == {"routing": "exact"}
    assert parse_routing("cache-prior:0.35") == {"routing": "cache-prior", "routing_lambda": 0.35}
    assert parse_routing("cache-prior:0.5:0") == {
        "routing": "cache-prior",
        "routing_lambda": 0.5,
        "routing_keep": 0,
    }
    assert parse_routing("max-rank:1:4") == {"routing": "max-rank", "routing_keep": 1, "routing_window": 4}
    modes = [
        m
        for m in modes_for(["25%"], ["lru"], ["none", "auto"], ["exact", "cache-prior:0.35"])
        if m.name == "edgemoe"
    ]
    assert [m.label for m in modes] == [
        "edgemoe[lru]@25%",
        "edgemoe[lru/cache-prior:0.35]@25%",
        "edgemoe[lru+auto]@25%",
        "edgemoe[lru+auto/cache-prior:0.35]@25%",
    ]
    opts = modes[1].options(io_threads=2, threads=None, profile=None)
    assert (opts.routing, opts.routing_lambda, opts.predictor) == ("cache-prior", 0.35, "none")
    assert modes[0].options(io_threads=2, threads=None, profile=None).routing == "exact"


def test_variant_bundle_runs_interleaved_at_the_main_budget(tiny_bundle, tiny_bundle_fp32):
    """A run's variant (the same model exported otherwise) gets every edgemoe mode again, at the bytes of the
    main bundle's budget, decoding the same tokens; its rows are apart from the main rows in the report."""
    from edgemoe_ort.bench.report import edgemoe_row, row_config
    from edgemoe_ort.bench.runner import run_bench
    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.runtime.ops import parse_budget

    main = Bundle.open(tiny_bundle)
    r = run_bench(tiny_bundle, budgets=["25%"], tokens=3, repeats=1, modes=["edgemoe"], rss=False,
                  variants={"fp32": tiny_bundle_fp32})
    assert [m["label"] for m in r["modes"]] == ["resident", "edgemoe@25%", "fp32:edgemoe@25%"]
    want = parse_budget("25%", main.store_bytes, main.primary_bytes)
    mine, other = edgemoe_row(r, "25%"), edgemoe_row(r, "25%", variant="fp32")
    assert mine["variant"] is None and other["variant"] == "fp32"
    assert mine["budget_bytes"] == other["budget_bytes"] == want
    assert other["variant_bundle"] == str(Bundle.open(tiny_bundle_fp32).path)
    assert r["variants"]["fp32"]["store_bytes"] > 4 * main.store_bytes
    # fp32 experts are 8x the bytes: at the same budget fewer fit and each miss reads more
    assert other["bytes_read_per_token"] > mine["bytes_read_per_token"]
    assert row_config(other) == "fp32: lru"


def test_variant_of_another_model_is_refused(tiny_bundle, tmp_path):
    from edgemoe_ort.bench.runner import run_bench

    other = _small(tmp_path)
    with pytest.raises(ValueError, match=r"variant 'x' .*expected 4 MoE layers"):
        run_bench(tiny_bundle, budgets=["25%"], tokens=2, repeats=1, rss=False, variants={"x": other.path})
    with pytest.raises(ValueError, match="variants: expected a name"):
        run_bench(tiny_bundle, budgets=["25%"], tokens=2, repeats=1, rss=False, variants={"a b": other.path})
