"""The expert cache in Python: an exact simulator of the ``OffloadedExpert`` store's policies, and Belady.

:func:`simulate` replays a routing trace through the same per-call algorithm as ``run_moe``
(``customops/src/moe.cc``) and returns the hits / misses / evictions the op's counters must show, exactly, for
every policy of ``edgemoe.policy``: ``lru``, ``lfu``, ``edgemoe``, ``hobbit``, ``pinned`` and ``none``.
:func:`belady` is the offline bound for the same trace (report only, not an op policy).

A **trace** is a list of calls ``(layer, experts)``: ``layer`` indexes the manifest's ``layers``,
``experts`` are the distinct experts the call uses (``-1`` and duplicates are dropped, the order does not
matter). Build one from recorded ``topk_indices`` with :func:`trace_from_routing` or :func:`trace_from_npz`.
``lengths[l][e]`` is the manifest record's ``length`` of expert ``(l, e)`` (:func:`lengths_from_bundle`),
``budget`` the store's byte budget.

Per call of layer ``l`` (the contract both sides implement):

1. ``step`` (0 at the start) is incremented on the first call and whenever ``l <=`` the previous call's
   layer (a new forward pass); the current layer becomes ``l``.
2. Order: the call's experts resident at the start of the call in ascending id, then the others ascending.
3. Read-ahead: non-blocking acquires in that order, each pinning its expert, until one fails; for each
   expert in turn a blocking acquire if it was not issued ahead (the call then holds no pin), another
   read-ahead round, then its pin is released.
4. An acquire of a resident expert is a hit; otherwise a miss that makes room for ``length`` bytes by asking
   the policy for victims among resident, unpinned experts (lowest keep-score first) until the bytes fit, all
   or none: if the candidates run out, nothing is evicted and the (non-blocking) acquire fails, counting
   nothing.
5. Per key, kept across evictions: ``uses``, ``last_use`` (a global clock, +1 per insert and per access: a
   miss inserts then accesses), ``last_step``, ``hp_uses`` (= ``uses``). Forward layer distance of a candidate
   of layer ``i`` while layer ``l`` runs: ``((i - l - 1) mod L) + 1`` in ``[1, L]``.

Keep-scores (the candidate with the lowest is evicted; ties go to the smaller ``last_use``) are in the policy
classes below (:data:`POLICIES`). Pure Python + numpy: no onnxruntime needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "POLICIES",
    "DEFAULT_WEIGHTS",
    "Call",
    "Key",
    "SimResult",
    "CacheSimulator",
    "CachePolicy",
    "LruPolicy",
    "LfuPolicy",
    "EdgeMoePolicy",
    "HobbitPolicy",
    "PinnedPolicy",
    "simulate",
    "belady",
    "trace_from_routing",
    "trace_from_npz",
    "lengths_from_bundle",
    "load_frequencies",
    "save_frequencies",
    "frequencies_from_trace",
    "parse_policy_weights",
    "pinned_set",
    "default_pin_count",
]

Key = tuple[int, int]  # (layer, expert)
Call = tuple[int, tuple[int, ...]]  # (layer, distinct experts ascending)
Lengths = Sequence[Sequence[int]] | Mapping[Key, int]
Frequencies = str | Path | Sequence[Sequence[float]] | np.ndarray
Trace = Iterable[tuple[int, Iterable[int]]]

DEFAULT_WEIGHTS: dict[str, float] = {"lru": 0.25, "lfu": 0.25, "lhu": 0.25, "fld": 0.25}


@dataclass(frozen=True)
class SimResult:
    """Counters of one replay: ``hits + misses`` = the acquires (uses) of the trace."""

    hits: int
    misses: int
    evictions: int
    #: the victims in eviction order (not compared: two replays are equal when their counters are)
    evicted: tuple[Key, ...] = field(default=(), compare=False, repr=False)

    @property
    def uses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.hits, self.misses, self.evictions)

    def as_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "hit_rate": self.hit_rate}


@dataclass
class KeyStats:
    """Bookkeeping of one expert, kept for every key ever acquired (survives evictions)."""

    uses: int = 0
    last_use: int = 0
    last_step: int = 0
    hp_uses: int = 0


@dataclass
class CacheState:
    """What a policy may look at when it ranks candidates."""

    num_layers: int
    step: int = 0
    current_layer: int = -1
    clock: int = 0
    keys: dict[Key, KeyStats] = field(default_factory=dict)

    def distance(self, layer: int) -> int:
        """Forward layer distance of a layer-``layer`` expert while ``current_layer`` runs, in ``[1, L]``."""
        return ((layer - self.current_layer - 1) % self.num_layers) + 1


# ---------------------------------------------------------------------------------------------- policies
class CachePolicy:
    """A keep-score: the candidate with the lowest score is evicted first. Scores are tuples ending in
    ``last_use`` (unique), so the ranking is total."""

    name: ClassVar[str] = ""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    def keep_score(self, key: Key, state: CacheState) -> tuple[Any, ...]:
        raise NotImplementedError

    def rank(self, candidates: Iterable[Key], state: CacheState) -> list[Key]:
        """Candidates in eviction order (what repeated ``victim()`` calls return)."""
        return sorted(candidates, key=lambda k: self.keep_score(k, state))


class LruPolicy(CachePolicy):
    """``lru``: evict the least recently inserted or accessed expert."""

    name = "lru"

    def keep_score(self, key: Key, state: CacheState) -> tuple[Any, ...]:
        return (state.keys[key].last_use,)


class LfuPolicy(CachePolicy):
    """``lfu``: evict the expert with the fewest uses (ever), then the least recently used."""

    name = "lfu"

    def keep_score(self, key: Key, state: CacheState) -> tuple[Any, ...]:
        s = state.keys[key]
        return (s.uses, s.last_use)


class EdgeMoePolicy(CachePolicy):
    """``edgemoe``: ``f / d`` (float64), ``f`` = the frequencies file's value of the expert if given, else its
    ``uses``; ``d`` = forward layer distance. Then ``last_use``."""

    name = "edgemoe"

    def keep_score(self, key: Key, state: CacheState) -> tuple[Any, ...]:
        s = state.keys[key]
        freq = self.config.frequencies
        f = float(freq[key[0]][key[1]]) if freq is not None else float(s.uses)
        return (f / float(state.distance(key[0])), s.last_use)


class HobbitPolicy(CachePolicy):
    """``hobbit``: ``((w_lru*(R/T) + w_lfu*(F/T)) + w_lhu*(H/T)) + w_fld*(1 - (d-1)/L)`` in float64, in that
    order (``R`` = last_step, ``F`` = uses, ``H`` = hp_uses, ``T`` = current step). Then ``last_use``."""

    name = "hobbit"

    def keep_score(self, key: Key, state: CacheState) -> tuple[Any, ...]:
        s = state.keys[key]
        w = self.config.weights
        T = float(state.step)
        L = float(state.num_layers)
        d = float(state.distance(key[0]))
        p = (
            (w["lru"] * (float(s.last_step) / T) + w["lfu"] * (float(s.uses) / T))
            + w["lhu"] * (float(s.hp_uses) / T)
        ) + w["fld"] * (1.0 - (d - 1.0) / L)
        return (p, s.last_use)


class PinnedPolicy(CachePolicy):
    """``pinned``: the ``N`` most frequent experts (:func:`pinned_set`) are evicted only when every candidate
    is one of them; LRU otherwise (and among them). Their summed lengths must stay ``<= budget - largest
    length`` (as in the op, an explicit ``pin_experts`` beyond that is an error)."""

    name = "pinned"

    def keep_score(self, key: Key, state: CacheState) -> tuple[Any, ...]:
        return (key in self.config.pinned, state.keys[key].last_use)


#: policy name -> class; ``none`` (no cache) has no class: every use is a miss.
POLICIES: dict[str, type[CachePolicy] | None] = {
    "lru": LruPolicy,
    "lfu": LfuPolicy,
    "edgemoe": EdgeMoePolicy,
    "hobbit": HobbitPolicy,
    "pinned": PinnedPolicy,
    "none": None,
}


@dataclass
class PolicyConfig:
    """Resolved options of a policy (frequencies table, hobbit weights, pinned set)."""

    frequencies: list[list[float]] | None = None
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    pinned: frozenset[Key] = frozenset()


# ------------------------------------------------------------------------------------------ options
def parse_policy_weights(spec: str | None) -> dict[str, float]:
    """``"lru=0.4,fld=0.6"`` -> the four hobbit weights (names not given keep 0.25)."""
    out = dict(DEFAULT_WEIGHTS)
    if spec is None or not spec.strip():
        return out
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in DEFAULT_WEIGHTS:
            raise ValueError(f"policy_weights: expected name=value with name in lru, lfu, lhu, fld, "
                             f"found {part!r} in {spec!r}")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"policy_weights: {name}: expected a number, found {value.strip()!r}") from None
        if not math.isfinite(v):
            raise ValueError(f"policy_weights: {name}: expected a finite number, found {value.strip()!r}")
        out[name] = v
    return out


def load_frequencies(
    source: Frequencies, lengths: Sequence[Sequence[int]] | None = None
) -> list[list[float]]:
    """The frequency table ``[layer][expert]`` (float64) from a JSON file
    ``{"expert_frequency": [[...], ...]}`` or an array-like; checked against ``lengths``' shape if given."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "expert_frequency" not in data:
            raise ValueError(f"{path}: expected a JSON object with 'expert_frequency'")
        table = data["expert_frequency"]
        where = str(path)
    else:
        table = source.tolist() if isinstance(source, np.ndarray) else source
        where = "frequencies"
    out: list[list[float]] = []
    for li, row in enumerate(table):
        vals = []
        for e, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(
                    f"{where}: layer {li} expert {e}: expected a non-negative number, found {v!r}"
                )
            vals.append(float(v))
        out.append(vals)
    if lengths is not None:
        if len(out) != len(lengths):
            raise ValueError(f"{where}: expected {len(lengths)} layers, found {len(out)}")
        for li, (row, lrow) in enumerate(zip(out, lengths, strict=True)):
            if len(row) != len(lrow):
                raise ValueError(f"{where}: layer {li}: expected {len(lrow)} experts, found {len(row)}")
    return out


def save_frequencies(path: str | Path, frequencies: Sequence[Sequence[float]] | np.ndarray) -> Path:
    """Write a frequencies file (the format ``RuntimeOptions(frequencies=...)`` reads)."""
    table = np.asarray(frequencies, dtype=np.float64).tolist() if isinstance(frequencies, np.ndarray) else [
        [float(v) for v in row] for row in frequencies
    ]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"expert_frequency": table}) + "\n", encoding="utf-8")
    return p


def frequencies_from_trace(trace: Trace, num_experts: Sequence[int]) -> list[list[float]]:
    """How many calls used each expert (a calibration table for ``edgemoe`` / ``pinned``)."""
    out = [[0.0] * int(n) for n in num_experts]
    for layer, experts in _normalize(trace):
        for e in experts:
            out[layer][e] += 1.0
    return out


def pinned_set(frequencies: Sequence[Sequence[float]], count: int) -> frozenset[Key]:
    """The ``count`` experts of highest frequency (ties: smaller ``(layer, expert)`` first)."""
    keys = sorted(((li, e) for li, row in enumerate(frequencies) for e in range(len(row))),
                  key=lambda k: (-frequencies[k[0]][k[1]], k[0], k[1]))
    return frozenset(keys[: max(0, count)])


def default_pin_count(frequencies: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]],
                      budget: int) -> int:
    """The largest ``N`` whose top-``N`` experts' summed lengths are ``<= budget - largest length``."""
    keys = sorted(((li, e) for li, row in enumerate(frequencies) for e in range(len(row))),
                  key=lambda k: (-frequencies[k[0]][k[1]], k[0], k[1]))
    room = budget - max(int(x) for row in lengths for x in row)
    total = n = 0
    for li, e in keys:
        total += int(lengths[li][e])
        if total > room:
            break
        n += 1
    return n


def lengths_from_bundle(bundle: Any) -> list[list[int]]:
    """``[layer][expert]`` record lengths of an opened :class:`edgemoe_ort.bundle.Bundle`."""
    return [
        [int(bundle.expert_record(li, e)["length"]) for e in range(int(lay["num_experts"]))]
        for li, lay in enumerate(bundle.layers)
    ]


# ------------------------------------------------------------------------------------------- traces
def _normalize(trace: Trace) -> list[Call]:
    return [(int(layer), tuple(sorted({int(e) for e in experts if int(e) >= 0}))) for layer, experts in trace]


def trace_from_routing(
    passes: Iterable[Sequence[Any] | Mapping[int, Any]],
) -> list[Call]:
    """Calls of a sequence of forward passes. Each pass is the per-layer ``topk_indices`` (any shape,
    ``-1`` = no expert) as a sequence indexed by manifest layer, or a mapping ``layer -> indices`` (run in
    layer order); an item may also be an ``(indices, weights)`` pair."""
    out: list[Call] = []
    for p in passes:
        items = sorted(p.items()) if isinstance(p, Mapping) else list(enumerate(p))
        for layer, idx in items:
            if isinstance(idx, tuple):
                idx = idx[0]
            arr = np.asarray(idx, dtype=np.int64).ravel()
            out.append((int(layer), tuple(sorted({int(e) for e in arr if e >= 0}))))
    return out


def trace_from_npz(path: str | Path) -> list[Call]:
    """Calls of a routing trace written by ``python -m edgemoe_ort.bench.trace record``."""
    z = np.load(path)
    L, S = int(z["num_layers"]), int(z["num_steps"])
    return trace_from_routing([[z[f"s{s}_l{li}_idx"] for li in range(L)] for s in range(S)])


def _lengths_table(lengths: Lengths) -> dict[Key, int]:
    if isinstance(lengths, Mapping):
        return {(int(k[0]), int(k[1])): int(v) for k, v in lengths.items()}
    return {(li, e): int(v) for li, row in enumerate(lengths) for e, v in enumerate(row)}


def _lengths_rows(table: dict[Key, int]) -> list[list[int]]:
    rows: list[list[int]] = []
    for (li, e), v in sorted(table.items()):
        while len(rows) <= li:
            rows.append([])
        while len(rows[li]) < e:
            rows[li].append(0)
        rows[li].append(v)
    return rows


# ----------------------------------------------------------------------------------------- simulator
class _Store:
    """The op's store, single caller: resident set, byte budget, policy bookkeeping."""

    def __init__(self, lengths: dict[Key, int], budget: int, policy: CachePolicy, num_layers: int) -> None:
        self.lengths = lengths
        self.budget = budget
        self.policy = policy
        self.state = CacheState(num_layers=num_layers)
        self.resident: dict[Key, int] = {}
        self.used = 0
        self.hits = self.misses = self.evictions = 0
        self.evicted: list[Key] = []
        self.prev_layer: int | None = None

    def begin_call(self, layer: int) -> None:
        if self.prev_layer is None or layer <= self.prev_layer:
            self.state.step += 1
        self.prev_layer = layer
        self.state.current_layer = layer

    def _touch(self, key: Key) -> None:  # access event + per-use bookkeeping
        st = self.state
        s = st.keys.setdefault(key, KeyStats())
        st.clock += 1
        s.last_use = st.clock
        s.uses += 1
        s.hp_uses += 1
        s.last_step = st.step

    def acquire(self, key: Key, pinned: set[Key]) -> bool:
        if key in self.resident:
            self.hits += 1
            self._touch(key)
            return True
        length = self.lengths[key]
        need = self.used + length - self.budget
        victims: list[Key] = []
        if need > 0:
            candidates = [k for k in self.resident if k not in pinned]
            freed = 0
            for k in self.policy.rank(candidates, self.state):
                if freed >= need:
                    break
                victims.append(k)
                freed += self.resident[k]
            if freed < need:
                return False  # all or none
        for k in victims:
            self.used -= self.resident.pop(k)
            self.evictions += 1
            self.evicted.append(k)
        self.resident[key] = length
        self.used += length
        self.misses += 1
        self.state.clock += 1  # insert event
        self.state.keys.setdefault(key, KeyStats()).last_use = self.state.clock
        self._touch(key)
        return True

    def run_call(self, layer: int, experts: tuple[int, ...]) -> None:
        self.begin_call(layer)
        keys = [(layer, e) for e in experts]
        order = [k for k in keys if k in self.resident] + [k for k in keys if k not in self.resident]
        pinned: set[Key] = set()
        issued = 0

        def issue_ahead() -> None:
            nonlocal issued
            while issued < len(order) and self.acquire(order[issued], pinned):
                pinned.add(order[issued])
                issued += 1

        issue_ahead()
        for oi, key in enumerate(order):
            if oi == issued:  # blocking: the call holds no pin now, and budget >= largest length
                if pinned or not self.acquire(key, pinned):  # cannot happen: budget >= largest length
                    raise RuntimeError(f"blocking acquire of {key} failed with pins {sorted(pinned)} held")
                pinned.add(key)
                issued += 1
            issue_ahead()
            pinned.discard(key)


def _check_budget(table: dict[Key, int], budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget: expected an int byte count, found {budget!r}")
    largest = max(table.values()) if table else 0
    if budget < largest:
        raise ValueError(f"budget {budget} is below the largest expert length {largest}")


class CacheSimulator:
    """The op's store for one caller, call by call (what :func:`simulate` replays): ``call(layer, experts)``
    for every ``OffloadedExpert`` compute in order, ``result()`` for the counters so far. Same arguments as
    :func:`simulate`."""

    def __init__(
        self,
        lengths: Lengths,
        budget: int,
        policy: str,
        *,
        num_layers: int,
        frequencies: Frequencies | None = None,
        policy_weights: str | None = None,
        pin_experts: int | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, found {policy!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers: expected >= 1, found {num_layers}")
        self.policy = policy
        self.table = _lengths_table(lengths)
        _check_budget(self.table, budget)
        self.budget = int(budget)
        rows = _lengths_rows(self.table)
        config = PolicyConfig(weights=parse_policy_weights(policy_weights))
        if frequencies is not None and policy in ("edgemoe", "pinned"):
            config.frequencies = load_frequencies(frequencies, rows)
        if policy == "pinned":
            if config.frequencies is None:
                raise ValueError("policy 'pinned' needs a frequencies file")
            if pin_experts is not None and (isinstance(pin_experts, bool) or pin_experts < 0):
                raise ValueError(f"pin_experts: expected None or an int >= 0, found {pin_experts!r}")
            if pin_experts is None:
                n = default_pin_count(config.frequencies, rows, self.budget)
            else:
                n = int(pin_experts)
                total = sum(len(r) for r in config.frequencies)
                if n > total:
                    raise ValueError(f"pin_experts: expected an int in [0, {total}] (experts in the store), "
                                     f"found {n}")
            config.pinned = pinned_set(config.frequencies, n)
            need = sum(self.table[k] for k in config.pinned)
            room = self.budget - max(self.table.values())
            if need > room:  # the op refuses this too: one blob's room must stay for the other experts
                raise ValueError(f"pin_experts: the {n} most frequent experts need {need} bytes, expected at "
                                 f"most budget - largest length = {room}")
        self.config = config
        cls = POLICIES[policy]
        self._store = _Store(self.table, self.budget, cls(config), num_layers) if cls is not None else None
        self._uses = 0

    def call(self, layer: int, experts: Iterable[int]) -> None:
        """One op compute of ``layer`` using ``experts`` (``-1`` and duplicates ignored)."""
        (layer, keys), = _normalize([(layer, experts)])
        for e in keys:
            if (layer, e) not in self.table:
                raise ValueError(f"trace: layer {layer} expert {e} has no length")
        self._uses += len(keys)
        if self._store is not None:
            self._store.run_call(layer, keys)

    def run(self, trace: Trace) -> SimResult:
        """``call()`` every call of ``trace``; returns :meth:`result`."""
        for layer, experts in trace:
            self.call(layer, experts)
        return self.result()

    @property
    def resident(self) -> dict[Key, int]:
        """Resident experts -> their length (empty for ``none``)."""
        return dict(self._store.resident) if self._store is not None else {}

    @property
    def state(self) -> CacheState | None:
        """Per-key bookkeeping, clock, step and current layer (``None`` for ``none``)."""
        return self._store.state if self._store is not None else None

    def result(self) -> SimResult:
        """The counters so far (``none``: every use a miss)."""
        st = self._store
        if st is None:
            return SimResult(hits=0, misses=self._uses, evictions=0)
        return SimResult(hits=st.hits, misses=st.misses, evictions=st.evictions, evicted=tuple(st.evicted))


def simulate(
    trace: Trace,
    lengths: Lengths,
    budget: int,
    policy: str,
    *,
    num_layers: int,
    frequencies: Frequencies | None = None,
    policy_weights: str | None = None,
    pin_experts: int | None = None,
) -> SimResult:
    """Replay ``trace`` through the op's store with ``policy`` under ``budget`` bytes; the op's ``hits``,
    ``misses`` and ``evictions`` for the same calls (single caller, fresh store) are exactly these.

    ``num_layers`` = the manifest's MoE layers (``L`` of the layer distance). ``frequencies`` (a JSON path or
    a ``[layer][expert]`` table): ``edgemoe`` uses it instead of the use counts; ``pinned`` requires it.
    ``policy_weights``: hobbit's ``"lru=..,lfu=..,lhu=..,fld=.."``. ``pin_experts``: ``pinned``'s ``N``
    (default :func:`default_pin_count`).
    """
    sim = CacheSimulator(lengths, budget, policy, num_layers=num_layers, frequencies=frequencies,
                         policy_weights=policy_weights, pin_experts=pin_experts)
    return sim.run(trace)


def belady(trace: Trace, lengths: Lengths, budget: int) -> SimResult:
    """Offline bound for the same trace: on a miss, evict the resident expert whose next use is farthest
    (never used again first; then larger length, then smaller key) until the blob fits. The current call's
    experts are not evicted during the call, unless nothing else can make room (a budget smaller than the
    call): then its already-used experts go, farthest next use first. Within a call the order is the op's
    (resident first, then ascending id; with a budget that holds the call this counts exactly as ascending
    order). Optimal for unit lengths; a heuristic with variable lengths."""
    calls = _normalize(trace)
    table = _lengths_table(lengths)
    _check_budget(table, budget)
    budget = int(budget)
    inf = len(calls)
    # next_call[c][e]: the next call after c using (layer of c, e)
    next_call: list[dict[int, int]] = [{} for _ in calls]
    seen: dict[Key, int] = {}
    for c in range(len(calls) - 1, -1, -1):
        layer, experts = calls[c]
        for e in experts:
            next_call[c][e] = seen.get((layer, e), inf)
            seen[(layer, e)] = c
    resident: dict[Key, int] = {}  # key -> next use (call index)
    used = hits = misses = evictions = 0
    evicted: list[Key] = []
    for c, (layer, experts) in enumerate(calls):
        keys = [(layer, e) for e in experts]
        order = [k for k in keys if k in resident] + [k for k in keys if k not in resident]
        current = set(keys)
        done: set[Key] = set()
        for key in order:
            if key in resident:
                hits += 1
            else:
                misses += 1
                length = table[key]
                need = used + length - budget
                if need > 0:
                    def far(k: Key) -> tuple[int, int, int, int]:
                        return (-resident[k], -table[k], k[0], k[1])

                    ranked = sorted((k for k in resident if k not in current), key=far)
                    ranked += sorted((k for k in resident if k in done), key=far)
                    freed = 0
                    for k in ranked:
                        if freed >= need:
                            break
                        del resident[k]
                        freed += table[k]
                        used -= table[k]
                        evictions += 1
                        evicted.append(k)
                    if freed < need:
                        raise AssertionError(f"belady: no room for {key} (budget {budget})")
                used += length
            resident[key] = next_call[c][key[1]]
            done.add(key)
    return SimResult(hits=hits, misses=misses, evictions=evictions, evicted=tuple(evicted))
