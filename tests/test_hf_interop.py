"""A bundle through transformers (issue 16, item 3): ``EdgeMoEForCausalLM`` under transformers'
``generate()``, its logits processors, a left-padded batch, and lm-evaluation-harness's HF adapter on a local
task, each against ``MoEModel`` and against the HF checkpoint itself (an fp32 bundle: the same numbers up to
float noise)."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.export  # host side: torch + transformers

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "edgemoe-tiny-mixtral"
PROMPT = "def fibonacci(n):\n    "
TOKENS = 32


@pytest.fixture(scope="module")
def hf() -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def ours(tiny_bundle_fp32: Path) -> Any:
    from edgemoe_ort.hf import EdgeMoEForCausalLM

    model = EdgeMoEForCausalLM.from_pretrained(tiny_bundle_fp32)
    yield model
    model.close()


def _new_tokens(out: Any, prompt_len: int) -> list[int]:
    return out[0, prompt_len:].tolist()


def test_greedy_generate_matches_moemodel_and_hf(
    ours: Any, hf: tuple[Any, Any], tiny_bundle_fp32: Path
) -> None:
    import torch

    from edgemoe_ort.hf import EdgeMoEForCausalLM
    from edgemoe_ort.runtime import MoEModel, RuntimeOptions

    model, tokenizer = hf
    enc = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)
    n = enc.input_ids.shape[1]
    kw = {"max_new_tokens": TOKENS, "min_new_tokens": TOKENS, "do_sample": False}
    with torch.no_grad():
        ref = _new_tokens(model.generate(**enc, **kw), n)
    got = _new_tokens(ours.generate(**enc, **kw), n)
    assert got == ref
    with MoEModel.load(tiny_bundle_fp32, RuntimeOptions(budget="25%")) as moe:
        assert moe.generate(enc.input_ids[0].tolist(), max_new_tokens=TOKENS).tokens == ref
    with EdgeMoEForCausalLM.from_pretrained(tiny_bundle_fp32, budget="25%") as small:  # same tokens in 25 %
        assert _new_tokens(small.generate(**enc, **kw), n) == ref
        cache = small.moe.session.stats()
        assert cache["misses"] > 0 and cache["peak_resident_bytes"] <= cache["budget_bytes"]
    out = ours(enc.input_ids)  # one forward: the logits are HF's
    with torch.no_grad():
        ref_logits = model(enc.input_ids).logits
    assert out.logits.shape == ref_logits.shape
    assert float((out.logits - ref_logits).abs().max()) <= 1e-4 * float(ref_logits.abs().max())
    assert out.past_key_values.get_seq_length() == n


def test_logits_processors_and_sampling_are_transformers(ours: Any, hf: tuple[Any, Any]) -> None:
    import torch

    model, tokenizer = hf
    enc = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)
    n = enc.input_ids.shape[1]
    plain = _new_tokens(ours.generate(**enc, max_new_tokens=8, do_sample=False), n)
    kw: dict[str, Any] = {
        "max_new_tokens": 16,
        "do_sample": False,
        "repetition_penalty": 1.4,
        "no_repeat_ngram_size": 2,
        "bad_words_ids": [[plain[0]]],
    }
    with torch.no_grad():
        ref = _new_tokens(model.generate(**enc, **kw), n)
    got = _new_tokens(ours.generate(**enc, **kw), n)
    assert got == ref and got[0] != plain[0]  # the processors ran, as they do for HF's model
    beams = {"max_new_tokens": 8, "num_beams": 3, "do_sample": False}
    with torch.no_grad():
        assert _new_tokens(ours.generate(**enc, **beams), n) == _new_tokens(model.generate(**enc, **beams), n)
    torch.manual_seed(7)
    a = ours.generate(**enc, max_new_tokens=8, do_sample=True, top_k=20)
    torch.manual_seed(7)
    b = ours.generate(**enc, max_new_tokens=8, do_sample=True, top_k=20)
    assert a.tolist() == b.tolist()  # transformers' sampler, seeded by torch


def test_left_padded_batch_equals_each_prompt_alone(ours: Any, hf: tuple[Any, Any]) -> None:
    import torch

    model, tokenizer = hf
    prompts = [PROMPT, "class Stack:\n    def push(self, item):\n        "]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|pad|>"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert int((batch.attention_mask == 0).sum()) > 0  # really padded
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    got = ours.generate(**batch, **kw)[:, batch.input_ids.shape[1]:].tolist()
    for row, prompt in zip(got, prompts, strict=True):
        alone = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ref = _new_tokens(model.generate(**alone, **kw), alone.input_ids.shape[1])
        assert row == ref, prompt


def _nextline_task(folder: Path, items: int = 24) -> str:
    """A local lm-evaluation-harness task (no hub): pick the true next line of held-out stdlib code over a
    line from elsewhere, by loglikelihood."""
    rng = random.Random(0)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("json/*.py"))
    lines = {f: [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()] for f in files}
    pool = [ln for f in files for ln in lines[f]]
    docs = []
    for k in range(items):
        ls = lines[files[k % len(files)]]
        i = rng.randrange(4, len(ls) - 1)
        choices = [ls[i], rng.choice(pool)]
        rng.shuffle(choices)
        context = "\n".join(ls[i - 4 : i]) + "\n"
        docs.append({"context": context, "choices": choices, "label": choices.index(ls[i])})
    (folder / "items.jsonl").write_text("\n".join(json.dumps(d) for d in docs), encoding="utf-8")
    (folder / "nextline.yaml").write_text(
        "task: edgemoe_nextline\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return "edgemoe_nextline"


def test_lm_evaluation_harness_runs_a_bundle(
    ours: Any, hf: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = hf
    task = _nextline_task(tmp_path)

    def evaluate(pretrained: Any) -> tuple[float, list[float]]:
        lm = HFLM(pretrained=pretrained, tokenizer=ours.tokenizer(), batch_size=4)
        res = lm_eval.simple_evaluate(
            model=lm, tasks=[task], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True
        )
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        lls = [float(r[0][0]) for s in samples for r in s["resps"]]
        return float(res["results"][task]["acc,none"]), lls

    acc, lls = evaluate(ours)
    ref_acc, ref_lls = evaluate(model)
    assert len(lls) == 48 and all(np.isfinite(lls))
    assert acc == ref_acc and acc > 0.5  # better than chance, and exactly HF's choices
    np.testing.assert_allclose(lls, ref_lls, rtol=1e-4, atol=1e-3)


def test_bad_arguments_are_one_clear_error(ours: Any, tiny_bundle_fp32: Path) -> None:
    import torch

    from edgemoe_ort.hf import EdgeMoEForCausalLM
    from edgemoe_ort.runtime import GenerationError, RuntimeOptions

    with pytest.raises(GenerationError, match="not both"):
        EdgeMoEForCausalLM.from_pretrained(tiny_bundle_fp32, budget="25%", options=RuntimeOptions())
    with pytest.raises(GenerationError, match="buget"):
        EdgeMoEForCausalLM.from_pretrained(tiny_bundle_fp32, buget="25%")
    with pytest.raises(GenerationError, match="largest expert"):
        EdgeMoEForCausalLM.from_pretrained(tiny_bundle_fp32, budget=1024)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(GenerationError, match=r"attention_mask: expected shape \(1, 3\)"):
        ours(ids, attention_mask=torch.ones((1, 5), dtype=torch.int64))
    with pytest.raises(GenerationError, match="inputs_embeds"):
        ours(ids, inputs_embeds=torch.zeros((1, 3, 8)))
