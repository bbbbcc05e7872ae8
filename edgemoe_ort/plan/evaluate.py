"""The planner's evaluator: perplexity of the HF model on calibration tokens with each routed expert's
weights replaced by ``dequantize(quantize(w, dtype, group_size))`` (edgemoe_ort.quant).

The model is loaded in float32 and patched as the exporter patches it (edgemoe_ort/export/patch.py): every
routed-experts module calls the ``offloaded_expert`` op, whose eager implementation computes from weights in
the canonical bundle layout (``w_in = [gate; up]``, ``w_out``) held in a registry. The evaluator overwrites
those tensors in place, so what is measured runs on exactly the numbers the bundle's kernels dequantize to
(the same quantizer, the same layout, bit for bit); the dense part stays float32 (as ``--dense-bits 32``,
the exporter's default). Only experts whose dtype changes are rewritten; each (expert, dtype) is quantized
once and kept (below :data:`CACHE_BYTES`).

Prefix cache (:meth:`Calibrator.cache_prefix`): the loss ranking changes one expert at a time from a fixed
base configuration, so the decoder layers before that expert's layer compute exactly what they computed in
the base pass. The output of the decoder layer before each MoE layer's is kept per batch (below
:data:`PREFIX_BYTES`), and a pass ``nll(..., from_layer=l)`` replaces the earlier decoder layers' forward by
that cached output: the same numbers, bit for bit, without their compute (tests/test_plan.py checks it).

:meth:`Calibrator.proxy_errors` is the one pass of the proxy ranking: with every expert at one level, it
records for each expert the inputs the router sends it and their gate weights, and sums the squared error
its output would get at another level, weighted by gate weight (no forward pass per expert).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgemoe_ort.plan.format import PlanLayer, expert_digest
from edgemoe_ort.quant import dequantize, quantize

__all__ = ["CACHE_BYTES", "Calibrator", "Key"]

Key = tuple[int, int]
#: dequantized experts kept for reuse, at most this many bytes (beyond: quantized again when needed)
CACHE_BYTES = 2 << 30
#: windows per forward pass
BATCH = 8
#: decoder-layer outputs the prefix cache keeps, at most this many bytes (beyond: no prefix cache)
PREFIX_BYTES = 1 << 30


class Calibrator:
    """A loaded, patched model and its calibration windows (``[n, window]`` int64)."""

    def __init__(self, loaded: Any, windows: np.ndarray, *, group_size: int) -> None:
        from edgemoe_ort.export.patch import patch_model

        if loaded.recipe.architecture == "encoder_decoder":
            raise ValueError(f"{loaded.source}: an encoder-decoder model; edgemoe-plan measures decoder-only "
                             "models (perplexity of a text continuation)")
        self.loaded = loaded
        self.patched = patch_model(loaded.model, loaded.recipe)
        self.group_size = group_size
        self.windows = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
        self.layers: list[PlanLayer] = []
        self._orig: dict[Key, tuple[np.ndarray, np.ndarray]] = {}
        self.digests: dict[Key, str] = {}
        for m in self.patched.layers:
            s, w = m.spec, m.weights
            self.layers.append(PlanLayer(s.layer, s.num_experts, s.hidden, s.intermediate, s.gated,
                                         w.b_in is not None, s.module_path))
            for e in range(s.num_experts):
                w_in = w.w_in[e].detach().numpy().astype(np.float32, copy=True)
                w_out = w.w_out[e].detach().numpy().astype(np.float32, copy=True)
                self._orig[(s.layer, e)] = (w_in, w_out)
                self.digests[(s.layer, e)] = expert_digest(
                    w_in, w_out,
                    None if w.b_in is None else w.b_in[e].detach().numpy(),
                    None if w.b_out is None else w.b_out[e].detach().numpy())
        self.keys: list[Key] = list(self._orig)
        self.current: dict[Key, str] = dict.fromkeys(self.keys, "fp32")  # as loaded: float32, exact
        self._cache: dict[tuple[Key, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached_bytes = 0
        self.passes = 0  #: forward passes over the calibration windows so far
        self._decoder = _decoder_layers(self.patched)
        self._prefix: dict[int, list[Any]] = {}  # decoder-layer index -> its output per batch (base pass)
        self._prefix_base: dict[Key, str] | None = None
        self._batch = 0

    @property
    def tokens(self) -> int:
        """Tokens scored per pass (each window's first token is not)."""
        return int(self.windows.shape[0] * (self.windows.shape[1] - 1))

    def close(self) -> None:
        self.patched.release()

    # -- weights ----------------------------------------------------------------------------------------
    def _dequantized(self, key: Key, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._cache.get((key, dtype))
        if hit is not None:
            return hit
        w_in, w_out = self._orig[key]
        pair = (torch.from_numpy(dequantize(quantize(w_in, dtype, self.group_size))),
                torch.from_numpy(dequantize(quantize(w_out, dtype, self.group_size))))
        size = int(w_in.nbytes + w_out.nbytes)
        if self._cached_bytes + size <= CACHE_BYTES:
            self._cache[(key, dtype)] = pair
            self._cached_bytes += size
        return pair

    def assign(self, dtypes: Mapping[Key, str]) -> None:
        """Put every expert of ``dtypes`` at its dtype (the others keep theirs)."""
        with torch.no_grad():
            for key, dtype in dtypes.items():
                if self.current[key] == dtype:
                    continue
                w = self.patched.layers[key[0]].weights
                w_in, w_out = self._dequantized(key, dtype)
                w.w_in[key[1]].copy_(w_in)
                w.w_out[key[1]].copy_(w_out)
                self.current[key] = dtype

    def uniform(self, dtype: str) -> dict[Key, str]:
        return dict.fromkeys(self.keys, dtype)

    # -- measurements -----------------------------------------------------------------------------------
    def nll(self, dtypes: Mapping[Key, str] | None = None, *, from_layer: int | None = None) -> float:
        """Mean negative log-likelihood (nats per token) with ``dtypes`` assigned. ``from_layer`` (a MoE
        layer): the decoder layers before its own take their output from the prefix cache, if it holds it and
        every expert of the earlier MoE layers is as in the cached base configuration."""
        if dtypes is not None:
            self.assign(dtypes)
        skip = self._skippable(from_layer)
        total, n = 0.0, 0
        model = self.patched.model
        with torch.inference_mode(), self._skipping(skip):
            for b, i in enumerate(range(0, self.windows.shape[0], BATCH)):
                self._batch = b
                ids = self.windows[i:i + BATCH]
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="sum"))
                n += ids[:, 1:].numel()
        self.passes += 1
        return total / n

    def perplexity(self, dtypes: Mapping[Key, str] | None = None, *, from_layer: int | None = None) -> float:
        return math.exp(self.nll(dtypes, from_layer=from_layer))

    # -- prefix cache -----------------------------------------------------------------------------------
    def cache_prefix(self, base: Mapping[Key, str]) -> float | None:
        """One pass with ``base`` assigned that keeps, per batch, the output of the decoder layer before each
        MoE layer's; returns its perplexity (None: no prefix cache for this model, or too large)."""
        self._prefix, self._prefix_base = {}, None
        if self._decoder is None:
            return None
        mlist, index = self._decoder
        wanted = sorted({d - 1 for d in index if d > 0})
        hidden = max(lay.hidden for lay in self.layers)
        if len(wanted) * self.windows.numel() * hidden * 4 > PREFIX_BYTES or not wanted:
            return None
        store: dict[int, list[Any]] = {d: [] for d in wanted}
        hooks = [mlist[d].register_forward_hook(
            lambda _m, _a, out, d=d: store[d].append(_detached(out))) for d in wanted]
        try:
            ppl = self.perplexity(base)
        finally:
            for h in hooks:
                h.remove()
        self._prefix, self._prefix_base = store, dict(base)
        return ppl

    def _skippable(self, from_layer: int | None) -> int:
        """How many leading decoder layers a pass from MoE layer ``from_layer`` may take from the cache."""
        if from_layer is None or self._decoder is None or self._prefix_base is None:
            return 0
        d = self._decoder[1][from_layer]
        if d == 0 or (d - 1) not in self._prefix:
            return 0
        earlier = {lay.layer for lay in self.layers if self._decoder[1][lay.layer] < d}
        if any(self.current[k] != self._prefix_base[k] for k in self.keys if k[0] in earlier):
            return 0
        return d

    @contextmanager
    def _skipping(self, count: int) -> Iterator[None]:
        if count == 0:
            yield
            return
        mlist = self._decoder[0]  # type: ignore[index]
        cached = self._prefix[count - 1]
        for j in range(count):
            mlist[j].forward = lambda *a, **k: cached[self._batch]  # the instance's: nn.Module calls it
        try:
            yield
        finally:
            for j in range(count):
                del mlist[j].forward

    def proxy_errors(self, at: Mapping[Key, str], low: str) -> tuple[dict[Key, float], float]:
        """One pass with ``at`` assigned: per expert, ``sum_t ||g_t (f_low(x_t) - f(x_t))||^2`` over the
        calibration tokens t routed to it (x_t its input, g_t its gate weight), divided by the layer's
        ``sum_t ||MoE output_t||^2``; also returns the pass's perplexity."""
        from edgemoe_ort.export.op import expert_ffn

        self.assign(at)
        err = dict.fromkeys(self.keys, 0.0)
        energy = [0.0] * len(self.layers)
        low_w = {key: self._dequantized(key, low) for key in self.keys}

        def record(spec: Any, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, y: torch.Tensor) -> None:
            w = self.patched.layers[spec.layer].weights
            xt = x.reshape(-1, x.shape[-1]).float()
            idx = idx.reshape(-1, spec.top_k)
            wts = wts.reshape(-1, spec.top_k).float()
            energy[spec.layer] += float(y.float().pow(2).sum())
            kw = dict(activation=spec.activation, gated=spec.gated, alpha=spec.alpha, limit=spec.limit)
            for e in torch.unique(idx).tolist():
                if e < 0:
                    continue
                token, slot = torch.where(idx == e)
                xe = xt[token]
                b_in = None if w.b_in is None else w.b_in[e]
                b_out = None if w.b_out is None else w.b_out[e]
                y_at = expert_ffn(xe, w.w_in[e], w.w_out[e], b_in, b_out, **kw)
                lw_in, lw_out = low_w[(spec.layer, e)]
                y_low = expert_ffn(xe, lw_in, lw_out, b_in, b_out, **kw)
                err[(spec.layer, e)] += float(((y_low - y_at) * wts[token, slot, None]).pow(2).sum())

        with _spy_on_experts(record):
            ppl = math.exp(self.nll())
        return {k: v / energy[k[0]] if energy[k[0]] > 0 else 0.0 for k, v in err.items()}, ppl


def _detached(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return out


def _decoder_layers(patched: Any) -> tuple[torch.nn.ModuleList, list[int]] | None:
    """The ModuleList of decoder layers and, per MoE layer, the index of the decoder layer holding its block
    (``model.layers.3.mlp`` -> 3); None if the blocks are not children of one list's items."""
    parent, index = None, []
    for m in patched.layers:
        layer_path = m.block_path.rpartition(".")[0]
        plist, _, num = layer_path.rpartition(".")
        if not num.isdigit() or parent not in (None, plist):
            return None
        parent = plist
        index.append(int(num))
    mlist = patched.model.get_submodule(parent) if parent else None
    if not isinstance(mlist, torch.nn.ModuleList) or index != sorted(index):
        return None
    return mlist, index


@contextmanager
def _spy_on_experts(record: Callable[..., None]) -> Iterator[None]:
    """Within the block, every routed-experts call of a patched model also calls ``record(spec, x,
    topk_indices, topk_weights, output)`` (the call goes through edgemoe_ort.export.patch's
    ``call_offloaded_expert``, looked up at call time)."""
    import edgemoe_ort.export.patch as patch

    original = patch.call_offloaded_expert

    def spy(spec: Any, store: str, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        y = original(spec, store, x, idx, wts)
        record(spec, x, idx, wts, y)
        return y

    patch.call_offloaded_expert = spy  # type: ignore[assignment]
    try:
        yield
    finally:
        patch.call_offloaded_expert = original  # type: ignore[assignment]
