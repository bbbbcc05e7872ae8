"""The memory model (edgemoe_ort.runtime.memory), what edgemoe-inspect shows of it, and the edgemoe-run policy
flags' errors. Synthetic bundles only: no torch, no export."""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgemoe_ort.bundle import Bundle
from edgemoe_ort.bundle.testing import make_synthetic_bundle
from edgemoe_ort.cli import inspect_app, run_app
from edgemoe_ort.runtime import memory
from edgemoe_ort.runtime.memory import (
    DEFAULT_CONTEXT,
    FIXED_OVERHEAD_BYTES,
    ITEMS,
    MAX_DEFAULT_PROMPT_TOKENS,
    estimate_rss,
    kv_bytes_per_token,
    minimum_budget,
    model_context,
)
from edgemoe_ort.runtime.ops import POLICIES, parse_budget

MiB = 1 << 20
LAYERS, KV_HEADS, HEAD_DIM, VOCAB, HIDDEN, HEADS, CONTEXT = 2, 4, 16, 100, 64, 4, 128
CONFIG = {"max_position_embeddings": CONTEXT, "vocab_size": VOCAB, "hidden_size": HIDDEN,
          "num_attention_heads": HEADS}


def _decoder_graph(path: Path, weight_floats: int = 1 << 18, *, concat: bool = False) -> None:
    """A stand-in decoder graph with the runtime's I/O names and one big initializer (which the shape
    reader must skip, not parse). Its presents are the pasts; with ``concat``, ``Concat(past, new)`` with
    each layer's new keys computed from the previous layer's presents (the runtime holds that cache once)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, KV_HEADS, "past", HEAD_DIM])
               for n in past]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", VOCAB])]
    outputs += [helper.make_tensor_value_info(n.replace("past_key_values.", "present."), TensorProto.FLOAT,
                                              [1, KV_HEADS, "total", HEAD_DIM]) for n in past]
    w = numpy_helper.from_array(np.arange(weight_floats, dtype=np.float32), "w")
    nodes = [helper.make_node("Identity", [n], [n.replace("past_key_values.", "present.")]) for n in past]
    if concat:
        nodes = [helper.make_node("Cast", ["input_ids"], ["ids_kv"], to=TensorProto.FLOAT),
                 helper.make_node("Unsqueeze", ["ids_kv", "axes03"], ["ids_4d"]),
                 helper.make_node("Expand", ["ids_4d", "kvshape"], ["new_0"])]
        for i in range(LAYERS):
            for kv in ("key", "value"):
                nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.{kv}", f"new_{i}"],
                                              [f"present.{i}.{kv}"], axis=2))
            nodes += [helper.make_node("ReduceSum", [f"present.{i}.key"], [f"k_{i}"], keepdims=0),
                      helper.make_node("ReduceSum", [f"present.{i}.value"], [f"v_{i}"], keepdims=0),
                      helper.make_node("Add", [f"k_{i}", f"v_{i}"], [f"s_{i}"]),
                      helper.make_node("Add", [f"new_{i}", f"s_{i}"], [f"new_{i + 1}"])]
    nodes.append(helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Unsqueeze", ["ids_f", "axes"], ["ids_3d"]))
    nodes.append(helper.make_node("Expand", ["ids_3d", "shape"], ["logits"]))
    inits = [w, numpy_helper.from_array(np.array([2], np.int64), "axes"),
             numpy_helper.from_array(np.array([1, 1, VOCAB], np.int64), "shape"),
             numpy_helper.from_array(np.array([0, 3], np.int64), "axes03"),
             numpy_helper.from_array(np.array([1, KV_HEADS, 1, HEAD_DIM], np.int64), "kvshape")]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, initializer=inits)
    onnx.save(helper.make_model(graph), str(path))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Mixed formats (the largest record is the fp32 expert's), a decoder graph with a KV cache, a config."""
    root = tmp_path_factory.mktemp("mem") / "b"
    make_synthetic_bundle(root, num_layers=LAYERS, num_experts=8, hidden=HIDDEN, intermediate=96,
                          dtype=["int4"] * 7 + ["fp32"], group_size=32)
    _decoder_graph(root / "model.onnx")
    mf = root / "manifest.json"
    m = json.loads(mf.read_text())
    m["model"]["config"] = CONFIG
    mf.write_text(json.dumps(m))
    return Bundle.open(root)


def test_minimum_budget_is_the_largest_record_length(bundle: Bundle) -> None:
    lengths = [int(r["length"]) for r in bundle.manifest["experts"]]
    fp32 = [int(r["length"]) for r in bundle.manifest["experts"] if r["format"]["dtype"] == "fp32"]
    assert minimum_budget(bundle) == max(lengths) == max(fp32) > min(lengths)
    assert minimum_budget(bundle.path) == minimum_budget(bundle)  # a path works too
    assert minimum_budget(bundle) == bundle.summary()["largest_expert_bytes"]


def test_kv_and_context_come_from_the_graph_and_config(bundle: Bundle) -> None:
    # 2 layers x (key + value) x kv_heads x head_dim x float32
    assert kv_bytes_per_token(bundle) == LAYERS * 2 * KV_HEADS * HEAD_DIM * 4
    assert model_context(bundle) == CONTEXT
    # the reader skips the weights: it agrees with onnx on the I/O
    ins, outs, by_type = memory._graph_io(bundle.graph_path("decoder"))
    ref = onnx.load(str(bundle.graph_path("decoder")))
    assert [i.name for i in ins] == [i.name for i in ref.graph.input]
    assert [o.name for o in outs] == [o.name for o in ref.graph.output]
    assert set(by_type) == {TensorProto.FLOAT, TensorProto.INT64}
    assert estimate_rss(bundle, "25%")["prepacked_bytes"] == 0  # a float32 graph


@pytest.mark.parametrize("external", [False, True])
def test_prepacked_bytes_count_the_uint8_weights(tmp_path: Path, external: bool) -> None:
    """MatMulNBits' weights are uint8 initializers; the reader finds their bytes in the file's raw data or in
    the external data's ``length``, without reading the data."""
    path = tmp_path / "g.onnx"
    big = numpy_helper.from_array(np.zeros((1000, 33), np.uint8), "b")
    other = numpy_helper.from_array(np.zeros(77, np.float32), "f")
    small = numpy_helper.from_array(np.zeros(5, np.uint8), "z")
    half = numpy_helper.from_array(np.zeros(40, np.float16), "h")
    node = helper.make_node("Identity", ["x"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                          [big, other, small, half])
    model = helper.make_model(g)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location="g.data", size_threshold=100)
        assert (tmp_path / "g.data").stat().st_size >= 33000
    else:
        onnx.save(model, str(path))
    by_type = memory._graph_io(path)[2]
    assert by_type[TensorProto.UINT8] == 33000 + 5 and by_type[TensorProto.FLOAT16] == 80
    assert by_type[TensorProto.FLOAT] == 77 * 4


def test_estimate_items_sum_to_the_total(bundle: Bundle) -> None:
    est = estimate_rss(bundle, "25%")
    assert est["total_bytes"] == sum(est[k] for k in ITEMS)
    assert est["budget_bytes"] == parse_budget("25%", bundle.store_bytes) == est["expert_bytes"]
    assert est["dense_bytes"] == bundle.dense_bytes
    assert est["fixed_overhead_bytes"] == FIXED_OVERHEAD_BYTES
    assert est["kv_cache_bytes"] == 2 * kv_bytes_per_token(bundle) * CONTEXT  # past + present
    assert (est["context_tokens"], est["prompt_tokens"]) == (CONTEXT, min(CONTEXT, MAX_DEFAULT_PROMPT_TOKENS))
    t = est["prompt_tokens"]
    assert est["activation_bytes"] == 2 * 4 * t * (VOCAB + HEADS * t + 8 * HIDDEN)
    gated_rows, inter, top_k = 2 * 96, 96, 2
    assert est["op_scratch_bytes"] == 4 * t * (top_k * HIDDEN + HIDDEN + gated_rows + inter)
    assert est["minimum_budget_bytes"] == minimum_budget(bundle)
    assert est["store_bytes"] == bundle.store_bytes


def test_estimate_budget_forms_and_bounds(bundle: Bundle) -> None:
    floor = minimum_budget(bundle)
    by_int = estimate_rss(bundle, floor)
    assert by_int["expert_bytes"] == floor
    assert estimate_rss(bundle, f"{floor}")["total_bytes"] == by_int["total_bytes"]
    # experts never exceed the store: a budget above it costs nothing more
    whole = estimate_rss(bundle, None)
    assert whole["expert_bytes"] == bundle.store_bytes
    assert estimate_rss(bundle, "1GiB")["total_bytes"] == whole["total_bytes"]
    # one more budget byte, one more byte of estimate (below the store size, once run time outweighs load)
    assert by_int["load_transient_bytes"] == 0
    assert estimate_rss(bundle, floor + 4096)["total_bytes"] == by_int["total_bytes"] + 4096
    with pytest.raises(ValueError, match=rf"budget: expected at least {floor} bytes .*found {floor - 1}"):
        estimate_rss(bundle, floor - 1)
    with pytest.raises(ValueError, match="budget"):
        estimate_rss(bundle, "lots")
    with pytest.raises(ValueError, match="context"):
        estimate_rss(bundle, None, context=0)
    with pytest.raises(ValueError, match="prompt_tokens"):
        estimate_rss(bundle, None, prompt_tokens=0)


def test_kv_cache_held_once_where_the_graph_allows(tmp_path: Path) -> None:
    """A graph whose presents are ``Concat(past, new)``, layer by layer: the runtime writes each layer's
    presents over the previous layer's past, so the cache costs (layers + 1) / layers of itself, whole
    pages; the stand-in graph above (presents = pasts) keeps the two copies of session.run."""
    root = tmp_path / "kv"
    make_synthetic_bundle(root, num_layers=LAYERS, num_experts=8, hidden=HIDDEN, intermediate=96)
    _decoder_graph(root / "model.onnx", concat=True)
    b = Bundle.open(root)
    per_tensor = KV_HEADS * HEAD_DIM * 4  # bytes per token of one key or value tensor
    assert kv_bytes_per_token(b) == LAYERS * 2 * per_tensor
    page = mmap.PAGESIZE
    for ctx in (CONTEXT, 1000):
        est = estimate_rss(b, None, context=ctx)
        assert est["kv_cache_bytes"] == (LAYERS + 1) * 2 * (-(-per_tensor * ctx // page) * page)
        assert est["kv_cache_bytes"] < 2 * kv_bytes_per_token(b) * ctx
        assert est["total_bytes"] == sum(est[k] for k in ITEMS)


def test_context_and_prompt_scale_their_items(bundle: Bundle) -> None:
    short = estimate_rss(bundle, None, context=16, prompt_tokens=8)
    long = estimate_rss(bundle, None, context=1024, prompt_tokens=512)
    assert long["kv_cache_bytes"] == 64 * short["kv_cache_bytes"]
    assert long["op_scratch_bytes"] == 64 * short["op_scratch_bytes"]
    assert long["activation_bytes"] > 64 * short["activation_bytes"]  # attention scores grow with T^2
    for k in ("dense_bytes", "expert_bytes", "fixed_overhead_bytes"):
        assert long[k] == short[k]


def test_load_transient_covers_dense_weights_held_twice(tmp_path: Path) -> None:
    """Creating the session holds the weights twice, before any expert is read: the peak is the larger of
    dense + dense and dense + experts + KV + activations + scratch."""
    root = tmp_path / "heavy"
    make_synthetic_bundle(root, num_layers=LAYERS, num_experts=8, hidden=HIDDEN, intermediate=96)
    _decoder_graph(root / "model.onnx", weight_floats=4 << 20)  # 16 MiB of dense weights
    b = Bundle.open(root)
    run_items = ("expert_bytes", "kv_cache_bytes", "activation_bytes", "op_scratch_bytes")
    small = estimate_rss(b, minimum_budget(b), context=16, prompt_tokens=8)
    assert small["load_transient_bytes"] == small["dense_bytes"] - sum(small[k] for k in run_items) > 0
    assert small["total_bytes"] == FIXED_OVERHEAD_BYTES + 2 * small["dense_bytes"]
    assert small["total_bytes"] == sum(small[k] for k in ITEMS)
    big = estimate_rss(b, None, context=8192, prompt_tokens=2048)
    assert big["load_transient_bytes"] == 0
    assert big["total_bytes"] == FIXED_OVERHEAD_BYTES + big["dense_bytes"] + sum(big[k] for k in run_items)


def test_defaults_without_config_or_kv_cache(tmp_path: Path) -> None:
    b = make_synthetic_bundle(tmp_path / "plain", num_layers=1, num_experts=4, hidden=32, intermediate=48)
    assert model_context(b) == DEFAULT_CONTEXT
    assert kv_bytes_per_token(b) == 0  # the synthetic graph has no past_key_values inputs
    est = estimate_rss(b, None)
    assert est["kv_cache_bytes"] == 0 and est["prompt_tokens"] == MAX_DEFAULT_PROMPT_TOKENS
    assert est["total_bytes"] == sum(est[k] for k in ITEMS)


def test_fixed_overhead_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "memory.md").read_text()
    assert f"{FIXED_OVERHEAD_BYTES // MiB} MiB" in doc
    assert "FIXED_OVERHEAD_BYTES" in doc


# --- edgemoe-inspect -------------------------------------------------------------------------------------
def _invoke(app: Any, args: list[str]) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})


def test_inspect_table_shows_the_minimum_and_default_budgets(bundle: Bundle) -> None:
    res = _invoke(inspect_app, [bundle.path])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split()).lower()
    assert "minimum budget" in text and "total" in text and "memory cap" in text
    defaults = ("10%", "25%", "50%", "100%")
    rows = [ln for ln in res.output.splitlines() if ln.strip("│ ").split(" ")[0].rstrip(":") in defaults]
    assert [r.strip("│ ").split()[0].rstrip(":") for r in rows] == list(defaults)
    est = estimate_rss(bundle, "100%")
    assert f"{est['total_bytes'] / MiB:.1f}" in rows[-1]


def test_inspect_json_matches_estimate_rss(bundle: Bundle) -> None:
    res = _invoke(inspect_app, [bundle.path, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["experts"] == len(bundle.manifest["experts"])  # the summary is still there
    mem = data["memory"]
    assert mem["minimum_budget_bytes"] == minimum_budget(bundle)
    assert mem["fixed_overhead_bytes"] == FIXED_OVERHEAD_BYTES
    budgets = [e["budget"] for e in mem["estimates"]]
    assert budgets == ["10%", "25%", "50%", "100%"]
    for e in mem["estimates"]:
        if parse_budget(e["budget"], bundle.store_bytes) < minimum_budget(bundle):
            assert "error" in e and e["budget_bytes"] < mem["minimum_budget_bytes"]
        else:
            assert e == {"budget": e["budget"], **estimate_rss(bundle, e["budget"])}


def test_inspect_one_budget_and_context(bundle: Bundle) -> None:
    res = _invoke(inspect_app, [bundle.path, "--json", "--budget", "50%", "--context", "64",
                                "--prompt-tokens", "32"])
    assert res.exit_code == 0, res.output
    (e,) = json.loads(res.output)["memory"]["estimates"]
    assert e == {"budget": "50%", **estimate_rss(bundle, "50%", context=64, prompt_tokens=32)}


def test_inspect_marks_default_budgets_below_the_minimum(tmp_path: Path) -> None:
    # 8 experts of one size: 10% of the store is less than one expert
    b = make_synthetic_bundle(tmp_path / "b", num_layers=1, num_experts=8, hidden=64, intermediate=96)
    res = _invoke(inspect_app, [b.path, "--json"])
    assert res.exit_code == 0, res.output
    first = json.loads(res.output)["memory"]["estimates"][0]
    assert first["budget"] == "10%" and "minimum" in first["error"]
    table = _invoke(inspect_app, [b.path])
    assert table.exit_code == 0 and "10%: < minimum" in table.output


def _one_error_line(res: Any, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--budget", "lots"], ["--budget", "'lots'"]),
        (["--budget", "0%"], ["--budget", "(0, 100]"]),
        (["--budget", "12XB"], ["--budget", "unknown unit"]),
        (["--budget", "1KB"], ["--budget", "expected at least", "found '1KB' = 1000 bytes"]),
        (["--context", "0"], ["--context", "found 0"]),
        (["--prompt-tokens", "-3"], ["--prompt-tokens", "found -3"]),
    ],
)
def test_inspect_errors_are_one_line_naming_the_flag(
    bundle: Bundle, args: list[str], needles: list[str]
) -> None:
    _one_error_line(_invoke(inspect_app, [bundle.path, *args]), *needles)


def test_inspect_missing_bundle(tmp_path: Path) -> None:
    _one_error_line(_invoke(inspect_app, [tmp_path / "nope"]), "nope")


# --- edgemoe-run policy flags ----------------------------------------------------------------------------
def test_run_policy_choices_come_from_the_runtime() -> None:
    res = _invoke(run_app, ["--help"])
    assert res.exit_code == 0
    flat = " ".join(res.output.split())
    assert " | ".join(POLICIES) in flat.replace("│ ", "")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--policy", "fifo"], ["--policy", "'fifo'", "lru"]),
        (["--policy", "pinned"], ["--policy pinned", "--frequencies"]),
        (["--pin-experts", "3"], ["--pin-experts", "--policy lru"]),
        (["--policy", "pinned", "--frequencies", "FREQ", "--pin-experts", "-1"], ["--pin-experts", "-1"]),
        (["--policy-weights", "lru=1"], ["--policy-weights", "--policy lru"]),
        (["--policy", "hobbit", "--policy-weights", "lru:1"], ["--policy-weights", "'lru:1'"]),
        (["--frequencies", "FREQ"], ["--frequencies", "--policy lru"]),
        (["--policy", "edgemoe", "--frequencies", "MISSING"], ["--frequencies", "MISSING", "nothing"]),
        (["--policy", "pinned", "--frequencies", "BAD"], ["--frequencies", "invalid JSON"]),
    ],
)
def test_run_policy_flag_errors(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    (tmp_path / "FREQ").write_text('{"expert_frequency": [[1, 2]]}')
    (tmp_path / "BAD").write_text("{not json")
    args = [str(tmp_path / a) if a in ("FREQ", "BAD", "MISSING") else a for a in args]
    res = _invoke(run_app, [tmp_path / "bundle", "--prompt", "x", *args])
    _one_error_line(res, *needles)


def test_run_policy_flags_reach_runtime_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgemoe_ort.runtime import generate

    seen: list[Any] = []

    def fake_load(bundle: Path, options: Any, **_: Any) -> Any:
        seen.append(options)
        raise ValueError("stop here")

    monkeypatch.setattr(generate, "load_model", fake_load)
    freq = tmp_path / "f.json"
    freq.write_text('{"expert_frequency": [[1, 2]]}')
    _one_error_line(_invoke(run_app, [tmp_path, "--prompt", "x", "--policy", "pinned", "--frequencies", freq,
                                      "--pin-experts", "2"]), "stop here")
    _one_error_line(_invoke(run_app, [tmp_path, "--prompt", "x", "--policy", "hobbit", "--policy-weights",
                                      "lru=0.5,lfu=0.5,lhu=0,fld=0"]), "stop here")
    pinned, hobbit = seen
    assert (pinned.policy, Path(pinned.frequencies), pinned.pin_experts) == ("pinned", freq, 2)
    assert (hobbit.policy, hobbit.policy_weights) == ("hobbit", "lru=0.5,lfu=0.5,lhu=0,fld=0")
    assert hobbit.frequencies is None and hobbit.pin_experts is None


def test_run_names_flags_in_library_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgemoe_ort.runtime import generate

    def fake_load(bundle: Path, options: Any, **_: Any) -> Any:
        raise ValueError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: "
                         "edgemoe.pin_experts: expected an integer in [0, 32], found 1000")

    monkeypatch.setattr(generate, "load_model", fake_load)
    freq = tmp_path / "f.json"
    freq.write_text("{}")
    line = _one_error_line(_invoke(run_app, [tmp_path, "--prompt", "x", "--policy", "pinned", "--frequencies",
                                             freq, "--pin-experts", "1000"]))
    assert line == "error: --pin-experts: expected an integer in [0, 32], found 1000"
