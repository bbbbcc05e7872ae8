"""``plan.json``: an expert-wise bitwidth plan (docs/quality.md, "Expert-wise bitwidths").

The one definition of the format: its constants, the model identity a plan is tied to, the writer and the
validating reader. ``edgemoe-plan`` (edgemoe_ort/plan/cli.py) makes the file; ``edgemoe-export --plan``
reads it and writes each expert in its planned dtype. Torch-free: the exporter's command line checks a plan
before torch is imported.

Layout (format_version 1)::

    {"format": "edgemoe-plan", "format_version": 1, "created_by": "edgemoe-ort 0.1.0",
     "model": {"source": str, "family": str, "config_sha256": hex, "config": {...config.json...},
               "layers": [{"layer", "module", "num_experts", "hidden", "intermediate", "gated", "bias"}]},
     "group_size": int, "tolerance": float (0.01 = 1%), "offered": [dtype, ...] (highest bits first),
     "reference": {"dtype": str, "perplexity": float},   # the uniform highest-offered model
     "method": "loss" | "proxy",
     "calibration": {...}, "search": {...}, "result": {...},   # what was measured (informational)
     "experts": [{"layer", "expert", "dtype", "xxh3", "loss"?, "proxy"?}, ...]}

``layer`` is the MoE layer index of the bundle's manifest (execution order), not the transformer block
number. ``xxh3`` is the xxh3_64 of the expert's canonical float32 weights (:func:`expert_digest`): the
exporter compares it as it reads each expert. ``config_sha256`` is the sha256 of the checkpoint's
config.json (:func:`config_fingerprint`, without ``transformers_version`` and ``_name_or_path``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from edgemoe_ort.bundle.errors import _clip
from edgemoe_ort.quant import BITS, DTYPES

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "METHODS",
    "PlanError",
    "PlanLayer",
    "Plan",
    "config_fingerprint",
    "expert_digest",
    "quantized_dtypes",
    "parse_bits",
    "parse_tolerance",
    "plan_to_doc",
    "parse_plan",
    "read_plan",
    "write_plan",
    "check_plan_model",
    "record_length",
    "resolve_plan",
]

PLAN_FORMAT = "edgemoe-plan"
PLAN_VERSION = 1
METHODS = ("loss", "proxy")
#: config.json keys left out of the fingerprint (they change when a checkpoint is re-saved, not the model)
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")

_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TOP_KEYS = {"format", "format_version", "created_by", "model", "group_size", "tolerance", "offered",
             "reference", "method", "calibration", "search", "result", "experts"}
_TOP_REQUIRED = _TOP_KEYS - {"created_by", "calibration", "search", "result"}
_MODEL_KEYS = {"source", "family", "config_sha256", "config", "layers"}
_LAYER_KEYS = {"layer", "module", "num_experts", "hidden", "intermediate", "gated", "bias"}
_RECORD_KEYS = {"layer", "expert", "dtype", "xxh3", "loss", "proxy"}
_RECORD_REQUIRED = {"layer", "expert", "dtype", "xxh3"}


class PlanError(ValueError):
    """A plan file is malformed or does not belong to the model: ``<file>: [layer L expert E: ]<field>:
    expected <x>, found <y>``."""

    def __init__(self, file: str | Path, field: str, *, expected: Any = None, found: Any = None,
                 message: str = "", layer: int | None = None, expert: int | None = None) -> None:
        self.file, self.field, self.expected, self.found = str(file), field, expected, found
        parts = [self.file]
        if layer is not None and expert is not None:
            parts.append(f"layer {layer} expert {expert}")
        if field:
            parts.append(_clip(field))
        tail = []
        if expected is not None:
            tail.append(f"expected {_clip(expected)}")
        if found is not None:
            tail.append(f"found {_clip(found)}")
        text = ", ".join(tail)
        if message:
            text = f"{message} ({text})" if text else message
        if text:
            parts.append(text)
        super().__init__(": ".join(parts))


@dataclass(frozen=True)
class PlanLayer:
    """One MoE layer of the planned model (the shapes the bundle's manifest will give it)."""

    layer: int
    num_experts: int
    hidden: int
    intermediate: int
    gated: bool
    bias: bool = False
    module: str = ""

    def shapes(self) -> dict[str, Any]:
        return {"layer": self.layer, "num_experts": self.num_experts, "hidden": self.hidden,
                "intermediate": self.intermediate, "gated": self.gated}


@dataclass
class Plan:
    """A plan: a dtype per (layer, expert) of one model, and what was measured to choose it."""

    family: str
    config: dict[str, Any]
    layers: list[PlanLayer]
    group_size: int
    tolerance: float
    offered: list[str]
    reference: dict[str, Any]
    method: str
    dtypes: dict[tuple[int, int], str]
    digests: dict[tuple[int, int], str]
    source: str = ""
    config_sha256: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    #: per expert, the loss-ranking perplexity and the proxy error (where measured)
    scores: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)
    created_by: str = ""
    path: Path | None = None

    def __post_init__(self) -> None:
        if not self.config_sha256:
            self.config_sha256 = config_fingerprint(self.config)

    def counts(self) -> dict[str, int]:
        """Experts per dtype, highest bits first."""
        out: dict[str, int] = {}
        for d in sorted(set(self.dtypes.values()), key=lambda d: -BITS[d]):
            out[d] = sum(1 for v in self.dtypes.values() if v == d)
        return out

    def layer_counts(self) -> list[dict[str, int]]:
        """Per layer, experts per dtype."""
        out = []
        for lay in self.layers:
            c: dict[str, int] = {}
            for e in range(lay.num_experts):
                d = self.dtypes[(lay.layer, e)]
                c[d] = c.get(d, 0) + 1
            out.append(c)
        return out


# --- identity ----------------------------------------------------------------------------------------


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the config (keys sorted, :data:`VOLATILE_CONFIG_KEYS` left out)."""
    kept = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def expert_digest(w_in: np.ndarray, w_out: np.ndarray, b_in: np.ndarray | None = None,
                  b_out: np.ndarray | None = None) -> str:
    """xxh3_64 (hex) of one expert's canonical weights as little-endian float32, w_in, w_out, biases."""
    h = xxhash.xxh3_64()
    for a in (w_in, w_out, b_in, b_out):
        if a is not None:
            h.update(np.ascontiguousarray(a, dtype="<f4").tobytes())
    return h.hexdigest()


def record_length(layer: dict[str, Any] | PlanLayer, dtype: str, group_size: int, bias: bool = False) -> int:
    """Bytes one expert record of ``dtype`` takes in the store (as BundleWriter lays it out)."""
    from edgemoe_ort.bundle.format import (
        ALIGNMENT,
        TENSOR_ALIGNMENT,
        align_up,
        expected_tensors,
        record_format,
        tensor_nbytes,
    )

    lay = layer.shapes() if isinstance(layer, PlanLayer) else layer
    pos = 0
    for tdt, shape in expected_tensors(lay, record_format(dtype, group_size),
                                       {"b_in", "b_out"} if bias else set()).values():
        pos = align_up(pos, TENSOR_ALIGNMENT) + tensor_nbytes(tdt, shape)
    return align_up(max(pos, 1), ALIGNMENT)


# --- command-line values -----------------------------------------------------------------------------


def quantized_dtypes() -> list[str]:
    """The group-wise quantized expert formats of this build, highest bits first (the default levels)."""
    return sorted((d for d in DTYPES if BITS[d] < 16), key=lambda d: -BITS[d])


def _choices() -> str:
    ordered = sorted(DTYPES, key=lambda d: -BITS[d])
    return f"{', '.join(str(BITS[d]) for d in ordered)} ({', '.join(ordered)})"


def parse_bits(text: str | None, flag: str = "--bits") -> list[str]:
    """``"2,3,4,8"`` (bits or dtype names) -> dtypes of the format table, highest bits first; None -> every
    quantized format (:func:`quantized_dtypes`). At least two levels: the highest is the reference."""
    if text is None:
        levels = quantized_dtypes()
    else:
        by_bits = {BITS[d]: d for d in DTYPES}
        levels = []
        for tok in (t.strip() for t in text.split(",")):
            if not tok:
                continue
            d = tok.lower() if tok.lower() in DTYPES else by_bits.get(int(tok)) if tok.isdigit() else None
            if d is None:
                raise ValueError(f"{flag}: {tok} is not an expert format of this build; expected some of "
                                 f"{_choices()}")
            if d not in levels:
                levels.append(d)
        levels.sort(key=lambda d: -BITS[d])
    if len(levels) < 2:
        raise ValueError(f"{flag}: expected at least two levels (the highest is the reference), found "
                         f"{', '.join(levels) or 'none'}; choices {_choices()}")
    return levels


def parse_tolerance(text: str | float, flag: str = "--tolerance") -> float:
    """``"1%"`` -> 0.01, ``"0.005"`` -> 0.005 (a fraction < 1); >= 0."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
        except ValueError:
            value = math.nan
        if not s.endswith("%") and value >= 1:
            raise ValueError(f"{flag}: expected a percentage like 1% or a fraction like 0.01, found {s!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{flag}: expected a percentage like 1% or a fraction like 0.01, found {text!r}")
    return value


# --- writer ------------------------------------------------------------------------------------------


def plan_to_doc(plan: Plan) -> dict[str, Any]:
    from edgemoe_ort.bundle.format import version_string

    experts = []
    for lay in plan.layers:
        for e in range(lay.num_experts):
            rec: dict[str, Any] = {"layer": lay.layer, "expert": e, "dtype": plan.dtypes[(lay.layer, e)],
                                   "xxh3": plan.digests[(lay.layer, e)]}
            rec.update(plan.scores.get((lay.layer, e), {}))
            experts.append(rec)
    return {
        "format": PLAN_FORMAT,
        "format_version": PLAN_VERSION,
        "created_by": plan.created_by or version_string(),
        "model": {
            "source": plan.source,
            "family": plan.family,
            "config_sha256": plan.config_sha256,
            "config": plan.config,
            "layers": [{"layer": lay.layer, "module": lay.module, "num_experts": lay.num_experts,
                        "hidden": lay.hidden, "intermediate": lay.intermediate, "gated": lay.gated,
                        "bias": lay.bias} for lay in plan.layers],
        },
        "group_size": plan.group_size,
        "tolerance": plan.tolerance,
        "offered": list(plan.offered),
        "reference": plan.reference,
        "method": plan.method,
        "calibration": plan.calibration,
        "search": plan.search,
        "result": plan.result,
        "experts": experts,
    }


def dump_plan(plan: Plan) -> str:
    """The file's text: indented, one expert record per line."""
    doc = plan_to_doc(plan)
    experts = doc.pop("experts")
    head = json.dumps(doc, indent=2)[:-2]  # without the closing "\n}"
    lines = ",\n".join("    " + json.dumps(r) for r in experts)
    return f"{head},\n  \"experts\": [\n{lines}\n  ]\n}}\n"


def write_plan(path: str | Path, plan: Plan) -> Path:
    """Write ``plan`` to ``path`` (through a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(dump_plan(plan), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- reader ------------------------------------------------------------------------------------------


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_plan(doc: Any, file: str | Path = "plan.json") -> Plan:
    """Validate a parsed plan document; raises :class:`PlanError` naming the field, expected vs found."""

    def need(cond: bool, fld: str, expected: str, found: Any, **kw: Any) -> None:
        if not cond:
            raise PlanError(file, fld, expected=expected, found=found, **kw)

    def obj(v: Any, fld: str, keys: set[str], required: set[str]) -> dict[str, Any]:
        need(isinstance(v, dict), fld, "an object", _type_name(v))
        unknown = sorted(set(v) - keys)
        need(not unknown, fld, f"only the keys {', '.join(sorted(keys))}", f"unknown key {unknown[0]!r}"
             if unknown else None)
        missing = sorted(required - set(v))
        need(not missing, f"{fld}.{missing[0]}" if missing else fld, "a value", "none (missing)")
        return v

    top = obj(doc, "plan", _TOP_KEYS, _TOP_REQUIRED)
    need(top["format"] == PLAN_FORMAT, "format", repr(PLAN_FORMAT), repr(top["format"]))
    need(top["format_version"] == PLAN_VERSION and _is_int(top["format_version"]), "format_version",
         f"{PLAN_VERSION} (the version this edgemoe-ort reads)", repr(top["format_version"]))
    model = obj(top["model"], "model", _MODEL_KEYS, _MODEL_KEYS - {"source"})
    need(isinstance(model["family"], str) and bool(model["family"]), "model.family", "a non-empty string",
         repr(model["family"]))
    need(isinstance(model["config"], dict), "model.config", "an object (the checkpoint's config.json)",
         _type_name(model["config"]))
    need(isinstance(model["config_sha256"], str) and bool(_HEX64.match(model["config_sha256"])),
         "model.config_sha256", "64 hex digits", repr(model["config_sha256"]))
    need(config_fingerprint(model["config"]) == model["config_sha256"], "model.config_sha256",
         "the sha256 of model.config", model["config_sha256"], message="the file was edited")
    need(isinstance(model["layers"], list) and bool(model["layers"]), "model.layers",
         "a non-empty array", _type_name(model["layers"]))
    layers: list[PlanLayer] = []
    for i, raw in enumerate(model["layers"]):
        fld = f"model.layers[{i}]"
        lay = obj(raw, fld, _LAYER_KEYS, _LAYER_KEYS - {"module", "bias"})
        need(lay["layer"] == i and _is_int(lay["layer"]), f"{fld}.layer", str(i), repr(lay["layer"]))
        for k in ("num_experts", "hidden", "intermediate"):
            need(_is_int(lay[k]) and lay[k] >= 1, f"{fld}.{k}", "an integer >= 1", repr(lay[k]))
        for k in ("gated", "bias"):
            need(isinstance(lay.get(k, False), bool), f"{fld}.{k}", "a boolean", repr(lay.get(k)))
        layers.append(PlanLayer(i, lay["num_experts"], lay["hidden"], lay["intermediate"], lay["gated"],
                                bool(lay.get("bias", False)), str(lay.get("module", ""))))
    gs = top["group_size"]
    need(_is_int(gs) and gs >= 1, "group_size", "an integer >= 1", repr(gs))
    tol = top["tolerance"]
    need(isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol >= 0, "tolerance",
         "a number >= 0 (0.01 = 1%)", repr(tol))
    need(top["method"] in METHODS, "method", f"one of {', '.join(METHODS)}", repr(top["method"]))
    offered = top["offered"]
    need(isinstance(offered, list) and all(isinstance(d, str) for d in offered), "offered",
         "an array of dtype names", repr(offered))
    need(isinstance(top["reference"], dict), "reference", "an object", _type_name(top["reference"]))
    for k in ("calibration", "search", "result"):
        need(isinstance(top.get(k, {}), dict), k, "an object", _type_name(top.get(k)))

    need(isinstance(top["experts"], list), "experts", "an array of expert records",
         _type_name(top["experts"]))
    dtypes: dict[tuple[int, int], str] = {}
    digests: dict[tuple[int, int], str] = {}
    scores: dict[tuple[int, int], dict[str, float]] = {}
    table = ", ".join(DTYPES)
    for i, raw in enumerate(top["experts"]):
        fld = f"experts[{i}]"
        rec = obj(raw, fld, _RECORD_KEYS, _RECORD_REQUIRED)
        li, e = rec["layer"], rec["expert"]
        need(_is_int(li) and 0 <= li < len(layers), f"{fld}.layer",
             f"a MoE layer 0..{len(layers) - 1} (unknown layer)", repr(li))
        need(_is_int(e) and 0 <= e < layers[li].num_experts, f"{fld}.expert",
             f"an expert 0..{layers[li].num_experts - 1} of layer {li} (unknown expert)", repr(e))
        need((li, e) not in dtypes, fld, "each expert once", f"layer {li} expert {e} again")
        need(rec["dtype"] in DTYPES, f"{fld}.dtype",
             f"one of {table} (the expert formats of this build)", repr(rec["dtype"]), layer=li, expert=e)
        need(isinstance(rec["xxh3"], str) and bool(_HEX16.match(rec["xxh3"])), f"{fld}.xxh3",
             "16 hex digits", repr(rec["xxh3"]))
        dtypes[(li, e)] = rec["dtype"]
        digests[(li, e)] = rec["xxh3"]
        extra = {k: rec[k] for k in ("loss", "proxy") if k in rec}
        for k, v in extra.items():
            need(isinstance(v, (int, float)) and not isinstance(v, bool), f"{fld}.{k}", "a number", repr(v))
        if extra:
            scores[(li, e)] = extra
    for lay in layers:
        for e in range(lay.num_experts):
            need((lay.layer, e) in dtypes, "experts",
                 f"a record for every expert of every layer ({sum(x.num_experts for x in layers)})",
                 f"none for layer {lay.layer} expert {e} (missing expert; {len(dtypes)} records)")
    return Plan(
        family=model["family"], config=model["config"], layers=layers, group_size=gs, tolerance=float(tol),
        offered=list(offered), reference=top["reference"], method=top["method"], dtypes=dtypes,
        digests=digests, source=str(model.get("source", "")), config_sha256=model["config_sha256"],
        calibration=top.get("calibration", {}), search=top.get("search", {}), result=top.get("result", {}),
        scores=scores, created_by=str(top.get("created_by", "")), path=Path(file),
    )


def read_plan(path: str | Path) -> Plan:
    """Read and validate ``path``; one :class:`PlanError` line for anything wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a plan file (edgemoe-plan -o), found "
                                f"{'a folder' if path.exists() else 'nothing'}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise PlanError(path, "", message=f"not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise PlanError(path, "", message=f"not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") \
            from None
    return parse_plan(doc, path)


# --- the plan against a model ------------------------------------------------------------------------


def check_plan_model(plan: Plan, family: str, config: dict[str, Any], where: str) -> None:
    """Refuse a plan made for another model: family, then the config fingerprint (naming the keys that
    differ). ``where`` names the model in messages."""
    file = plan.path or "plan"
    if plan.family != family:
        raise PlanError(file, "model.family", expected=f"{family!r} (the family of {where})",
                        found=repr(plan.family), message="the plan was made for another model")
    if config_fingerprint(config) != plan.config_sha256:
        keys = sorted((set(config) | set(plan.config)) - set(VOLATILE_CONFIG_KEYS))
        diff = [k for k in keys if config.get(k) != plan.config.get(k)]
        shown = "; ".join(f"{k}: plan {plan.config.get(k)!r}, model {config.get(k)!r}" for k in diff[:3])
        raise PlanError(file, "model.config", expected=f"the config of {where}",
                        found=f"another ({shown})" if shown else "another",
                        message="the plan was made for another model")


def check_plan_layers(plan: Plan, layers: list[PlanLayer], where: str) -> None:
    """Refuse a plan whose MoE layers differ from the model's (count, experts, shapes)."""
    file = plan.path or "plan"
    if len(layers) != len(plan.layers):
        raise PlanError(file, "model.layers", expected=f"{len(layers)} MoE layers (those of {where})",
                        found=len(plan.layers), message="the plan was made for another model")
    for mine, theirs in zip(layers, plan.layers, strict=True):
        if mine.shapes() != theirs.shapes() or mine.bias != theirs.bias:
            raise PlanError(file, f"model.layers[{mine.layer}]", expected=f"{mine.shapes()} ({where})",
                            found=theirs.shapes(), message="the plan was made for another model")


def resolve_plan(plan: str | Path | Plan | None, *, bits: int | None,
                 group_size: int | None) -> Plan | None:
    """The plan of ``export_model(plan=...)``, read and validated (:func:`~edgemoe_ort.plan.read_plan`);
    with a plan, ``bits`` must be None and ``group_size`` None or the plan's. Cheap: runs before any load."""
    if plan is None:
        return None
    the_plan = plan if isinstance(plan, Plan) else read_plan(plan)
    if bits is not None:
        name = f" {the_plan.path}" if the_plan.path else ""
        raise ValueError(f"--plan{name}: the plan sets every expert's dtype; leave --bits out (found --bits "
                         f"{bits})")
    if group_size is not None and group_size != the_plan.group_size:
        raise ValueError(f"--group-size: the plan was measured at group size {the_plan.group_size}; leave "
                         f"--group-size out or give {the_plan.group_size} (found {group_size})")
    return the_plan
