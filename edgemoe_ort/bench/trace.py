"""Routing traces: record ``topk_indices``/``topk_weights`` of every OffloadedExpert node while a decoder
bundle generates, then replay them into a stack of large synthetic experts (``ReplayWorkload``) so the cache
and the I/O see a trained model's expert locality at realistic expert sizes.

    python -m edgemoe_ort.bench.trace record BUNDLE OUT.npz [--prompt-file F] [--tokens N]
    python -m edgemoe_ort.bench.trace replay-bundle TRACE.npz OUT_BUNDLE [--hidden 1024 --intermediate 3584
                                                                          --layers 24 --dtype int4]

Trace file (npz): ``num_layers``, ``num_steps``, ``num_experts``, ``top_k``, and per step ``s`` and layer
``l``: ``s{s}_l{l}_idx`` int64 ``[T, K]``, ``s{s}_l{l}_w`` float32 ``[T, K]`` (step 0 = prefill,
``T`` = prompt
tokens; then one decode token per step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe_ort.bundle import Bundle
from edgemoe_ort.profile.routing import RoutingRecorder, write_tapped_graph

__all__ = ["record_trace", "make_replay_bundle", "DEFAULT_PROMPT"]

Past = dict[str, np.ndarray]

DEFAULT_PROMPT = (
    "import os\nimport sys\n\n\ndef read_lines(path):\n    with open(path) as f:\n        return "
    "f.readlines()\n\n\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
)


def _routing_graph(bundle: Bundle, out_dir: Path) -> tuple[Path, list[tuple[int, str, str]]]:
    """The decoder graph with every OffloadedExpert node's topk inputs exposed as extra outputs
    (:func:`edgemoe_ort.profile.routing.write_tapped_graph`), and ``(layer, indices, weights)`` per node."""
    path, taps, _ = write_tapped_graph(bundle, out_dir)
    return path, [(t.layer, t.indices, t.weights) for t in taps]


def record_trace(
    bundle_dir: str | Path,
    out: str | Path,
    *,
    prompt: str | list[int] = DEFAULT_PROMPT,
    tokens: int = 64,
) -> dict[str, Any]:
    """Greedy-generate ``tokens`` tokens from ``prompt`` with the bundle; save the routing of every step."""
    from edgemoe_ort.runtime.generate import GenerationError, load_tokenizer

    bundle = Bundle.open(bundle_dir)
    tok = load_tokenizer(bundle)
    if isinstance(prompt, str):
        if tok is None:
            raise GenerationError(f"{bundle.path}: the bundle has no tokenizer; pass token ids instead")
        ids = list(tok.encode(prompt, add_special_tokens=False).ids)
    else:
        ids = [int(t) for t in prompt]
    steps: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
    with RoutingRecorder(bundle) as rec:

        def step(input_ids: np.ndarray, past: Past | None) -> tuple[int, Past]:
            res = rec.forward(input_ids, past)
            steps.append({layer: (r.indices, r.weights) for layer, r in res.routing.items()})
            return int(np.argmax(res.logits[0, -1])), res.present

        nxt, past = step(np.asarray([ids], np.int64), None)
        generated = [nxt]
        for _ in range(tokens - 1):
            nxt, past = step(np.asarray([[nxt]], np.int64), past)
            generated.append(nxt)
        layers = [t.layer for t in rec.taps]
    L = len(layers)
    arrays: dict[str, Any] = {
        "num_layers": np.int64(L),
        "num_steps": np.int64(len(steps)),
        "num_experts": np.int64(int(bundle.layers[0]["num_experts"])),
        "top_k": np.int64(int(bundle.layers[0]["top_k"])),
        "source": np.array(str(bundle.path)),
    }
    for s, rec_s in enumerate(steps):
        for li, layer in enumerate(layers):
            arrays[f"s{s}_l{li}_idx"], arrays[f"s{s}_l{li}_w"] = rec_s[layer]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    text = tok.decode(generated, skip_special_tokens=True) if tok else " ".join(map(str, generated))
    return {
        "trace": str(out),
        "layers": L,
        "steps": len(steps),
        "prompt_tokens": len(ids),
        "text": text,
    }


def trace_locality(trace: str | Path) -> dict[str, float]:
    """How often a decode token reuses an expert the previous token used in the same layer."""
    z = np.load(trace)
    L, S = int(z["num_layers"]), int(z["num_steps"])
    same = tot = 0
    for s in range(2, S):
        for li in range(L):
            a = set(z[f"s{s - 1}_l{li}_idx"].ravel().tolist())
            b = z[f"s{s}_l{li}_idx"].ravel().tolist()
            same += sum(1 for e in b if e in a)
            tot += len(b)
    return {"reuse_prev_token": same / tot if tot else 0.0}


def make_replay_bundle(
    trace: str | Path,
    out: str | Path,
    *,
    hidden: int = 1024,
    intermediate: int = 3584,
    layers: int | None = 24,
    dtype: str = "int4",
    group_size: int = 64,
    force: bool = True,
) -> Bundle:
    """A synthetic bundle (random experts, ``make_moe_graph`` chain) with the trace's experts per layer and
    top-k, at large ``hidden``/``intermediate``; ``layers`` deeper than the trace repeat its layers."""
    from edgemoe_ort.bundle.testing import make_synthetic_bundle

    z = np.load(trace)
    L = int(z["num_layers"])
    return make_synthetic_bundle(
        out,
        num_layers=layers or L,
        num_experts=int(z["num_experts"]),
        top_k=int(z["top_k"]),
        hidden=hidden,
        intermediate=intermediate,
        dtype=dtype,
        group_size=group_size,
        force=force,
        family="replay",
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="record / replay routing traces")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("bundle")
    r.add_argument("out")
    r.add_argument("--prompt-file")
    r.add_argument("--tokens", type=int, default=64)
    b = sub.add_parser("replay-bundle")
    b.add_argument("trace")
    b.add_argument("out")
    b.add_argument("--hidden", type=int, default=1024)
    b.add_argument("--intermediate", type=int, default=3584)
    b.add_argument("--layers", type=int, default=24)
    b.add_argument("--dtype", default="int4")
    a = ap.parse_args(argv)
    if a.cmd == "record":
        prompt = Path(a.prompt_file).read_text() if a.prompt_file else DEFAULT_PROMPT
        bnd = Bundle.open(a.bundle)
        if bnd.tokenizer_path is None:  # no tokenizer: a fixed id sequence
            vocab = int(bnd.config.get("vocab_size", 256) or 256)
            prompt = [int(t) for t in np.random.default_rng(0).integers(3, vocab, size=48)]
        rep = record_trace(a.bundle, a.out, prompt=prompt, tokens=a.tokens)
        rep.update(trace_locality(a.out))
        print(json.dumps(rep))
    else:
        bnd = make_replay_bundle(
            a.trace, a.out, hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, dtype=a.dtype
        )
        print(json.dumps({"bundle": str(bnd.path), "store_bytes": bnd.store_bytes}))


if __name__ == "__main__":
    main()
