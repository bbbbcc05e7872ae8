"""Stage 3a: flat-tensor wrappers around the (patched) HF model, the signatures the ONNX graphs get.

Names follow optimum's ONNX conventions:

* causal LM, role ``decoder``: inputs ``input_ids [b, s]``, ``attention_mask [b, p+s]``,
  ``position_ids [b, s]``,
  ``past_key_values.{i}.key / .value [b, kv_heads, p, head_dim]``; outputs ``logits [b, s, vocab]``,
  ``present.{i}.key / .value [b, kv_heads, p+s, head_dim]``. The first step passes past tensors with p = 0.
* encoder-decoder (Switch), role ``encoder``: ``input_ids``, ``attention_mask`` -> ``last_hidden_state``;
  role ``decoder``: ``input_ids`` (decoder ids), ``encoder_attention_mask``, ``encoder_hidden_states``,
  ``past_key_values.{i}.decoder.key / .value`` (self-attention) -> ``logits``,
  ``present.{i}.decoder.key / .value``. Cross-attention keys/values are recomputed from
  ``encoder_hidden_states`` at every step (no ``.encoder.`` cache entries).

All caches are full-length (a plain ``DynamicLayer`` per layer, even for sliding-window layers, whose window
is applied by the attention mask): ``present`` is always ``past`` followed by the new positions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel

KV = list[tuple[torch.Tensor, torch.Tensor]]


def _flat(cache: DynamicCache) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for layer in cache.layers:
        out += [layer.keys, layer.values]
    return out


class CausalLMWithFlatCache(nn.Module):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def input_names(num_layers: int) -> list[str]:
        past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
        return ["input_ids", "attention_mask", "position_ids", *past]

    @staticmethod
    def output_names(num_layers: int) -> list[str]:
        return ["logits", *(f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value"))]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: KV,
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values])
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        return (out.logits, *_flat(out.past_key_values))


class Seq2SeqEncoder(nn.Module):
    input_names = ["input_ids", "attention_mask"]
    output_names = ["last_hidden_state"]

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encoder = self.model.get_encoder()
        return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class Seq2SeqDecoderWithFlatCache(nn.Module):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def input_names(num_layers: int) -> list[str]:
        past = [f"past_key_values.{i}.decoder.{kv}" for i in range(num_layers) for kv in ("key", "value")]
        return ["input_ids", "encoder_attention_mask", "encoder_hidden_states", *past]

    @staticmethod
    def output_names(num_layers: int) -> list[str]:
        return [
            "logits",
            *(f"present.{i}.decoder.{kv}" for i in range(num_layers) for kv in ("key", "value")),
        ]

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        past_key_values: KV,
    ) -> tuple[torch.Tensor, ...]:
        self_cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values])
        cache = EncoderDecoderCache(self_cache, DynamicCache())
        out = self.model(
            attention_mask=encoder_attention_mask,
            encoder_outputs=(encoder_hidden_states,),
            decoder_input_ids=input_ids,
            past_key_values=cache,  # use_cache is not passed: it would reach the encoder stack too
            return_dict=True,
        )
        return (out.logits, *_flat(out.past_key_values.self_attention_cache))
