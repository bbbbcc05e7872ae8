"""The full ablation (issue 17, EdgeMoE style): naive -> cache (lru) -> best policy ->
+ prefetch -> + bitwidth plan -> + low-bit twins -> + cache-aware routing, each step on top of the ones
before.

One interleaved run of the twins bundle (the default model's int4 experts with int2 twins) at 25 % on the
small-model storage profile holds every combination of the policies, predictors, routing and miss-precision
settings below, and the same combinations on the plan bundle (the default model exported with a bitwidth
plan of ``edgemoe-plan``, with the same twins) at the same bytes (the run's variant ``plan``); the report
walks the steps through it, taking the faster policy as "best". Each step's held-out perplexity comes from
the same decode-mode evaluation as the twins and routing sweeps (the step's bundle and options, at the twins
bundle's 25 % in bytes). Without a plan bundle the plan step is left out and the later steps run on the twins
bundle. The large model (int4 experts with int2 twins) gets the same run unthrottled and on the large-model
storage profile, without perplexity (random weights, no tokenizer) and without a plan.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PLAN", "PRECISION", "ROUTING", "STEP_LABELS", "run_ablation_part", "steps"]

#: the settings the later steps add (the best of the twins and routing sweeps within their goals)
PRECISION = "dynamic:0.5:0.7"
ROUTING = "cache-prior:0.35"
POLICIES = ("lru", "hobbit")
PREDICTOR = "auto"
#: the run's variant name of the plan bundle
PLAN = "plan"
STEP_LABELS = (
    "naive (no cache)",
    "+ cache (lru)",
    "+ best policy",
    "+ prefetch",
    "+ bitwidth plan",
    "+ low-bit twins",
    "+ cache-aware routing",
)


def steps(policy: str, plan: bool = True) -> list[dict[str, Any]]:
    """The edgemoe steps after naive, with ``policy`` as the best policy: the filter of each row of the run
    (policy, predictor, routing, precision, variant) and ``ppl``, the key of the step's perplexity. With
    ``plan`` the last three steps run on the plan bundle; without, the plan step is None."""
    v = PLAN if plan else None
    row = {"policy": policy, "predictor": PREDICTOR}
    return [
        {"policy": "lru", "predictor": None, "routing": "exact", "precision": "exact", "variant": None,
         "ppl": "exact"},
        {"policy": policy, "predictor": None, "routing": "exact", "precision": "exact", "variant": None,
         "ppl": "exact"},
        {**row, "routing": "exact", "precision": "exact", "variant": None, "ppl": "exact"},
        {**row, "routing": "exact", "precision": "exact", "variant": PLAN, "ppl": "plan"} if plan else None,
        {**row, "routing": "exact", "precision": PRECISION, "variant": v, "ppl": "twins"},
        {**row, "routing": ROUTING, "precision": PRECISION, "variant": v, "ppl": "routing"},
    ]


def _best_policy(run: dict[str, Any]) -> str:
    from edgemoe_ort.bench.report import edgemoe_row

    rows = [(p, edgemoe_row(run, "25%", p)) for p in POLICIES]
    return max((r for r in rows if r[1] is not None), key=lambda r: r[1]["decode_tokens_per_s"])[0]


def _timed_run(
    bundle: str, *, profile: str | None, tokens: int, plan: str | None, common: dict[str, Any]
) -> dict[str, Any]:
    """One interleaved run of the combinations the steps take, for each policy (and on the plan variant, if
    any)."""
    from edgemoe_ort.bench.runner import run_bench

    return run_bench(
        bundle,
        budgets=["25%"],
        tokens=tokens,
        profile=profile,
        modes=["naive", "edgemoe"],
        predictors=["none", PREDICTOR],
        routings=["exact", ROUTING],
        precisions=["exact", PRECISION],
        variants={PLAN: plan} if plan else None,
        keep=_a_step,
        **dict(common, policies=list(POLICIES), rss=False),
    )


def _a_step(mode: Any) -> bool:
    """Whether an edgemoe mode (runner.Mode) is one of the steps' settings for its policy."""
    settings = {(s["predictor"], s["routing"], s["precision"]) for s in steps(mode.policy or "lru") if s}
    return (mode.predictor, mode.routing or "exact", mode.precision or "exact") in settings


def _entry(name: str, model: str, bundle: str, run: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``ablations`` record of one run (the report walks its steps)."""
    return {
        "run": name,
        "model": model,
        "bundle": str(bundle),
        "plan_bundle": None,
        "policy": _best_policy(run),
        "tokens": 0,
        "perplexity": {},
        "precision": PRECISION,
        "routing": ROUTING,
        "predictor": PREDICTOR,
        **extra,
    }


def run_ablation_part(a: Any, results: dict[str, Any], common: dict[str, Any], log: Any = None) -> None:
    """The suite's ``ablation`` part: on the default model (``a.twins``, and ``a.plan_twins``, the plan
    bundle, if given) the timed run, then the perplexity of each step that can change the numbers (exact,
    + plan, + twins, + routing; the cache and prefetch steps compute what exact does); on the large model
    (``a.large_twins``, if given) the timed runs unthrottled and on ``a.large_profile`` (random weights and
    no tokenizer: no perplexity, and no plan, whose search needs one)."""
    ablations = results.setdefault("ablations", {})
    old = results.pop("ablation", None)  # the one record of results written before there were several
    if old:
        ablations.setdefault(old["run"], old)
    if a.twins:
        ablations.update(_default_model(a, results, common, log))
    large = getattr(a, "large_twins", None)
    for prof in dict.fromkeys((None, a.large_profile or None)) if large else ():  # --large-profile '': one
        name = "ablation-large" + (f"-{prof}" if prof else "")
        if log:
            log(f"== ablation, large model with twins{', storage profile ' + prof if prof else ''}")
        run = _timed_run(large, profile=prof, tokens=a.large_tokens, plan=None, common=common)
        results["runs"][name] = run
        ablations[name] = _entry(name, "large", large, run)


def _default_model(a: Any, results: dict[str, Any], common: dict[str, Any], log: Any) -> dict[str, Any]:
    from edgemoe_ort.bench.policies import HELDOUT_TOKENS, eval_default
    from edgemoe_ort.bench.runner import parse_precision, parse_routing
    from edgemoe_ort.bench.sweep import evaluate_settings
    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.runtime.generate import load_tokenizer
    from edgemoe_ort.runtime.ops import RuntimeOptions, parse_budget

    name = f"ablation-small-{a.profile}"
    plan = getattr(a, "plan_twins", None)
    if log:
        log(f"== ablation, default model with twins{' and its plan bundle' if plan else ''}, storage profile "
            f"{a.profile}")
    run = _timed_run(a.twins, profile=a.profile, tokens=max(a.tokens, 32), plan=plan, common=common)
    results["runs"][name] = run
    policy = _best_policy(run)
    main = Bundle.open(a.twins)
    ids = eval_default().heldout_token_ids(load_tokenizer(main), HELDOUT_TOKENS)
    ids = ids[: a.twins_tokens]
    budget = str(parse_budget("25%", main.store_bytes, main.primary_bytes))  # the plan bundle's too
    chosen = {"exact": ("exact", "exact"), "twins": ("exact", PRECISION), "routing": (ROUTING, PRECISION)}

    def options_of(key: str) -> RuntimeOptions:
        routing, precision = chosen[key]
        return RuntimeOptions(
            budget=budget,
            policy=policy,
            predictor=PREDICTOR,
            **parse_routing(routing),
            **parse_precision(precision),
        )

    if log:
        log(f"== ablation: held-out perplexity of its steps ({len(ids)} tokens, policy {policy})")
    if plan:  # exact on the twins bundle; the plan, + twins and + routing steps on the plan bundle
        ppl = {key: r.perplexity for key, r, _ in evaluate_settings(a.twins, ids, ["exact"], options_of)}
        on_plan = evaluate_settings(plan, ids, list(chosen), options_of)
        ppl.update({"plan" if key == "exact" else key: r.perplexity for key, r, _ in on_plan})
    else:
        ppl = {key: r.perplexity for key, r, _ in evaluate_settings(a.twins, ids, list(chosen), options_of)}
    return {
        name: _entry(
            name, "default", a.twins, run,
            plan_bundle=str(plan) if plan else None,
            plan_dtypes=Bundle.open(plan).summary()["dtypes"] if plan else None,
            budget_bytes=int(budget),
            tokens=len(ids),
            perplexity=ppl,
        )
    }
