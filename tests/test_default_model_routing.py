"""Routing statistics of models/eval_default.py, and the default model's routing being far from uniform."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.eval_default import expert_usage, routing_counts, routing_structure  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "edgemoe-tiny-mixtral"
E, K, W = 8, 2, 256


def _probs_for(top: np.ndarray, peak: float = 0.45) -> np.ndarray:
    """Router softmax putting `peak` on each chosen expert and the rest spread evenly."""
    n_layers, n, k = top.shape
    probs = np.full((n_layers, n, E), (1 - k * peak) / (E - k), dtype=np.float32)
    np.put_along_axis(probs, top, peak, axis=-1)
    return probs


def _random_top(rng: np.random.Generator, n_layers: int, n: int) -> np.ndarray:
    return np.argsort(rng.random((n_layers, n, E)), axis=-1)[..., :K]


def test_uniform_random_routing_is_scored_as_chance() -> None:
    top = _random_top(np.random.default_rng(1), 3, 64 * W)
    rs = routing_structure(top, _probs_for(top), W)
    for row in rs:
        assert row["reuse"] == pytest.approx(K / E, abs=0.01)
        assert row["reuse_shuffled"] == pytest.approx(K / E, abs=0.01)
        assert row["window_entropy"] == pytest.approx(row["window_entropy_shuffled"], abs=0.005)
        assert row["top_k_mass"] == pytest.approx(0.9, abs=1e-6)
    for row in rs[:-1]:
        assert row["next_hit"] == pytest.approx(K / E, abs=0.02)
        assert row["next_hit_popular"] == pytest.approx(K / E, abs=0.02)
    assert "next_hit" not in rs[-1]
    usage = expert_usage(routing_counts(top, E))
    assert all(u["normalized_entropy"] > 0.999 for u in usage)


def test_structured_routing_is_scored_as_structure() -> None:
    rng = np.random.default_rng(2)
    n = 64 * W
    # layer 0: one random expert pair per window, held for the whole window (perfect locality);
    # layer 1: a fixed function of layer 0's top-1 expert (perfectly predictable).
    pairs = _random_top(rng, 1, n // W)[0]
    top0 = np.repeat(pairs, W, axis=0)
    top1 = np.stack([(top0[:, 0] + 3) % E, (top0[:, 0] + 5) % E], axis=1)
    top = np.stack([top0, top1])
    rs = routing_structure(top, _probs_for(top), W)
    assert rs[0]["reuse"] == 1.0 and rs[0]["reuse_shuffled"] < 0.4
    assert rs[0]["window_entropy"] == pytest.approx(1 / 3)  # 2 experts of 8 in each window
    assert rs[0]["window_entropy_shuffled"] > 0.9
    assert rs[0]["next_hit"] == 1.0
    assert rs[0]["next_hit_popular"] < 0.6


@pytest.mark.export
@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(), reason="default model not trained")
def test_default_model_routing_is_far_from_uniform() -> None:
    """Issue 3: routing of the shipped model is far from uniform, and no expert is dead (held-out code)."""
    from models.eval_default import heldout_token_ids, load_model, load_tokenizer, torch_routing

    ids = heldout_token_ids(load_tokenizer(DEFAULT_MODEL), 16384)
    model = load_model(DEFAULT_MODEL, threads=2)
    top, probs = torch_routing(model, ids)
    usage = expert_usage(routing_counts(top, model.config.num_local_experts))
    mean_entropy = float(np.mean([u["normalized_entropy"] for u in usage]))
    assert mean_entropy <= 0.87, usage
    assert min(u["least_used_share"] for u in usage) >= 0.001, usage  # no dead expert
    rs = routing_structure(top, probs)
    # the router's scores single experts out: 2x the chosen-pair probability of uniform scores (k/E = 0.25)
    assert np.mean([r["top_k_mass"] for r in rs]) >= 0.5, rs
    # and layer l's choice tells which experts layer l+1 will need, better than popularity alone
    assert all(r["next_hit"] > r["next_hit_popular"] + 0.03 for r in rs[:-1]), rs
