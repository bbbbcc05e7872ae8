"""Tiny random checkpoints of every supported family, for tests (no hub access needed).

``save_tiny_checkpoint(model_type, folder)`` builds ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM``
``from_config`` with random weights and ``save_pretrained``-s it, so tests export through the real
``from_pretrained`` path of a local folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

VOCAB = 128

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {
        **_COMMON,
        "intermediate_size": 48,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
    },
    "qwen2_moe": {
        **_COMMON,
        "intermediate_size": 64,
        "moe_intermediate_size": 40,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "shared_expert_intermediate_size": 56,
        "norm_topk_prob": False,
        "use_sliding_window": False,
    },
    "qwen3_moe": {
        **_COMMON,
        "num_hidden_layers": 3,
        "mlp_only_layers": [1],
        "intermediate_size": 64,
        "moe_intermediate_size": 40,
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "head_dim": 16,
        "norm_topk_prob": True,
    },
    "olmoe": {
        **_COMMON,
        "intermediate_size": 48,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
    },
    "gpt_oss": {
        **_COMMON,
        "intermediate_size": 48,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": 8,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "granitemoe": {**_COMMON, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    "phimoe": {
        **_COMMON,
        "intermediate_size": 48,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
    },
    "deepseek_v3": {
        **_COMMON,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "n_shared_experts": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "num_key_value_heads": 4,
        "rope_interleave": True,
    },
    "switch_transformers": {
        "vocab_size": VOCAB,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 48,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "num_experts": 4,
        "expert_capacity": 2,
        "encoder_sparse_step": 1,
        "decoder_sparse_step": 2,
        "relative_attention_num_buckets": 8,
        "initializer_factor": 1.0,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": None,
    },
}


def tiny_config(model_type: str, **overrides: Any) -> Any:
    if model_type not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for {model_type!r}; have {sorted(TINY_CONFIGS)}")
    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_config(config).eval()


def save_tiny_checkpoint(model_type: str, folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    folder = Path(folder)
    tiny_model(model_type, seed, **overrides).save_pretrained(folder)
    return folder
