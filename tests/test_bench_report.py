"""The generated benchmark page: rows per cache policy and the per-budget RSS verdicts."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgemoe_ort.bench.cli import bench_app
from edgemoe_ort.bench.report import RSS_SLACK_BYTES, headline, rss_verdicts, write_report
from edgemoe_ort.bench.suite import findings
from edgemoe_ort.bundle.testing import make_synthetic_bundle, random_routing


def _trace(path, layers=2, E=8, K=2, prompt=5, steps=6):
    """A routing trace (npz, the format of edgemoe_ort.bench.trace) of random top-K routing."""
    rng = np.random.default_rng(0)
    arrays = {"num_layers": np.int64(layers), "num_steps": np.int64(steps), "num_experts": np.int64(E),
              "top_k": np.int64(K)}
    for s in range(steps):
        for li in range(layers):
            idx, w = random_routing(prompt if s == 0 else 1, E, K, rng)
            arrays[f"s{s}_l{li}_idx"], arrays[f"s{s}_l{li}_w"] = idx, w
    np.savez(path, **arrays)


def _run(tmp_path):
    b = make_synthetic_bundle(
        tmp_path / "b", num_layers=2, num_experts=8, hidden=64, intermediate=128, dtype="int4", group_size=32
    )
    _trace(tmp_path / "t.npz")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        bench_app,
        [str(b.path), "--trace", str(tmp_path / "t.npz"), "--budgets", "25%,50%", "--tokens", "6",
         "--repeats", "2", "--policy", "lru", "--rss-tokens", "8", "--json", str(out)],
    )
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def _with_fake_policy(run, policy="lfu", over_budget="50%"):
    """Copy the lru rows as another policy (2x slower) and push one of its peaks over the RSS goal."""
    run = copy.deepcopy(run)
    extra = []
    for m in [m for m in run["modes"] if m["mode"] == "edgemoe"]:
        f = copy.deepcopy(m)
        f["policy"], f["label"] = policy, f"edgemoe[{policy}]@{m['budget']}"
        f["decode_s_per_token_runs"] = [2 * t for t in m["decode_s_per_token_runs"]]
        f["decode_tokens_per_s"] = m["decode_tokens_per_s"] / 2
        if m["budget"] == over_budget:
            limit = run["dense_bytes"] + f["budget_bytes"] + RSS_SLACK_BYTES
            f["peak_rss_bytes"] = f["rss"]["base_rss_bytes"] + limit + (1 << 20)
        extra.append(f)
    run["modes"] += extra
    run["policies"] = ["lru", policy]
    return run


def test_rss_verdict_per_budget_uses_the_bundles_dense_bytes(tmp_path):
    run = _with_fake_policy(_run(tmp_path))
    v = {x["label"]: x for x in rss_verdicts(run)}
    assert set(v) == {"edgemoe[lru]@25%", "edgemoe[lru]@50%", "edgemoe[lfu]@25%", "edgemoe[lfu]@50%"}
    for x in v.values():
        row = next(m for m in run["modes"] if m["label"] == x["label"])
        assert x["limit"] == run["dense_bytes"] + row["budget_bytes"] + 64 * 2**20
        assert x["delta"] == row["peak_rss_bytes"] - row["rss"]["base_rss_bytes"]
        assert x["decode_tokens"] == 8
    assert v["edgemoe[lru]@25%"]["ok"] and "MiB: met" in v["edgemoe[lru]@25%"]["text"]
    assert not v["edgemoe[lfu]@50%"]["ok"] and "not met" in v["edgemoe[lfu]@50%"]["text"]
    assert headline(run)["edgemoe_over_naive"] > 0  # the lru row, found by policy


def test_report_shows_policy_rows_and_rss_verdicts(tmp_path):
    run = _with_fake_policy(_run(tmp_path))
    results = {"runs": {"tiny": run}, "kernels": None, "commands": ["x"], "notes": []}
    results["findings"] = findings(results)
    md = tmp_path / "bench.md"
    write_report(results, md, tmp_path / "img")
    text = md.read_text()
    assert "Cache policies (lru, lfu), per budget:" in text
    assert "| 25% | lfu |" in text and "| 50% | lru |" in text
    assert "| edgemoe | lfu | 25% (" in text  # the mode table's policy column
    assert "Peak RSS per budget" in text
    assert "edgemoe[lfu]@50%: peak RSS" in text and "not met" in text
    assert (tmp_path / "img" / "bench-tiny.png").stat().st_size > 1000


def test_ratios_are_withheld_when_the_resident_baseline_was_slower_than_a_storage_mode(tmp_path):
    """A loaded machine once printed ratios to roofline of 2.3 and 3.3: the resident baseline (every expert
    cached) ran slower than modes that read from storage. Such a run's ratios are withheld, everywhere."""
    from edgemoe_ort.bench.report import mode_table, paired_ratio, roofline_ratio
    from edgemoe_ort.bench.runner import ratios_withheld

    run = _run(tmp_path)
    assert run["ratios_withheld"] is None  # an ordinary run keeps them
    e = next(m for m in run["modes"] if m["mode"] == "edgemoe" and m["budget"] == "25%")
    assert e["bytes_read_per_token"] > 0
    assert roofline_ratio(run, e) == e["roofline_ratio"] and paired_ratio(run, e) is not None
    resident = {"mode": "resident", "label": "resident", "decode_s_per_token": 0.02,
                "bytes_read_per_token": 0}
    rows = [dict(e, decode_s_per_token=0.010), resident]
    why = ratios_withheld(rows, compute_s=0.020)
    assert why is not None
    assert "resident baseline (20.0 ms/token) was slower than edgemoe[lru]@25% (10.0 ms/token)" in why
    assert ratios_withheld(rows, compute_s=0.005) is None
    assert ratios_withheld([dict(e, decode_s_per_token=0.0099)], compute_s=0.010) is None  # jitter
    slow = dict(run, ratios_withheld=why)
    assert roofline_ratio(slow, e) is None and paired_ratio(slow, e) is None
    assert headline(slow)["roofline_ratio"] is None
    line = next(r for r in mode_table(slow).splitlines() if r.startswith("| edgemoe |") and "| 25%" in r)
    assert line.rstrip(" |").split("|")[-2:] == [" – ", " –"], line
    from edgemoe_ort.bench.report import plot_run

    files = plot_run("x", slow, tmp_path / "img")  # the ratio panel says withheld instead of plotting them
    assert files and all((tmp_path / "img" / f).is_file() for f in files)


def test_miss_precision_modes_and_the_twins_section(tmp_path):
    """A bundle with twins: --miss-precision exact,dynamic:... are modes of one interleaved run, each row
    carries its uses split, and the twins section pairs the dynamic rows with exact."""
    from edgemoe_ort.bench.report_twins import twins_markdown
    from edgemoe_ort.bench.runner import modes_for, parse_precision

    assert parse_precision("exact") == {"miss_precision": "exact"}
    assert parse_precision("dynamic:0.5:0.9") == {"miss_precision": "dynamic", "thresholds": (0.5, 0.9)}
    for bad in ("dynamic:0.9:0.5", "dynamic:0.5", "fast"):
        with pytest.raises(ValueError, match="--miss-precision"):
            parse_precision(bad)
    modes = modes_for(["25%"], ["lru"], None, None, ["exact", "dynamic"])
    labels = [m.label for m in modes if m.name == "edgemoe"]
    assert labels == ["edgemoe[lru]@25%", "edgemoe[lru~dynamic]@25%"]

    b = make_synthetic_bundle(tmp_path / "b", num_layers=2, num_experts=8, hidden=64, intermediate=128,
                              dtype="int8", twin="int4", group_size=32)
    _trace(tmp_path / "t.npz")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        bench_app,
        [str(b.path), "--trace", str(tmp_path / "t.npz"), "--budgets", "25%", "--tokens", "6",
         "--repeats", "2", "--modes", "edgemoe", "--miss-precision", "exact,dynamic:0.5:0.9", "--no-rss",
         "--json", str(out)],
    )
    assert res.exit_code == 0, res.output
    run = json.loads(out.read_text())
    rows = {m["label"]: m for m in run["modes"] if m["mode"] == "edgemoe"}
    assert set(rows) == {"edgemoe@25%", "edgemoe[~dynamic:0.5:0.9]@25%"}
    exact, dyn = rows["edgemoe@25%"], rows["edgemoe[~dynamic:0.5:0.9]@25%"]
    assert exact["miss_precision"] == "exact" and exact["uses_per_token"]["low"] == 0
    assert dyn["miss_precision"] == "dynamic:0.5:0.9" and dyn["uses_per_token"]["low"] > 0
    assert "dynamic:0.5:0.9 " in res.output  # the table's miss column shows the split
    curve = {"bundle": str(b.path), "budget": "25%", "policy": "lru", "tokens": 10, "best": "dynamic:0.5:0.9",
             "formats": {"primary": ["int8"], "twin": ["int4"]},
             "rows": [{"setting": "exact", "perplexity": 10.0, "ppl_increase": 0.0, "bytes_per_token": 2e6,
                       "fewer_bytes": 0.0, "uses": {"high": 8, "low": 0, "skipped": 0}, "thresholds": None},
                      {"setting": "dynamic:0.5:0.9", "perplexity": 10.1, "ppl_increase": 0.01,
                       "bytes_per_token": 1.5e6, "fewer_bytes": 0.25,
                       "uses": {"high": 5, "low": 3, "skipped": 0}, "thresholds": [0.5, 0.9]}]}
    run["precisions"] = ["exact", "dynamic:0.5:0.9"]
    text = "\n".join(twins_markdown({"twins_curve": curve, "runs": {"twins-small-rpi4": run}}))
    assert "| `dynamic:0.5:0.9` | 0.500, 0.900 | 10.100 | +1.00% | 1.500 | 25.0 % | 62 / 38 / 0 |" in text
    assert "`dynamic:0.5:0.9` vs exact: **" in text and "goal ≥ 1.2x within 2%" in text
    assert twins_markdown({"runs": {}}) == []


def test_kernel_tables_cover_every_quantized_format(tmp_path):
    """The suite's kernel part: the int4 comparison with ORT's ops, and `ours` across int8/int4/int3/int2."""
    from edgemoe_ort.bench.kernels import (
        KERNEL_FORMATS,
        format_bundle_path,
        kernel_bundle,
        run_format_bench,
        run_kernel_bench,
    )

    shape = dict(hidden=64, intermediate=128, group_size=32)
    kb = kernel_bundle(tmp_path / "kb", dtype="int4", **shape)
    k = run_kernel_bench(kb.path, tokens=(1, 3), samples=1, calls=1)
    k["formats"] = run_format_bench(tmp_path / "kb", tokens=(1, 3), samples=2, calls=1, **shape)
    assert KERNEL_FORMATS == ("int8", "int4", "int3", "int2")
    assert format_bundle_path(tmp_path / "kb", "int3") == tmp_path / "kb-int3"
    assert format_bundle_path(tmp_path / "kb", "int4") == tmp_path / "kb"
    rows = k["formats"]["results"]
    assert [(r["dtype"], r["T"]) for r in rows] == [(d, t) for t in (1, 3) for d in KERNEL_FORMATS]
    sizes = {r["dtype"]: r["expert_bytes"] for r in rows}
    assert sizes["int8"] > sizes["int4"] > sizes["int3"] > sizes["int2"]
    assert all(r["over_int4"] == 1.0 for r in rows if r["dtype"] == "int4")
    results = {"runs": {}, "kernels": k, "commands": ["x"], "notes": []}
    md = tmp_path / "bench.md"
    write_report(results, md, tmp_path / "img")
    text = md.read_text()
    assert "## Kernel micro-benchmark" in text and "### Ours across expert formats" in text
    for d in KERNEL_FORMATS:
        assert f"| {d} | 1 |" in text and f"| {d} | 3 |" in text
    assert len(k["loadavg_start"]) == 3 and len(k["formats"]["loadavg_end"]) == 3
    assert text.count("1-minute load average") == 2


def test_ablation_section_walks_the_steps(tmp_path):
    """Each ablation step is the row of its configuration (the plan step and those after it on the run's plan
    variant); speed-ups are paired per repeat against naive and the step above; perplexity stays exact's
    until the plan step, then is each step's own."""
    from edgemoe_ort.bench.ablation import PLAN, PRECISION, PREDICTOR, ROUTING, steps
    from edgemoe_ort.bench.report_ablation import ablation_markdown

    run = _run(tmp_path)
    lru = next(m for m in run["modes"] if m["label"] == "edgemoe[lru]@25%")
    run["modes"] = [m for m in run["modes"] if m["mode"] != "edgemoe"]
    todo = steps("hobbit")
    assert [s["variant"] for s in todo] == [None, None, None, PLAN, PLAN, PLAN]
    for i, s in enumerate(todo):
        m = copy.deepcopy(lru)
        m.update(policy=s["policy"], predictor=s["predictor"], routing=s["routing"],
                 miss_precision=s["precision"], variant=s["variant"])
        m["decode_s_per_token_runs"] = [t / (1 + i) for t in lru["decode_s_per_token_runs"]]
        m["decode_tokens_per_s"] = lru["decode_tokens_per_s"] * (1 + i)
        run["modes"].append(m)
        if s["variant"]:  # the same settings on the main bundle: never taken for a plan step
            run["modes"].append(dict(copy.deepcopy(lru), policy=s["policy"], predictor=s["predictor"],
                                     routing=s["routing"], miss_precision=s["precision"],
                                     decode_s_per_token_runs=[99.0] * len(m["decode_s_per_token_runs"])))
    run["profile"] = {"name": "rpi4"}
    ab = {"run": "ablation-small-rpi4", "bundle": "b", "plan_bundle": "p", "budget_bytes": 1 << 20,
          "policy": "hobbit", "tokens": 64,
          "perplexity": {"exact": 10.0, "plan": 10.05, "twins": 10.1, "routing": 10.3},
          "precision": PRECISION, "routing": ROUTING, "predictor": PREDICTOR}
    results = {"runs": {"ablation-small-rpi4": run}, "ablation": ab}
    text = "\n".join(ablation_markdown(results))
    assert "on `p`" in text and "1.00 MiB" in text
    lines = [x for x in text.splitlines() if x.startswith("| ")][1:]
    assert [x.split(" | ")[0] for x in lines] == [
        "| naive (no cache)", "| + cache (lru)", "| + best policy", "| + prefetch", "| + bitwidth plan",
        "| + low-bit twins", "| + cache-aware routing"]
    assert " | 2.00 | " in lines[2]  # the best-policy step: twice the step above (paired)
    assert " | 1.25 | " in lines[5]  # the twins step: 5/4 of the plan step, not the main bundle's row
    assert lines[3].endswith("| 10.000 |") and lines[4].endswith("| 10.050 (+0.50%) |")
    assert lines[5].endswith("| 10.100 (+1.00%) |") and lines[6].endswith("| 10.300 (+3.00%) |")
    # a run without a plan bundle: the plan step is a dash, twins and routing come from the main bundle
    ab2 = dict(ab, plan_bundle=None)
    run2 = copy.deepcopy(run)
    for m in run2["modes"]:
        m["variant"] = None
    text = "\n".join(ablation_markdown({"runs": {ab["run"]: run2}, "ablation": ab2}))
    lines = [x for x in text.splitlines() if x.startswith("| ")][1:]
    assert "bitwidth plan left out" in text
    assert lines[4] == "| + bitwidth plan | – | – | – | – | – | – | – |"
    assert lines[5].endswith("| 10.100 (+1.00%) |")
    # several ablations (the large model's: no perplexity, no plan step), each its own section
    big = dict(ab2, run="ablation-large", model="large", perplexity={}, tokens=0)
    text = "\n".join(ablation_markdown({"runs": {ab["run"]: run2, "ablation-large": run2},
                                         "ablations": {ab["run"]: ab2, "ablation-large": big}}))
    assert text.count("## Ablation (") == 2 and "## Ablation (large model, 25 %" in text
    assert "No held-out perplexity" in text.split("## Ablation (large")[1]
    large_rows = [x for x in text.split("## Ablation (large")[1].splitlines() if x.startswith("| + ")]
    assert all(x.endswith("| – |") for x in large_rows)
    assert ablation_markdown({"runs": {}}) == []


def test_ablation_runs_only_the_settings_its_steps_take():
    """Per policy: no prefetch, + prefetch, + twins, + routing (with twins); nothing else of the product."""
    from edgemoe_ort.bench.ablation import POLICIES, PRECISION, PREDICTOR, ROUTING, _a_step
    from edgemoe_ort.bench.runner import modes_for

    every = modes_for(["25%"], list(POLICIES), ["none", PREDICTOR], ["exact", ROUTING], ["exact", PRECISION])
    kept = [m.label for m in every if m.name == "edgemoe" and _a_step(m)]
    assert kept == [
        f"edgemoe[{p}{tag}]@25%"
        for p in POLICIES
        for tag in ("", f"+{PREDICTOR}", f"+{PREDICTOR}~{PRECISION}", f"+{PREDICTOR}/{ROUTING}~{PRECISION}")
    ]


def _site(kind, node, layer, router, probe):
    return {"kind": kind, "node": node, "layer": layer, "hidden": 4, "num_experts": 8,
            "recall_router": router, "recall_probe": probe}


def test_prediction_section_shows_the_probes_and_the_large_models_profile(tmp_path):
    recall = {"token": [0.9, 0.8, 0.7], "residual": [None, 0.93, 0.91], "gates": [None, 0.85, 0.9]}
    probes = {"ridge": 1e-4, "train_tokens": 900, "sites": [
        _site("residual", 1, 1, 0.92, 0.93), _site("residual", 2, 2, 0.82, 0.91),
        _site("gates", 0, 1, 0.61, 0.85), _site("gates", 0, 2, 0.6, 0.77), _site("gates", 1, 2, 0.83, 0.9)]}
    corpus = {"paths": ["c"], "train_tokens": 900, "heldout_tokens": 100, "heldout_share": 0.1}
    ids = {**corpus, "paths": ["random ids (seed 1)"]}
    results = {"runs": {}, "kernels": None, "commands": ["x"], "notes": [], "findings": [],
               "prefetch_profile": {"bundle": "b", "corpus": corpus, "recall": recall,
                                    "auto": [["token"], ["residual"], ["residual"]], "probes": probes},
               "prefetch_profile_large": {"bundle": "L", "corpus": ids, "recall": recall,
                                          "auto": [["token"], ["residual"], ["gates"]], "probes": probes}}
    md = tmp_path / "bench.md"
    write_report(results, md, tmp_path / "img")
    text = md.read_text()
    assert "- `residual`: layer 1 0.920 → **0.930**, layer 2 0.820 → **0.910**" in text
    # the next layer's row only (node 0's row for layer 2 is two layers ahead)
    assert "- `gates` (the next layer's row): layer 1 0.610 → **0.850**, layer 2 0.830 → **0.900**" in text
    assert "Goal (best predictor ≥ 0.85 at every layer): met (best per layer 0.900, 0.930, 0.910)" in text
    assert "### The large model's profile" in text and "`random ids (seed 1)`" in text
    assert "| residual | 0.820 / 0.920 / 0.920 | 0.910 / 0.930 / 0.930 |" in text
    assert "`auto` there: gates, residual (layers 1-2)" in text
    del results["prefetch_profile"]["probes"], results["prefetch_profile_large"]
    write_report(results, md, tmp_path / "img")
    text = md.read_text()
    assert "probes fitted" not in text and "large model's profile" not in text
