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
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from edgemoe_ort.bundle import Bundle

__all__ = ["record_trace", "make_replay_bundle", "DEFAULT_PROMPT"]

DEFAULT_PROMPT = (
    "import os\nimport sys\n\n\ndef read_lines(path):\n    with open(path) as f:\n        return "
    "f.readlines()\n\n\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
)


def _routing_graph(bundle: Bundle, out_dir: Path) -> tuple[Path, list[tuple[int, str, str]]]:
    """The decoder graph with every OffloadedExpert node's topk inputs exposed as extra outputs."""
    model = onnx.load(str(bundle.graph_path("decoder")), load_external_data=True)
    taps = []
    existing = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "OffloadedExpert" and node.domain == "edgemoe":
            layer = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "layer")
            idx, w = node.input[1], node.input[2]
            taps.append((int(layer), idx, w))
            for name, et in ((idx, TensorProto.INT64), (w, TensorProto.FLOAT)):
                if name not in existing:
                    model.graph.output.append(helper.make_tensor_value_info(name, et, None))
                    existing.add(name)
    if not taps:
        raise ValueError(f"{bundle.graph_path('decoder')}: no OffloadedExpert node")
    path = out_dir / "model.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    return path, sorted(taps)


def record_trace(
    bundle_dir: str | Path,
    out: str | Path,
    *,
    prompt: str | list[int] = DEFAULT_PROMPT,
    tokens: int = 64,
) -> dict[str, Any]:
    """Greedy-generate ``tokens`` tokens from ``prompt`` with the bundle and save the routing of "
    "every step."""
    from edgemoe_ort.runtime.generate import MoEModel, load_tokenizer
    from edgemoe_ort.runtime.ops import ExpertSession, RuntimeOptions, make_session_options

    bundle = Bundle.open(bundle_dir)
    tok = load_tokenizer(bundle)
    with tempfile.TemporaryDirectory() as td:
        path, taps = _routing_graph(bundle, Path(td))
        opts = RuntimeOptions()
        so, sid = make_session_options(bundle.path, opts)
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        es = ExpertSession(sess, sid, bundle.path, opts)
        model = MoEModel(bundle, es, tok)
        out_names = [o.name for o in sess.get_outputs()]
        ids = model.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        steps: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []

        def step(
            input_ids: np.ndarray, past: dict[str, np.ndarray] | None
        ) -> tuple[int, dict[str, np.ndarray]]:
            # MoEModel.forward keeps only logits/present; run the session ourselves to keep the taps too.
            batch, seq = input_ids.shape
            past = past if past is not None else model._empty_past(batch)
            past_len = next(iter(past.values())).shape[2] if past else 0
            feeds: dict[str, np.ndarray] = {"input_ids": input_ids}
            names = [i.name for i in sess.get_inputs()]
            if "attention_mask" in names:
                feeds["attention_mask"] = np.ones((batch, past_len + seq), np.int64)
            if "position_ids" in names:
                feeds["position_ids"] = np.arange(past_len, past_len + seq, dtype=np.int64)[None, :]
            feeds.update(past)
            res = dict(zip(out_names, sess.run(None, feeds), strict=True))
            rec = {}
            for layer, idx, w in taps:
                k = res[idx].shape[-1]
                rec[layer] = (
                    res[idx].reshape(-1, k).astype(np.int64),
                    res[w].reshape(-1, k).astype(np.float32),
                )
            steps.append(rec)
            present = {n: res[n.replace("past_key_values.", "present.")] for n, _, _ in model._past_specs}
            return int(np.argmax(res["logits"][0, -1])), present

        nxt, past = step(np.asarray([ids], np.int64), None)
        generated = [nxt]
        for _ in range(tokens - 1):
            nxt, past = step(np.asarray([[nxt]], np.int64), past)
            generated.append(nxt)
        sess = None  # noqa: F841 - release the session before the bundle's temp graph goes
    L = len(taps)
    arrays: dict[str, Any] = {
        "num_layers": np.int64(L),
        "num_steps": np.int64(len(steps)),
        "num_experts": np.int64(int(bundle.layers[0]["num_experts"])),
        "top_k": np.int64(int(bundle.layers[0]["top_k"])),
        "source": np.array(str(bundle.path)),
    }
    for s, rec in enumerate(steps):
        for li, (layer, _, _) in enumerate(taps):
            arrays[f"s{s}_l{li}_idx"], arrays[f"s{s}_l{li}_w"] = rec[layer]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return {
        "trace": str(out),
        "layers": L,
        "steps": len(steps),
        "prompt_tokens": len(ids),
        "text": model.decode(generated),
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
