"""The Python API as a user meets it (issue 14): GenerationErrors naming the parameter, the context limit,
close() and the context manager, top-k / repetition penalty, a partial result on KeyboardInterrupt."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgemoe_ort.runtime import MoEModel, RuntimeOptions
from edgemoe_ort.runtime.generate import GenerationError, sample_next

pytestmark = pytest.mark.export  # the session bundle is exported with torch

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> MoEModel:
    return MoEModel.load(tiny_bundle, RuntimeOptions(budget="50%"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": math.nan}, r"^temperature: expected a finite number >= 0 .*found nan"),
        ({"temperature": -1.0}, r"^temperature: "),
        ({"seed": -3}, r"^seed: expected None or an integer >= 0, found -3"),
        ({"seed": 1.5}, r"^seed: "),
        ({"max_new_tokens": 0}, r"^max_new_tokens: expected an integer >= 1, found 0"),
        ({"top_p": math.nan}, r"^top_p: "),
        ({"top_k": -1}, r"^top_k: "),
        ({"repetition_penalty": 0.0}, r"^repetition_penalty: "),
        ({"stop": [""]}, r"^stop: expected non-empty strings"),
        ({"stop": 5}, r"^stop: expected a string or a list of strings"),
    ],
)
def test_bad_sampling_parameters_name_the_parameter(model: MoEModel, kwargs: dict, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        model.generate(PROMPT, **kwargs)
    with pytest.raises(GenerationError, match=message):  # stream: before the first piece
        next(model.stream(PROMPT, **kwargs))


def test_options_of_the_wrong_type(tiny_bundle: Path) -> None:
    with pytest.raises(GenerationError, match=r"^options: expected a RuntimeOptions .*found str '25%'"):
        MoEModel.load(tiny_bundle, "25%")  # type: ignore[arg-type]
    opts = RuntimeOptions()
    opts.io_threads = "2"  # type: ignore[assignment]
    with pytest.raises(GenerationError, match=r"^io_threads: expected an int"):
        MoEModel.load(tiny_bundle, opts)


def test_budget_below_the_largest_expert_is_ours(tiny_bundle: Path) -> None:
    with pytest.raises(GenerationError, match=r"^budget: '1KB' is 1000 bytes, below the largest expert "
                                              r"\(layer \d+ expert \d+: 163840 bytes"):
        MoEModel.load(tiny_bundle, RuntimeOptions(budget="1KB"))


def test_prompt_longer_than_the_context(model: MoEModel) -> None:
    assert model.context_length == 256
    with pytest.raises(GenerationError, match=r"the prompt is 300 tokens, but the model's context is 256"):
        model.generate([5] * 300)
    with pytest.raises(GenerationError, match=r"the prompt is 256 tokens"):
        model.generate([5] * 256)
    with pytest.raises(GenerationError, match=r"token id 4096 is outside the vocabulary \(expected 0..4095"):
        model.generate([1, 4096])


def test_generation_stops_at_the_context(model: MoEModel) -> None:
    result = model.generate([5] * 250, max_new_tokens=3000)
    assert result.stop_reason == "context"
    assert len(result.tokens) == 6 and result.stats.generated_tokens == 6


def test_top_k_one_is_greedy_and_the_penalty_bites(model: MoEModel) -> None:
    greedy = model.generate(PROMPT, max_new_tokens=16)
    assert model.generate(PROMPT, max_new_tokens=16, temperature=1.5, top_k=1, seed=7).tokens == greedy.tokens
    penalized = model.generate(PROMPT, max_new_tokens=16, repetition_penalty=5.0)
    assert penalized.tokens != greedy.tokens
    ids = model.encode(PROMPT)
    assert len(set(penalized.tokens) & set(ids)) <= len(set(greedy.tokens) & set(ids))


def test_sample_next_top_k_and_penalty() -> None:
    logits = np.array([4.0, 3.0, 2.0, 1.0, -1.0])
    rng = np.random.default_rng(0)
    draws = {sample_next(logits, temperature=5.0, top_p=1.0, rng=rng, top_k=2) for _ in range(300)}
    assert draws == {0, 1}
    assert sample_next(logits, temperature=0, top_p=1.0, rng=rng, repetition_penalty=3.0, seen=[0]) == 1
    # a negative logit is multiplied: the penalized token gets less likely, never more
    assert sample_next(np.array([-1.0, -1.5]), temperature=0, top_p=1.0, rng=rng, repetition_penalty=2.0,
                       seen=[0]) == 1


def test_close_and_context_manager(tiny_bundle: Path) -> None:
    with MoEModel.load(tiny_bundle) as m:
        assert m.generate(PROMPT, max_new_tokens=2).tokens
    with pytest.raises(GenerationError, match="the model is closed"):
        m.generate(PROMPT, max_new_tokens=2)
    m.close()  # twice is fine
    assert m.session is None


def test_keyboard_interrupt_leaves_a_partial_result(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = MoEModel.load(tiny_bundle)
    step = MoEModel._step
    calls = {"n": 0}

    def interrupted_step(self: MoEModel, token: int, state: object) -> object:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return step(self, token, state)

    monkeypatch.setattr(MoEModel, "_step", interrupted_step)
    results: list = []
    with pytest.raises(KeyboardInterrupt):
        for _ in m.stream(PROMPT, max_new_tokens=50, result=results):
            pass
    (r,) = results
    assert r.stop_reason == "interrupted" and len(r.tokens) == 4 and r.stats.generated_tokens == 4
    assert r.stats.cache["hits"] + r.stats.cache["misses"] > 0 and r.text


def test_public_api_has_docstrings() -> None:
    for fn in (MoEModel.load, MoEModel.generate, MoEModel.stream, MoEModel.close, MoEModel.prompt_ids):
        assert fn.__doc__ and len(fn.__doc__.split()) >= 8, fn.__qualname__
