"""The full ablation on the default model (issue 17, EdgeMoE style): naive -> cache (lru) -> best policy ->
+ prefetch -> + low-bit twins -> + cache-aware routing, each step on top of the ones before.

One interleaved run of the twins bundle (the default model's int4 experts with int2 twins) at 25 % on the
small-model storage profile holds every combination of the policies, predictors, routing and miss-precision
settings below; the report walks the steps through it, taking the faster policy as "best". Each step's
held-out perplexity comes from the same decode-mode evaluation as the twins and routing sweeps (25 %, the
step's options). The bitwidth plan is a step of its own bundle: docs/quality.md, "Expert-wise bitwidths".
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRECISION", "ROUTING", "STEP_LABELS", "run_ablation_part", "steps"]

#: the settings the later steps add (the best of the twins and routing sweeps within their goals)
PRECISION = "dynamic:0.5:0.7"
ROUTING = "cache-prior:0.35"
POLICIES = ("lru", "hobbit")
PREDICTOR = "auto"
STEP_LABELS = (
    "naive (no cache)",
    "+ cache (lru)",
    "+ best policy",
    "+ prefetch",
    "+ low-bit twins",
    "+ cache-aware routing",
)


def steps(policy: str) -> list[dict[str, Any]]:
    """The edgemoe steps after naive, with ``policy`` as the best policy: the filter of each row of the run
    (policy, predictor, routing, precision)."""
    return [
        {"policy": "lru", "predictor": None, "routing": "exact", "precision": "exact"},
        {"policy": policy, "predictor": None, "routing": "exact", "precision": "exact"},
        {"policy": policy, "predictor": PREDICTOR, "routing": "exact", "precision": "exact"},
        {"policy": policy, "predictor": PREDICTOR, "routing": "exact", "precision": PRECISION},
        {"policy": policy, "predictor": PREDICTOR, "routing": ROUTING, "precision": PRECISION},
    ]


def _best_policy(run: dict[str, Any]) -> str:
    from edgemoe_ort.bench.report import edgemoe_row

    rows = [(p, edgemoe_row(run, "25%", p)) for p in POLICIES]
    return max((r for r in rows if r[1] is not None), key=lambda r: r[1]["decode_tokens_per_s"])[0]


def run_ablation_part(a: Any, results: dict[str, Any], common: dict[str, Any], log: Any = None) -> None:
    """The suite's ``ablation`` part on ``a.twins``: the timed run, then the perplexity of each step that can
    change the numbers (exact, + twins, + routing; the cache and prefetch steps compute what exact does)."""
    from edgemoe_ort.bench.policies import HELDOUT_TOKENS, eval_default
    from edgemoe_ort.bench.runner import parse_precision, parse_routing, run_bench
    from edgemoe_ort.bench.sweep import evaluate_settings
    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.runtime.generate import load_tokenizer
    from edgemoe_ort.runtime.ops import RuntimeOptions

    name = f"ablation-small-{a.profile}"
    if log:
        log(f"== ablation, default model with twins, storage profile {a.profile}")
    run = run_bench(
        a.twins,
        budgets=["25%"],
        tokens=max(a.tokens, 32),
        profile=a.profile,
        modes=["naive", "edgemoe"],
        predictors=["none", PREDICTOR],
        routings=["exact", ROUTING],
        precisions=["exact", PRECISION],
        **dict(common, policies=list(POLICIES), rss=False),
    )
    results["runs"][name] = run
    policy = _best_policy(run)
    ids = eval_default().heldout_token_ids(load_tokenizer(Bundle.open(a.twins)), HELDOUT_TOKENS)
    ids = ids[: a.twins_tokens]
    chosen = {"exact": ("exact", "exact"), "twins": ("exact", PRECISION), "routing": (ROUTING, PRECISION)}

    def options_of(key: str) -> RuntimeOptions:
        routing, precision = chosen[key]
        return RuntimeOptions(
            budget="25%",
            policy=policy,
            predictor=PREDICTOR,
            **parse_routing(routing),
            **parse_precision(precision),
        )

    if log:
        log(f"== ablation: held-out perplexity of its steps ({len(ids)} tokens, policy {policy})")
    ppl = {key: r.perplexity for key, r, _ in evaluate_settings(a.twins, ids, list(chosen), options_of)}
    results["ablation"] = {
        "run": name,
        "bundle": str(a.twins),
        "policy": policy,
        "tokens": len(ids),
        "perplexity": ppl,
        "precision": PRECISION,
        "routing": ROUTING,
        "predictor": PREDICTOR,
    }
