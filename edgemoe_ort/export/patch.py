"""Stage 2: patch the HF model so that every routed-experts module calls ``edgemoe::offloaded_expert``.

* fused families (experts stored as ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``): a new experts
  implementation is registered in transformers' ``ALL_EXPERTS_FUNCTIONS`` and selected with
  ``model.set_experts_implementation`` — the HF block (router, shared expert, renormalisation...) runs as is;
* per-expert families (SwitchTransformers: a ModuleDict of ``wi`` / ``wo`` Linear): the block's ``experts``
  module is swapped for :class:`SwitchOffloadedExperts` (capacity-dropped tokens get index -1, weight 0).

Routers and shared experts stay dense. The routed-expert weights are extracted to the canonical bundle layout
(``w_in = [gate; up]`` rows, ``w_out``; GPT-OSS de-transposed and de-interleaved) and the patched model runs
on exactly those tensors, so a patched-vs-original comparison validates the extraction too.

A streamed export's skeleton (:mod:`.stream`) has its routed experts on the meta device: the same extraction
then gives meta tensors (the layer shapes) and the patched model traces but does not run eagerly; the
experts are read later, one at a time, through the same canonical functions (:func:`canonical_fused`,
:func:`canonical_expert`), so both paths write the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from edgemoe_ort.export.op import (
    ExpertWeights,
    LayerSpec,
    call_offloaded_expert,
    new_store,
    put_weights,
    release_store,
)
from edgemoe_ort.export.recipes import Recipe, UnsupportedModelError
from edgemoe_ort.export.schema import ACTIVATIONS, SWIGLU_ALPHA, SWIGLU_LIMIT

EXPERTS_IMPLEMENTATION = "edgemoe_offloaded"

#: HF activation names -> the op's activation names (anything else is refused)
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "swiglu_oai": "swiglu_oai",
}


@dataclass
class MoELayer:
    spec: LayerSpec
    role: str  # graph role that contains this layer
    block_path: str
    weights: ExpertWeights
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # router / shared-expert params (must stay)


@dataclass
class PatchedModel:
    model: PreTrainedModel
    recipe: Recipe
    store: str
    layers: list[MoELayer]

    def layers_for(self, role: str) -> list[MoELayer]:
        return [m for m in self.layers if m.role == role]

    def release(self) -> None:
        """Drop the canonical weights from the op's registry (the model can no longer run)."""
        release_store(self.store)

    def drop_weights(self) -> None:
        """Free every parameter and buffer of the torch model (their storage becomes empty) and the layers'
        ``dense`` copies: after tracing, the graphs hold their own copy and a streamed export needs the torch
        model no more. The model can no longer run."""
        empty = torch.empty(0)
        with torch.no_grad():
            for t in (*self.model.parameters(), *self.model.buffers()):
                if not t.is_meta:
                    t.data = empty
        for m in self.layers:
            m.dense = {}


class SwitchOffloadedExperts(nn.Module):
    """Replaces ``SwitchTransformersExperts``: one ``offloaded_expert`` call per block.

    Receives the router's capacity-masked one-hot ``[T, 1, E]`` and the max probability ``[T, 1]``; a token
    dropped by the capacity limit (all-zero row) gets index -1 and weight 0, so its MoE output is 0 like HF.
    """

    def __init__(self, spec: LayerSpec, store: str) -> None:
        super().__init__()
        self.spec = spec
        self.store = store
        self.num_experts = spec.num_experts

    def forward(
        self, hidden_states: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        sel = selected_experts.reshape(-1, self.spec.num_experts).to(torch.int64)
        kept = sel.sum(dim=-1, keepdim=True) > 0
        ids = torch.arange(self.spec.num_experts, dtype=torch.int64, device=sel.device)
        index = (sel * ids).sum(dim=-1, keepdim=True)
        index = torch.where(kept, index, torch.full_like(index, -1))
        weight = routing_weights.reshape(-1, 1).to(hidden_states.dtype) * kept.to(hidden_states.dtype)
        return call_offloaded_expert(self.spec, self.store, hidden_states, index, weight)


def _edgemoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    spec: LayerSpec | None = getattr(self, "_edgemoe_spec", None)
    if spec is None:
        raise RuntimeError(
            f"experts_implementation={EXPERTS_IMPLEMENTATION!r} is set but this {type(self).__name__} "
            "was not patched by edgemoe_ort.export.patch_model"
        )
    return call_offloaded_expert(spec, self._edgemoe_store, hidden_states, top_k_index, top_k_weights)


def _register_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if ALL_EXPERTS_FUNCTIONS.get(EXPERTS_IMPLEMENTATION) is not _edgemoe_experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _edgemoe_experts_forward)


def _iter_blocks(model: nn.Module, recipe: Recipe) -> Iterator[tuple[str, str, nn.Module]]:
    """(role, path, block) of every MoE block, in recipe graph order then module order."""
    for graph in recipe.graphs:
        regexes = graph.block_regexes()
        for path, module in model.named_modules():
            if any(r.match(path) for r in regexes) and hasattr(module, recipe.experts):
                yield graph.role, path, module


def _activation(recipe: Recipe, config: object) -> str:
    raw = recipe.activation.resolve(config, "moe.activation")
    act = HF_ACTIVATIONS.get(str(raw))
    if act is None or act not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{recipe.model_type}: expert activation {raw!r} is not supported by OffloadedExpert "
            f"(supported HF names: {', '.join(sorted(HF_ACTIVATIONS))})"
        )
    return act


def _check_fused_layout(recipe: Recipe, experts: nn.Module, path: str) -> None:
    expected = {
        "has_gate": recipe.gated,
        "is_transposed": recipe.transposed,
        "is_concatenated": recipe.gate_up == "concatenated",
        "has_bias": recipe.bias,
        "has_post_expert_norm": False,
    }
    for flag, want in expected.items():
        found = getattr(experts, flag, None)
        if found is None:
            raise UnsupportedModelError(
                f"{recipe.model_type}: {path} ({type(experts).__name__}) is not a transformers fused-experts "
                f"module (no {flag}); recipe {recipe.path.name} says layout = 'fused'"
            )
        if bool(found) != want:
            raise UnsupportedModelError(
                f"{recipe.model_type}: {path}.{flag} is {found} but recipe {recipe.path.name} implies {want}"
            )
    from transformers.integrations.moe import _default_apply_gate

    custom_gate = type(experts)._apply_gate is not _default_apply_gate
    if recipe.gated and custom_gate != (recipe.activation.literal == "swiglu_oai"):
        raise UnsupportedModelError(
            f"{recipe.model_type}: {type(experts).__name__} has "
            f"{'a custom' if custom_gate else 'the default'} gating function, which recipe "
            f"{recipe.path.name} (activation {recipe.activation}) does not describe"
        )


def fused_param_names(recipe: Recipe) -> tuple[str, ...]:
    """The parameters of a fused experts module that hold routed-expert weights (in the HF model)."""
    stem_in = "gate_up_proj" if recipe.gated else "up_proj"
    names = (stem_in, "down_proj")
    return (*names, f"{stem_in}_bias", "down_proj_bias") if recipe.bias else names


def canonical_fused(recipe: Recipe, params: Mapping[str, torch.Tensor]) -> ExpertWeights:
    """The canonical layout of fused experts tensors ``params`` (names of :func:`fused_param_names`, any
    number of experts on dim 0: the whole layer, or a ``[1, ...]`` slice of one expert)."""
    stem_in = "gate_up_proj" if recipe.gated else "up_proj"
    w_in = params[stem_in].detach().float()
    w_out = params["down_proj"].detach().float()
    b_in = b_out = None
    if recipe.bias:
        b_in = params[f"{stem_in}_bias"].detach().float()
        b_out = params["down_proj_bias"].detach().float()
    if recipe.transposed:  # [E, in, out] -> [E, out, in]
        w_in = w_in.transpose(1, 2)
        w_out = w_out.transpose(1, 2)
    if recipe.gated and recipe.gate_up == "interleaved":  # rows g0 u0 g1 u1 ... -> [gate; up]
        w_in = torch.cat([w_in[:, 0::2], w_in[:, 1::2]], dim=1)
        if b_in is not None:
            b_in = torch.cat([b_in[:, 0::2], b_in[:, 1::2]], dim=1)
    return ExpertWeights(
        w_in.contiguous(),
        w_out.contiguous(),
        None if b_in is None else b_in.contiguous(),
        None if b_out is None else b_out.contiguous(),
    )


def _extract_fused(recipe: Recipe, experts: nn.Module) -> ExpertWeights:
    return canonical_fused(recipe, {n: getattr(experts, n) for n in fused_param_names(recipe)})


def per_expert_param_names(recipe: Recipe) -> tuple[str, ...]:
    """Weights and biases of one expert of a per-expert experts module, relative to the expert's module."""
    mods = (*recipe.w_in, recipe.w_out)
    return tuple(f"{m}.{p}" for m in mods for p in ("weight", "bias"))


def canonical_expert(
    recipe: Recipe, params: Mapping[str, torch.Tensor | None], where: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(w_in, w_out, b_in, b_out) of ONE expert of a per-expert layout, from its tensors ``params`` (names of
    :func:`per_expert_param_names`; a missing or None bias = no bias). ``where`` names it in messages."""
    w_in = torch.cat([params[f"{n}.weight"].detach().float() for n in recipe.w_in], dim=0)
    w_out = params[f"{recipe.w_out}.weight"].detach().float()
    biases = [params.get(f"{n}.bias") for n in (*recipe.w_in, recipe.w_out)]
    if not any(b is not None for b in biases):
        return w_in, w_out, None, None
    if not recipe.bias:
        raise UnsupportedModelError(f"{recipe.model_type}: {where} has biases; recipe says none")
    if any(b is None for b in biases):
        raise UnsupportedModelError(f"{recipe.model_type}: {where}: some of its projections have no bias")
    b_in = torch.cat([b.detach().float() for b in biases[:-1]], dim=0)  # type: ignore[union-attr]
    return w_in, w_out, b_in, biases[-1].detach().float()  # type: ignore[union-attr]


def _extract_per_expert(recipe: Recipe, experts: nn.Module, num_experts: int, path: str) -> ExpertWeights:
    w_in, w_out, b_in, b_out = [], [], [], []
    for e in range(num_experts):
        name = recipe.per_expert.format(i=e)
        try:
            expert = experts.get_submodule(name)
            mods = {n: expert.get_submodule(n) for n in (*recipe.w_in, recipe.w_out)}
        except AttributeError as err:
            raise UnsupportedModelError(f"{recipe.model_type}: {path}: {err}") from None
        params = {f"{n}.{p}": getattr(m, p, None) for n, m in mods.items() for p in ("weight", "bias")}
        wi, wo, bi, bo = canonical_expert(recipe, params, f"{path}.{name}")
        w_in.append(wi)
        w_out.append(wo)
        if bi is not None:
            b_in.append(bi)
            b_out.append(bo)
    return ExpertWeights(
        torch.stack(w_in).contiguous(),
        torch.stack(w_out).contiguous(),
        torch.stack(b_in).contiguous() if b_in else None,
        torch.stack(b_out).contiguous() if b_out else None,
    )


def _dense_params(recipe: Recipe, block: nn.Module, path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for child in (recipe.router, *recipe.shared_expert):
        try:
            module = block.get_submodule(child)
        except AttributeError:
            raise UnsupportedModelError(
                f"{recipe.model_type}: {path} has no {child!r} (recipe {recipe.path.name})"
            ) from None
        for name, p in module.named_parameters():
            out[f"{path}.{child}.{name}"] = p.detach()
    return out


def patch_model(model: PreTrainedModel, recipe: Recipe) -> PatchedModel:
    """Patch ``model`` in place (see module doc). Returns the MoE layers in manifest order.

    Routed experts on the meta device (a streamed skeleton) give meta ``MoELayer.weights``: shapes only.
    """
    if model.training:
        raise ValueError("patch_model expects a model in eval mode (router jitter / dropout)")
    config = model.config
    top_k = recipe.top_k.resolve(config, "moe.top_k")
    num_experts_cfg = recipe.num_experts.resolve(config, "moe.num_experts")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise UnsupportedModelError(f"{recipe.model_type}: top_k must be a positive int, found {top_k!r}")
    activation = _activation(recipe, config)
    alpha = (
        float(recipe.swiglu_alpha.resolve(config, "moe.swiglu_alpha"))
        if recipe.swiglu_alpha
        else SWIGLU_ALPHA
    )
    limit = (
        float(recipe.swiglu_limit.resolve(config, "moe.swiglu_limit"))
        if recipe.swiglu_limit
        else SWIGLU_LIMIT
    )

    store = new_store()
    layers: list[MoELayer] = []
    for role, path, block in list(_iter_blocks(model, recipe)):
        experts = block.get_submodule(recipe.experts)
        if recipe.layout == "fused":
            _check_fused_layout(recipe, experts, f"{path}.{recipe.experts}")
            weights = _extract_fused(recipe, experts)
        else:
            weights = _extract_per_expert(recipe, experts, int(num_experts_cfg), f"{path}.{recipe.experts}")
        num_experts, rows, hidden = weights.w_in.shape
        intermediate = weights.w_out.shape[2]
        if num_experts != num_experts_cfg:
            raise UnsupportedModelError(
                f"{recipe.model_type}: {path}: {num_experts} experts in the weights, "
                f"config says {num_experts_cfg}"
            )
        if rows != (2 * intermediate if recipe.gated else intermediate) or weights.w_out.shape[1] != hidden:
            raise UnsupportedModelError(
                f"{recipe.model_type}: {path}: inconsistent expert shapes w_in {tuple(weights.w_in.shape)}, "
                f"w_out {tuple(weights.w_out.shape)} (gated={recipe.gated})"
            )
        spec = LayerSpec(
            layer=len(layers),
            num_experts=int(num_experts),
            top_k=top_k,
            hidden=int(hidden),
            intermediate=int(intermediate),
            gated=recipe.gated,
            activation=activation,
            alpha=alpha,
            limit=limit,
            has_bias=weights.b_in is not None,
            module_path=f"{path}.{recipe.experts}",
        )
        put_weights(store, spec.layer, weights)
        layers.append(MoELayer(spec, role, path, weights, _dense_params(recipe, block, path)))
        if recipe.layout == "fused":
            experts._edgemoe_spec = spec
            experts._edgemoe_store = store
        else:
            block.set_submodule(recipe.experts, SwitchOffloadedExperts(spec, store))

    if not layers:
        release_store(store)
        raise UnsupportedModelError(
            f"{recipe.model_type}: no MoE block found at {[g.blocks for g in recipe.graphs]} "
            f"(recipe {recipe.path.name})"
        )
    if recipe.layout == "fused":
        _register_implementation()
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        for layer in layers:
            experts = model.get_submodule(layer.spec.module_path)
            impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
            if impl != EXPERTS_IMPLEMENTATION:
                release_store(store)
                raise RuntimeError(
                    f"{recipe.model_type}: set_experts_implementation did not reach {layer.spec.module_path} "
                    f"(its implementation is {impl!r})"
                )
    return PatchedModel(model, recipe, store, layers)
