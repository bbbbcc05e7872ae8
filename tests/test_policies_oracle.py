"""Every cache policy of the real op against the Python simulator (edgemoe_ort.runtime.cachesim): after
every forward pass the op's hits / misses / evictions equal the simulator's exactly, and the outputs are
bit-identical to an unlimited-budget session. Synthetic bundles with mixed expert formats (so blob lengths
differ), skewed and uniform random routing, budgets from the largest single expert up to half the store."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe_ort.bundle.testing import chain_feeds as feeds
from edgemoe_ort.bundle.testing import make_synthetic_bundle, random_routing
from edgemoe_ort.runtime.cachesim import (
    CacheSimulator,
    frequencies_from_trace,
    lengths_from_bundle,
    save_frequencies,
    trace_from_routing,
)
from edgemoe_ort.runtime.ops import RuntimeOptions, open_session

FORMATS = ["fp32", "fp16", "int8", "int4"]
L, E, K, HIDDEN = 3, 8, 2, 64




def skewed_routing(T, rng, probs):
    """Per layer, K distinct experts per token drawn from a skewed distribution; some slots dropped (-1)."""
    out = []
    for p in probs:
        idx = np.stack([rng.choice(E, size=K, replace=False, p=p) for _ in range(T)]).astype(np.int64)
        idx[rng.random(idx.shape) < 0.05] = -1
        w = rng.random((T, K)).astype(np.float32)
        out.append((idx, w / w.sum(axis=1, keepdims=True)))
    return out


def sequence(n, seed, skewed):
    rng = np.random.default_rng(seed)
    probs = []
    for _ in range(L):  # a Zipf-like popularity per layer, a different expert order in each layer
        p = 1.0 / np.arange(1, E + 1) ** 1.3
        probs.append(rng.permutation(p / p.sum()))
    out = []
    for _ in range(n):
        T = int(rng.choice([1, 1, 1, 1, 2, 3, 8]))
        X = rng.standard_normal((T, HIDDEN)).astype(np.float32)
        if skewed:
            routing = skewed_routing(T, rng, probs)
        else:
            routing = [random_routing(T, E, K, rng) for _ in range(L)]
        out.append((X, routing))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    b = make_synthetic_bundle(root / "b", num_layers=L, num_experts=E, top_k=K, hidden=HIDDEN,
                              intermediate=96, dtype=lambda li, e: FORMATS[(li + e) % 4])
    lengths = lengths_from_bundle(b)
    assert len({x for row in lengths for x in row}) >= 3
    seqs = {"skewed": sequence(150, seed=1, skewed=True), "uniform": sequence(60, seed=2, skewed=False)}
    calib = trace_from_routing([[idx for idx, _ in r] for _, r in sequence(40, seed=3, skewed=True)])
    freq_counts = save_frequencies(root / "freq_counts.json", frequencies_from_trace(calib, [E] * L))
    # fractional values (f / d in float64, no ties) and a table full of ties
    rng = np.random.default_rng(4)
    freq_float = save_frequencies(root / "freq_float.json", rng.random((L, E)) * 7.3)
    freq_ties = save_frequencies(root / "freq_ties.json", np.floor(rng.random((L, E)) * 3))
    full = open_session(b.graph_path(), b.path, RuntimeOptions(budget=None))
    want = {name: [full.run(None, feeds(X, r))[0] for X, r in seq] for name, seq in seqs.items()}
    return {"bundle": b, "lengths": lengths, "seqs": seqs, "want": want, "freq_counts": freq_counts,
            "freq_float": freq_float, "freq_ties": freq_ties}


CONFIGS = {
    "lru": dict(policy="lru"),
    "lfu": dict(policy="lfu"),
    "edgemoe": dict(policy="edgemoe"),
    "edgemoe-freq": dict(policy="edgemoe", frequencies="freq_float"),
    "edgemoe-ties": dict(policy="edgemoe", frequencies="freq_ties"),
    "hobbit": dict(policy="hobbit"),
    "hobbit-weights": dict(policy="hobbit", policy_weights="lru=0.6,lfu=0.1,lhu=0.05,fld=0.25"),
    "hobbit-partial": dict(policy="hobbit", policy_weights="fld=0.9,lhu=0"),
    "pinned": dict(policy="pinned", frequencies="freq_counts"),
    "pinned-3": dict(policy="pinned", frequencies="freq_counts", pin_experts=3),
    "pinned-ties": dict(policy="pinned", frequencies="freq_ties", pin_experts=5),
    "none": dict(policy="none"),
}
BUDGETS = ["largest", "largest+1", "1/6", "1/3", "1/2"]


def budget_bytes(name, b, lengths):
    largest = max(x for row in lengths for x in row)
    return {"largest": largest, "largest+1": largest + min(min(row) for row in lengths),
            "1/6": b.store_bytes // 6, "1/3": b.store_bytes // 3, "1/2": b.store_bytes // 2}[name]


def check(setup, config, budget_name, seq_name):
    b, lengths = setup["bundle"], setup["lengths"]
    budget = budget_bytes(budget_name, b, lengths)
    kw = dict(config)
    if "frequencies" in kw:
        kw["frequencies"] = setup[kw["frequencies"]]
    try:
        sim = CacheSimulator(lengths, budget, num_layers=L, **kw)
    except ValueError as e:  # an explicit pin_experts that leaves no room: both sides refuse it
        assert "pin_experts" in str(e)
        with pytest.raises(Exception, match="pin_experts"):
            open_session(b.graph_path(), b.path, RuntimeOptions(budget=budget, **kw))
        return None
    sess = open_session(b.graph_path(), b.path, RuntimeOptions(budget=budget, **kw))
    for n, ((X, routing), want) in enumerate(zip(setup["seqs"][seq_name], setup["want"][seq_name],
                                                 strict=True)):
        y = sess.run(None, feeds(X, routing))[0]
        assert np.array_equal(y, want), f"pass {n}: output differs from the unlimited-budget session"
        for li, (idx, _) in enumerate(routing):
            sim.call(li, idx.ravel().tolist())
        st = sess.stats()
        got = (st["hits"], st["misses"], st["evictions"])
        exp = sim.result().as_tuple()
        assert got == exp, (
            f"{config} budget {budget} ({budget_name}), {seq_name} pass {n}: op (hits, misses, evictions) "
            f"{got} != simulator {exp}; this pass' calls: "
            f"{trace_from_routing([[idx for idx, _ in routing]])}"
        )
    st = sess.stats()
    assert st["policy"] == config["policy"]
    assert st["peak_resident_bytes"] <= budget and st["budget_bytes"] == budget
    assert st["calls"] == L * len(setup["seqs"][seq_name])
    if config["policy"] != "none":
        assert st["reads"] == st["misses"]
    return sim.result()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_policy_matches_simulator(setup, name):
    results = {}
    for budget_name in BUDGETS:
        for seq_name in ("skewed", "uniform"):
            r = check(setup, CONFIGS[name], budget_name, seq_name)
            if r is not None:
                results[(budget_name, seq_name)] = r
    assert len(results) >= 4
    if name == "none":
        assert all(r.hits == 0 and r.evictions == 0 for r in results.values())
    else:  # the traces do exercise the cache
        assert all(r.evictions > 0 for r in results.values())
        assert all(r.hits > 0 for (bn, _), r in results.items() if bn in ("1/3", "1/2"))


def test_policies_differ_on_these_traces(setup):
    """The oracle is only as good as the traces: the policies must not all produce the same counters."""
    b, lengths = setup["bundle"], setup["lengths"]
    budget = budget_bytes("1/3", b, lengths)
    trace = trace_from_routing([[idx for idx, _ in r] for _, r in setup["seqs"]["skewed"]])
    seen = set()
    for cfg in CONFIGS.values():
        kw = dict(cfg)
        if "frequencies" in kw:
            kw["frequencies"] = setup[kw["frequencies"]]
        seen.add(CacheSimulator(lengths, budget, num_layers=L, **kw).run(trace).as_tuple())
    assert len(seen) >= 6, seen


def test_pinned_needs_frequencies(setup):
    b = setup["bundle"]
    with pytest.raises(Exception, match="frequenc"):
        open_session(b.graph_path(), b.path, RuntimeOptions(budget="50%", policy="pinned"))
