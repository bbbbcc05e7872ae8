"""Expert-wise bitwidth planning (EdgeMoE): measure each routed expert's sensitivity to quantization on
calibration text and choose a dtype per expert within a perplexity tolerance (``edgemoe-plan``); the plan
file (``plan.json``, :mod:`.format`) is what ``edgemoe-export --plan`` writes a mixed bundle from.

One job per module: :mod:`.format` (the file: writer, reader, validation, model identity; torch-free),
:mod:`.evaluate` (perplexity with experts replaced by their dequantized weights; torch), :mod:`.rank` (loss
and proxy rankings), :mod:`.search` (the K search over the levels), :mod:`.planner` (end to end),
:mod:`.cli` (the command).
"""

from edgemoe_ort.plan.format import (
    PLAN_FORMAT,
    PLAN_VERSION,
    Plan,
    PlanError,
    PlanLayer,
    parse_bits,
    parse_tolerance,
    read_plan,
    write_plan,
)

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "Plan",
    "PlanError",
    "PlanLayer",
    "parse_bits",
    "parse_tolerance",
    "read_plan",
    "write_plan",
]
