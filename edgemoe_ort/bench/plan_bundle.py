"""The ablation's plan bundle (issue 17, "+ bitwidth plan"): plan the default model's expert bitwidths with
``edgemoe-plan``'s library on train-split text of models/eval_default.py, then export it with that plan and
the same low-bit twins as the twins bundle.

    python -m edgemoe_ort.bench.plan_bundle MODEL OUT [--tolerance 0.2%] [--bits int4,int3,int2]

writes ``OUT.plan.json`` (the plan) and the bundle ``OUT`` (replaced: it is a build product under
build/bench/). The planner never sees the held-out split the ablation scores (docs/quality.md,
"Expert-wise bitwidths", has the method).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

__all__ = ["build_plan_bundle", "calibration_folder"]

#: the offered levels: the twins bundle's int4 and below (so the plan only ever narrows an expert)
BITS = "int4,int3,int2"
TOLERANCE = "0.2%"
TWIN = "int2"
CALIB_TOKENS = 8192


def calibration_folder(folder: Path, chars: int) -> Path:
    """Train-split files of the default model's corpus (in path order) written to ``folder`` (emptied first:
    a build folder) until they hold ``chars`` characters."""
    from edgemoe_ort.bench.policies import eval_default

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    n = 0
    for i, f in enumerate(eval_default().load_corpus("train")):
        if n >= chars:
            break
        (folder / f"{i:05d}_{f.relpath.replace('/', '_')}").write_text(f.text, encoding="utf-8")
        n += len(f.text)
    return folder


def build_plan_bundle(
    model: str | Path, out: str | Path, *, tolerance: str = TOLERANCE, bits: str = BITS, twin: str = TWIN,
    tokens: int = CALIB_TOKENS,
) -> Path:
    """Plan ``model`` to ``tolerance`` over ``bits`` and export it to ``out`` with that plan and ``twin``
    twins (group size 64, as the twins bundle). Returns the bundle folder; the plan is ``OUT.plan.json``."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: edgemoe_ort/plan/planner.py says why
    from edgemoe_ort.export import export_model
    from edgemoe_ort.plan.format import parse_tolerance, write_plan
    from edgemoe_ort.plan.planner import plan_model

    out = Path(out)
    calib = calibration_folder(out.with_name(out.name + ".calibration"), 3 * 4 * tokens)
    plan = plan_model(model, tolerance=parse_tolerance(tolerance), corpus=[calib], bits=bits, group_size=64,
                      tokens=tokens, method="loss")
    plan_path = write_plan(out.with_name(out.name + ".plan.json"), plan)
    print(f"plan {tolerance}: {', '.join(f'{d} {n}' for d, n in plan.counts().items())} -> {plan_path}")
    return Path(export_model(model, out, plan=plan_path, twin=twin, force=True))


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module doc."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tolerance", default=TOLERANCE)
    ap.add_argument("--bits", default=BITS)
    a = ap.parse_args(argv)
    print(build_plan_bundle(a.model, a.out, tolerance=a.tolerance, bits=a.bits))


if __name__ == "__main__":
    main()
