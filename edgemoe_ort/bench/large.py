"""The large reference model for speed measurements: a Mixtral-architecture config with random weights whose
int4 expert store is >= 1 GiB, exported through the normal exporter (``export_model``).

``LARGE_CONFIG`` (Mixtral layout, scaled): hidden 1024, intermediate 3584 (Mixtral's 3.5x), 24 layers,
8 experts, top-2, GQA 16 query / 8 KV heads of 64, vocab 8192. One int4 g64 expert = 3 * 1024 * 3584 weights
= 5.50 MB of nibbles + 0.52 MB of f16 scales / u8 zeros = 6.03 MB (4096-aligned); 192 experts = 1.16 GB
(1.08 GiB). Dense part ≈ 89 M parameters (0.36 GB fp32).

Host side (torch + transformers). Peak RAM: the random init is built in bf16 (4.3 GB) and saved as
safetensors; ``export_model`` then loads it in fp32 (8.6 GB) — that is the exporter's peak, not ours.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

LARGE_CONFIG: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=64,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def save_random_checkpoint(out: str | Path, config: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """``MixtralForCausalLM(config)`` with random weights, built in bf16, saved with ``save_pretrained``."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    out = Path(out)
    cfg = MixtralConfig(**(config or LARGE_CONFIG))
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.no_grad():
            model = MixtralForCausalLM(cfg)
            model.to(torch.bfloat16)
    finally:
        torch.set_default_dtype(prev)
    model.config.dtype = "bfloat16"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_large_bundle(
    hf_dir: str | Path,
    bundle_dir: str | Path,
    *,
    bits: int = 4,
    group_size: int = 64,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Random checkpoint (if ``hf_dir`` has none) → ``export_model`` → bundle. Returns the timings."""
    from edgemoe_ort.export import export_model

    hf_dir, bundle_dir = Path(hf_dir), Path(bundle_dir)
    t0 = time.perf_counter()
    if not (hf_dir / "config.json").is_file():
        save_random_checkpoint(hf_dir, config)
    t1 = time.perf_counter()
    export_model(hf_dir, bundle_dir, bits=bits, group_size=group_size, force=True)
    t2 = time.perf_counter()
    report = {"checkpoint_s": t1 - t0, "export_s": t2 - t1, "bundle": str(bundle_dir)}
    (bundle_dir.parent / (bundle_dir.name + ".build.json")).write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir")
    ap.add_argument("bundle_dir")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="a tiny variant (tests)")
    a = ap.parse_args(argv)
    cfg = None
    if a.tiny:
        cfg = dict(
            LARGE_CONFIG,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=512,
        )
    print(
        json.dumps(
            build_large_bundle(a.hf_dir, a.bundle_dir, bits=a.bits, group_size=a.group_size, config=cfg)
        )
    )


if __name__ == "__main__":
    main()
