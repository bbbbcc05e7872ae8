"""The pure parts of the llama.cpp baseline (edgemoe_ort.bench.llama, .llama_cap): the tokenizer mapping and
the converter patch, tensor and cap arithmetic, parsers of llama-bench / llama-quantize / time -v output, the
summary and its table. None needs the llama.cpp build, a GGUF or a cgroup; nothing is timed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from edgemoe_ort.bench import llama, llama_cap
from edgemoe_ort.bench.llama_cap import Cap

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO / "models" / "edgemoe-tiny-mixtral" / "tokenizer.json"
MiB = 1 << 20


def _tok(pre: Any, model: str = "BPE", normalizer: Any = None) -> dict[str, Any]:
    return {"model": {"type": model}, "pre_tokenizer": pre, "normalizer": normalizer}


def test_default_model_tokenizer_maps_to_gpt2() -> None:
    assert llama.bpe_pre_tokenizer(json.loads(DEFAULT_TOKENIZER.read_text())) == "gpt-2"


@pytest.mark.parametrize(
    ("tok", "want"),
    [
        (_tok({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}), "gpt-2"),
        (_tok({"type": "ByteLevel"}), "gpt-2"),  # use_regex defaults to true
        (_tok({"type": "Sequence", "pretokenizers": [{"type": "ByteLevel", "use_regex": True}]}), "gpt-2"),
        (_tok({"type": "ByteLevel", "use_regex": False}), None),  # needs a Split before it: another regex
        (_tok({"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]}), None),
        (_tok({"type": "Metaspace"}), None),
        (_tok({"type": "ByteLevel"}, model="WordPiece"), None),
        (_tok({"type": "ByteLevel"}, normalizer={"type": "NFC"}), None),
        (_tok(None), None),
    ],
)
def test_bpe_pre_tokenizer(tok: dict[str, Any], want: str | None) -> None:
    assert llama.bpe_pre_tokenizer(tok) == want


def test_converter_patch_answers_only_for_gpt2_byte_level(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime patch wraps the vendored ``TextModel.get_vocab_base_pre`` (a stand-in here): a known hash
    passes through, an unknown one becomes "gpt-2" for our tokenizer and still raises for any other."""
    pkg = tmp_path / "tree" / "conversion"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text(
        "class TextModel:\n"
        "    def __init__(self, d, known=False):\n"
        "        self.dir_model, self.known = d, known\n"
        "    def get_vocab_base_pre(self, tokenizer):\n"
        "        if self.known:\n"
        "            return 'llama-bpe'\n"
        "        raise NotImplementedError('BPE pre-tokenizer was not recognized')\n"
    )
    ours, other = tmp_path / "ours", tmp_path / "other"
    ours.mkdir()
    other.mkdir()
    (ours / "tokenizer.json").write_text(DEFAULT_TOKENIZER.read_text())
    (other / "tokenizer.json").write_text(json.dumps(_tok({"type": "Metaspace"})))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m == "conversion" or m.startswith("conversion.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        llama._patch_converter(tmp_path / "tree")
        from conversion.base import TextModel  # type: ignore[import-not-found]

        assert TextModel(ours).get_vocab_base_pre(None) == "gpt-2"
        assert TextModel(other, known=True).get_vocab_base_pre(None) == "llama-bpe"
        with pytest.raises(NotImplementedError):
            TextModel(other).get_vocab_base_pre(None)
        with pytest.raises(NotImplementedError):
            TextModel(tmp_path).get_vocab_base_pre(None)  # no tokenizer.json at all
    finally:
        for name in [m for m in sys.modules if m == "conversion" or m.startswith("conversion.")]:
            del sys.modules[name]


def test_stage_checkpoint_links_weights_and_copies_the_tokenizer(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"x")
    staged = llama.stage_checkpoint(hf, tmp_path / "stage", DEFAULT_TOKENIZER.parent)
    assert (staged / "config.json").is_symlink() and (staged / "model.safetensors").resolve() == \
        (hf / "model.safetensors").resolve()
    assert (staged / "tokenizer.json").read_text() == DEFAULT_TOKENIZER.read_text()
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]  # untouched
    (hf / "tokenizer.json").write_text("{}")
    assert llama.stage_checkpoint(hf, tmp_path / "stage2", None) == hf.resolve()
    (hf / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="--tokenizer-from"):
        llama.stage_checkpoint(hf, tmp_path / "stage3", None)


def test_split_tensor_bytes() -> None:
    s = llama.split_tensor_bytes([
        ("token_embd.weight", 100), ("blk.0.attn_q.weight", 10), ("blk.0.ffn_gate_inp.weight", 1),
        ("blk.0.ffn_gate_exps.weight", 1000), ("blk.0.ffn_up_exps.weight", 1000),
        ("blk.0.ffn_down_exps.weight", 1000), ("blk.1.ffn_gate_up_exps.weight", 2000),
        ("blk.1.ffn_down_shexp.weight", 50), ("output.weight", 100),
    ])
    assert s == {"expert_bytes": 5000, "dense_bytes": 261, "expert_tensors": 4, "tensors": 9}


def test_compare_greedy() -> None:
    assert llama.compare_greedy([1, 2, 3], [1, 2, 3]) is None
    assert llama.compare_greedy([1, 2, 3], [1, 5, 3]) == 1
    assert llama.compare_greedy([1, 2, 3], [1, 2]) == 2


def test_forced_mismatches_excuse_only_near_ties() -> None:
    hf, margins = [5, 6, 7, 8], [0.5, 0.0004, 0.3, 0.2]
    assert llama.forced_mismatches(hf, [5, 6, 7, 8], margins, 0.01) == ([], [])
    assert llama.forced_mismatches(hf, [5, 9, 7, 8], margins, 0.01) == ([], [1])
    assert llama.forced_mismatches(hf, [5, 9, 7, 1], margins, 0.01) == ([3], [1])
    assert llama.forced_mismatches(hf, [5, 9, 7, 8], margins, 0.0) == ([1], [])


def test_parse_quantize_fallbacks() -> None:
    log = (
        "[   1/  42]                    token_embd.weight - [  256,  4096,     1,     1], type =    f16, "
        "converting to q4_K .. size =     2.00 MiB ->     0.56 MiB\n"
        "warning: blk.0.ffn_down_exps.weight              - ncols    384 not divisible by 256 (required for "
        "type    q4_K) -> falling back to    q5_0\n"
        "warning: blk.1.ffn_down_exps.weight              - ncols    384 not divisible by 256 (required for "
        "type    q4_K) -> falling back to    q5_0\n"
        "llama_model_quantize_impl: WARNING: 8 of 42 tensor(s) required fallback quantization\n"
    )
    notes = llama.parse_quantize_fallbacks(log)
    assert notes == [
        "warning: blk.N.ffn_down_exps.weight - ncols 384 not divisible by 256 (required for type q4_K) -> "
        "falling back to q5_0 (x2)",
        "llama_model_quantize_impl: WARNING: 8 of 42 tensor(s) required fallback quantization",
    ]
    assert llama.parse_quantize_fallbacks("[ 1/ 2] x.weight converting to q4_0\n") == []


def test_parse_llama_bench_json_and_jsonl() -> None:
    rows = [{"model_size": 1288490188, "n_prompt": 0, "n_gen": 32, "avg_ts": 2.31, "samples_ts": [2.31]}]
    out = "load_backend: loaded CPU backend\n" + json.dumps(rows, indent=2) + "\nllama_perf: done\n"
    assert llama.parse_llama_bench(out) == rows
    jsonl = "some log\n" + "\n".join(json.dumps(r) for r in rows) + "\n"
    assert llama.parse_llama_bench(jsonl) == rows
    with pytest.raises(ValueError, match="avg_ts"):
        llama.parse_llama_bench("error: failed to load model\n")


TIME_V = """\tCommand being timed: "llama-bench -m m.gguf"
\tUser time (seconds): 12.01
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02.50
\tMaximum resident set size (kbytes): 180224
\tMajor (requiring I/O) page faults: 812
\tMinor (reclaiming a frame) page faults: 5000
\tFile system inputs: 2048000
\tFile system outputs: 8
\tExit status: 0
"""


def test_parse_time_v() -> None:
    t = llama_cap.parse_time_v(TIME_V)
    assert t["fs_inputs"] == 2048000 and t["bytes_read"] == 2048000 * 512
    assert (t["max_rss_kb"], t["major_faults"], t["exit_status"]) == (180224, 812, 0)
    assert t["elapsed_s"] == pytest.approx(62.5)
    killed = llama_cap.parse_time_v("\tCommand terminated by signal 9\n\tFile system inputs: 10\n")
    assert killed["signal"] == 9 and killed["bytes_read"] == 5120


def test_llama_caps_and_plan() -> None:
    caps = llama_cap.llama_caps(50 * MiB, 1000 * MiB, (0.1, 0.25, 1.0))
    assert [c.label for c in caps] == ["llama+10%", "llama+25%", "llama+100%"]
    assert caps[1].bytes == 50 * MiB + 250 * MiB and all(c.bytes % 4096 == 0 for c in caps)
    assert caps[0].bytes == -(-(50 * MiB + round(0.1 * 1000 * MiB)) // 4096) * 4096
    plan = llama_cap.plan_caps(50 * MiB, 1000 * MiB, [("25%", 800 * MiB + 1)], (0.1, 1.0))
    assert [c.label for c in plan] == ["llama+10%", "ours@25%", "llama+100%"]
    assert plan[1].bytes == 800 * MiB + 4096 and plan[1].kind == "ours" and plan[1].budget == "25%"
    with pytest.raises(ValueError):
        llama_cap.llama_caps(1, 1, (1.5,))
    ram = llama_cap.plan_caps(50 * MiB, 1000 * MiB, [], (0.25,), uncapped_bytes=24 << 30)
    assert [(c.label, c.kind) for c in ram] == [("llama+25%", "llama"), ("uncapped", "machine")]


class _FakeBundle:
    store_bytes = 1000 * MiB
    primary_bytes = 1000 * MiB


def test_ours_budget_for_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The largest budget whose estimate fits (estimate = 400 MiB + budget here), else the minimum."""
    import edgemoe_ort.runtime.memory as memory

    monkeypatch.setattr(memory, "minimum_budget", lambda b: 6 * MiB)
    monkeypatch.setattr(memory, "estimate_rss", lambda b, budget, **kw: {"total_bytes": 400 * MiB + budget})
    b = _FakeBundle()
    budget, note = llama_cap.ours_budget_for_cap(b, Cap("llama+50%", 700 * MiB, "llama", 0.5),
                                                 context=33, prompt_tokens=1)
    assert 300 * MiB - 4096 <= budget <= 300 * MiB and "largest" in note
    budget, note = llama_cap.ours_budget_for_cap(b, Cap("llama+10%", 200 * MiB, "llama", 0.1),
                                                 context=33, prompt_tokens=1)
    assert budget == 6 * MiB and "exceeds the cap" in note
    budget, _ = llama_cap.ours_budget_for_cap(b, Cap("llama+100%", 2000 * MiB, "llama", 1.0),
                                              context=33, prompt_tokens=1)
    assert budget == 1000 * MiB
    budget, note = llama_cap.ours_budget_for_cap(b, Cap("ours@25%", 700 * MiB, "ours", budget="25%"),
                                                 context=33, prompt_tokens=1)
    assert budget == 250 * MiB and "own budget" in note


def _run(cap: str, mode: str, r: int, tps: float | None, oom: bool = False, rc: int = 0) -> dict[str, Any]:
    return {"cap": cap, "mode": mode, "repeat": r, "decode_tokens_per_s": tps, "decode_tokens": 32,
            "bytes_read": 32_000_000, "peak_bytes": 100 * MiB, "peak_anon_bytes": 50 * MiB, "oom_killed": oom,
            "returncode": rc, "load_before": [0.5, 0.5, 0.5], "load_after": [1.6, 1.0, 1.0],
            "budget_bytes": 10 * MiB if mode == "ours" else None}


def _table(runs: list[dict[str, Any]], caps: list[Cap], **settings: Any) -> str:
    """The markdown table of ``runs`` at ``caps`` (settings of a large-model run, updated by ``settings``)."""
    result = {
        "settings": {"gguf": "m/Q4_0.gguf", "bundle": "b", "bundle_dense_bytes": 357 * MiB,
                     "bundle_store_bytes": 1100 * MiB, "tokens": 32, "repeats": 3,
                     "llama_cmd": ["llama-bench"], "ours_cmd": ["edgemoe-run"],
                     "ours_min_estimate_bytes": 530 * MiB, "fixed_overhead_bytes": 160 * MiB, **settings},
        "llama_gguf": {"dense_bytes": 55 * MiB, "expert_bytes": 1133 * MiB},
        "cgroup_version": 1, "summary": llama_cap.summarize(runs, caps), "runs": runs,
    }
    result["findings"] = llama_cap._findings(result, caps)
    return llama_cap.markdown_table(result)


def test_summarize_ratios_and_table() -> None:
    caps = [Cap("llama+25%", 300 * MiB, "llama", 0.25), Cap("llama+50%", 600 * MiB, "llama", 0.5)]
    runs = [
        _run("llama+25%", "llama", 0, 2.0), _run("llama+25%", "ours", 0, None, oom=True, rc=137),
        _run("llama+50%", "llama", 0, 2.0), _run("llama+50%", "ours", 0, 8.0),
        _run("llama+50%", "ours", 1, 9.0), _run("llama+50%", "llama", 1, 4.0),
        _run("llama+50%", "llama", 2, 3.0), _run("llama+50%", "ours", 2, 6.0),
    ]
    rows = llama_cap.summarize(runs, caps)
    by = {(r["cap"], r["mode"]): r for r in rows}
    assert by[("llama+50%", "ours")]["decode_tokens_per_s"] == 8.0
    assert by[("llama+50%", "ours")]["ratio"] == pytest.approx(8.0 / 3.0)
    assert by[("llama+50%", "ours")]["ratio_paired"] == pytest.approx(2.25)  # median of 4, 2.25, 2
    assert by[("llama+25%", "ours")]["ratio"] is None and by[("llama+25%", "ours")]["oom_killed"] == 1
    assert by[("llama+50%", "llama")]["bytes_read_per_token"] == pytest.approx(1e6)
    table = _table(runs, caps, repeats=3)
    assert "| llama+50% | 600 | edgemoe | 10 | 8.00 | **2.67x** (2.25) |" in table
    assert "**not met**: edgemoe did not complete there (OOM-killed 1/1" in table
    assert "busy machine" in table and "where the gap is" in table


def test_qmoe_rows_and_finding() -> None:
    """ORT's all-in-memory QMoE is a third mode of the capped runs: its rows, and where it completed."""
    caps = [Cap("llama+25%", 300 * MiB, "llama", 0.25), Cap("uncapped", 24 << 30, "machine")]
    runs = [_run("llama+25%", "llama", 0, 2.0), _run("llama+25%", "ours", 0, 8.0),
            _run("llama+25%", "qmoe", 0, None, oom=True, rc=137),
            _run("uncapped", "llama", 0, 9.0), _run("uncapped", "ours", 0, 30.0),
            _run("uncapped", "qmoe", 0, 40.0)]
    table = _table(runs, caps, repeats=1, qmoe_cmd=["python", {"x": 1}])
    assert "| llama+25% | 300 | ORT QMoE (all in memory) | – | – | – |" in table
    assert "ORT QMoE (every expert in memory) completed from uncapped" in table
    assert "did not complete at llama+25%" in table
    assert "ORT QMoE, all experts in memory: `python -m edgemoe_ort.bench.rss '{\"x\": 1}'`" in table


def test_qmoe_child_reports_its_decode_rate(tmp_path: Path) -> None:
    """The capped QMoE run's child: one greedy generation of the converted graph, its decode rate."""
    import subprocess

    from edgemoe_ort.bench.runner import inmemory_model_path
    from edgemoe_ort.bundle import Bundle

    tiny = Path(__file__).resolve().parents[1] / "models" / "edgemoe-tiny-mixtral"
    pytest.importorskip("torch")
    from edgemoe_ort.export import export_model

    b = Bundle.open(export_model(tiny, tmp_path / "b", bits=4))
    inmem = inmemory_model_path(b)
    cmd = llama_cap._qmoe_cmd(b.path, inmem, 4)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    j = json.loads(out.stdout.strip().splitlines()[-1])
    assert j["decode_tokens"] == 4 and j["decode_tokens_per_s"] > 0
