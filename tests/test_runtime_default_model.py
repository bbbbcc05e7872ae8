"""End to end on the project's default model: export → bundle → MoEModel.generate / CLI, against HF."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemoe_ort.bundle import Bundle

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "edgemoe-tiny-mixtral"
PROMPT = "def fibonacci(n):\n    "
BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.export,
    pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(), reason="default model not trained"),
]


@pytest.fixture(scope="module")
def bundles(tiny_bundle_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    from edgemoe_ort.export import export_model

    root = tmp_path_factory.mktemp("default-bundles")
    return {32: tiny_bundle_fp32, 4: export_model(DEFAULT_MODEL, root / "int4", bits=4)}


@pytest.fixture(scope="module")
def hf_model():  # noqa: ANN201 - torch types stay out of module scope
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def _load(bundle: Path, **options: object):  # noqa: ANN202
    from edgemoe_ort.runtime import MoEModel, RuntimeOptions

    return MoEModel.load(bundle, RuntimeOptions(**options))  # type: ignore[arg-type]


def test_fp32_bundle_matches_hf_logits_and_greedy_tokens(bundles: dict[int, Path], hf_model) -> None:
    import torch

    model, tokenizer = hf_model
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        ref_logits = model(ids).logits[0].numpy()
        ref = model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, ids.shape[1]:]
    ours = _load(bundles[32])
    assert ours.encode(PROMPT) == ids[0].tolist(), "bundle tokenizer differs from the HF tokenizer"
    logits = ours.logits(ids[0].tolist())
    assert np.abs(logits - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
    result = ours.generate(ids[0].tolist(), max_new_tokens=32)
    n = len(result.tokens)
    assert result.tokens == ref.tolist()[:n]
    assert n == 32 or result.stop_reason == "eos"


def test_quarter_budget_gives_same_tokens_within_budget(bundles: dict[int, Path]) -> None:
    full = _load(bundles[4]).generate(PROMPT, max_new_tokens=24)
    quarter = _load(bundles[4], budget="25%").generate(PROMPT, max_new_tokens=24)
    assert quarter.tokens == full.tokens
    cache = quarter.stats.cache
    store = Bundle.open(bundles[4]).store_bytes
    assert cache["budget_bytes"] <= store // 4
    assert 0 < cache["peak_resident_bytes"] <= cache["budget_bytes"]
    assert cache["misses"] > full.stats.cache["misses"], "a quarter budget must evict and re-read"


def test_copied_bundle_runs_identically(bundles: dict[int, Path], tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(bundles[4], copy)
    a = _load(bundles[4]).generate(PROMPT, max_new_tokens=16)
    b = _load(copy).generate(PROMPT, max_new_tokens=16)
    assert a.tokens == b.tokens
    assert str(bundles[4]) not in (copy / "manifest.json").read_text()


def test_sampling_is_seeded_and_stop_strings_cut(bundles: dict[int, Path]) -> None:
    model = _load(bundles[4])
    kw = dict(max_new_tokens=24, temperature=0.9, top_p=0.9)
    a = model.generate(PROMPT, seed=7, **kw)
    b = model.generate(PROMPT, seed=7, **kw)
    assert a.tokens == b.tokens
    greedy = model.generate(PROMPT, max_new_tokens=24)
    stop = greedy.text[len(greedy.text) // 2 :][:3]
    if stop.strip():
        cut = model.generate(PROMPT, max_new_tokens=24, stop=[stop])
        assert cut.stop_reason == "stop_string"
        assert stop not in cut.text and greedy.text.startswith(cut.text)
    streamed = "".join(model.stream(PROMPT, max_new_tokens=24))
    assert streamed == greedy.text
    with pytest.raises(ValueError, match="top_p"):
        model.generate(PROMPT, top_p=0.0)


def test_device_runtime_imports_no_torch(bundles: dict[int, Path]) -> None:
    code = (
        "import sys; from edgemoe_ort.runtime import MoEModel, RuntimeOptions;"
        f"m = MoEModel.load({str(bundles[4])!r}, RuntimeOptions(budget='50%'));"
        "r = m.generate('x = ', max_new_tokens=4);"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "assert not bad, bad; print(len(r.tokens))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in {"1", "2", "3", "4"}


def test_cli_run_json(bundles: dict[int, Path]) -> None:
    out = subprocess.run(
        [BIN / "edgemoe-run", bundles[4], "--prompt", PROMPT, "--max-new-tokens", "8", "--budget", "25%",
         "--json"],
        capture_output=True, text=True, check=True,
    )
    data = json.loads(out.stdout)
    for key in ("text", "tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_rss_bytes"):
        assert key in data, key
    cache_keys = ("budget_bytes", "peak_resident_bytes", "hits", "misses", "bytes_read", "stall_s",
                  "direct_io")
    for key in cache_keys:
        assert key in data["cache"], key
    assert data["cache"]["peak_resident_bytes"] <= data["cache"]["budget_bytes"]
    assert len(data["tokens"]) >= 1 and data["decode_tokens_per_s"] >= 0


def test_cli_errors_are_one_clear_line(bundles: dict[int, Path], tmp_path: Path) -> None:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    missing = subprocess.run([BIN / "edgemoe-run", tmp_path / "nope", "--prompt", "x"],
                             capture_output=True, text=True, env=env)
    assert missing.returncode != 0
    assert "Traceback" not in missing.stderr and "nope" in missing.stderr
    bad_budget = subprocess.run([BIN / "edgemoe-run", bundles[4], "--prompt", "x", "--budget", "lots"],
                                capture_output=True, text=True, env=env)
    assert bad_budget.returncode != 0 and "Traceback" not in bad_budget.stderr
    assert "budget" in bad_budget.stderr
    exists = subprocess.run([BIN / "edgemoe-export", DEFAULT_MODEL, "-o", bundles[4]],
                            capture_output=True, text=True, env=env)
    assert exists.returncode != 0 and "Traceback" not in exists.stderr
    assert "--force" in exists.stderr or "force" in exists.stderr
    assert Bundle.open(bundles[4]).summary()["experts"] > 0  # untouched


def test_cli_inspect_json(bundles: dict[int, Path]) -> None:
    out = subprocess.run([BIN / "edgemoe-inspect", bundles[4], "--json"], capture_output=True, text=True,
                         check=True)
    data = json.loads(out.stdout)
    assert data["family"] == "mixtral"
    assert (data["layers"], data["experts"], data["dtypes"]) == (4, 32, {"int4": 32})
    assert data["store_bytes"] == (bundles[4] / "experts.bin").stat().st_size
    assert data["dense_bytes"] >= (bundles[4] / "model.onnx").stat().st_size > 0


def test_int4_heldout_perplexity_within_3_percent_of_fp32(bundles: dict[int, Path]) -> None:
    sys.path.insert(0, str(REPO))
    from models.eval_default import heldout_token_ids, load_tokenizer, perplexity

    ids = heldout_token_ids(load_tokenizer(DEFAULT_MODEL), 4096)
    ppl = {}
    for bits, path in bundles.items():
        model = _load(path)
        ppl[bits] = perplexity(lambda batch, m=model: m.forward(batch)[0], ids)["perplexity"]
    assert 1.0 < ppl[32] < 4096, ppl  # a trained model: far better than uniform over the vocabulary
    assert abs(ppl[4] / ppl[32] - 1) <= 0.03, ppl
