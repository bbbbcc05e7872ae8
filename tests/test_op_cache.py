"""The expert store behind OffloadedExpert: budget, LRU accounting, I/O modes, sharing, statistics."""

from __future__ import annotations

import errno
import gc
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from edgemoe_ort.bundle.testing import chain_feeds as feeds
from edgemoe_ort.bundle.testing import make_synthetic_bundle, random_routing, reference_chain
from edgemoe_ort.runtime import ops
from edgemoe_ort.runtime.ops import RuntimeOptions, open_session, store_stats

MIXED = ["fp32", "fp16", "int8", "int4", "int4", "int8", "fp16", "fp32"]




def sequence(n_calls, num_layers, E, K, seed, hidden=64):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_calls):
        T = int(rng.choice([1, 1, 1, 2, 4, 8]))
        X = rng.standard_normal((T, hidden)).astype(np.float32)
        out.append((X, [random_routing(T, E, K, rng) for _ in range(num_layers)]))
    return out


def simulate_lru(bundle, seq, budget):
    """The op's cache in Python. Access order within one call (docs/op-contract.md): the distinct experts of
    the call, first those resident at the start of the call in ascending id, then the others in ascending id.
    A miss evicts least-recently-used experts until the blob's `length` fits in the budget."""
    resident: OrderedDict[tuple[int, int], int] = OrderedDict()
    used = hits = misses = evictions = 0
    for _, routing in seq:
        for li, (idx, _) in enumerate(routing):
            experts = sorted({int(e) for e in idx.ravel() if e >= 0})
            hot = [e for e in experts if (li, e) in resident]
            cold = [e for e in experts if (li, e) not in resident]
            for e in hot + cold:
                key = (li, e)
                if key in resident:
                    hits += 1
                    resident.move_to_end(key)
                    continue
                misses += 1
                length = int(bundle.expert_record(li, e)["length"])
                while used + length > budget:
                    _, n = resident.popitem(last=False)
                    used -= n
                    evictions += 1
                resident[key] = length
                used += length
    return hits, misses, evictions


@pytest.fixture(scope="module")
def mixed_bundle(tmp_path_factory):
    return make_synthetic_bundle(tmp_path_factory.mktemp("cache") / "b", num_layers=2, num_experts=8, top_k=2,
                                 dtype=MIXED)


def test_budget_third_of_store_matches_lru_and_unlimited(mixed_bundle):
    b = mixed_bundle
    budget = b.store_bytes // 3
    largest = max(int(b.expert_record(li, e)["length"]) for li in range(2) for e in range(8))
    assert budget >= largest
    seq = sequence(200, 2, 8, 2, seed=7)
    tight = open_session(b.graph_path(), b.path, RuntimeOptions(budget=budget))
    full = open_session(b.graph_path(), b.path, RuntimeOptions(budget=None))
    for X, routing in seq:
        y1 = tight.run(None, feeds(X, routing))[0]
        y2 = full.run(None, feeds(X, routing))[0]
        assert np.array_equal(y1, y2)
    X, routing = seq[-1]
    ref = reference_chain(b, X, routing)
    assert np.max(np.abs(y1 - ref)) <= 1e-4 * np.max(np.abs(ref))

    st = tight.stats()
    assert st["budget_bytes"] == budget
    assert st["peak_resident_bytes"] <= budget
    assert st["resident_bytes"] <= budget
    hits, misses, evictions = simulate_lru(b, seq, budget)
    assert (st["hits"], st["misses"], st["evictions"]) == (hits, misses, evictions)
    assert st["reads"] == misses and st["calls"] == 400
    assert evictions > 0 and hits > 0

    sf = full.stats()
    assert sf["evictions"] == 0 and sf["misses"] == 16 and sf["peak_resident_bytes"] <= b.store_bytes


def test_percent_budget_and_string_units(mixed_bundle):
    b = mixed_bundle
    s = open_session(b.graph_path(), b.path, RuntimeOptions(budget="50%"))
    assert s.stats()["budget_bytes"] == b.store_bytes // 2
    s = open_session(b.graph_path(), b.path, RuntimeOptions(budget="1MiB"))
    assert s.stats()["budget_bytes"] == 1 << 20


def test_none_policy_reads_every_use(mixed_bundle):
    b = mixed_bundle
    seq = sequence(30, 2, 8, 2, seed=3)
    largest = max(int(b.expert_record(li, e)["length"]) for li in range(2) for e in range(8))
    naive = open_session(b.graph_path(), b.path, RuntimeOptions(policy="none", budget=2 * largest))
    lru = open_session(b.graph_path(), b.path, RuntimeOptions())
    uses = 0
    for X, routing in seq:
        assert np.array_equal(naive.run(None, feeds(X, routing))[0], lru.run(None, feeds(X, routing))[0])
        uses += sum(len({int(e) for e in idx.ravel() if e >= 0}) for idx, _ in routing)
    st = naive.stats()
    assert st["misses"] == uses and st["hits"] == 0 and st["reads"] == uses
    assert st["resident_bytes"] == 0 and st["peak_resident_bytes"] <= 2 * largest
    assert st["policy"] == "none"


def o_direct_works(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def run_modes(b, seq):
    outs, stats = {}, {}
    for io in ("direct", "buffered", "mmap"):
        s = open_session(b.graph_path(), b.path, RuntimeOptions(io=io, budget=b.store_bytes // 3))
        outs[io] = [s.run(None, feeds(X, r))[0] for X, r in seq]
        stats[io] = s.stats()
    return outs, stats


def test_io_modes_identical(mixed_bundle):
    b = mixed_bundle
    seq = sequence(20, 2, 8, 2, seed=11)
    outs, stats = run_modes(b, seq)
    for io in ("buffered", "mmap"):
        assert all(np.array_equal(a, c) for a, c in zip(outs["direct"], outs[io], strict=True))
    direct_ok = o_direct_works(b.store_path)
    assert stats["direct"]["direct_io"] is direct_ok
    assert (stats["direct"]["io_note"] == "") is direct_ok
    assert stats["buffered"]["direct_io"] is False and stats["mmap"]["direct_io"] is False
    assert stats["mmap"]["io_mode"] == "mmap" and stats["mmap"]["misses"] == stats["direct"]["misses"]


@pytest.mark.skipif(not Path("/dev/shm").is_dir() or not os.access("/dev/shm", os.W_OK), reason="no /dev/shm")
def test_direct_falls_back_on_tmpfs(tmp_path):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        b = make_synthetic_bundle(Path(d) / "b", dtype="int8")
        if o_direct_works(b.store_path):
            pytest.skip("this /dev/shm accepts O_DIRECT")
        s = open_session(b.graph_path(), b.path, RuntimeOptions(io="direct"))
        rng = np.random.default_rng(0)
        X = rng.standard_normal((4, 64)).astype(np.float32)
        routing = [random_routing(4, 8, 2, rng)]
        y = s.run(None, feeds(X, routing))[0]
        ref = reference_chain(b, X, routing)
        assert np.max(np.abs(y - ref)) <= 1e-4 * np.max(np.abs(ref))
        st = s.stats()
        assert st["direct_io"] is False and "O_DIRECT" in st["io_note"] and st["io_mode"] == "direct"
        del s
        gc.collect()


def test_two_sessions_and_two_threads(mixed_bundle):
    b = mixed_bundle
    seq = sequence(40, 2, 8, 2, seed=5)
    serial_sess = open_session(b.graph_path(), b.path, RuntimeOptions())
    serial = [serial_sess.run(None, feeds(X, r))[0] for X, r in seq]

    # two sessions over the same bundle, interleaved, each with its own (tight) store
    s1 = open_session(b.graph_path(), b.path, RuntimeOptions(budget="34%"))
    s2 = open_session(b.graph_path(), b.path, RuntimeOptions(budget="34%", io="buffered"))
    assert s1.store_id != s2.store_id
    for (X, r), want in zip(seq, serial, strict=True):
        assert np.array_equal(s1.run(None, feeds(X, r))[0], want)
        assert np.array_equal(s2.run(None, feeds(X, r))[0], want)

    # two threads running one session (one shared store, budget tight enough to evict under contention)
    shared = open_session(b.graph_path(), b.path, RuntimeOptions(budget="34%", intra_op_threads=1))
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def worker(tid: int) -> None:
        try:
            items = seq[tid::2]
            results[tid] = [shared.run(None, feeds(X, r))[0] for _ in range(3) for X, r in items]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    for tid in range(2):
        want = serial[tid::2] * 3
        assert all(np.array_equal(a, c) for a, c in zip(results[tid], want, strict=True))
    st = shared.stats()
    assert st["peak_resident_bytes"] <= st["budget_bytes"]
    assert st["calls"] == 2 * 3 * len(seq)


def test_stats_survive_session_and_reset(mixed_bundle):
    b = mixed_bundle
    s = open_session(b.graph_path(), b.path, RuntimeOptions())
    seq = sequence(3, 2, 8, 2, seed=1)
    for X, r in seq:
        s.run(None, feeds(X, r))
    sid = s.store_id
    before = s.stats()
    assert before["live"] is True and before["misses"] > 0 and before["resident_bytes"] > 0
    assert before["kernel"] == ops.kernel_path() and before["store_id"] == sid
    s.reset_stats()
    after_reset = s.stats()
    assert after_reset["misses"] == 0 and after_reset["peak_resident_bytes"] == before["resident_bytes"]
    s.run(None, feeds(*seq[0]))
    assert s.stats()["hits"] > 0
    del s
    gc.collect()
    gone = store_stats(sid)
    assert gone["live"] is False and gone["resident_bytes"] == 0 and gone["hits"] > 0
    with pytest.raises(KeyError):
        store_stats("no-such-store")


def test_verify_checksums_off_still_correct(mixed_bundle):
    b = mixed_bundle
    s = open_session(b.graph_path(), b.path, RuntimeOptions(verify_checksums=False, io_threads=1))
    X, r = sequence(1, 2, 8, 2, seed=2)[0]
    y = s.run(None, feeds(X, r))[0]
    ref = reference_chain(b, X, r)
    assert np.max(np.abs(y - ref)) <= 1e-4 * np.max(np.abs(ref))
    assert s.stats()["checksums_verified"] == 0
