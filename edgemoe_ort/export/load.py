"""Stage 1: load a Hugging Face checkpoint (hub id or local folder) in float32 for export.

``load_model(source)`` loads everything (``from_pretrained`` in float32). ``load_model(source, stream=True)``
(what ``export_model`` uses) loads all but the routed experts, which stay on the meta device and are read
from the checkpoint one expert at a time later (:mod:`.stream`); if the checkpoint cannot stream, the reason
is logged and everything is loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from edgemoe_ort.export.recipes import Recipe, load_recipe

if TYPE_CHECKING:
    from edgemoe_ort.export.stream import ExpertStream

log = logging.getLogger(__name__)

#: files of a checkpoint that make up its tokenizer (copied into the bundle when present)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    recipe: Recipe
    config_dict: dict[str, Any]  # the checkpoint's config.json, verbatim
    tokenizer_dir: Path | None  # folder holding tokenizer.json (+ friends), if the checkpoint has one
    source: str
    #: streamed: the routed experts are on the meta device and read from here; None: they are in ``model``
    experts: ExpertStream | None = None
    #: why a streamed load was asked for but everything was loaded (None: not asked, or streamed)
    stream_fallback: str | None = None


def _checkpoint_file(model_id_or_path: str, filename: str) -> Path | None:
    local = Path(model_id_or_path)
    if local.is_dir():
        p = local / filename
        return p if p.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(
        model_id_or_path,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return Path(found) if found else None


def checkpoint_config(model_id_or_path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict, verbatim (what the bundle stores)."""
    source = str(model_id_or_path)
    cfg_file = _checkpoint_file(source, "config.json")
    if cfg_file is not None:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    return AutoConfig.from_pretrained(source).to_dict()  # pragma: no cover - config found elsewhere


class CheckpointLoadError(ValueError):
    """The checkpoint's weight files are there but do not load (corrupt, truncated, of another model)."""


def _weights_error(source: str, exc: BaseException) -> CheckpointLoadError:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return CheckpointLoadError(
        f"{source}: the checkpoint's weights cannot be loaded ({type(exc).__name__}: {first})"
    )


def load_model(model_id_or_path: str | Path, *, stream: bool = False) -> LoadedModel:
    """``from_pretrained`` in float32, eval mode, with the recipe of its ``model_type``.

    ``stream``: leave the routed experts on the meta device and return an
    :class:`~edgemoe_ort.export.stream.ExpertStream` that reads them from the checkpoint's safetensors one
    expert at a time (``LoadedModel.experts``); a checkpoint that cannot stream is loaded whole, with the
    reason logged and in ``LoadedModel.stream_fallback``.

    Raises :class:`~edgemoe_ort.export.recipes.UnsupportedModelError` (naming the model_type and the supported
    ones) before any weight is loaded if the family has no recipe.
    """
    source = str(model_id_or_path)
    config = AutoConfig.from_pretrained(source)
    recipe = load_recipe(config.model_type)
    config.use_cache = True
    auto = AutoModelForSeq2SeqLM if recipe.architecture == "encoder_decoder" else AutoModelForCausalLM
    experts: ExpertStream | None = None
    fallback: str | None = None
    if stream:
        from edgemoe_ort.export.stream import ExpertStream, StreamUnavailable, meta_model

        try:
            experts = ExpertStream.plan(meta_model(config, auto), recipe, source)
        except StreamUnavailable as exc:
            fallback = str(exc)
            log.warning("%s: routed experts not streamed, loading the whole checkpoint: %s", source, fallback)
        except CheckpointLoadError:
            raise
        except Exception as exc:  # a shard's header that safetensors cannot read: the same error as below
            raise _weights_error(source, exc) from exc
    try:
        if experts is not None:
            from edgemoe_ort.export.stream import load_skeleton

            model = load_skeleton(source, config, recipe, auto)
        else:
            model = auto.from_pretrained(source, config=config, dtype=torch.float32)
    except Exception as exc:  # safetensors, torch.load and transformers each raise their own kinds
        raise _weights_error(source, exc) from exc
    model.eval()

    config_dict = checkpoint_config(source)
    tok = _checkpoint_file(source, "tokenizer.json") or _checkpoint_file(source, "tokenizer_config.json")
    tokenizer_dir = tok.parent if tok is not None else None
    if tokenizer_dir is not None and not Path(source).is_dir():
        # hub snapshot: make sure the companions of tokenizer.json are in the same snapshot folder
        for name in TOKENIZER_FILES:
            _checkpoint_file(source, name)
    return LoadedModel(model, recipe, config_dict, tokenizer_dir, source, experts, fallback)
