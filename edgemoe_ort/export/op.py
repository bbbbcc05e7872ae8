"""The torch side of ``OffloadedExpert``: a custom op, its eager math, its fake, and its ONNX translation.

``torch.ops.edgemoe.offloaded_expert(x, topk_indices, topk_weights, layer, ..., store)`` is opaque to
``torch.export``: the routed-expert weights never enter the traced graph, so they never become initializers.
Eagerly it computes exactly what the C++ op computes (docs/op-contract.md), from weights in the canonical
bundle layout (``w_in = [gate; up]`` rows, ``w_out``) held in a process-local registry under the key
``store``. The patched torch model therefore runs on the very tensors the exporter writes into the bundle,
and "patched model == original model" checks the extraction as well as the routing.

A streamed export (:mod:`.stream`) patches a skeleton whose routed experts are on the meta device: its
registry entries are meta tensors (shapes only). Run eagerly, the op then refuses, except inside
:func:`shape_probe` (the exporter's KV-cache shape probe), where it returns zeros: the routed experts' output
is irrelevant to the shapes asked for. Tracing never runs the eager implementation (it uses the fake one).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from edgemoe_ort.export.schema import (
    DOMAIN,
    MANIFEST_DEFAULT,
    OP_TYPE,
    OPSET_VERSION,
    SWIGLU_ALPHA,
    SWIGLU_LIMIT,
    register_schema,
)

OP_QUALNAME = "edgemoe::offloaded_expert"


@dataclass(frozen=True)
class LayerSpec:
    """One MoE layer as the bundle and the node describe it."""

    layer: int  # index into the manifest's layers (execution order), not the transformer block number
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    gated: bool
    activation: str
    alpha: float = SWIGLU_ALPHA
    limit: float = SWIGLU_LIMIT
    has_bias: bool = False
    module_path: str = ""  # where the routed experts live in the HF model (for messages)

    def manifest_entry(self) -> dict[str, object]:
        return {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "gated": self.gated,
            "activation": self.activation,
        }


@dataclass(frozen=True)
class ExpertWeights:
    """All experts of one layer in the canonical layout (float32, row-major ``[out, in]``)."""

    w_in: torch.Tensor  # [E, 2I, H] (gate rows, then up rows) or [E, I, H]
    w_out: torch.Tensor  # [E, H, I]
    b_in: torch.Tensor | None = None  # [E, 2I] or [E, I]
    b_out: torch.Tensor | None = None  # [E, H]


_lock = threading.Lock()
_stores: dict[str, dict[int, ExpertWeights]] = {}
_store_counter = 0


def new_store() -> str:
    """A fresh registry key for one patched model."""
    global _store_counter
    with _lock:
        _store_counter += 1
        key = f"store{_store_counter}"
        _stores[key] = {}
    return key


def put_weights(store: str, layer: int, weights: ExpertWeights) -> None:
    with _lock:
        _stores.setdefault(store, {})[layer] = weights


def get_weights(store: str, layer: int) -> ExpertWeights:
    try:
        return _stores[store][layer]
    except KeyError:
        raise KeyError(
            f"no expert weights registered for store {store!r} layer {layer}: "
            "the model was not patched by edgemoe_ort.export (or the store was released)"
        ) from None


def release_store(store: str) -> None:
    with _lock:
        _stores.pop(store, None)


_probe = threading.local()


@contextmanager
def shape_probe() -> Iterator[None]:
    """Within this block, a layer whose weights are not in memory (meta: a streamed export's skeleton) gives
    zeros instead of failing: for forwards that only look at shapes (the KV-cache probe of :mod:`.trace`)."""
    before = getattr(_probe, "active", False)
    _probe.active = True
    try:
        yield
    finally:
        _probe.active = before


def activate(a: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(a)
    if activation == "gelu":
        return F.gelu(a)
    if activation == "gelu_tanh":
        return F.gelu(a, approximate="tanh")
    if activation == "relu":
        return F.relu(a)
    raise ValueError(f"unknown activation {activation!r}")


def expert_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    *,
    activation: str,
    gated: bool,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """One expert on rows ``x [N, H]`` (the formula of docs/bundle-format.md)."""
    a = F.linear(x, w_in, b_in)
    if activation == "swiglu_oai":
        inter = a.shape[-1] // 2
        g = a[..., :inter].clamp(max=limit)
        u = a[..., inter:].clamp(min=-limit, max=limit)
        h = (u + 1) * (g * torch.sigmoid(alpha * g))
    elif gated:
        inter = a.shape[-1] // 2
        h = activate(a[..., :inter], activation) * a[..., inter:]
    else:
        h = activate(a, activation)
    return F.linear(h, w_out, b_out)


@torch.library.custom_op(OP_QUALNAME, mutates_args=())
def offloaded_expert(
    x: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_weights: torch.Tensor,
    layer: int,
    num_experts: int,
    top_k: int,
    activation: str,
    gated: bool,
    alpha: float,
    limit: float,
    store: str,
) -> torch.Tensor:
    """Eager reference of ``edgemoe.OffloadedExpert`` (same math and index rules as the C++ op)."""
    weights = get_weights(store, layer)
    if weights.w_in.is_meta:
        if getattr(_probe, "active", False):
            return torch.zeros_like(x)
        raise RuntimeError(
            f"layer {layer}: the routed experts of this model are not in memory (a streamed export's "
            "skeleton: they are read from the checkpoint one expert at a time); load it with "
            "edgemoe_ort.export.load_model(..., stream=False) to run it"
        )
    hidden = x.shape[-1]
    if topk_indices.shape[-1] != top_k or topk_weights.shape[-1] != top_k:
        raise ValueError(
            f"layer {layer}: top_k={top_k} but topk_indices has K={topk_indices.shape[-1]}, "
            f"topk_weights has K={topk_weights.shape[-1]}"
        )
    xt = x.reshape(-1, hidden)
    idx = topk_indices.reshape(-1, top_k)
    wts = topk_weights.reshape(-1, top_k)
    bad = (idx < -1) | (idx >= num_experts)
    if bool(bad.any()):
        raise ValueError(f"layer {layer}: expert index outside [-1, {num_experts}): {idx[bad][:4].tolist()}")
    out = torch.zeros_like(xt)
    for e in torch.unique(idx).tolist():
        if e < 0:
            continue
        token, slot = torch.where(idx == e)
        y = expert_ffn(
            xt[token],
            weights.w_in[e],
            weights.w_out[e],
            None if weights.b_in is None else weights.b_in[e],
            None if weights.b_out is None else weights.b_out[e],
            activation=activation,
            gated=gated,
            alpha=alpha,
            limit=limit,
        )
        out.index_add_(0, token, (y * wts[token, slot, None]).to(out.dtype))
    return out.reshape(x.shape)


@offloaded_expert.register_fake
def _offloaded_expert_fake(
    x: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_weights: torch.Tensor,
    layer: int,
    num_experts: int,
    top_k: int,
    activation: str,
    gated: bool,
    alpha: float,
    limit: float,
    store: str,
) -> torch.Tensor:
    return torch.empty_like(x)


def call_offloaded_expert(
    spec: LayerSpec, store: str, x: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Call the op for ``spec`` (all attributes are Python constants taken from the config)."""
    return torch.ops.edgemoe.offloaded_expert(
        x,
        topk_indices.to(torch.int64),
        topk_weights.to(x.dtype),
        spec.layer,
        spec.num_experts,
        spec.top_k,
        spec.activation,
        spec.gated,
        float(spec.alpha),
        float(spec.limit),
        store,
    )


# --- ONNX translation ---------------------------------------------------------------------------------------


def _edgemoe_opset() -> Any:  # onnxscript.values.Opset
    from onnxscript import values

    register_schema()
    return values.Opset(DOMAIN, OPSET_VERSION)


def offloaded_expert_onnx(
    x: Any,  # onnxscript / onnx_ir values while the exporter builds the graph
    topk_indices: Any,
    topk_weights: Any,
    layer: int,
    num_experts: int,
    top_k: int,
    activation: str,
    gated: bool,
    alpha: float,
    limit: float,
    store: str,
) -> Any:
    """Translation used by ``torch.onnx.export(dynamo=True)``: emits one ``edgemoe.OffloadedExpert`` node.

    ``store`` is a host-side registry key and is dropped; ``manifest`` is always the bundle's manifest.
    """
    attrs: dict[str, object] = {
        "layer": int(layer),
        "num_experts": int(num_experts),
        "top_k": int(top_k),
        "activation": str(activation),
        "gated": int(bool(gated)),
        "manifest": MANIFEST_DEFAULT,
    }
    if activation == "swiglu_oai":
        attrs["alpha"] = float(alpha)
        attrs["limit"] = float(limit)
    return getattr(_edgemoe_opset(), OP_TYPE)(x, topk_indices, topk_weights, **attrs)


def custom_translation_table() -> dict[object, object]:
    register_schema()
    return {torch.ops.edgemoe.offloaded_expert.default: offloaded_expert_onnx}
