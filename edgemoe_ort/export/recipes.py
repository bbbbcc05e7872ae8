"""Per-family export recipes: ``<repo>/export/<model_type>.toml``, one small declarative file per family.

A recipe says where the MoE blocks are, how the routed experts are stored, which config keys give the
number of experts / top-k / activation, and which block children must stay dense (router, shared expert).
Everything in a recipe is read and checked by the exporter; free text goes in ``notes``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from edgemoe_ort.bundle.routing import SCORE_KINDS, SEAMS, RoutingSeam
from edgemoe_ort.resources import data_dir, find_data_dir

#: the export recipes: the wheel's copy, else the repository's export/ (edgemoe_ort/resources.py)
RECIPES_DIR = data_dir("recipes")

ARCHITECTURES = ("causal_lm", "encoder_decoder")
LAYOUTS = ("fused", "per_expert")
GATE_UP = ("concatenated", "interleaved")
#: ``[routing] seam`` values: where CacheAwareTopK goes, or "none"
ROUTING_SEAMS = (*SEAMS, "none")


class UnsupportedModelError(ValueError):
    """The checkpoint's model_type has no recipe (or the recipe does not match the model)."""


@dataclass(frozen=True)
class GraphRecipe:
    role: str  # bundle graph role: "decoder" | "encoder"
    blocks: tuple[str, ...]  # module-path globs ("*" = one path component) of candidate MoE blocks

    def block_regexes(self) -> list[re.Pattern[str]]:
        return [re.compile("^" + re.escape(b).replace(r"\*", r"[^.]+") + "$") for b in self.blocks]


@dataclass(frozen=True)
class ConfigValue:
    """A recipe value that is either a literal or ``{ config = "key" }`` (read from the HF config)."""

    literal: Any = None
    config_key: str | None = None

    def resolve(self, config: Any, what: str) -> Any:
        if self.config_key is None:
            return self.literal
        if not hasattr(config, self.config_key):
            raise UnsupportedModelError(
                f"{getattr(config, 'model_type', '?')}: config has no {self.config_key!r} "
                f"(recipe field {what})"
            )
        return getattr(config, self.config_key)


@dataclass(frozen=True)
class Recipe:
    model_type: str
    architecture: str
    graphs: tuple[GraphRecipe, ...]
    experts: str  # child of a block holding the routed experts (replaced by OffloadedExpert)
    router: str  # child of a block that routes (stays dense; checked)
    shared_expert: tuple[str, ...]  # children that stay dense (checked); may be empty
    num_experts: ConfigValue
    top_k: ConfigValue
    activation: ConfigValue
    gated: bool
    layout: str
    gate_up: str
    transposed: bool
    bias: bool
    per_expert: str = "expert_{i}"  # per_expert layout: child of `experts` holding expert i
    w_in: tuple[str, ...] = ()  # per_expert layout: Linear children whose rows form w_in, in order
    w_out: str = ""  # per_expert layout: Linear child giving w_out
    swiglu_alpha: ConfigValue | None = None
    swiglu_limit: ConfigValue | None = None
    notes: str = ""
    path: Path = field(default=Path())
    #: ``[routing]``: the router's selection step CacheAwareTopK replaces (None: not wired, see routing_why)
    routing: RoutingSeam | None = None
    routing_why: str = ""


def _config_value(raw: Any, where: str) -> ConfigValue:
    if isinstance(raw, dict):
        if set(raw) != {"config"} or not isinstance(raw["config"], str):
            raise ValueError(f'{where}: expected a literal or {{ config = "key" }}, found {raw!r}')
        return ConfigValue(config_key=raw["config"])
    return ConfigValue(literal=raw)


def _as_tuple(raw: Any) -> tuple[str, ...]:
    if raw is None or raw == "":
        return ()
    if isinstance(raw, str):
        return (raw,)
    return tuple(str(x) for x in raw)


def _routing(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {"routing": None, "routing_why": f"{where} has no [routing] table"}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: [routing] must be a table, found {raw!r}")
    seam = raw.get("seam")
    if seam not in ROUTING_SEAMS:
        raise ValueError(f"{where}: routing.seam: expected one of {', '.join(ROUTING_SEAMS)}, found {seam!r}")
    if seam == "none":
        why = raw.get("why")
        if not isinstance(why, str) or not why:
            raise ValueError(f"{where}: routing.seam = 'none' needs routing.why (a reason)")
        return {"routing": None, "routing_why": why}
    scores = raw.get("scores")
    if scores not in SCORE_KINDS:
        kinds = ", ".join(SCORE_KINDS)
        raise ValueError(f"{where}: routing.scores: expected one of {kinds}, found {scores!r}")
    return {"routing": RoutingSeam(seam, scores), "routing_why": ""}


def parse_recipe(data: dict[str, Any], path: Path) -> Recipe:
    where = str(path)
    try:
        moe, experts = data["moe"], data["experts"]
        graphs = tuple(GraphRecipe(role=g["role"], blocks=_as_tuple(g["blocks"])) for g in data["graphs"])
        recipe = Recipe(
            model_type=data["model_type"],
            architecture=data["architecture"],
            graphs=graphs,
            experts=moe["experts"],
            router=moe["router"],
            shared_expert=_as_tuple(moe.get("shared_expert")),
            num_experts=_config_value(moe["num_experts"], f"{where}: moe.num_experts"),
            top_k=_config_value(moe["top_k"], f"{where}: moe.top_k"),
            activation=_config_value(moe["activation"], f"{where}: moe.activation"),
            gated=bool(moe["gated"]),
            layout=experts["layout"],
            gate_up=experts.get("gate_up", "concatenated"),
            transposed=bool(experts.get("transposed", False)),
            bias=bool(experts.get("bias", False)),
            per_expert=experts.get("per_expert", "expert_{i}"),
            w_in=_as_tuple(experts.get("w_in")),
            w_out=experts.get("w_out", ""),
            swiglu_alpha=_config_value(moe["swiglu_alpha"], where) if "swiglu_alpha" in moe else None,
            swiglu_limit=_config_value(moe["swiglu_limit"], where) if "swiglu_limit" in moe else None,
            notes=str(data.get("notes", "")),
            path=path,
            **_routing(data.get("routing"), where),
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing recipe field {e.args[0]!r}") from None
    if recipe.architecture not in ARCHITECTURES:
        raise ValueError(f"{where}: architecture {recipe.architecture!r} not in {ARCHITECTURES}")
    if recipe.layout not in LAYOUTS:
        raise ValueError(f"{where}: experts.layout {recipe.layout!r} not in {LAYOUTS}")
    if recipe.gate_up not in GATE_UP:
        raise ValueError(f"{where}: experts.gate_up {recipe.gate_up!r} not in {GATE_UP}")
    if recipe.layout == "per_expert" and (not recipe.w_in or not recipe.w_out):
        raise ValueError(f"{where}: experts.layout = 'per_expert' needs experts.w_in and experts.w_out")
    if recipe.gated and recipe.layout == "per_expert" and len(recipe.w_in) != 2:
        raise ValueError(f"{where}: gated per-expert layout needs w_in = [gate, up]")
    if not recipe.graphs:
        raise ValueError(f"{where}: no [[graphs]]")
    return recipe


def recipes_dir() -> Path:
    """The folder of the recipes (:data:`RECIPES_DIR`); FileNotFoundError if it is missing."""
    return find_data_dir("recipes")


def supported_model_types() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def load_recipe(model_type: str) -> Recipe:
    path = recipes_dir() / f"{model_type}.toml"
    if not path.is_file():
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by the edgemoe exporter; "
            f"supported: {', '.join(supported_model_types())}"
        )
    with path.open("rb") as f:
        recipe = parse_recipe(tomllib.load(f), path)
    if recipe.model_type != model_type:
        raise ValueError(f"{path}: model_type {recipe.model_type!r} does not match the file name")
    return recipe
