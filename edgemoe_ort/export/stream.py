"""Streaming export: the dense part of a checkpoint is loaded, the routed experts are read one at a time.

A non-streamed export loads the whole checkpoint in float32 (a bf16 checkpoint doubles in size) and holds
every routed expert twice (the model and its canonical copy). Streamed (the default of ``export_model``):

1. **Skeleton.** ``from_pretrained`` instantiates the model class as usual (on the meta device, then loads
   it), but through a throw-away subclass whose ``state_dict()`` hides the routed-expert parameters while
   loading. So transformers' own loader (key renaming, fusing, base-model prefixes, tied weights, dtype)
   loads and initialises everything else (embeddings, attention, norms, routers, shared experts) and never
   reads or allocates a routed expert: those parameters stay on the meta device (then the class is put back:
   the model is a plain ``MixtralForCausalLM`` & co.). :func:`~edgemoe_ort.export.patch.patch_model` takes
   their shapes from the meta tensors; tracing never needs their values (the custom op's fake implementation
   runs); the KV-cache probe runs the routed experts as zeros (:func:`~edgemoe_ort.export.op.shape_probe`).
2. **Key map.** Every tensor name in the checkpoint's safetensors headers is passed through transformers'
   weight-conversion machinery (``get_model_conversion_mapping`` + ``rename_source_key``: exactly what
   ``from_pretrained`` does), giving for each routed-expert parameter the checkpoint keys that feed it and the
   ``WeightConverter`` (if any) that fuses them (e.g. old Mixtral ``block_sparse_moe.experts.{e}.w1/w3`` ->
   ``mlp.experts.gate_up_proj`` by ``MergeModulelist(0)`` + ``Concatenate(1)``; GraniteMoE's
   ``input_linear`` by a renaming; GPT-OSS and v5-native checkpoints: fused tensors as they are). Nothing is
   hard-coded per family.
3. **Stream.** :meth:`ExpertStream.read_expert` reads one expert: per-expert checkpoint tensors whole, fused
   ones as the ``[e:e+1]`` slice (``safe_open``, memory-mapped, opened per expert so that no mapping outlives
   it), runs the same converter on that one expert (its operations must leave dim 0 alone, which is checked),
   then the same canonical extraction as the in-memory path (:func:`~edgemoe_ort.export.patch.canonical_fused`
   / :func:`~edgemoe_ort.export.patch.canonical_expert`), so the store is byte-identical. The values are
   upcast to float32 one expert at a time.

What cannot stream (no safetensors, a quantized checkpoint, a converter that mixes experts, non-float expert
tensors) raises :class:`StreamUnavailable`; :func:`~edgemoe_ort.export.load.load_model` then logs the reason
and loads the whole checkpoint as before. A checkpoint that lacks an expert tensor, or whose tensor has the
wrong shape, is a :class:`~edgemoe_ort.export.load.CheckpointLoadError` naming the file and key.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from edgemoe_ort.export.op import ExpertWeights
from edgemoe_ort.export.patch import MoELayer, _iter_blocks, canonical_expert, canonical_fused
from edgemoe_ort.export.recipes import Recipe

log = logging.getLogger(__name__)

#: safetensors dtypes an expert tensor may have (anything else: quantized, cannot stream)
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class StreamUnavailable(Exception):
    """This checkpoint's routed experts cannot be read one expert at a time (the reason is the message)."""


def _load_error(msg: str) -> Exception:
    from edgemoe_ort.export.load import CheckpointLoadError

    return CheckpointLoadError(msg)


# --- which parameters are routed experts --------------------------------------------------------------------


def routed_expert_params(model: torch.nn.Module, recipe: Recipe) -> dict[str, list[str]]:
    """Per experts-module path (``model.layers.0.mlp.experts``), the full names of its parameters."""
    out: dict[str, list[str]] = {}
    for _, path, block in _iter_blocks(model, recipe):
        experts_path = f"{path}.{recipe.experts}"
        experts = block.get_submodule(recipe.experts)
        out[experts_path] = [f"{experts_path}.{n}" for n, _ in experts.named_parameters()]
    return out


def _skeleton_class(base: type[PreTrainedModel], recipe: Recipe) -> type[PreTrainedModel]:
    """``base`` whose ``state_dict()`` leaves out the routed experts while ``_edgemoe_hide`` is set (so that
    ``from_pretrained`` neither loads nor materialises them: they stay on the meta device)."""

    class Skeleton(base):  # type: ignore[valid-type, misc]
        def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            names = [n for ns in routed_expert_params(self, recipe).values() for n in ns]
            self._edgemoe_routed = frozenset(names)
            self._edgemoe_hide = True
            for n in names:  # never initialised either (a no-op on meta, but say so)
                self.get_parameter(n)._is_hf_initialized = True
            # the checkpoint's expert tensors are unexpected keys now (renamed to these names): say nothing
            ignore = set(getattr(base, "_keys_to_ignore_on_load_unexpected", None) or ())
            self._keys_to_ignore_on_load_unexpected = ignore | {f"^{re.escape(n)}$" for n in names}

        def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
            sd = super().state_dict(*args, **kwargs)
            if getattr(self, "_edgemoe_hide", False):
                for n in self._edgemoe_routed:
                    sd.pop(n, None)
            return sd

    Skeleton.__name__ = base.__name__  # transformers looks conversion mappings up by class name
    Skeleton.__qualname__ = base.__qualname__
    Skeleton.__module__ = base.__module__
    return Skeleton


def model_class(config: PretrainedConfig, auto: Any) -> type[PreTrainedModel]:
    """The class ``auto.from_pretrained`` would instantiate for ``config``."""
    from transformers.models.auto.auto_factory import _get_model_class

    return _get_model_class(config, auto._model_mapping)


def meta_model(config: PretrainedConfig, auto: Any) -> PreTrainedModel:
    """The model of ``config`` on the meta device (names and shapes only, no memory)."""
    cls = model_class(config, auto)
    with torch.device("meta"):
        return cls._from_config(copy.deepcopy(config), dtype=torch.float32)


def load_skeleton(source: str, config: PretrainedConfig, recipe: Recipe, auto: Any) -> PreTrainedModel:
    """``from_pretrained`` in float32 with every routed-expert parameter left on the meta device."""
    base = model_class(config, auto)
    model = _skeleton_class(base, recipe).from_pretrained(source, config=config, dtype=torch.float32)
    model._edgemoe_hide = False
    model.__class__ = base  # a plain HF model again (with meta experts)
    left = [n for n in model._edgemoe_routed if not model.get_parameter(n).is_meta]
    if left:  # pragma: no cover - transformers changed how it loads
        raise RuntimeError(f"streamed load materialised routed-expert parameters: {sorted(left)[:3]}")
    return model


# --- the checkpoint's files ---------------------------------------------------------------------------------


def checkpoint_shards(source: str) -> tuple[list[Path], dict[str, str]]:
    """The checkpoint's safetensors files and the index's ``weight_map`` (key -> file name; empty without an
    index). Raises :class:`StreamUnavailable` if the checkpoint has no safetensors."""
    from edgemoe_ort.export.load import _checkpoint_file

    index = _checkpoint_file(source, "model.safetensors.index.json")
    if index is not None:
        try:
            weight_map = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (ValueError, KeyError, TypeError) as exc:
            raise _load_error(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from exc
        files = []
        for name in sorted(set(weight_map.values())):
            f = _checkpoint_file(source, name)
            if f is None:
                raise _load_error(f"{index}: lists {name}, which the checkpoint does not have")
            files.append(f)
        return files, weight_map
    single = _checkpoint_file(source, "model.safetensors")
    if single is not None:
        return [single], {}
    raise StreamUnavailable("the checkpoint has no model.safetensors(.index.json) (another weight format)")


# --- the key map --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    key: str
    file: Path
    shape: tuple[int, ...]


@dataclass
class _ParamPlan:
    """How one routed-expert parameter of the model is made from checkpoint tensors."""

    target: str  # full parameter name in the model
    shape: tuple[int, ...]  # its shape in the model
    expert_dim: bool  # dim 0 is the expert (fused layout); else the parameter belongs to one expert
    converter: Any  # transformers WeightConverter, or None for a plain (possibly renamed) tensor
    sources: dict[str, list[_Source]] = field(default_factory=dict)  # source pattern -> keys, loader's order
    mode: str = ""  # "merge" (one checkpoint tensor per expert), "slice" (fused: [e:e+1]), "whole"


@dataclass
class _LayerPlan:
    module_path: str
    num_experts: int
    fused: bool
    params: dict[str, _ParamPlan]  # relative name (within the experts module) -> plan


#: conversion operations that may run on one expert's slice: they must not act on dim 0 (the expert axis)
# ("Split" is left out: transformers' Split.convert asks the model for the parameter; the stream passes none)
_PER_EXPERT_OPS = {"Concatenate", "Interleave", "Chunk", "Transpose"}


def _op_dims(op: Any) -> list[int]:
    dims = [getattr(op, a) for a in ("dim", "dim0", "dim1") if isinstance(getattr(op, a, None), int)]
    return dims


def _check_ops(ops: list[Any], first_may_merge: bool, what: str) -> None:
    for i, op in enumerate(ops):
        name = type(op).__name__
        if i == 0 and first_may_merge and name == "MergeModulelist" and getattr(op, "dim", None) == 0:
            continue
        if name not in _PER_EXPERT_OPS or any(d == 0 for d in _op_dims(op)):
            raise StreamUnavailable(
                f"{what}: transformers' conversion {[type(o).__name__ for o in ops]} ({op!r}) cannot be "
                "applied one expert at a time"
            )


_Tensors = dict[tuple[str, int | None], torch.Tensor]


def _pick(p: _ParamPlan, srcs: list[_Source], expert: int) -> list[tuple[_Source, int | None]]:
    """The reads giving expert ``expert``'s part of ``p`` from one source pattern: (tensor, slice or None)."""
    if p.mode == "merge":
        return [(srcs[expert], None)]
    if p.mode == "slice":
        return [(srcs[0], expert)]
    return [(s, None) for s in srcs]


def _merge_gap(name: str, conv: Any, srcs: dict[str, list[_Source]], num_experts: int) -> Exception | None:
    """A per-expert merge (``experts.*.w1.weight`` ...) that lacks some expert's tensor: the error naming the
    first missing checkpoint key (built from a sibling key) and the file its siblings are in; else None."""
    def regex(pattern: str) -> re.Pattern[str]:
        return re.compile(re.escape(pattern.lstrip("^").replace("\\.", ".")).replace(r"\*", r"(\d+)"))

    sibling = None
    for pattern, got in srcs.items():
        m = regex(pattern).search(got[0].key) if got else None
        if m is not None and m.groups():
            sibling = (got[0], m)
            break
    for pattern in conv.source_patterns:
        got = srcs.get(pattern, [])
        if len(got) == num_experts:
            continue
        rx = regex(pattern)
        present = set()
        for src in got:
            m = rx.search(src.key)
            if m is not None and m.groups():
                present.add(int(m.group(1)))
        missing = min(set(range(num_experts)) - present, default=None)
        if sibling is None or missing is None:
            return _load_error(
                f"{name}: the checkpoint has {len(got)} tensors matching {pattern!r}, expected one per "
                f"expert ({num_experts})"
            )
        src, m = sibling
        key = src.key[: m.start()] + pattern.lstrip("^").replace("\\.", ".").replace("*", str(missing))
        key += src.key[m.end() :]
        return _load_error(
            f"{src.file.name}: no tensor {key} (expert {missing} of the routed-expert parameter {name}; "
            f"{len(got)} of {num_experts} experts found)"
        )
    return None


class ExpertStream:
    """Reads routed experts one at a time from a checkpoint's safetensors, in the canonical layout."""

    def __init__(self, layers: dict[str, _LayerPlan], recipe: Recipe, config: PretrainedConfig) -> None:
        self.layers = layers
        self.recipe = recipe
        self.config = config

    @classmethod
    def plan(cls, model: PreTrainedModel, recipe: Recipe, source: str) -> ExpertStream:
        """Map every routed-expert parameter of ``model`` (may be on meta) to checkpoint keys of ``source``.

        Raises :class:`StreamUnavailable` if the experts cannot stream (then export them in memory), and
        :class:`~edgemoe_ort.export.load.CheckpointLoadError` if the checkpoint is missing an expert tensor.
        """
        from safetensors import safe_open
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

        quant = getattr(model.config, "quantization_config", None)
        if quant:
            get = quant.get if isinstance(quant, dict) else lambda k: getattr(quant, k, "")
            method = get("quant_method")
            raise StreamUnavailable(f"quantized checkpoint (quant_method={method!r}): dequantising needed")
        files, weight_map = checkpoint_shards(source)
        headers: dict[str, _Source] = {}
        dtypes: dict[str, str] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    if k in headers or (weight_map and weight_map.get(k, f.name) != f.name):
                        continue
                    sl = h.get_slice(k)
                    headers[k] = _Source(k, f, tuple(int(d) for d in sl.get_shape()))
                    dtypes[k] = str(sl.get_dtype())
        for k, name in weight_map.items():
            if k not in headers:
                raise _load_error(f"{name}: has no tensor {k!r} (model.safetensors.index.json says it has)")

        num_experts = int(recipe.num_experts.resolve(model.config, "moe.num_experts"))
        routed = routed_expert_params(model, recipe)
        targets = {n for ns in routed.values() for n in ns}
        meta_sd = model.state_dict()
        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        found: dict[str, dict[str, list[_Source]]] = defaultdict(lambda: defaultdict(list))
        pattern_of: dict[str, str | None] = {}
        prefix = model.base_model_prefix
        for k in sorted(headers, key=dot_natural_key):  # the loader's order (experts 0, 1, ..., 10, ...)
            renamed, pattern = rename_source_key(k, renamings, converters, prefix, meta_sd)
            if renamed not in meta_sd and k in meta_sd:
                renamed, pattern = rename_source_key(k, [], [], prefix, meta_sd)
            if renamed in targets:
                found[renamed][pattern if pattern is not None else k].append(headers[k])
                pattern_of[renamed] = pattern
        plans: dict[str, _LayerPlan] = {}
        for path, names in routed.items():
            params: dict[str, _ParamPlan] = {}
            fused = recipe.layout == "fused"
            for name in names:
                shape = tuple(int(d) for d in meta_sd[name].shape)
                srcs = found.get(name)
                if not srcs:
                    where = ", ".join(f.name for f in files)
                    raise _load_error(
                        f"{source}: no tensor in {where} gives the routed-expert parameter {name} "
                        f"{list(shape)} (checked with transformers' key mapping of {model.config.model_type})"
                    )
                for s in (s for ss in srcs.values() for s in ss):
                    if dtypes[s.key] not in FLOAT_DTYPES:
                        raise StreamUnavailable(f"{s.file.name}: {s.key} is stored as {dtypes[s.key]}")
                pattern = pattern_of[name]
                conv = by_pattern[pattern] if pattern is not None else None
                plan = _ParamPlan(name, shape, fused, conv, dict(srcs))
                lens = {len(v) for v in srcs.values()}
                if fused and shape[0] != num_experts:
                    raise StreamUnavailable(f"{name}: shape {list(shape)}, no axis of {num_experts} experts")
                if not fused:
                    plan.mode = "whole"
                    if conv is not None:
                        _check_ops(conv.operations, False, name)
                elif conv is not None and type(conv.operations[0]).__name__ == "MergeModulelist":
                    gap = _merge_gap(name, conv, srcs, num_experts)
                    if gap is not None:
                        raise gap
                    plan.mode = "merge"
                    _check_ops(conv.operations, True, name)
                elif lens == {1} and all(v[0].shape[:1] == (num_experts,) for v in srcs.values()):
                    plan.mode = "slice"
                    if conv is not None:
                        _check_ops(conv.operations, False, name)
                else:
                    keys = [s.key for ss in srcs.values() for s in ss][:4]
                    raise StreamUnavailable(f"{name}: made from {keys}... in a way that does not split")
                params[name[len(path) + 1 :]] = plan
            plans[path] = _LayerPlan(path, num_experts, fused, params)
        return cls(plans, recipe, model.config)

    # --- reading -----------------------------------------------------------------------------------------

    def _params_of(self, layer: _LayerPlan, expert: int) -> dict[str, _ParamPlan]:
        if layer.fused:
            return layer.params
        stem = self.recipe.per_expert.format(i=expert) + "."
        return {n[len(stem) :]: p for n, p in layer.params.items() if n.startswith(stem)}

    def _read(self, reads: Iterable[tuple[_Source, int | None]]) -> _Tensors:
        """Read tensors (whole, or the slice [e:e+1] of dim 0), one ``safe_open`` per file and call."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[_Source, int | None]]] = defaultdict(list)
        for src, e in reads:
            by_file[src.file].append((src, e))
        out: dict[tuple[str, int | None], torch.Tensor] = {}
        for f, items in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as h:
                    for src, e in items:
                        out[(src.key, e)] = (
                            h.get_slice(src.key)[e : e + 1] if e is not None else h.get_tensor(src.key)
                        )
            except Exception as exc:  # safetensors raises its own kinds for truncated / corrupt files
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                what = f"{type(exc).__name__}: {first}"
                raise _load_error(f"{f}: cannot read {items[0][0].key} ({what})") from exc
        return out

    def read_expert(self, module_path: str, expert: int) -> ExpertWeights:
        """Expert ``expert`` of the experts module at ``module_path``, canonical float32:
        ``w_in [2I or I, H]``, ``w_out [H, I]``, biases ``[2I or I]`` / ``[H]`` or None (exactly what the
        in-memory path gives for it)."""
        layer = self.layers[module_path]
        params = self._params_of(layer, expert)
        tensors: dict[str, torch.Tensor] = {}
        done: dict[str, torch.Tensor] = {}  # outputs of a one-to-many converter, by target name
        for rel, p in params.items():  # one parameter at a time: only its checkpoint tensors are mapped
            if p.target in done:
                tensors[rel] = done.pop(p.target)
                continue
            picked = {pattern: _pick(p, srcs, expert) for pattern, srcs in p.sources.items()}
            raw = self._read((s, e) for reads in picked.values() for s, e in reads)
            inputs = {pattern: [raw.pop((s.key, e)) for s, e in reads] for pattern, reads in picked.items()}
            t = self._convert(p, inputs, done)  # empties ``inputs``: the converter frees what it consumed
            want = (1, *p.shape[1:]) if p.expert_dim else p.shape
            if tuple(t.shape) != want:
                keys = [s.key for reads in picked.values() for s, _ in reads]
                files = sorted({s.file.name for reads in picked.values() for s, _ in reads})
                raise _load_error(
                    f"{', '.join(files)}: {keys} give {list(t.shape)} for expert {expert} of {p.target}, "
                    f"expected {list(want)}"
                )
            tensors[rel] = t.float()  # what the canonical extraction does first: the source dtype dies here
            del t
        if layer.fused:
            w = canonical_fused(self.recipe, tensors)
            del tensors
            return ExpertWeights(
                w.w_in[0],
                w.w_out[0],
                None if w.b_in is None else w.b_in[0],
                None if w.b_out is None else w.b_out[0],
            )
        where = f"{module_path}.{self.recipe.per_expert.format(i=expert)}"
        return ExpertWeights(*canonical_expert(self.recipe, tensors, where))

    def _convert(
        self, p: _ParamPlan, inputs: dict[str, list[torch.Tensor]], done: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        if p.converter is None:
            ((t,),) = inputs.values()
            inputs.clear()
            return t
        conv = copy.deepcopy(p.converter)
        for pattern, ts in inputs.items():
            conv.collected_tensors[pattern].extend(ts)
        inputs.clear()
        out = conv.convert(p.target, model=None, config=self.config)
        out = {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}
        if p.target not in out:  # pragma: no cover - a converter that names its outputs otherwise
            raise StreamUnavailable(f"{p.target}: transformers' conversion gave {sorted(out)}")
        result = out.pop(p.target)
        done.update(out)
        return result


def iter_experts(layer: MoELayer, stream: ExpertStream | None) -> Iterator[tuple[int, ExpertWeights]]:
    """(e, weights of expert e) of one MoE layer, in order, canonical float32 without the expert axis: read
    from ``stream`` one at a time, or sliced from the layer's in-memory weights (``stream`` None)."""
    for e in range(layer.spec.num_experts):
        if stream is not None:
            yield e, stream.read_expert(layer.spec.module_path, e)
            continue
        w = layer.weights
        yield e, ExpertWeights(
            w.w_in[e],
            w.w_out[e],
            None if w.b_in is None else w.b_in[e],
            None if w.b_out is None else w.b_out[e],
        )
