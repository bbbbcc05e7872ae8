"""A bundle as a transformers model (host side: imports torch and transformers; the device runtime does not).

:class:`EdgeMoEForCausalLM` wraps a decoder-only bundle's :class:`~edgemoe_ort.runtime.MoEModel` (the same
ONNX Runtime session, expert cache and budget) behind transformers' model interface, in the spirit of
optimum's ``ORTModelForCausalLM``. ``forward()`` returns a ``CausalLMOutputWithPast`` with a ``DynamicCache``,
so ``GenerationMixin.generate()`` (greedy, sampling, beam search, logits processors, stopping criteria),
pipelines and lm-evaluation-harness's HF adapter run a bundle as they run any causal LM.

>>> from edgemoe_ort.hf import EdgeMoEForCausalLM
>>> model = EdgeMoEForCausalLM.from_pretrained("bundles/tiny", budget="25%")
>>> tok = model.tokenizer()                                    # the bundle's tokenizer, as transformers'
>>> out = model.generate(**tok("def fib(n):", return_tensors="pt"), max_new_tokens=32, do_sample=False)

The graph's KV cache is copied between numpy and torch without copies (``torch.from_numpy`` and back); the
cache's layout is the graph's, ``[batch, kv_heads, seq, head_dim]`` per layer, as transformers' own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from edgemoe_ort.runtime import MoEModel, RuntimeOptions
from edgemoe_ort.runtime.generate import GenerationError

__all__ = ["EdgeMoEForCausalLM"]


def _config_of(bundle_config: dict[str, Any]) -> PretrainedConfig:
    """The transformers config of the checkpoint the bundle was exported from (its ``config.json``)."""
    cfg = dict(bundle_config)
    model_type = cfg.pop("model_type", None)
    if isinstance(model_type, str):
        try:
            return AutoConfig.for_model(model_type, **cfg)
        except (KeyError, ValueError):  # a family this transformers does not know: the generic config
            pass
    return PretrainedConfig(**cfg)


class EdgeMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """A decoder-only bundle behind transformers' causal-LM interface. Make it with :meth:`from_pretrained`.

    It has no torch parameters (the weights are in the ONNX graph and the expert store); it runs on the CPU.
    ``close()`` (or ``with``) frees the session and the expert cache at once.
    """

    config_class = PretrainedConfig
    main_input_name = "input_ids"
    base_model_prefix = "edgemoe"
    _supports_cache_class = True
    _is_stateful = False

    def __init__(self, config: PretrainedConfig, model: MoEModel) -> None:
        super().__init__(config)
        self.moe = model
        self._input_names = set(model._input_names)
        self._past_names = [name for name, _, _ in model._past_specs]  # past_key_values.L.key / .value
        self._layers = sorted({self._layer_of(n) for n in self._past_names})
        missing = [f"present.{L}.{kv}" for L in self._layers for kv in ("key", "value")
                   if f"present.{L}.{kv}" not in model._output_names]
        if missing or len(self._past_names) != 2 * len(self._layers):
            raise GenerationError(
                f"{model.bundle.graph_path('decoder')}: expected past_key_values.L.key/value inputs and "
                f"present.L.key/value outputs per layer, found inputs {self._past_names} (missing {missing})"
            )
        self._empty_past = model._empty_past
        self.generation_config = self._generation_config(model)

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        bundle_dir: str | Path,
        *,
        budget: int | float | str | None = None,
        options: RuntimeOptions | None = None,
        **runtime_options: Any,
    ) -> EdgeMoEForCausalLM:
        """Open the decoder-only bundle at ``bundle_dir``. ``budget`` (bytes, ``"25%"``, ``"300MB"``) and any
        other :class:`~edgemoe_ort.runtime.RuntimeOptions` field may be given as keywords, or ``options`` as a
        whole (not both). Errors name the bundle file or the option, as :meth:`MoEModel.load`'s do."""
        if options is not None and (budget is not None or runtime_options):
            raise GenerationError("from_pretrained: pass options=RuntimeOptions(...) or keywords, not both")
        if options is None:
            kw = dict(runtime_options)
            if budget is not None:
                kw["budget"] = budget
            try:
                options = RuntimeOptions(**kw)
            except TypeError as exc:
                raise GenerationError(f"from_pretrained: {exc} (expected RuntimeOptions fields)") from None
        moe = MoEModel.load(bundle_dir, options)
        try:
            return cls(_config_of(moe.bundle.config), moe)
        except BaseException:
            moe.close()
            raise

    @staticmethod
    def _generation_config(model: MoEModel) -> GenerationConfig:
        tok = model.bundle.tokenizer_path
        if tok is not None and (tok / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(tok)
        return GenerationConfig.from_model_config(_config_of(model.bundle.config))

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The bundle's tokenizer (its ``tokenizer/`` folder) as a transformers tokenizer."""
        tok = self.moe.bundle.tokenizer_path
        if tok is None:
            raise GenerationError(f"{self.moe.bundle.path}: the bundle has no tokenizer/ folder")
        return PreTrainedTokenizerFast.from_pretrained(str(tok))

    # -- what transformers asks of a model --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def can_generate(self) -> bool:  # type: ignore[override]
        return True

    def get_input_embeddings(self) -> Any:  # the embeddings live in the graph
        raise NotImplementedError("a bundle's embeddings are inside its ONNX graph")

    def _init_weights(self, module: Any) -> None:  # no torch weights to initialize
        pass

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """One pass of the bundle's decoder graph: logits ``[B, S, V]`` of ``input_ids [B, S]`` after
        ``past_key_values`` (the KV cache of earlier passes), and the cache including this pass.
        ``attention_mask [B, past + S]`` (left padding) and ``position_ids`` are fed to the graph where it has
        them (else ones and positions from the cache length); ``labels`` give the shifted cross-entropy."""
        if kwargs.get("inputs_embeds") is not None:
            raise GenerationError("inputs_embeds: a bundle takes input_ids (its embeddings are in the graph)")
        ids = input_ids.detach().to("cpu", torch.int64).numpy()
        batch, seq = ids.shape
        past = self._past_arrays(past_key_values, batch)
        past_len = next(iter(past.values())).shape[2] if past else 0
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        if "attention_mask" in self._input_names:
            if attention_mask is not None:
                mask = attention_mask.detach().to("cpu", torch.int64).numpy()
                if mask.shape != (batch, past_len + seq):
                    raise GenerationError(
                        f"attention_mask: expected shape {(batch, past_len + seq)} (batch, past + new "
                        f"tokens), found {tuple(mask.shape)}"
                    )
            else:
                mask = np.ones((batch, past_len + seq), np.int64)
            feeds["attention_mask"] = np.ascontiguousarray(mask)
        if "position_ids" in self._input_names:
            if position_ids is not None:
                pos = position_ids.detach().to("cpu", torch.int64).numpy()
            elif attention_mask is not None:  # as transformers' own models: positions count unmasked tokens
                pos = (np.cumsum(feeds["attention_mask"], axis=1) - 1).clip(min=0)[:, past_len:]
            else:
                pos = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
            feeds["position_ids"] = np.ascontiguousarray(pos, dtype=np.int64)
        feeds.update(past)
        self.moe._require_open()
        outputs = self.moe.session.run(None, feeds)
        named = dict(zip(self.moe._output_names, outputs, strict=True))
        logits = torch.from_numpy(named["logits"])
        cache = None
        if use_cache is not False and self._layers:
            cache = DynamicCache()
            for layer in self._layers:  # the graph's present.L.* hold past + this pass: they become layer L
                key, value = named[f"present.{layer}.key"], named[f"present.{layer}.value"]
                cache.update(torch.from_numpy(key), torch.from_numpy(value), layer)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(torch.int64),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    # -- the cache: graph inputs past_key_values.L.key/value <-> DynamicCache layer L -------------------
    @staticmethod
    def _layer_of(name: str) -> int:
        return int(name.split(".")[1])

    def _past_arrays(self, cache: DynamicCache | None, batch: int) -> dict[str, np.ndarray]:
        if cache is None or cache.get_seq_length() == 0:
            return self._empty_past(batch)
        out: dict[str, np.ndarray] = {}
        for name in self._past_names:
            layer = cache.layers[self._layer_of(name)]
            t = layer.keys if name.endswith(".key") else layer.values
            out[name] = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
        return out

    # -- lifetime ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the session and the expert cache (the model cannot run afterwards)."""
        self.moe.close()

    def __enter__(self) -> EdgeMoEForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
