"""x86 side of the aarch64 lane's end-to-end check: greedy tokens + logits of bundles, saved for the
comparison that tests/test_aarch64_lane.py makes under qemu.

usage: python make_reference.py OUT.npz BUNDLE [--prompt TEXT] [--max-new-tokens N]

Writes OUT.npz with: prompt_ids, tokens (greedy continuation), logits (one pass over prompt + tokens,
[S, V] float32), kernel (the kernel path that produced them), bundle (path), stop_reason.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

DEFAULT_PROMPT = "def fibonacci(n):\n    "
DEFAULT_NEW_TOKENS = 32


def run(bundle: Path, prompt: str, max_new_tokens: int) -> dict[str, np.ndarray]:
    """Greedy generation + full-sequence logits of `bundle`; also what the aarch64 side computes."""
    from edgemoe_ort.runtime import MoEModel, RuntimeOptions, kernel_path

    model = MoEModel.load(bundle, RuntimeOptions())
    if model.tokenizer is not None:
        prompt_ids = model.encode(prompt)
    else:  # a bundle without tokenizer (synthetic checkpoints): the prompt's bytes as token ids
        vocab = int(model.bundle.config.get("vocab_size", 256))
        prompt_ids = [b % vocab for b in prompt.encode()]
    result = model.generate(prompt_ids, max_new_tokens=max_new_tokens)
    logits = model.logits(prompt_ids + result.tokens)
    return {
        "prompt_ids": np.asarray(prompt_ids, np.int64),
        "tokens": np.asarray(result.tokens, np.int64),
        "logits": np.asarray(logits, np.float32),
        "kernel": np.asarray(kernel_path()),
        "stop_reason": np.asarray(result.stop_reason),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    args = ap.parse_args()
    ref = run(args.bundle, args.prompt, args.max_new_tokens)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez(tmp, bundle=np.asarray(str(args.bundle.resolve())), prompt=np.asarray(args.prompt), **ref)
    os.replace(tmp, args.out)
    print(f"{args.out}: {len(ref['tokens'])} tokens ({ref['stop_reason']}) with the {ref['kernel']} kernels")


if __name__ == "__main__":
    main()
