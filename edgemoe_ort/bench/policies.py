"""Cache policies on the default model's held-out text: the op's own hit rate per policy, the simulator's
figure for the same trace (they must be equal) and Belady's bound.

    python -m edgemoe_ort.bench.policies BUNDLE [--budget 25%] [--tokens N] [--windows W] [--prompt P]
                                         [--policies lru,lfu,...] [--json OUT]

The text is the held-out token stream of ``models/eval_default.py`` (``heldout_token_ids``). It is decoded
the way ``generate()`` runs: ``W`` windows spread over the stream, each a prefill of ``P`` tokens then one
token per step through the KV cache (teacher-forced: the next held-out token, so the routing is the
text's, not the model's own continuation). One session per policy runs all windows in order (the cache
persists across windows, as in one process serving several requests), through the decoder graph with
every ``OffloadedExpert`` node's ``topk_indices`` exposed (:func:`edgemoe_ort.bench.trace._routing_graph`),
so each policy's run also re-checks that the routing it saw is the recorded trace. ``edgemoe+freq`` and
``pinned`` read a frequencies file counted on separate calibration windows of the same stream (disjoint
from the measured ones). The exit status is 1 if any policy's counters differ from the simulator's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe_ort.bundle import Bundle
from edgemoe_ort.resources import repo_root
from edgemoe_ort.runtime.cachesim import (
    CacheSimulator,
    belady,
    frequencies_from_trace,
    lengths_from_bundle,
    save_frequencies,
)

__all__ = [
    "DEFAULT_POLICIES",
    "PolicySpec",
    "eval_default",
    "main",
    "markdown_table",
    "parse_policy_list",
    "run_policies",
]

#: name -> RuntimeOptions fields; "+freq" variants get the calibration frequencies file
DEFAULT_POLICIES = ("lru", "lfu", "edgemoe", "edgemoe+freq", "hobbit", "pinned", "none")
PolicySpec = tuple[str, dict[str, Any]]
HELDOUT_TOKENS = 65536  # the stream the windows are spread over (models/eval_default.DEFAULT_EVAL_TOKENS)


def parse_policy_list(spec: str) -> list[PolicySpec]:
    """``"lru,edgemoe+freq,hobbit:fld=0.5"`` -> ``[(name, options)]``. ``P+freq``: policy ``P`` with the
    calibration frequencies (``pinned`` always has them); ``hobbit:WEIGHTS``: hobbit with those weights."""
    out: list[PolicySpec] = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        opts: dict[str, Any] = {}
        base, _, weights = name.partition(":")
        if weights:
            if not base.startswith("hobbit"):
                raise ValueError(f"--policies: {name!r}: weights (':...') apply to hobbit only")
            opts["policy_weights"] = weights.replace(";", ",")
        if base.endswith("+freq") or base == "pinned":
            opts["frequencies"] = True
            base = base.removesuffix("+freq")
        if base not in ("lru", "lfu", "edgemoe", "hobbit", "pinned", "none"):
            raise ValueError(f"--policies: unknown policy {name!r}")
        opts["policy"] = base
        out.append((name, opts))
    if not out:
        raise ValueError("--policies: no policy given")
    return out


def eval_default() -> Any:
    """``models/eval_default.py`` of the repository (the held-out stream)."""
    try:
        from models import eval_default  # type: ignore[import-not-found]
    except ImportError:
        root = repo_root()  # a source checkout: models/ is not in the wheel
        if root is None or not (root / "models" / "eval_default.py").is_file():
            raise
        sys.path.insert(0, str(root))
        from models import eval_default  # type: ignore[import-not-found]
    return eval_default


def heldout_windows(tokenizer: Any, windows: int, length: int, *, offset: float = 0.0) -> list[list[int]]:
    """``windows`` runs of ``length`` held-out tokens spread evenly over the first 65536 tokens of the stream
    (``offset`` in strides shifts them: 0.5 gives windows disjoint from those at 0 while ``length`` is at most
    half a stride)."""
    ids = eval_default().heldout_token_ids(tokenizer, HELDOUT_TOKENS)
    stride = len(ids) // windows
    if length > stride // 2:
        raise ValueError(f"windows of {length} tokens do not fit {windows} times in {len(ids)} tokens")
    starts = [int(i * stride + offset * stride) for i in range(windows)]
    return [[int(t) for t in ids[s : s + length]] for s in starts]


class _TappedModel:
    """The bundle's decoder with its routing exposed, in one session with given runtime options."""

    def __init__(self, bundle: Bundle, graph: Path, options: Any) -> None:
        import onnxruntime as ort

        from edgemoe_ort.runtime.generate import MoEModel
        from edgemoe_ort.runtime.ops import ExpertSession, make_session_options

        so, sid = make_session_options(bundle.path, options)
        self.sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        self.es = ExpertSession(self.sess, sid, bundle.path, options)
        self.model = MoEModel(bundle, self.es, None)
        self.names = [o.name for o in self.sess.get_outputs()]
        self.inputs = [i.name for i in self.sess.get_inputs()]

    def forward(
        self, ids: list[int], past: dict[str, np.ndarray] | None, taps: list[tuple[int, str, str]]
    ) -> tuple[dict[int, np.ndarray], dict[str, np.ndarray]]:
        input_ids = np.asarray([ids], np.int64)
        past = past if past is not None else self.model._empty_past(1)
        past_len = next(iter(past.values())).shape[2] if past else 0
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, past_len + len(ids)), np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(past_len, past_len + len(ids), dtype=np.int64)[None, :]
        feeds.update(past)
        res = dict(zip(self.names, self.sess.run(None, feeds), strict=True))
        routing = {layer: np.asarray(res[idx], np.int64) for layer, idx, _ in taps}
        present = {n: res[n.replace("past_key_values.", "present.")] for n, _, _ in self.model._past_specs}
        return routing, present

    def run_windows(
        self, windows: list[list[int]], prompt: int, taps: list[tuple[int, str, str]]
    ) -> list[dict[int, np.ndarray]]:
        """Per window: prefill ``prompt`` tokens, then the rest one at a time; the routing of every pass."""
        passes = []
        for w in windows:
            routing, past = self.forward(w[:prompt], None, taps)
            passes.append(routing)
            for t in w[prompt:]:
                routing, past = self.forward([t], past, taps)
                passes.append(routing)
        return passes


def _calls(passes: list[dict[int, np.ndarray]]) -> list[tuple[int, tuple[int, ...]]]:
    out = []
    for p in passes:
        for layer in sorted(p):
            out.append((layer, tuple(sorted({int(e) for e in p[layer].ravel() if e >= 0}))))
    return out


def run_policies(
    bundle_dir: str | Path,
    *,
    budget: str | int = "25%",
    tokens: int = 1024,
    windows: int = 8,
    prompt: int = 16,
    policies: list[PolicySpec] | None = None,
    io: str = "buffered",
    sim_only: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Measure every policy (see the module docstring); returns the JSON-able report. ``sim_only``: record
    the trace but run only the simulator (no op session per policy; ``op`` is then ``None``)."""
    from edgemoe_ort.bench.trace import _routing_graph
    from edgemoe_ort.runtime.generate import load_tokenizer
    from edgemoe_ort.runtime.ops import RuntimeOptions, parse_budget

    def say(s: str) -> None:
        if log is not None:
            print(s, file=log, flush=True)

    policies = policies if policies is not None else parse_policy_list(",".join(DEFAULT_POLICIES))
    bundle = Bundle.open(bundle_dir)
    tok = load_tokenizer(bundle)
    if tok is None:
        raise ValueError(f"{bundle.path}: the bundle has no tokenizer (the held-out text needs one)")
    if tokens < windows:
        raise ValueError(f"--tokens {tokens}: at least one decode token per window ({windows} windows)")
    per_window = tokens // windows
    budget_bytes = parse_budget(budget, bundle.store_bytes, bundle.primary_bytes)
    lengths = lengths_from_bundle(bundle)
    num_layers = len(lengths)
    eval_windows = heldout_windows(tok, windows, prompt + per_window)
    calib_windows = heldout_windows(tok, windows, prompt + per_window, offset=0.5)

    with tempfile.TemporaryDirectory() as td:
        graph, taps = _routing_graph(bundle, Path(td))
        say(f"recording the routing of {windows} x ({prompt} prompt + {per_window} decode) held-out tokens")
        rec = _TappedModel(bundle, graph, RuntimeOptions(budget=None, io=io, predictor="none"))
        trace = _calls(rec.run_windows(eval_windows, prompt, taps))
        calib = _calls(rec.run_windows(calib_windows, prompt, taps))
        del rec
        freq_path = save_frequencies(Path(td) / "frequencies.json",
                                     frequencies_from_trace(calib, [len(r) for r in lengths]))
        freq_table = json.loads(freq_path.read_text())["expert_frequency"]

        results = []
        for name, spec in policies:
            kw = dict(spec)
            if kw.pop("frequencies", False):
                kw["frequencies"] = freq_path
            sim = CacheSimulator(lengths, budget_bytes, num_layers=num_layers, **kw).run(trace)
            row: dict[str, Any] = {
                "policy": name,
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()},
                "op": None,
                "sim": sim.as_dict(),
                "equal": None,
                "routing_identical": None,
            }
            if not sim_only:
                opts = RuntimeOptions(budget=budget_bytes, io=io, predictor="none", **kw)
                m = _TappedModel(bundle, graph, opts)
                seen = _calls(m.run_windows(eval_windows, prompt, taps))
                st = m.es.stats()
                del m
                op = (int(st["hits"]), int(st["misses"]), int(st["evictions"]))
                row["op"] = {"hits": op[0], "misses": op[1], "evictions": op[2],
                             "hit_rate": op[0] / max(1, op[0] + op[1]), "bytes_read": int(st["bytes_read"])}
                row["equal"] = op == sim.as_tuple()
                row["routing_identical"] = seen == trace
                say(f"{name:>14}: op hit rate {row['op']['hit_rate']:.4f}  sim {sim.hit_rate:.4f}"
                    f"{'' if row['equal'] else '  MISMATCH op ' + str(op) + ' sim ' + str(sim.as_tuple())}")
            else:
                say(f"{name:>14}: sim hit rate {sim.hit_rate:.4f}")
            results.append(row)
        bound = belady(trace, lengths, budget_bytes)

    uses = sum(len(e) for _, e in trace)
    cached = [r for r in results if r["options"]["policy"] != "none"]
    src = "sim" if sim_only else "op"
    best = max(cached, key=lambda r: r[src]["hit_rate"]) if cached else None
    return {
        "bundle": str(bundle.path),
        "budget": str(budget),
        "budget_bytes": budget_bytes,
        "store_bytes": bundle.store_bytes,
        "experts_in_budget": budget_bytes / (bundle.primary_bytes / sum(len(r) for r in lengths)),
        "windows": windows,
        "prompt_tokens": prompt,
        "decode_tokens": per_window * windows,
        "calls": len(trace),
        "uses": uses,
        "io": io,
        "frequencies": "per-call expert counts on calibration windows disjoint from the measured ones",
        "calibration_frequencies": freq_table,
        "policies": results,
        "belady": bound.as_dict(),
        "best": {"policy": best["policy"], "hit_rate": best[src]["hit_rate"]} if best else None,
        "sim_only": sim_only,
        "all_equal": None if sim_only else all(r["equal"] and r["routing_identical"] for r in results),
    }


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a markdown table (one row per policy, then Belady)."""
    lines = [
        f"budget {report['budget']} = {report['budget_bytes']} bytes "
        f"(~{report['experts_in_budget']:.1f} experts), {report['windows']} windows x "
        f"({report['prompt_tokens']} prompt + {report['decode_tokens'] // report['windows']} decode) tokens, "
        f"{report['calls']} calls, {report['uses']} expert uses",
        "",
        "| policy | op hits | op misses | op evictions | op hit rate | simulator hit rate | equal |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["policies"]:
        op, sim = r["op"], r["sim"]
        if op is None:
            lines.append(f"| {r['policy']} | - | - | - | - | {sim['hit_rate']:.4f} | (simulator only) |")
            continue
        eq = "yes" if r["equal"] and r["routing_identical"] else "**NO**"
        lines.append(f"| {r['policy']} | {op['hits']} | {op['misses']} | {op['evictions']} | "
                     f"{op['hit_rate']:.4f} | {sim['hit_rate']:.4f} | {eq} |")
    b = report["belady"]
    lines.append(f"| Belady (offline bound) | {b['hits']} | {b['misses']} | {b['evictions']} | "
                 f"{b['hit_rate']:.4f} | {b['hit_rate']:.4f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m edgemoe_ort.bench.policies",
        description="hit rate of every cache policy on the default model's held-out text: op vs simulator "
        "vs Belady",
    )
    ap.add_argument("bundle")
    ap.add_argument("--budget", default="25%", help="bytes, a size (8MB) or a share of the store (25%%)")
    ap.add_argument("--tokens", type=int, default=1024, help="decode tokens in all (split over the windows)")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows (default 8)")
    ap.add_argument("--prompt", type=int, default=16, help="prefill tokens per window (default 16)")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help="comma-separated: lru, lfu, edgemoe, edgemoe+freq, hobbit, hobbit:lru=..;fld=.., "
                    "pinned, none")
    ap.add_argument("--io", default="buffered", choices=("direct", "buffered", "mmap"))
    ap.add_argument("--sim-only", action="store_true",
                    help="record the trace, then only simulate the policies (no op session per policy)")
    ap.add_argument("--json", dest="json_out", help="write the report here")
    a = ap.parse_args(argv)
    try:
        pols = parse_policy_list(a.policies)
    except ValueError as e:
        ap.error(str(e))
    if a.windows < 1 or a.prompt < 1:
        ap.error("--windows and --prompt must be >= 1")
    report = run_policies(a.bundle, budget=a.budget, tokens=a.tokens, windows=a.windows, prompt=a.prompt,
                          policies=pols, io=a.io, sim_only=a.sim_only, log=sys.stderr)
    report["command"] = " ".join(["python -m edgemoe_ort.bench.policies", *(argv or sys.argv[1:])])
    print(markdown_table(report))
    if a.json_out:
        out = Path(a.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    if report["all_equal"] is False:
        print("error: the op's counters differ from the simulator's (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
