"""The cache simulator (edgemoe_ort.runtime.cachesim) on hand-computed traces: each policy's victim where the
policies differ, read-ahead pins, all-or-none evictions, pinned's default N, and Belady as an upper bound."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from edgemoe_ort.runtime.cachesim import (
    POLICIES,
    SimResult,
    belady,
    default_pin_count,
    frequencies_from_trace,
    load_frequencies,
    parse_policy_weights,
    pinned_set,
    save_frequencies,
    simulate,
    trace_from_routing,
)

UNIT1 = [[1, 1, 1, 1]]  # one layer, four unit-length experts
UNIT2 = [[1, 1], [1, 1]]  # two layers of two


def run(trace, lengths, budget, policy, **kw):
    kw.setdefault("num_layers", len(lengths))
    return simulate(trace, lengths, budget, policy, **kw)


# Trace A, one layer, budget 2. Call 4 must evict 0 (used twice, older) or 1 (used once, newer); call 5 asks
# for 0 again. By hand (clock +2 per miss, +1 per hit): last_use 0 -> 3, 1 -> 5; uses 0 -> 2, 1 -> 1;
# last_step 0 -> 2, 1 -> 3; step at call 4 = 4 (every call of layer 0 starts a pass); d = 1 (L = 1).
TRACE_A = [(0, [0]), (0, [0]), (0, [1]), (0, [2]), (0, [0])]


def test_trace_a_lru_evicts_oldest():
    r = run(TRACE_A, UNIT1, 2, "lru")
    # call 4 evicts 0 (last_use 3 < 5); call 5 misses 0 and evicts 1 (last_use 5 < 7 of expert 2)
    assert r == SimResult(hits=1, misses=4, evictions=2)
    assert r.evicted == ((0, 0), (0, 1))


def test_trace_a_lfu_and_edgemoe_keep_the_frequent_one():
    for policy in ("lfu", "edgemoe"):  # lfu: uses 2 > 1; edgemoe: 2/1 > 1/1
        r = run(TRACE_A, UNIT1, 2, policy)
        assert r == SimResult(hits=2, misses=3, evictions=1), policy
        assert r.evicted == ((0, 1),), policy


def test_trace_a_hobbit_default_and_lru_only_weights():
    # default: p0 = .25*(2/4) + .25*(2/4) + .25*(2/4) + .25*1 = 0.625,
    #          p1 = .25*(3/4 + 1/4 + 1/4) + .25 = 0.5625
    r = run(TRACE_A, UNIT1, 2, "hobbit")
    assert r == SimResult(2, 3, 1) and r.evicted == ((0, 1),)
    # recency only: p0 = 2/4 < p1 = 3/4 -> evict 0; call 5: last_step 1 -> 3 < 2 -> 4, evict 1
    r = run(TRACE_A, UNIT1, 2, "hobbit", policy_weights="lru=1,lfu=0,lhu=0,fld=0")
    assert r == SimResult(1, 4, 2) and r.evicted == ((0, 0), (0, 1))


def test_trace_a_pinned_follows_the_frequencies():
    r = run(TRACE_A, UNIT1, 2, "pinned", frequencies=[[5, 1, 1, 1]], pin_experts=1)  # P = {0}
    assert r == SimResult(2, 3, 1) and r.evicted == ((0, 1),)
    # P = {1}: call 4 evicts 0 (the only candidate outside P), call 5 evicts 2 (outside P) although 1 is older
    r = run(TRACE_A, UNIT1, 2, "pinned", frequencies=[[1, 5, 1, 1]], pin_experts=1)
    assert r == SimResult(1, 4, 2) and r.evicted == ((0, 0), (0, 2))
    # the pinned set must leave one largest blob's room: budget 2 - 1 holds one pinned expert, not two
    with pytest.raises(ValueError, match="pin_experts: the 2 most frequent experts need 2 bytes"):
        run(TRACE_A, UNIT1, 2, "pinned", frequencies=[[5, 1, 1, 1]], pin_experts=2)
    with pytest.raises(ValueError, match="pin_experts: expected an int in"):
        run(TRACE_A, UNIT1, 2, "pinned", frequencies=[[5, 1, 1, 1]], pin_experts=5)


def test_pinned_all_candidates_pinned_falls_back_to_lru():
    # budget 4, P = {0, 1, 2}; 3 (outside P) is pinned by the call {3, 4}, so the candidates for 4 are all in
    # P: LRU among them evicts 0. The next miss (5) finds 3 outside P and evicts it although 1 is older.
    lengths = [[1] * 6]
    freq = [[5, 4, 3, 0, 0, 0]]
    trace = [(0, [0]), (0, [1]), (0, [2]), (0, [3]), (0, [3, 4]), (0, [5])]
    r = run(trace, lengths, 4, "pinned", frequencies=freq, pin_experts=3)
    assert r == SimResult(hits=1, misses=6, evictions=2) and r.evicted == ((0, 0), (0, 3))
    assert run(trace, lengths, 4, "lru").evicted == ((0, 0), (0, 1))


def test_trace_a_none_and_belady():
    assert run(TRACE_A, UNIT1, 2, "none") == SimResult(0, 5, 0)
    b = belady(TRACE_A, UNIT1, 2)  # call 4: 0 is used again at call 5, 1 never: evict 1
    assert b == SimResult(2, 3, 1) and b.evicted == ((0, 1),)


# Trace B, two layers, budget 2: (1,0) then (0,0) are loaded; call 3 (layer 0) needs a slot.
# LRU/LFU evict (1,0) (older, equal uses). edgemoe: d(1,0) = 1, d(0,0) = 2 -> 1/1 > 1/2: evicts (0,0).
# hobbit (T = 3): p(1,0) = .25*(1/3)*3 + .25*1 = 0.5; p(0,0) = .25*(2/3 + 1/3 + 1/3) + .25*(1 - 1/2) = 0.4583
TRACE_B = [(1, [0]), (0, [0]), (0, [1]), (1, [0])]


@pytest.mark.parametrize(
    "policy, kw, hits, victims",
    [
        ("lru", {}, 0, [(1, 0), (0, 0)]),
        ("lfu", {}, 0, [(1, 0), (0, 0)]),
        ("edgemoe", {}, 1, [(0, 0)]),
        # 10/2 > 1/1 keeps (0,0); call 4 (layer 1 runs, (0,1) and (0,0) at d = 1): 0/1 < 10/1
        ("edgemoe", {"frequencies": [[10, 0], [1, 0]]}, 0, [(1, 0), (0, 1)]),
        ("hobbit", {}, 1, [(0, 0)]),
        ("hobbit", {"policy_weights": "fld=0"}, 0, [(1, 0), (0, 0)]),  # recency wins without distance
        ("pinned", {"frequencies": [[0, 0], [3, 0]], "pin_experts": 1}, 1, [(0, 0)]),
    ],
)
def test_trace_b_layer_distance(policy, kw, hits, victims):
    r = run(TRACE_B, UNIT2, 2, policy, **kw)
    assert (r.hits, r.misses, r.evictions) == (hits, 4 - hits, len(victims))
    assert list(r.evicted) == victims


def test_layer_distance_wraps():
    # three layers; while layer 2 runs, layer 0 is next (d = 1), layer 1 at d = 2, layer 2 itself at d = 3.
    # Load (0,0), (1,0) and (2,0) in one pass at budget 3, then (2,1) in the next pass' layer 2: f = 1 each,
    # scores 1/1, 1/2, 1/3 -> edgemoe evicts (2,0); LRU evicts (0,0).
    lengths = [[1, 1]] * 3
    trace = [(0, [0]), (1, [0]), (2, [0]), (2, [1])]
    assert run(trace, lengths, 3, "edgemoe").evicted == ((2, 0),)
    assert run(trace, lengths, 3, "lru").evicted == ((0, 0),)
    # with the current layer 0 instead: (1,0) is next (d = 1), (2,0) at 2, (0,0) at 3
    trace = [(0, [0]), (1, [0]), (2, [0]), (0, [1])]
    assert run(trace, lengths, 3, "edgemoe").evicted == ((0, 0),)


# Trace C, one layer, budget 2: 0 used four times, then 1; call 6 uses {0, 2, 3}. Read-ahead pins 0 (hit) and
# 2 (evicting 1), fails on 3 (no unpinned candidate: all or none), and retries after 0 is released: only 0 can
# go. A sequential LFU would have evicted 2 instead (uses 1 < 5), so call 7's 0 is a miss here.
TRACE_C = [(0, [0])] * 4 + [(0, [1]), (0, [0, 2, 3]), (0, [0])]


def test_trace_c_read_ahead_pins_decide_the_victim():
    r = run(TRACE_C, UNIT1, 2, "lfu")
    assert r == SimResult(hits=4, misses=5, evictions=3)
    assert r.evicted == ((0, 1), (0, 0), (0, 2))  # call 7: 2 and 3 used once, 2 older


def test_call_larger_than_budget():
    # budget 2, a call of 3 cold experts: 0 and 1 issued ahead, 2 waits for 0's release and evicts it.
    r = run([(0, [0, 1, 2]), (0, [1, 2])], UNIT1, 2, "lru")
    assert r == SimResult(hits=2, misses=3, evictions=1) and r.evicted == ((0, 0),)
    b = belady([(0, [0, 1, 2]), (0, [1, 2])], UNIT1, 2)
    assert b.hits == 2


def test_variable_lengths_all_or_none():
    # lengths 2, 1, 1, 3, budget 4, LFU. 2 used three times, 1 once: both resident (2 bytes). The call {0, 3}:
    # 0 fits as is (4 bytes used); 3 needs 3 bytes but the unpinned candidates 1 and 2 hold 2: the try fails
    # and evicts nothing. After 0's release the blocking acquire ranks 1 (uses 1, older), 0 (uses 1), 2 (uses
    # 3) and evicts 1 then 0 (3 bytes): 2 survives and the last call hits.
    lengths = [[2, 1, 1, 3]]
    trace = [(0, [2])] * 3 + [(0, [1]), (0, [0, 3]), (0, [2])]
    r = run(trace, lengths, 4, "lfu")
    assert r == SimResult(hits=3, misses=4, evictions=2) and r.evicted == ((0, 1), (0, 0))
    # a miss frees only as many victims as needed: 2 evicts 0 (3 bytes), then 3 needs 1 byte: 1 goes, 2 stays
    r = run([(0, [0]), (0, [1]), (0, [2]), (0, [3])], [[3, 1, 1, 3]], 4, "lru")
    assert r.evicted == ((0, 0), (0, 1))


def test_none_counts_every_use():
    trace = [(0, [0, 1]), (0, [0, 1]), (0, [3])]
    assert run(trace, UNIT1, 4, "none") == SimResult(0, 5, 0)
    assert run(trace, UNIT1, 4, "lru") == SimResult(2, 3, 0)


def test_pinned_default_n():
    lengths = [[3, 1, 2, 2]]
    freq = [[4, 3, 2, 1]]
    # budget 6, largest length 3: room 3 -> top-1 (3 bytes) fits, top-2 (4) does not
    assert default_pin_count(freq, lengths, 6) == 1
    assert default_pin_count(freq, lengths, 7) == 2  # room 4: 3 + 1
    assert default_pin_count(freq, lengths, 3) == 0
    assert default_pin_count(freq, lengths, 100) == 4
    # ties: smaller (layer, expert) first
    assert pinned_set([[1, 2], [2, 1]], 2) == {(0, 1), (1, 0)}
    assert pinned_set([[1, 1], [1, 1]], 3) == {(0, 0), (0, 1), (1, 0)}
    # the default N is what simulate() uses: budget 7 pins {0, 1}; 2 and 3 fight over the rest
    trace = [(0, [0]), (0, [1]), (0, [2]), (0, [3]), (0, [0]), (0, [1])]
    r = run(trace, lengths, 7, "pinned", frequencies=freq)
    assert r == run(trace, lengths, 7, "pinned", frequencies=freq, pin_experts=2)
    assert r.evicted == ((0, 2),) and r.hits == 2
    assert run(trace, lengths, 7, "lru").hits == 0


def test_frequencies_file(tmp_path):
    p = save_frequencies(tmp_path / "f.json", np.array([[1, 2], [3, 4]]))
    assert json.loads(p.read_text()) == {"expert_frequency": [[1.0, 2.0], [3.0, 4.0]]}
    assert load_frequencies(p, UNIT2) == [[1.0, 2.0], [3.0, 4.0]]
    a = run(TRACE_B, UNIT2, 2, "edgemoe", frequencies=p)
    assert a == run(TRACE_B, UNIT2, 2, "edgemoe", frequencies=[[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="expected 2 layers"):
        load_frequencies([[1, 2]], UNIT2)
    with pytest.raises(ValueError, match="layer 1: expected 2 experts"):
        load_frequencies([[1, 2], [1]], UNIT2)
    with pytest.raises(ValueError, match="non-negative"):
        load_frequencies([[1, -2], [1, 1]], UNIT2)
    with pytest.raises(ValueError, match="needs a frequencies file"):
        run(TRACE_B, UNIT2, 2, "pinned")
    assert frequencies_from_trace(TRACE_B, [2, 2]) == [[1.0, 1.0], [2.0, 0.0]]


def test_policy_weights_and_errors():
    assert parse_policy_weights(None) == {"lru": 0.25, "lfu": 0.25, "lhu": 0.25, "fld": 0.25}
    assert parse_policy_weights("lru=0.5, fld=0") == {"lru": 0.5, "lfu": 0.25, "lhu": 0.25, "fld": 0.0}
    for bad in ("lru", "xyz=1", "lru=abc", "lru=inf"):
        with pytest.raises(ValueError, match="policy_weights"):
            parse_policy_weights(bad)
    with pytest.raises(ValueError, match="below the largest"):
        run(TRACE_A, [[1, 2, 1, 1]], 1, "lru")
    with pytest.raises(ValueError, match="policy"):
        run(TRACE_A, UNIT1, 2, "fifo")


def test_trace_from_routing():
    passes = [
        [np.array([[3, 1], [1, -1]]), (np.array([[0, 2]]), np.ones((1, 2), np.float32))],
        {1: np.array([[-1, -1]]), 0: np.array([2, 2])},
    ]
    assert trace_from_routing(passes) == [(0, (1, 3)), (1, (0, 2)), (0, (2,)), (1, ())]
    # an empty call still counts as a call (steps, current layer) but uses nothing
    assert run(trace_from_routing(passes), [[1] * 4, [1] * 4], 8, "lru") == SimResult(0, 5, 0)


def sequential_lru(trace, lengths, budget):
    """test_op_cache.simulate_lru: LRU over the per-call order, no read-ahead."""
    resident: OrderedDict = OrderedDict()
    used = hits = misses = ev = 0
    for li, experts in trace:
        hot = [e for e in experts if (li, e) in resident]
        for e in hot + [e for e in experts if (li, e) not in resident]:
            if (li, e) in resident:
                hits += 1
                resident.move_to_end((li, e))
                continue
            misses += 1
            n = lengths[li][e]
            while used + n > budget:
                used -= resident.popitem(last=False)[1]
                ev += 1
            resident[(li, e)] = n
            used += n
    return hits, misses, ev


def random_trace(rng, L, E, passes, max_k):
    out = []
    for _ in range(passes):
        for li in range(L):
            n = int(rng.integers(1, max_k + 1))
            out.append((li, sorted(rng.choice(E, size=n, replace=False).tolist())))
    return out


def test_lru_with_read_ahead_equals_sequential_lru():
    rng = np.random.default_rng(0)
    for _ in range(100):
        L, E = int(rng.integers(1, 4)), 8
        lengths = [[int(x) for x in rng.choice([1, 2, 3, 5], E)] for _ in range(L)]
        trace = random_trace(rng, L, E, int(rng.integers(5, 40)), 4)
        budget = int(rng.integers(5, 30))
        assert run(trace, lengths, budget, "lru").as_tuple() == sequential_lru(trace, lengths, budget)


def test_belady_bounds_every_policy_on_unit_lengths():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(60):
        L, E, K = int(rng.integers(1, 4)), 8, int(rng.integers(1, 4))
        lengths = [[1] * E for _ in range(L)]
        trace = random_trace(rng, L, E, int(rng.integers(10, 60)), K)
        # skewed traces too, so the frequency policies have something to find
        if rng.random() < 0.5:
            trace = [(li, sorted({int(e) % 5 for e in ex})) for li, ex in trace]
        freq = frequencies_from_trace(trace, [E] * L)
        for budget in (K, K + 2, 2 * K + 3, L * E):
            b = belady(trace, lengths, budget)
            assert b.uses == sum(len(ex) for _, ex in trace)
            for policy in POLICIES:
                for kw in ({}, {"frequencies": freq}):
                    if policy == "pinned" and not kw:
                        continue
                    r = run(trace, lengths, budget, policy, **kw)
                    assert r.uses == b.uses
                    assert b.hits >= r.hits, (policy, kw, budget, b, r)
                    checked += 1
            if budget == L * E:  # everything fits: only compulsory misses
                assert b.evictions == 0 and run(trace, lengths, budget, "lru").as_tuple() == b.as_tuple()
    assert checked > 1000


def test_belady_hand_case():
    # budget 2: 0 1 2 0 1 -> at 2, evict 1 (next use farther than 0's); 0 hits; 1 misses. LRU: 0 hits nothing.
    trace = [(0, [e]) for e in (0, 1, 2, 0, 1)]
    b = belady(trace, UNIT1, 2)
    assert b == SimResult(1, 4, 2) and b.evicted == ((0, 1), (0, 0))  # last: 0 and 2 never reused
    assert run(trace, UNIT1, 2, "lru") == SimResult(0, 5, 3)
