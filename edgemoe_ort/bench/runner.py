"""The side-by-side benchmark: every mode of one bundle, interleaved in one process, plus the roofline.

Modes (``Mode.name``):

- ``inmemory``: the bundle converted by :mod:`edgemoe_ort.bench.inmemory` (all experts as initializers of
  ORT's QMoE / MoE), run by ORT alone (MLAS kernels, no custom op);
- ``naive``: our op, policy ``none`` (every use reads its expert from storage), direct I/O;
- ``mmap``: our op, LRU cache at the budget, I/O by ``mmap`` + memcpy (page faults do the I/O);
- ``edgemoe``: our op, LRU cache at the budget, direct I/O.

Timing runs happen in one process, interleaved: repeat ``r`` runs every mode once, in forward order for even
``r`` and reverse order for odd ``r``, so drift (other tenants, thermal) hits every mode alike; medians over
repeats are reported. Each run opens a fresh session (cold cache, the page cache of the store dropped), runs
the prefill, then ``tokens`` decode steps. The decode steps feed a fixed token sequence (the greedy output of
a reference run), so every mode does exactly the same work.

Peak RSS is process-wide, so it is measured per mode in a fresh subprocess (``python -m
edgemoe_ort.bench.rss``) that runs one generation: ``peak_rss`` (ru_maxrss, everything incl. the
interpreter), ``base_rss`` (after imports, before the session) and ``gen_peak_rss`` (peak during the
generation, VmHWM reset after the session is created).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgemoe_ort.bench.inmemory import convert_bundle_to_inmemory
from edgemoe_ort.bench.storage import load_profile, odirect_bandwidth
from edgemoe_ort.bundle import Bundle
from edgemoe_ort.runtime.ops import RuntimeOptions, kernel_path, open_session, parse_budget

__all__ = ["Mode", "modes_for", "run_bench", "drop_store_cache", "RESULT_FIELDS"]

DEFAULT_BUDGETS = ("10%", "25%", "50%", "100%")
#: every mode result carries these keys (tests check them)
RESULT_FIELDS = (
    "mode",
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
    name: str  # inmemory | naive | mmap | edgemoe
    budget: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.budget is None else f"{self.name}@{self.budget}"

    def options(
        self, *, io_threads: int, threads: int | None, profile: dict[str, Any] | None
    ) -> RuntimeOptions:
        bw = float(profile["read_bw_bytes_per_s"]) if profile else 0.0
        lat = float(profile["read_latency_us"]) if profile else 0.0
        common = dict(
            io_threads=io_threads, intra_op_threads=threads, throttle_bw=bw, throttle_latency_us=lat
        )
        if self.name == "naive":
            return RuntimeOptions(policy="none", io="direct", **common)
        if self.name == "mmap":
            return RuntimeOptions(policy="lru", io="mmap", budget=self.budget, **common)
        if self.name == "edgemoe":
            return RuntimeOptions(policy="lru", io="direct", budget=self.budget, **common)
        if self.name == "resident":  # the roofline's compute: our op, every used expert cached beforehand
            return RuntimeOptions(policy="lru", io="direct", budget="100%", **common)
        raise ValueError(f"mode {self.name!r} has no RuntimeOptions")


def modes_for(budgets: Sequence[str]) -> list[Mode]:
    out = [Mode("resident"), Mode("inmemory"), Mode("naive")]
    out += [Mode("mmap", b) for b in budgets]
    out += [Mode("edgemoe", b) for b in budgets]
    return out


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

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.store_id = None

    def run(self, names: Any, feeds: dict[str, Any], run_options: Any = None) -> list[Any]:
        return self.session.run(names, feeds, run_options)

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
    src = {"manifest_mtime": (bundle.path / "manifest.json").stat().st_mtime, "bundle": str(bundle.path)}
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
) -> Any:
    if mode.name == "inmemory":
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads is not None:
            so.intra_op_num_threads = threads
        path = inmem_path or inmemory_model_path(bundle)
        return _PlainSession(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    return open_session(
        bundle.graph_path("decoder"),
        bundle.path,
        mode.options(io_threads=io_threads, threads=threads, profile=profile),
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

    def _model(self, sess: Any) -> Any:
        from edgemoe_ort.runtime.generate import MoEModel

        return MoEModel(self.bundle, sess, None)

    def reference(self, sess: Any) -> None:
        """Greedy tokens of this session: the fixed sequence every mode then decodes."""
        m = self._model(sess)
        logits, past = m.forward(np.asarray([self.prompt_ids], np.int64))
        out = [int(np.argmax(logits[0, -1]))]
        for _ in range(self.tokens - 1):
            logits, past = m.forward(np.asarray([[out[-1]]], np.int64), past)
            out.append(int(np.argmax(logits[0, -1])))
        self.forced = out

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
    :mod:`edgemoe_ort.bench.trace`): step 0 is the prefill (all prompt tokens), then one step per token."""

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
            self.steps = self.steps[: 1 + int(tokens) - 1] if tokens > 0 else self.steps[:1]
        self.tokens = len(self.steps)  # prefill produces the first token
        H = int(bundle.layers[0]["hidden"])
        rng = np.random.default_rng(0)
        self.x = [rng.standard_normal((s[0][0].shape[0], H)).astype(np.float32) for s in self.steps]

    def prompt_tokens(self) -> int:
        return int(self.steps[0][0][0].shape[0])

    def reference(self, sess: Any) -> None:
        pass

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
def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    keys = ("hits", "misses", "reads", "bytes_read", "read_s", "stall_s", "throttle_s", "evictions")
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
    return {
        "mode": mode.name,
        "budget": mode.budget,
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


def measure_rss(bundle_dir: Path, mode: Mode, spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of one generation of ``mode`` in a fresh subprocess (see edgemoe_ort.bench.rss)."""
    cmd = [
        sys.executable,
        "-m",
        "edgemoe_ort.bench.rss",
        json.dumps({**spec, "bundle": str(bundle_dir), "mode": mode.name, "budget": mode.budget}),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "cpus": os.cpu_count(),
        "kernel": kernel_path(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return info


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
    modes: Sequence[str] | None = None,
    bw_total_bytes: int = 256 << 20,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run every mode of ``bundle_dir`` (see the module doc) and return the JSON-able result."""
    bundle = Bundle.open(bundle_dir)
    prof = load_profile(profile) if profile else None
    all_modes = modes_for(list(budgets))
    if modes is not None:
        all_modes = [m for m in all_modes if m.name in set(modes) or m.name == "resident"]
    workload = make_workload(bundle, tokens=tokens, prompt_ids=prompt_ids, trace=trace)
    kw = dict(io_threads=io_threads, threads=threads, profile=prof)
    result: dict[str, Any] = {
        "bundle": str(bundle.path),
        "workload": workload.kind,
        "trace": str(trace) if trace else None,
        "machine": machine_info(),
        "profile": prof,
        "store_bytes": bundle.store_bytes,
        "dense_bytes": bundle.dense_bytes,
        "num_experts": sum(int(lay["num_experts"]) for lay in bundle.layers),
        "largest_expert_bytes": bundle.summary()["largest_expert_bytes"],
        "prompt_tokens": workload.prompt_tokens(),
        "decode_tokens": max(workload.tokens - 1, 0),
        "repeats": repeats,
        "budgets": list(budgets),
        "io_threads": io_threads,
        "threads": threads,
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

    # -- interleaved timed runs --------------------
    runs: dict[str, list[dict[str, Any]]] = {m.label: [] for m in all_modes}
    for r in range(repeats):
        order = all_modes if r % 2 == 0 else list(reversed(all_modes))
        for m in order:
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
        bb = None if m.budget is None else parse_budget(m.budget, bundle.store_bytes)
        rows.append(summarize(m, runs[m.label], workload.prompt_tokens(), compute_s, bw, bb))
    result["modes"] = rows
    result["loadavg_end"] = os.getloadavg()

    # -- peak RSS, one subprocess per mode --------------------
    if rss:
        log("peak RSS per mode (fresh subprocess each) …")
        spec = {
            "tokens": min(tokens, 8),
            "prompt_ids": getattr(workload, "prompt_ids", None),
            "trace": str(trace) if trace else None,
            "io_threads": io_threads,
            "threads": threads,
            "profile": profile,
        }
        for row, m in zip(rows, all_modes, strict=True):
            res = measure_rss(bundle.path, m, spec)
            row["rss"] = res
            row["peak_rss_bytes"] = res.get("peak_rss_bytes")
            log(
                f"  {m.label:16s} peak {res.get('peak_rss_bytes', 0) / 2**20:.0f} MiB "
                f"(base {res.get('base_rss_bytes', 0) / 2**20:.0f} MiB)"
            )
    result["elapsed_s"] = time.perf_counter() - t_start
    return result
