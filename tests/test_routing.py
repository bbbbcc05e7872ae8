"""Cache-aware routing (CacheAwareTopK, docs/op-contract.md) on the default model's bundle: ``exact`` is the
router's own TopK bit for bit, the biased rules trade perplexity for misses and say so in their counters,
the options are checked, old bundles are upgraded, and ``edgemoe-eval`` measures it from the command line."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from edgemoe_ort.bundle.residual import RESIDUAL_OPSET
from edgemoe_ort.bundle.routing import ROUTING_OP_TYPE
from edgemoe_ort.bundle.wiring import wire_bundle
from edgemoe_ort.eval import evaluate
from edgemoe_ort.runtime.generate import MoEModel, load_tokenizer
from edgemoe_ort.runtime.ops import RuntimeOptions, config_keys, session_config_entries

REPO = Path(__file__).resolve().parents[1]
PROMPT = "def read_lines(path):\n    with open(path) as f:\n"


def _text_tokens(bundle: Path, n: int) -> np.ndarray:
    """``n`` tokens of this repository's own Python (text the default model never trained on)."""
    from edgemoe_ort.bundle import Bundle

    tok = load_tokenizer(Bundle.open(bundle))
    text = "".join(p.read_text() for p in sorted((REPO / "edgemoe_ort" / "runtime").glob("*.py")))
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    assert len(ids) >= n
    return ids[:n]


def _routers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == "edgemoe" and n.op_type == ROUTING_OP_TYPE]


def _unrouted_copy(bundle: Path, dst: Path) -> Path:
    """A copy of ``bundle`` whose CacheAwareTopK nodes are ONNX TopK again (same inputs and outputs): the
    graph as it was before cache-aware routing existed."""
    shutil.copytree(bundle, dst)
    path = dst / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for i, n in enumerate(model.graph.node):
        if n.domain == "edgemoe" and n.op_type == ROUTING_OP_TYPE:
            model.graph.node[i].CopyFrom(helper.make_node("TopK", list(n.input), list(n.output), name=n.name))
    onnx.save(model, str(path))
    return dst


def _logits_and_tokens(bundle: Path, **opts: Any) -> tuple[np.ndarray, list[int]]:
    with MoEModel.load(bundle, RuntimeOptions(predictor="none", **opts)) as m:
        logits = m.logits(m.encode(PROMPT))
        tokens = m.generate(PROMPT, max_new_tokens=24, temperature=0.0).tokens
    return logits, tokens


def test_the_exported_graph_routes_every_layer_through_cache_aware_topk(tiny_bundle: Path) -> None:
    model = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False)
    nodes = _routers(model)
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert sorted(a["layer"] for a in attrs) == [0, 1, 2, 3]
    assert {a["scores"] for a in attrs} == {b"probs"}  # Mixtral: TopK over the router's softmax
    assert not [n for n in model.graph.node if n.op_type == "TopK"]
    # the export's ResidualPrefetch nodes (opset 4) include CacheAwareTopK's opset 3
    assert max(o.version for o in model.opset_import if o.domain == "edgemoe") == RESIDUAL_OPSET


@pytest.mark.parametrize("budget", [None, "25%"])
def test_exact_is_bit_identical_to_the_routers_own_topk(
    tiny_bundle: Path, tmp_path: Path, budget: Any
) -> None:
    before = _unrouted_copy(tiny_bundle, tmp_path / "unrouted")
    want_logits, want_tokens = _logits_and_tokens(before, budget=budget)
    for opts in (
        dict(routing="exact"),
        dict(routing="cache-prior", routing_lambda=0.0),  # lambda 0 = exact
        dict(routing="cache-prior", routing_lambda=5.0, routing_keep=2),  # J >= k = exact
        dict(routing="max-rank", routing_keep=2, routing_window=8),
    ):
        logits, tokens = _logits_and_tokens(tiny_bundle, budget=budget, **opts)
        assert np.array_equal(logits, want_logits), opts
        assert tokens == want_tokens, opts


def _eval(bundle: Path, ids: np.ndarray, **opts: Any) -> Any:
    with MoEModel.load(bundle, RuntimeOptions(budget="25%", predictor="none", **opts)) as m:
        r = evaluate(m, ids, window=64)
        layers = m.session.stats()["layers"]
    return r, layers


def test_biased_rules_trade_perplexity_for_misses_and_count_them(tiny_bundle: Path) -> None:
    ids = _text_tokens(tiny_bundle, 512)
    exact, exact_layers = _eval(tiny_bundle, ids)
    r = exact.cache["routing"]
    assert r["rule"] == "exact" and r["changed"] == 0 and r["misses_avoided"] == 0
    assert r["selections"] == exact.tokens_run * 2 * 4  # every token run, top-2, 4 layers
    for opts in (
        dict(routing="cache-prior", routing_lambda=0.35),
        dict(routing="max-rank", routing_window=4),
    ):
        biased, layers = _eval(tiny_bundle, ids, **opts)
        c = biased.cache
        assert c["routing"]["rule"] == opts["routing"]
        assert c["routing"]["selections"] == r["selections"]
        assert 0 < c["routing"]["changed"] < c["routing"]["selections"], opts
        assert c["routing"]["misses_avoided"] > 0, opts
        assert c["misses"] < 0.85 * exact.cache["misses"], (opts, c["misses"], exact.cache["misses"])
        assert biased.perplexity != exact.perplexity and math.isfinite(biased.perplexity)
        assert biased.perplexity < 1.5 * exact.perplexity  # rerouted, not broken
        for key in ("selections", "changed", "misses_avoided"):  # the per-layer counters add up
            assert sum(lay["routing"][key] for lay in layers) == c["routing"][key]


def test_j_keeps_the_true_top_expert(tiny_bundle: Path) -> None:
    """Layer 0's router input depends on the tokens only, so its exact choice is known under any rule: with
    J = 1 the first expert of every token is the exact one; the paper's J = 0 with a large lambda moves it."""
    from edgemoe_ort.profile.routing import RoutingRecorder

    ids = _text_tokens(tiny_bundle, 256)

    def layer0(**opts: Any) -> np.ndarray:
        with RoutingRecorder(tiny_bundle, RuntimeOptions(budget="25%", predictor="none", **opts)) as rec:
            return rec.record(ids, window=1, batch=1).layers[0].indices

    exact = layer0()
    for opts in (dict(routing="cache-prior", routing_lambda=2.0), dict(routing="max-rank", routing_window=8)):
        got = layer0(**opts)
        assert np.array_equal(got[:, 0], exact[:, 0]), opts
        assert (got[:, 1] != exact[:, 1]).any(), opts
    moved = layer0(routing="cache-prior", routing_lambda=2.0, routing_keep=0)
    assert (moved[:, 0] != exact[:, 0]).any()


def test_options_are_checked_and_reach_the_session(tmp_path: Path) -> None:
    keys = {k["key"] for k in config_keys()}
    assert {
        "edgemoe.routing",
        "edgemoe.routing_lambda",
        "edgemoe.routing_keep",
        "edgemoe.routing_window",
    } <= keys
    for bad, word in (
        (dict(routing="biased"), "routing: expected one of exact, cache-prior, max-rank"),
        (dict(routing_lambda=-1.0), "routing_lambda"),
        (dict(routing_lambda=float("nan")), "routing_lambda"),
        (dict(routing_keep=5000), "routing_keep"),
        (dict(routing_window=-1), "routing_window"),
        (dict(routing_keep=True), "routing_keep"),
    ):
        with pytest.raises(ValueError, match=word):
            RuntimeOptions(**bad)
    e = session_config_entries(
        tmp_path, RuntimeOptions(routing="max-rank", routing_keep=0, routing_window=3), "s"
    )
    assert (e["edgemoe.routing"], e["edgemoe.routing_keep"], e["edgemoe.routing_window"]) == (
        "max-rank",
        "0",
        "3",
    )
    assert session_config_entries(tmp_path, RuntimeOptions(), "s")["edgemoe.routing"] == "exact"


def test_wire_bundle_adds_routing_to_an_old_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    old = _unrouted_copy(tiny_bundle, tmp_path / "old")
    assert not _routers(onnx.load(str(old / "model.onnx"), load_external_data=False))
    want, _ = _logits_and_tokens(old, budget="25%")
    weights = {p.name: p.read_bytes() for p in old.iterdir() if p.suffix in (".bin", ".data", ".weights")}
    report = wire_bundle(old)["decoder"]
    assert report.changed and report.opset == RESIDUAL_OPSET  # ResidualPrefetch too (opset 4 >= 3)
    assert sum("CacheAwareTopK (topk over probs)" in n for n in report.notes) == 4, report.notes
    assert len(_routers(onnx.load(str(old / "model.onnx"), load_external_data=False))) == 4
    got, _ = _logits_and_tokens(old, budget="25%")
    assert np.array_equal(got, want)
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.name in weights} == weights
    assert not wire_bundle(old)["decoder"].changed  # idempotent


def _eval_cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("edgemoe-eval")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)


def test_eval_cli(tiny_bundle: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "text"
    corpus.mkdir()
    for p in sorted((REPO / "edgemoe_ort" / "bundle").glob("*.py"))[:4]:
        shutil.copy(p, corpus / p.name)
    out = _eval_cli(
        str(tiny_bundle),
        "--corpus",
        str(corpus),
        "--split",
        "all",
        "--tokens",
        "300",
        "--budget",
        "25%",
        "--routing",
        "cache-prior",
        "--routing-lambda",
        "0.35",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["tokens"] == 300 - 3 and doc["windows"] == 3 and doc["mode"] == "decode"  # 128 + 128 + 44
    assert math.isfinite(doc["perplexity"]) and doc["perplexity"] > 1
    assert doc["cache"]["routing"]["rule"] == "cache-prior" and doc["cache"]["routing"]["changed"] > 0
    assert doc["options"]["routing_lambda"] == 0.35
    text = _eval_cli(str(tiny_bundle), "--corpus", str(corpus), "--tokens", "200", "--split", "all")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("perplexity ") and "routing exact: 0 of" in text.stdout
    for args, word in (
        (["--routing", "biased"], "--routing"),
        (["--routing-lambda", "-1"], "--routing-lambda"),
        (["--split", "train"], "--split"),
        (["--mode", "fast"], "--mode"),
    ):
        bad = _eval_cli(str(tiny_bundle), "--corpus", str(corpus), *args)
        assert bad.returncode == 2, (args, bad.stderr)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0] and "Traceback" not in bad.stderr, (args, bad.stderr)
    missing = _eval_cli(str(tiny_bundle), "--corpus", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "nothing" in missing.stderr
