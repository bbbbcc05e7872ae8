"""The side-by-side benchmark: every mode of one bundle, interleaved in one process, plus the roofline.

Modes (``Mode.name``):

- ``inmemory``: the bundle converted by :mod:`edgemoe_ort.bench.inmemory` (all experts as initializers of
  ORT's QMoE / MoE), run by ORT alone (MLAS kernels, no custom op);
- ``naive``: our op, policy ``none`` (every use reads its expert from storage), direct I/O;
- ``mmap``: our op, LRU cache at the budget, I/O by ``mmap`` + memcpy (page faults do the I/O);
- ``edgemoe``: our op, a cache policy (``Mode.policy``, LRU by default) at the budget, direct I/O. With
  several policies (``run_bench(policies=[...])``) every policy is its own mode ``edgemoe[P]@budget``,
  interleaved with the others.

Timing runs happen in one process, interleaved: repeat ``r`` runs every mode once, in forward order for even
``r`` and reverse order for odd ``r``, so drift (other tenants, thermal) hits every mode alike; medians over
repeats are reported. Each run opens a fresh session (cold cache, the page cache of the store dropped), runs
the prefill, then ``tokens`` decode steps. The decode steps feed a fixed token sequence (the greedy output of
a reference run), so every mode does exactly the same work.

Peak RSS is process-wide, so it is measured per mode in a fresh subprocess (``python -m
edgemoe_ort.bench.rss``) that runs one generation of ``rss_decode_tokens`` decode tokens (64 by default:
RSS that grows with the run length is hidden by a short run): ``peak_rss`` (VmHWM over the whole process,
session creation included), ``base_rss`` (after imports, before the session), ``gen_peak_rss`` (peak during
the generation, VmHWM reset after the session is created) and the VmHWM after every decode token.

Roofline: ``compute_s`` per decode token = our op with everything resident (budget 100 %, cache warmed by
an untimed pass, 0 misses checked); ``bw`` = O_DIRECT read bandwidth of the store's filesystem at the store's
blob size (or the profile's bandwidth with ``--profile``). For a mode, ``bound = max(compute_s,
bytes_read_per_token / bw)`` and ``roofline_ratio = bound / measured_s_per_token`` (1.0 = at the bound).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgemoe_ort.bench.inmemory import convert_bundle_to_inmemory
from edgemoe_ort.bench.storage import load_profile, odirect_bandwidth
from edgemoe_ort.bundle import Bundle
from edgemoe_ort.runtime.ops import (
    POLICIES,
    RuntimeOptions,
    kernel_path,
    library_path,
    open_session,
    parse_budget,
)

__all__ = [
    "Mode",
    "modes_for",
    "run_bench",
    "drop_store_cache",
    "check_policies",
    "parse_predictors",
    "parse_routing",
    "parse_routings",
    "parse_precision",
    "parse_precisions",
    "parse_policies",
    "CACHE_POLICIES",
    "RESULT_FIELDS",
]

DEFAULT_BUDGETS = ("10%", "25%", "50%", "100%")
#: decode tokens of the peak-RSS generation (fresh process per mode)
DEFAULT_RSS_DECODE_TOKENS = 64
#: policies an ``edgemoe`` mode may run: every cache policy of the op (``none`` is the ``naive`` mode)
CACHE_POLICIES = tuple(p for p in POLICIES if p != "none")
#: every mode result carries these keys (tests check them)
RESULT_FIELDS = (
    "mode",
    "policy",
    "budget",
    "budget_bytes",
    "decode_tokens_per_s",
    "prefill_tokens_per_s",
    "ttft_s",
    "decode_s_per_token",
    "bytes_read_per_token",
    "hit_rate",
    "stall_s_per_token",
    "peak_rss_bytes",
    "bound_s_per_token",
    "roofline_ratio",
    "runs",
)


@dataclass(frozen=True)
class Mode:
    """One benchmarked configuration: ``name`` (resident | inmemory | naive | mmap | edgemoe), the cache
    ``budget`` (None: no budget / everything) and, for ``edgemoe``, the cache ``policy`` (None: the default,
    ``lru``, labelled without a policy; otherwise the label is ``edgemoe[P]@budget``)."""

    name: str  # resident | inmemory | naive | mmap | edgemoe
    budget: str | None = None
    policy: str | None = None  # edgemoe only: lru | lfu | edgemoe | hobbit | pinned (None = lru)
    predictor: str | None = None  # edgemoe only: table | gates | token | residual | auto (None = none)
    routing: str | None = None  # edgemoe only: a routing spec (parse_routing; None = exact)
    precision: str | None = None  # edgemoe only: a miss-precision spec (parse_precision; None = exact)
    # edgemoe only: another bundle of the same model (a run's ``variants``), at the main bundle's budget
    variant: str | None = None  # its name in the run (label prefix ``name:``)
    variant_path: str | None = None  # its folder
    budget_bytes: int | None = None  # the budget in bytes (``budget``'s share of the main bundle's experts)

    @property
    def label(self) -> str:
        """Unique name in a run: ``naive``, ``mmap@25%``, ``edgemoe@25%``, ``edgemoe[lfu]@25%``,
        ``edgemoe[lfu+auto]@25%``, ``edgemoe[+gates]@25%`` (default policy, predictor gates),
        ``edgemoe[lru/cache-prior:0.35]@25%`` (a routing rule), ``edgemoe[lru~dynamic]@25%`` (a miss
        precision), ``plan:edgemoe[lru+auto]@25%`` (a variant bundle at the main bundle's 25 %)."""
        tag = (self.policy or "") + (f"+{self.predictor}" if self.predictor else "")
        tag += f"/{self.routing}" if self.routing else ""
        tag += f"~{self.precision}" if self.precision else ""
        name = f"{self.name}[{tag}]" if tag else self.name
        name = f"{self.variant}:{name}" if self.variant else name
        return name if self.budget is None else f"{name}@{self.budget}"

    @property
    def budget_spec(self) -> str | None:
        """The budget the op gets: ``budget_bytes`` if set (a variant), else ``budget``."""
        return str(self.budget_bytes) if self.budget_bytes is not None else self.budget

    @property
    def cache_policy(self) -> str | None:
        """The op's cache policy in this mode (None for the in-memory baseline, which has no store)."""
        if self.name == "inmemory":
            return None
        if self.name == "naive":
            return "none"
        if self.name == "edgemoe":
            return self.policy or "lru"
        return "lru"

    def options(
        self,
        *,
        io_threads: int,
        threads: int | None,
        profile: dict[str, Any] | None,
        policy_options: dict[str, Any] | None = None,
    ) -> RuntimeOptions:
        """The RuntimeOptions of this mode. ``policy_options`` (``frequencies``, ``policy_weights``,
        ``pin_experts``; None values are left out) go to ``edgemoe`` modes only."""
        bw = float(profile["read_bw_bytes_per_s"]) if profile else 0.0
        lat = float(profile["read_latency_us"]) if profile else 0.0
        common: dict[str, Any] = dict(
            io_threads=io_threads, intra_op_threads=threads, throttle_bw=bw, throttle_latency_us=lat
        )
        common["predictor"] = "none"  # only the edgemoe modes with a predictor prefetch
        if self.name == "naive":
            return RuntimeOptions(policy="none", io="direct", **common)
        if self.name == "mmap":
            return RuntimeOptions(policy="lru", io="mmap", budget=self.budget, **common)
        if self.name == "edgemoe":
            extra = {k: v for k, v in (policy_options or {}).items() if v is not None}
            common["predictor"] = self.predictor or "none"
            common.update(parse_routing(self.routing) if self.routing else {})
            common.update(parse_precision(self.precision) if self.precision else {})
            return RuntimeOptions(
                policy=self.policy or "lru", io="direct", budget=self.budget_spec, **common, **extra
            )
        if self.name == "resident":  # the roofline's compute: our op, every used expert cached beforehand
            return RuntimeOptions(policy="lru", io="direct", budget="100%", **common)
        raise ValueError(f"mode {self.name!r} has no RuntimeOptions")


def modes_for(
    budgets: Sequence[str],
    policies: Sequence[str] | None = None,
    predictors: Sequence[str] | None = None,
    routings: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
) -> list[Mode]:
    """Every mode of a run: resident, inmemory, naive, mmap at each budget, then edgemoe at each budget —
    once (policy lru, label ``edgemoe@B``) if ``policies`` is None, else once per policy and budget (label
    ``edgemoe[P]@B``), grouped by policy; with ``predictors`` once per policy, predictor and budget
    (``edgemoe[P+pred]@B``; predictor ``none`` is the mode without prefetching); with ``routings`` once
    more per routing spec (``edgemoe[P+pred/spec]@B``; ``exact`` is the router's own choice); with
    ``precisions`` once more per miss-precision spec (``edgemoe[P~dynamic]@B``; ``exact`` reads primaries)."""
    out = [Mode("resident"), Mode("inmemory"), Mode("naive")]
    out += [Mode("mmap", b) for b in budgets]
    pols: list[str | None] = list(policies) if policies is not None else [None]
    preds: list[str | None] = [None if x == "none" else x for x in predictors] if predictors else [None]
    routes: list[str | None] = [None if x == "exact" else x for x in routings] if routings else [None]
    precs: list[str | None] = [None if x == "exact" else x for x in precisions] if precisions else [None]
    out += [Mode("edgemoe", b, p, q, r, c) for p in pols for q in preds for r in routes for c in precs
            for b in budgets]
    return out


def parse_precision(spec: str) -> dict[str, Any]:
    """A miss-precision spec -> RuntimeOptions fields: ``exact``; ``dynamic`` (thresholds from the profile);
    ``dynamic:T1:T2``. Raises ValueError naming ``--miss-precision``."""
    parts = spec.split(":")
    try:
        if parts == ["exact"]:
            return {"miss_precision": "exact"}
        if parts[0] == "dynamic" and len(parts) in (1, 3):
            out: dict[str, Any] = {"miss_precision": "dynamic"}
            if len(parts) == 3:
                out["thresholds"] = (float(parts[1]), float(parts[2]))
            RuntimeOptions(**out)  # the ranges
            return out
    except ValueError:
        pass
    raise ValueError(f"--miss-precision: expected exact, dynamic or dynamic:T1:T2 (0 <= T1 < T2 <= 1), "
                     f"found {spec!r}")


def parse_precisions(text: str | Sequence[str], *, flag: str = "--miss-precision") -> list[str]:
    """``"exact,dynamic:0.6:0.9"`` (or a list) -> the specs, each checked by :func:`parse_precision`."""
    items = [x.strip() for x in text.split(",")] if isinstance(text, str) else list(text)
    if not items or any(not x for x in items) or len(set(items)) != len(items):
        raise ValueError(f"{flag}: expected a comma-separated list of specs without repeats, found {text!r}")
    for x in items:
        parse_precision(x)
    return items


def parse_routing(spec: str) -> dict[str, Any]:
    """A routing spec -> RuntimeOptions fields: ``exact``; ``cache-prior:LAMBDA[:J]``; ``max-rank:J:M``
    (J = kept true top experts, M = window; defaults as RuntimeOptions). Raises ValueError naming
    ``--routing``."""
    from edgemoe_ort.runtime.ops import RuntimeOptions

    parts = spec.strip().split(":")
    rule, args = parts[0], parts[1:]
    want = "exact, cache-prior:LAMBDA[:J] or max-rank:J[:M]"
    try:
        if rule == "exact" and not args:
            out: dict[str, Any] = {"routing": "exact"}
        elif rule == "cache-prior" and 1 <= len(args) <= 2:
            out = {"routing": rule, "routing_lambda": float(args[0])}
            if len(args) == 2:
                out["routing_keep"] = int(args[1])
        elif rule == "max-rank" and 1 <= len(args) <= 2:
            out = {"routing": rule, "routing_keep": int(args[0])}
            if len(args) == 2:
                out["routing_window"] = int(args[1])
        else:
            raise ValueError
        RuntimeOptions(**out)  # ranges
    except ValueError as exc:
        why = f" ({exc})" if str(exc) else ""
        raise ValueError(f"--routing: expected {want}, found {spec!r}{why}") from None
    return out


def parse_routings(text: str | Sequence[str], *, flag: str = "--routing") -> list[str]:
    """``"exact,cache-prior:0.35"`` (or a list) -> the specs, each checked by :func:`parse_routing`."""
    items = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip()]
    if not items or len(set(items)) != len(items):
        raise ValueError(
            f"{flag}: expected a comma-separated list of routing specs without repeats, found {text!r}"
        )
    for x in items:
        parse_routing(x)
    return items


def parse_predictors(text: str | Sequence[str], *, flag: str = "--predictors") -> list[str]:
    """``"none,gates"`` (or a list) -> ``["none", "gates"]``: known predictors, no repeats, at least one."""
    from edgemoe_ort.runtime.ops import PREDICTORS

    items = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip()]
    bad = [x for x in items if x not in PREDICTORS]
    if not items or bad or len(set(items)) != len(items):
        raise ValueError(
            f"{flag}: expected a comma-separated list of {', '.join(PREDICTORS)} without repeats, "
            f"found {text!r}"
        )
    return items


def parse_policies(text: str | Sequence[str], *, flag: str = "--policies") -> list[str]:
    """``"lru,lfu"`` (or a list) -> ``["lru", "lfu"]``: known cache policies, no duplicates, at least one.
    Raises ValueError with one line naming ``flag``."""
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    if any(not p for p in items) or not items:
        raise ValueError(f"{flag}: expected a comma-separated list of policies, found {text!r}")
    for p in items:
        if p == "none":
            raise ValueError(
                f"{flag}: 'none' is not a cache policy (no cache is the `naive` mode, always measured); "
                f"expected one of {', '.join(CACHE_POLICIES)}"
            )
        if p not in CACHE_POLICIES:
            raise ValueError(f"{flag}: expected one of {', '.join(CACHE_POLICIES)}, found {p!r}")
    dup = sorted({p for p in items if items.count(p) > 1})
    if dup:
        raise ValueError(f"{flag}: {', '.join(dup)} listed more than once")
    return items


def check_policies(
    policies: Sequence[str],
    *,
    frequencies: str | Path | None = None,
    policy_weights: str | None = None,
    pin_experts: int | None = None,
    flag: str = "--policies",
) -> None:
    """Fail early (ValueError, one line) unless every policy can run: names known (:func:`parse_policies`),
    ``pinned`` given a readable JSON ``frequencies`` file, and the loaded op library accepts the policy (a
    session on a tiny synthetic bundle is opened per policy: cheap, and it catches a library built before
    the policy existed before a long benchmark starts)."""
    import tempfile

    from edgemoe_ort.bundle.testing import make_synthetic_bundle

    parse_policies(list(policies), flag=flag)
    if frequencies is not None:
        fp = Path(frequencies).expanduser()
        try:
            json.loads(fp.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"--frequencies: cannot read {fp} ({e.strerror or e})") from None
        except ValueError as e:
            raise ValueError(f"--frequencies: {fp} is not JSON ({e})") from None
    elif "pinned" in policies:
        raise ValueError(f"{flag}: policy 'pinned' needs --frequencies FILE (expert frequencies, JSON)")
    given = dict(policy_weights=policy_weights, pin_experts=pin_experts)
    extra = {k: v for k, v in given.items() if v is not None}
    try:
        RuntimeOptions(**extra)  # validates the values
    except TypeError as e:  # a runtime without these options
        raise ValueError(f"{flag}: this runtime has no such option ({e})") from None
    with tempfile.TemporaryDirectory(prefix="edgemoe-policy-probe-") as td:
        b = make_synthetic_bundle(
            Path(td) / "b", num_layers=1, num_experts=2, top_k=1, hidden=32, intermediate=32
        )
        for p in policies:
            if p == "pinned":  # its frequencies name the benchmarked bundle's experts, not the probe's
                continue
            try:
                sess = open_session(b.graph_path(), b.path, RuntimeOptions(policy=p, **extra))
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(
                    f"{flag}: the op library {library_path()} cannot run policy {p!r}: {msg} "
                    "(rebuild it with `make lib`?)"
                ) from None
            sess = None  # noqa: F841 - close before the next probe


def drop_store_cache(bundle: Bundle) -> None:
    """Drop the store file's pages from the page cache, so mmap / buffered reads hit the device."""
    fd = os.open(bundle.store_path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --- sessions --------------------
class _PlainSession:
    """Duck-typed ExpertSession around a plain ORT session (the in-memory baseline has no store)."""

    def __init__(self, session: ort.InferenceSession, graph_path: Path | None = None) -> None:
        self.session = session
        self.store_id = None
        #: the graph the session runs (MoEModel checks its KV layout there, not in the bundle's graph)
        self.graph_path = graph_path

    def run(self, names: Any, feeds: dict[str, Any], run_options: Any = None) -> list[Any]:
        return self.session.run(names, feeds, run_options)

    def io_binding(self) -> Any:
        return self.session.io_binding()

    def run_with_iobinding(self, binding: Any, run_options: Any = None) -> None:
        self.session.run_with_iobinding(binding, run_options)

    def stats(self) -> dict[str, Any]:
        return {}

    def reset_stats(self) -> None:
        pass

    def get_inputs(self) -> list[Any]:
        return self.session.get_inputs()

    def get_outputs(self) -> list[Any]:
        return self.session.get_outputs()


def inmemory_model_path(bundle: Bundle, cache_dir: Path | None = None) -> Path:
    """The converted in-memory graph, cached next to the bundle (``<bundle>.inmemory/``) unless stale."""
    d = cache_dir if cache_dir is not None else bundle.path.parent / f"{bundle.path.name}.inmemory"
    out = d / "model.onnx"
    stamp = d / "source.json"
    src = {"manifest_mtime": (bundle.path / "manifest.json").stat().st_mtime, "bundle": str(bundle.path),
           "graph_mtime": bundle.graph_path("decoder").stat().st_mtime}  # wire_bundle rewrites the graph only
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == src:
        return out
    convert_bundle_to_inmemory(bundle.path, out)
    stamp.write_text(json.dumps(src))
    return out


def open_mode(
    bundle: Bundle,
    mode: Mode,
    *,
    io_threads: int,
    threads: int | None,
    profile: dict[str, Any] | None,
    inmem_path: Path | None = None,
    policy_options: dict[str, Any] | None = None,
) -> Any:
    """A fresh session of ``mode``: a plain ORT session for ``inmemory``, else our op's ExpertSession."""
    if mode.name == "inmemory":
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads is not None:
            so.intra_op_num_threads = threads
        path = inmem_path or inmemory_model_path(bundle)
        return _PlainSession(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), path)
    return open_session(
        bundle.graph_path("decoder"),
        bundle.path,
        mode.options(io_threads=io_threads, threads=threads, profile=profile, policy_options=policy_options),
    )


# --- workloads --------------------
class ModelWorkload:
    """A decoder bundle (input_ids / logits / KV cache): prefill ``prompt_ids``, then decode "
    "``forced`` ids."""

    kind = "model"

    def __init__(self, bundle: Bundle, prompt_ids: list[int], tokens: int) -> None:
        self.bundle = bundle
        self.prompt_ids = list(prompt_ids)
        self.tokens = int(tokens)
        self.forced: list[int] | None = None

    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def for_bundle(self, bundle: Bundle) -> ModelWorkload:
        """The same prompt and decode tokens on ``bundle`` (another bundle of the same model)."""
        out = ModelWorkload(bundle, self.prompt_ids, self.tokens)
        out.forced = self.forced
        return out

    def _model(self, sess: Any) -> Any:
        from edgemoe_ort.runtime.generate import MoEModel

        return MoEModel(self.bundle, sess, None)

    def reference(self, sess: Any, on_step: Callable[[int], None] | None = None) -> None:
        """Greedy tokens of this session: the fixed sequence every mode then decodes. ``on_step(i)`` is
        called after the prefill (i = 0) and after decode step i (1 .. tokens - 1)."""
        m = self._model(sess)
        logits, past = m.forward(np.asarray([self.prompt_ids], np.int64))
        out = [int(np.argmax(logits[0, -1]))]
        if on_step is not None:
            on_step(0)
        for i in range(self.tokens - 1):
            logits, past = m.forward(np.asarray([[out[-1]]], np.int64), past)
            out.append(int(np.argmax(logits[0, -1])))
            if on_step is not None:
                on_step(i + 1)
        self.forced = out

    def generate(self, sess: Any, on_step: Callable[[int], None] | None = None) -> int:
        """One generation of ``tokens`` tokens (greedy; the peak-RSS run). Returns the decode steps run."""
        self.reference(sess, on_step)
        return self.tokens - 1

    def run(self, sess: Any, between: Callable[[], None]) -> tuple[float, list[float]]:
        assert self.forced is not None, "call reference() first"
        m = self._model(sess)
        t0 = time.perf_counter()
        logits, past = m.forward(np.asarray([self.prompt_ids], np.int64))
        int(np.argmax(logits[0, -1]))
        prefill = time.perf_counter() - t0
        between()
        steps = []
        for tok in self.forced[:-1]:  # the first token comes out of the prefill
            t = time.perf_counter()
            logits, past = m.forward(np.asarray([[tok]], np.int64), past)
            int(np.argmax(logits[0, -1]))
            steps.append(time.perf_counter() - t)
        return prefill, steps


class ReplayWorkload:
    """A stack of OffloadedExpert nodes (``make_moe_graph``) driven by a recorded routing trace (npz from
    :mod:`edgemoe_ort.bench.trace`): step 0 is the prefill (all prompt tokens), then one step per token.

    ``tokens`` beyond the trace's length (prefill + recorded decode steps) cycle through its decode steps
    again (used for the long peak-RSS generation; the timed runs stay within the trace)."""

    kind = "replay"

    def __init__(self, bundle: Bundle, trace_path: str | Path, tokens: int | None = None) -> None:
        self.bundle = bundle
        z = np.load(trace_path)
        self.num_layers = len(bundle.layers)
        L = int(z["num_layers"])
        if L < 1:
            raise ValueError(f"{trace_path}: empty trace")
        self.steps: list[list[tuple[np.ndarray, np.ndarray]]] = []
        n = int(z["num_steps"])
        for s in range(n):
            per = []
            for li in range(self.num_layers):
                src = li % L  # a deeper replay stack repeats the recorded layers
                idx = z[f"s{s}_l{src}_idx"].astype(np.int64)
                w = z[f"s{s}_l{src}_w"].astype(np.float32)
                E = int(bundle.layers[li]["num_experts"])
                # repeats of a recorded layer get rotated expert ids: same locality, different experts
                per.append(((idx + li // L) % E, w))
            self.steps.append(per)
        if tokens is not None:
            want = max(int(tokens), 1)
            if want <= len(self.steps) or len(self.steps) < 2:
                self.steps = self.steps[:want]
            else:  # cycle the recorded decode steps (not the prefill) up to `want` steps
                dec = self.steps[1:]
                self.steps = self.steps[:1] + [dec[i % len(dec)] for i in range(want - 1)]
        self.tokens = len(self.steps)  # prefill produces the first token
        H = int(bundle.layers[0]["hidden"])
        rng = np.random.default_rng(0)
        self.x = [rng.standard_normal((s[0][0].shape[0], H)).astype(np.float32) for s in self.steps]

    def generate(self, sess: Any, on_step: Callable[[int], None] | None = None) -> int:
        """Every step once (the peak-RSS run); ``on_step(i)`` after step i. Returns the decode steps run."""
        for s in range(len(self.steps)):
            sess.run(None, self._feeds(s))
            if on_step is not None:
                on_step(s)
        return len(self.steps) - 1

    def prompt_tokens(self) -> int:
        return int(self.steps[0][0][0].shape[0])

    def reference(self, sess: Any, on_step: Callable[[int], None] | None = None) -> None:
        """Nothing to do: the trace fixes the work."""

    def _feeds(self, s: int) -> dict[str, np.ndarray]:
        f = {"X": self.x[s]}
        for li, (idx, w) in enumerate(self.steps[s]):
            f[f"topk_indices_{li}"] = idx
            f[f"topk_weights_{li}"] = w
        return f

    def run(self, sess: Any, between: Callable[[], None]) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        sess.run(None, self._feeds(0))
        prefill = time.perf_counter() - t0
        between()
        steps = []
        for s in range(1, len(self.steps)):
            t = time.perf_counter()
            sess.run(None, self._feeds(s))
            steps.append(time.perf_counter() - t)
        return prefill, steps


# --- one timed run --------------------
_PREFETCH_KEYS = ("issued", "used", "hidden", "wasted", "wasted_bytes", "declined")


_USES_KEYS = ("high", "low", "skipped")


def _flat(st: dict[str, Any]) -> dict[str, Any]:
    """The stats with the nested ``prefetch`` and ``uses`` counters as ``prefetch_<key>``, ``uses_<key>``."""
    p, u = st.get("prefetch") or {}, st.get("uses") or {}
    return {**st, **{f"prefetch_{k}": p.get(k, 0) for k in _PREFETCH_KEYS},
            **{f"uses_{k}": u.get(k, 0) for k in _USES_KEYS}}


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    keys = ("hits", "misses", "reads", "bytes_read", "read_s", "stall_s", "throttle_s", "evictions") + tuple(
        f"prefetch_{k}" for k in _PREFETCH_KEYS
    ) + tuple(f"uses_{k}" for k in _USES_KEYS)
    a, b = _flat(a), _flat(b)
    return {k: float(b.get(k, 0)) - float(a.get(k, 0)) for k in keys}


def timed_run(bundle: Bundle, mode: Mode, workload: Any, **kw: Any) -> dict[str, Any]:
    drop_store_cache(bundle)
    sess = open_mode(bundle, mode, **kw)
    try:
        if mode.name == "resident":
            workload.run(sess, lambda: None)  # untimed pass: every expert the timed pass uses is now cached
        sess.reset_stats()
        snap: dict[str, Any] = {}

        def between() -> None:
            snap.update(sess.stats())

        prefill, steps = workload.run(sess, between)
        end = sess.stats()
    finally:
        sess = None  # free the session (and its cache) before the next mode opens one
    pre = _diff({}, snap) if snap else {}
    dec = _diff(snap, end) if snap else {}
    return {
        "prefill_s": prefill,
        "decode_steps_s": steps,
        "prefill_stats": pre,
        "decode_stats": dec,
        "budget_bytes": end.get("budget_bytes"),
        "direct_io": end.get("direct_io"),
        "peak_resident_bytes": end.get("peak_resident_bytes"),
    }


# --- the benchmark --------------------
def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def summarize(
    mode: Mode,
    runs: list[dict[str, Any]],
    n_prompt: int,
    compute_s: float,
    bw: float,
    budget_bytes: int | None,
) -> dict[str, Any]:
    dec_tokens = len(runs[0]["decode_steps_s"])
    per_tok = [sum(r["decode_steps_s"]) / dec_tokens for r in runs] if dec_tokens else [0.0]
    s_tok = _median(per_tok)
    dstats = runs[0]["decode_stats"]
    bytes_tok = _median([r["decode_stats"].get("bytes_read", 0.0) / max(dec_tokens, 1) for r in runs])
    stall_tok = _median([r["decode_stats"].get("stall_s", 0.0) / max(dec_tokens, 1) for r in runs])
    hits = [r["decode_stats"].get("hits", 0.0) for r in runs]
    miss = [r["decode_stats"].get("misses", 0.0) for r in runs]
    hit_rate = None
    if dstats:
        hr = [h / (h + m) if h + m else 0.0 for h, m in zip(hits, miss, strict=True)]
        hit_rate = _median(hr)
    bound = max(compute_s, bytes_tok / bw if bw else 0.0)
    prefill_s = _median([r["prefill_s"] for r in runs])
    issued = sum(r["decode_stats"].get("prefetch_issued", 0.0) for r in runs)
    used = sum(r["decode_stats"].get("prefetch_used", 0.0) for r in runs)
    return {
        "mode": mode.name,
        "policy": mode.cache_policy,
        "predictor": mode.predictor,
        "routing": mode.routing or "exact",
        "miss_precision": mode.precision or "exact",
        "uses_per_token": {k: _median([r["decode_stats"].get(f"uses_{k}", 0.0) / max(dec_tokens, 1)
                                       for r in runs]) for k in ("high", "low", "skipped")},
        "prefetch_precision": used / issued if issued else None,
        "prefetch_wasted_bytes_per_token": _median(
            [r["decode_stats"].get("prefetch_wasted_bytes", 0.0) / max(dec_tokens, 1) for r in runs]
        ),
        "prefetch_hidden_per_token": _median(
            [r["decode_stats"].get("prefetch_hidden", 0.0) / max(dec_tokens, 1) for r in runs]
        ),
        "budget": mode.budget,
        "variant": mode.variant,
        "variant_bundle": mode.variant_path,
        "label": mode.label,
        "budget_bytes": budget_bytes,
        "decode_tokens_per_s": 1.0 / s_tok if s_tok else 0.0,
        "prefill_tokens_per_s": n_prompt / prefill_s if prefill_s else 0.0,
        "ttft_s": prefill_s,
        "decode_s_per_token": s_tok,
        "decode_s_per_token_runs": per_tok,
        "bytes_read_per_token": bytes_tok,
        "prefill_bytes_read": _median([r["prefill_stats"].get("bytes_read", 0.0) for r in runs]),
        "hit_rate": hit_rate,
        "stall_s_per_token": stall_tok,
        "read_s_per_token": _median(
            [r["decode_stats"].get("read_s", 0.0) / max(dec_tokens, 1) for r in runs]
        ),
        "direct_io": runs[0].get("direct_io"),
        "peak_resident_bytes": max((r.get("peak_resident_bytes") or 0) for r in runs),
        "peak_rss_bytes": None,
        "bound_s_per_token": bound,
        "roofline_ratio": bound / s_tok if s_tok else 0.0,
        "runs": len(runs),
    }


#: a storage mode this much faster than the resident baseline withholds the run's ratios (less is jitter of
#: a mode whose few reads are hidden, which runs at the baseline's speed)
WITHHOLD_MARGIN = 0.05


def ratios_withheld(rows: Sequence[dict[str, Any]], compute_s: float) -> str | None:
    """Why the run's ratios to roofline cannot be trusted, or None. The roofline's compute is the resident
    mode (every expert it uses cached); a mode that reads experts from storage cannot be faster than that
    unless the machine's speed changed under the run (other tenants), and then every ratio built on it is
    wrong (a loaded machine once printed ratios of 2.3 and 3.3)."""
    if compute_s <= 0:
        return None
    faster = [
        f"{r['label']} ({r['decode_s_per_token'] * 1e3:.1f} ms/token)"
        for r in rows
        if r["mode"] not in ("resident", "inmemory")
        and r["bytes_read_per_token"] > 0
        and 0 < r["decode_s_per_token"] < compute_s * (1 - WITHHOLD_MARGIN)
    ]
    if not faster:
        return None
    return (
        f"the resident baseline ({compute_s * 1e3:.1f} ms/token) was slower than {', '.join(faster)}, which "
        "read from storage: the machine's speed changed during the run; re-run on a quiet machine"
    )


def measure_rss(
    bundle_dir: Path, mode: Mode, spec: dict[str, Any], timeout_s: float = 1800
) -> dict[str, Any]:
    """Peak RSS of one generation of ``mode`` in a fresh subprocess (see edgemoe_ort.bench.rss); on failure
    ``{"error": last stderr line}``."""
    cmd = [
        sys.executable,
        "-m",
        "edgemoe_ort.bench.rss",
        json.dumps(
            {
                **spec,
                "bundle": str(bundle_dir),
                "mode": mode.name,
                "budget": mode.budget_spec,
                "policy": mode.policy,
                "predictor": mode.predictor,
                "routing": mode.routing,
                "precision": mode.precision,
            }
        ),
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if out.returncode != 0:
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def library_fingerprint() -> dict[str, Any]:
    """Path, size, mtime and sha256 (first 16 hex digits) of the op library sessions load: a run records it
    at its start and end, so a library rebuilt during a benchmark shows."""
    import hashlib

    p = library_path()
    try:
        st = p.stat()
        h = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    except OSError as e:
        return {"path": str(p), "error": str(e)}
    return {"path": str(p), "bytes": st.st_size, "mtime": st.st_mtime, "sha256": h}


def machine_info() -> dict[str, Any]:
    """Platform, CPU, RAM, kernel path, 1-min load average and the op library's fingerprint."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "cpus": os.cpu_count(),
        "kernel": kernel_path(),
        "loadavg_start": os.getloadavg(),
        "library": library_fingerprint(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and "cpu" not in info:
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and "simd" not in info:  # what ORT's MLAS may use beyond AVX2
                info["simd"] = sorted(
                    f for f in line.split(":", 1)[1].split() if f.startswith(("avx512", "amx", "avx_vnni"))
                )
            if "cpu" in info and "simd" in info:
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return info


def check_variant(main: Bundle, name: str, path: str | Path) -> Bundle:
    """The bundle at ``path``, checked to be the same model as ``main`` (layers, experts per layer,
    vocabulary), else a ValueError naming the variant and the first difference."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"variants: expected a name of letters, digits, '-' or '_', found {name!r}")
    other = Bundle.open(path)
    shape = [int(lay["num_experts"]) for lay in main.layers]
    found = [int(lay["num_experts"]) for lay in other.layers]
    if found != shape:
        raise ValueError(f"variant {name!r} ({other.path}): expected {len(shape)} MoE layers of {shape} "
                         f"experts as {main.path}, found {len(found)} of {found}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if main.config.get(key) != other.config.get(key):
            raise ValueError(f"variant {name!r} ({other.path}): config {key} is {other.config.get(key)!r}, "
                             f"{main.path} has {main.config.get(key)!r}: not the same model")
    return other


def variant_modes(modes: Sequence[Mode], name: str, other: Bundle, main: Bundle) -> list[Mode]:
    """The edgemoe modes of ``modes`` again on the variant bundle ``other``: same settings, budget the bytes
    of the main bundle's (``25%`` of ``main``'s experts), so the variant is compared at the same memory."""
    return [
        replace(
            m, variant=name, variant_path=str(other.path),
            budget_bytes=parse_budget(m.budget, main.store_bytes, main.primary_bytes),
        )
        for m in modes
        if m.name == "edgemoe" and m.budget is not None
    ]


def make_workload(
    bundle: Bundle, *, tokens: int, prompt_ids: list[int] | None, trace: str | Path | None
) -> Any:
    if trace is not None:
        return ReplayWorkload(bundle, trace, tokens)
    if prompt_ids is None and bundle.tokenizer_path is not None:
        from edgemoe_ort.bench.trace import DEFAULT_PROMPT
        from edgemoe_ort.runtime.generate import load_tokenizer

        tok = load_tokenizer(bundle)
        if tok is not None:
            prompt_ids = list(tok.encode(DEFAULT_PROMPT, add_special_tokens=False).ids)
    if prompt_ids is None:
        vocab = int(bundle.config.get("vocab_size", 256) or 256)
        prompt_ids = list(np.random.default_rng(0).integers(3, max(vocab, 4), size=32))
    return ModelWorkload(bundle, [int(t) for t in prompt_ids], tokens)


def run_bench(
    bundle_dir: str | Path,
    *,
    budgets: Sequence[str] = DEFAULT_BUDGETS,
    tokens: int = 16,
    prompt_ids: list[int] | None = None,
    trace: str | Path | None = None,
    repeats: int = 3,
    profile: str | None = None,
    io_threads: int = 2,
    threads: int | None = None,
    rss: bool = True,
    rss_decode_tokens: int = DEFAULT_RSS_DECODE_TOKENS,
    modes: Sequence[str] | None = None,
    policies: Sequence[str] | None = None,
    predictors: Sequence[str] | None = None,
    routings: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    frequencies: str | Path | None = None,
    policy_weights: str | None = None,
    pin_experts: int | None = None,
    bw_total_bytes: int = 256 << 20,
    variants: Mapping[str, str | Path] | None = None,
    keep: Callable[[Mode], bool] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run every mode of ``bundle_dir`` (see the module doc) and return the JSON-able result.

    ``policies``: None runs one ``edgemoe`` mode per budget with the default policy (lru); a list runs one
    ``edgemoe[P]@budget`` mode per policy and budget, all interleaved. ``frequencies`` / ``policy_weights``
    / ``pin_experts`` go to the edgemoe modes' RuntimeOptions. ``rss_decode_tokens``: decode tokens of the
    peak-RSS generation (one fresh process per mode). ``variants`` (name -> bundle folder): other bundles of
    the same model (a bitwidth plan's, say) whose edgemoe modes run interleaved with the main ones, each at
    the bytes of the main bundle's budget, decoding the same tokens (see :func:`variant_modes`). ``keep``:
    only the edgemoe modes it accepts run (the others always do)."""
    bundle = Bundle.open(bundle_dir)
    prof = load_profile(profile) if profile else None
    if policies is not None:
        policies = parse_policies(list(policies))
    if predictors is not None:
        predictors = parse_predictors(list(predictors))
    if routings is not None:
        routings = parse_routings(list(routings))
    if precisions is not None:
        precisions = parse_precisions(list(precisions))
    if rss and rss_decode_tokens < 1:
        raise ValueError(f"rss_decode_tokens: expected at least 1, found {rss_decode_tokens}")
    all_modes = modes_for(list(budgets), policies, predictors, routings, precisions)
    if modes is not None:
        all_modes = [m for m in all_modes if m.name in set(modes) or m.name == "resident"]
    others = {name: check_variant(bundle, name, path) for name, path in (variants or {}).items()}
    if others and trace is not None:
        raise ValueError("variants: a trace replay has no other bundles to compare (drop the trace or them)")
    all_modes += [v for name, b in others.items() for v in variant_modes(all_modes, name, b, bundle)]
    if keep is not None:
        all_modes = [m for m in all_modes if m.name != "edgemoe" or keep(m)]
    workload = make_workload(bundle, tokens=tokens, prompt_ids=prompt_ids, trace=trace)
    given = dict(frequencies=frequencies, policy_weights=policy_weights, pin_experts=pin_experts)
    policy_options = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None}
    kw: dict[str, Any] = dict(
        io_threads=io_threads, threads=threads, profile=prof, policy_options=policy_options or None
    )
    result: dict[str, Any] = {
        "bundle": str(bundle.path),
        "workload": workload.kind,
        "trace": str(trace) if trace else None,
        "machine": machine_info(),
        "profile": prof,
        "store_bytes": bundle.store_bytes,
        "primary_bytes": bundle.primary_bytes,
        "dense_bytes": bundle.dense_bytes,
        "num_experts": sum(int(lay["num_experts"]) for lay in bundle.layers),
        "largest_expert_bytes": bundle.summary()["largest_expert_bytes"],
        "prompt_tokens": workload.prompt_tokens(),
        "decode_tokens": max(workload.tokens - 1, 0),
        "repeats": repeats,
        "budgets": list(budgets),
        "policies": list(policies) if policies is not None else None,
        "predictors": list(predictors) if predictors is not None else None,
        "routings": list(routings) if routings is not None else None,
        "precisions": list(precisions) if precisions is not None else None,
        "policy_options": policy_options,
        "io_threads": io_threads,
        "threads": threads,
        "variants": {
            name: {"bundle": str(b.path), "store_bytes": b.store_bytes, "primary_bytes": b.primary_bytes}
            for name, b in others.items()
        },
    }
    t_start = time.perf_counter()
    if any(m.name == "inmemory" for m in all_modes):
        log("converting the bundle to the in-memory QMoE/MoE graph …")
        t = time.perf_counter()
        inmem = inmemory_model_path(bundle)
        result["inmemory_convert_s"] = time.perf_counter() - t
        kw_in = dict(kw, inmem_path=inmem)
    else:
        kw_in = kw

    # -- roofline inputs: bandwidth and resident compute --------------------
    log("measuring O_DIRECT read bandwidth of the store …")
    bwm = odirect_bandwidth(
        bundle.store_path, result["largest_expert_bytes"], total_bytes=bw_total_bytes, threads=io_threads
    )
    result["storage"] = bwm
    bw = float(prof["read_bw_bytes_per_s"]) if prof else bwm["bytes_per_s"]
    result["roofline_bw_bytes_per_s"] = bw
    log(
        f"  {bwm['bytes_per_s'] / 1e6:.0f} MB/s at {bwm['block_bytes'] >> 10} KiB blocks "
        f"(direct={bwm['direct']}); roofline uses {bw / 1e6:.0f} MB/s"
    )

    log("reference run (the fixed decode tokens) …")
    ref = open_session(
        bundle.graph_path("decoder"),
        bundle.path,
        RuntimeOptions(budget="100%", io="direct", io_threads=io_threads, intra_op_threads=threads),
    )
    workload.reference(ref)
    ref = None
    loads = {name: workload.for_bundle(b) for name, b in others.items()}

    # -- interleaved timed runs --------------------
    runs: dict[str, list[dict[str, Any]]] = {m.label: [] for m in all_modes}
    for r in range(repeats):
        order = all_modes if r % 2 == 0 else list(reversed(all_modes))
        for m in order:
            if m.variant is not None:
                rr = timed_run(others[m.variant], m, loads[m.variant], **kw)
            else:
                rr = timed_run(bundle, m, workload, **(kw_in if m.name == "inmemory" else kw))
            runs[m.label].append(rr)
            n = max(len(rr["decode_steps_s"]), 1)
            log(
                f"  [{r + 1}/{repeats}] {m.label:16s} decode "
                f"{n / max(sum(rr['decode_steps_s']), 1e-12):7.2f} tok/s"
                f"  prefill {rr['prefill_s']:.2f}s"
            )
    # the roofline's compute: the interleaved "resident" mode (our op, every expert it uses cached beforehand)
    res = runs.get(Mode("resident").label)
    if res:
        compute_s = _median([sum(r["decode_steps_s"]) / max(len(r["decode_steps_s"]), 1) for r in res])
        misses = int(max(r["decode_stats"].get("misses", 0) for r in res))
    else:
        compute_s, misses = 0.0, 0
    result["compute_s_per_token"] = compute_s
    result["compute_misses"] = misses
    log(f"  resident compute {compute_s * 1e3:.1f} ms/token (misses during it: {misses})")
    rows = []
    for m in all_modes:
        bb = m.budget_bytes
        if bb is None and m.budget is not None:
            bb = parse_budget(m.budget, bundle.store_bytes, bundle.primary_bytes)
        rows.append(summarize(m, runs[m.label], workload.prompt_tokens(), compute_s, bw, bb))
    result["modes"] = rows
    result["ratios_withheld"] = ratios_withheld(rows, compute_s)
    if result["ratios_withheld"]:
        log(f"  ratios to roofline withheld: {result['ratios_withheld']}")
    result["loadavg_end"] = os.getloadavg()

    # -- peak RSS, one subprocess per mode --------------------
    if rss:
        log(f"peak RSS per mode (fresh subprocess each, {rss_decode_tokens} decode tokens) …")
        spec = {
            "tokens": rss_decode_tokens + 1,
            "prompt_ids": getattr(workload, "prompt_ids", None),
            "trace": str(trace) if trace else None,
            "io_threads": io_threads,
            "threads": threads,
            "profile": profile,
            "policy_options": policy_options,
        }
        result["rss_decode_tokens"] = rss_decode_tokens
        for row, m in zip(rows, all_modes, strict=True):
            t = time.perf_counter()
            res = measure_rss(Path(m.variant_path) if m.variant_path else bundle.path, m, spec)
            row["rss"] = res
            row["peak_rss_bytes"] = res.get("peak_rss_bytes")
            if "error" in res:
                log(f"  {m.label:16s} RSS run failed: {res['error']}")
                continue
            log(
                f"  {m.label:16s} peak {res.get('peak_rss_bytes', 0) / 2**20:.0f} MiB "
                f"(base {res.get('base_rss_bytes', 0) / 2**20:.0f} MiB, "
                f"{res.get('decode_tokens')} decode tokens, {time.perf_counter() - t:.0f} s)"
            )
    result["library_end"] = library_fingerprint()
    result["elapsed_s"] = time.perf_counter() - t_start
    return result
