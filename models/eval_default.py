"""Corpus, held-out token stream and metrics for the default model (``models/edgemoe-tiny-mixtral``).

The corpus is the CPython standard library's own ``.py`` sources (PSF licence), which every machine
running this project has offline. Everything here is deterministic for a given Python version: file lists
are sorted, the train/held-out split is a hash of the file's relative path, and the held-out token stream is
the held-out files (ordered by that hash) tokenized one by one, each followed by ``<|endoftext|>``.

The metric helpers are backend-agnostic so the int8/int4 ONNX bundles can be compared with the PyTorch
checkpoint on exactly the same tokens::

    from models.eval_default import heldout_token_ids, load_tokenizer, perplexity, expert_usage
    tok = load_tokenizer("models/edgemoe-tiny-mixtral")          # needs only `tokenizers`
    ids = heldout_token_ids(tok, 65536)                           # int64 numpy array, fixed content
    res = perplexity(my_logits_fn, ids, window=256)               # int64[B, T] -> logits float[B, T, V]
    usage = expert_usage(counts)                                  # counts: int[L, E] top-k assignments

Recompute the numbers of the shipped checkpoint (and compare them with its ``eval.json``)::

    .venv/bin/python models/eval_default.py --model-dir models/edgemoe-tiny-mixtral --check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOT, PAD]

# Directories skipped anywhere in the tree: third-party packages, bytecode and the test suites
# (tests are ~60% of the stdlib's bytes and mostly fixtures/data; we keep the library code only).
EXCLUDED_DIRS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test"})
# Files skipped: the auto-generated pydoc topic dump (0.75 MB of prose in one string literal, it would
# dominate whichever split it lands in) and build-machine-specific files.
EXCLUDED_FILES = frozenset({"pydoc_data/topics.py"})
EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")
# Machine-generated codec tables (encodings/cp*.py etc., "Generated from ... with gencodec.py"): ~1.2 MB of
# repetitive lookup tables, not code anyone writes. Matched on the first 1 KiB of the file.
GENERATED_MARKERS = ("gencodec.py",)

HELDOUT_MODULUS = 10  # ~10% of the files are held out
DEFAULT_EVAL_TOKENS = 65536
DEFAULT_WINDOW = 256

Split = Literal["train", "heldout", "all"]
LogitsFn = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class CorpusFile:
    relpath: str  # posix path relative to the stdlib root
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


def path_hash(relpath: str) -> int:
    return int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")


def is_heldout(relpath: str) -> bool:
    return path_hash(relpath) % HELDOUT_MODULUS == 0


def list_corpus_files(root: Path | None = None) -> list[str]:
    """Sorted posix relative paths of every stdlib ``.py`` file in the corpus."""
    root = root or stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        parts = rel.parts
        if any(d in EXCLUDED_DIRS for d in parts[:-1]):
            continue
        if rel.as_posix() in EXCLUDED_FILES or parts[0].startswith(EXCLUDED_PREFIXES):
            continue
        if p.is_file() and not _is_generated(p):
            out.append(rel.as_posix())
    return sorted(out)


def _is_generated(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(1024).decode("utf-8", errors="replace")
    return any(m in head for m in GENERATED_MARKERS)


def read_source(path: Path) -> str:
    # All stdlib sources are UTF-8; "replace" keeps this total and deterministic anyway.
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_corpus(split: Split, root: Path | None = None) -> list[CorpusFile]:
    """Corpus files of a split. ``train`` is in path order; ``heldout`` is ordered by path hash."""
    root = root or stdlib_root()
    rels = list_corpus_files(root)
    if split == "train":
        rels = [r for r in rels if not is_heldout(r)]
    elif split == "heldout":
        rels = sorted((r for r in rels if is_heldout(r)), key=path_hash)
    return [CorpusFile(r, read_source(root / r)) for r in rels]


def corpus_fingerprint(files: Sequence[CorpusFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.relpath.encode())
        h.update(b"\0")
        h.update(f.text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ tokenizer
def load_tokenizer(model_dir: str | Path) -> Any:
    """The checkpoint's tokenizer as a plain ``tokenizers.Tokenizer`` (no transformers needed)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def _backend(tokenizer: Any) -> Any:
    # Accept a tokenizers.Tokenizer or a transformers fast tokenizer.
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def encode_documents(tokenizer: Any, texts: Iterable[str]) -> np.ndarray:
    """Tokenize documents one by one and concatenate them, each followed by ``<|endoftext|>``."""
    tok = _backend(tokenizer)
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    encs = tok.encode_batch(list(texts), add_special_tokens=False)
    parts: list[np.ndarray] = []
    for e in encs:
        parts.append(np.asarray(e.ids, dtype=np.int64))
        parts.append(np.asarray([eot], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def heldout_token_ids(
    tokenizer: Any, n_tokens: int = DEFAULT_EVAL_TOKENS, root: Path | None = None
) -> np.ndarray:
    """The first ``n_tokens`` tokens of the held-out stream (int64), fixed per tokenizer + Python version."""
    ids = encode_documents(tokenizer, (f.text for f in load_corpus("heldout", root)))
    if len(ids) < n_tokens:
        raise ValueError(f"held-out split has only {len(ids)} tokens (< {n_tokens})")
    return ids[:n_tokens].copy()


# -------------------------------------------------------------------------------------------- metrics
def windows(token_ids: np.ndarray, window: int) -> np.ndarray:
    """Non-overlapping windows [n_windows, window]; a trailing partial window is dropped."""
    n = len(token_ids) // window
    if n == 0:
        raise ValueError(f"need at least {window} tokens")
    return np.asarray(token_ids[: n * window], dtype=np.int64).reshape(n, window)


def perplexity(
    logits_fn: LogitsFn, token_ids: np.ndarray, window: int = DEFAULT_WINDOW, batch_size: int = 8
) -> dict[str, float | int]:
    """Token-level perplexity over fixed non-overlapping windows.

    Each window is scored independently (fresh context); positions 1..window-1 are predicted, so
    ``n_predicted = n_windows * (window - 1)``. ``logits_fn`` maps int64 ``[B, T]`` to logits ``[B, T, V]``
    (numpy or anything ``np.asarray`` accepts); the log-softmax is done here in float64.
    """
    w = windows(token_ids, window)
    total_nll = 0.0
    n_pred = 0
    for i in range(0, len(w), batch_size):
        batch = w[i : i + batch_size]
        logits = np.asarray(logits_fn(batch), dtype=np.float64)[:, :-1, :]
        targets = batch[:, 1:]
        mx = logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(logits - mx).sum(axis=-1)) + mx[..., 0]
        picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        total_nll += float((lse - picked).sum())
        n_pred += targets.size
    nll = total_nll / n_pred
    return {
        "nll": nll,
        "perplexity": math.exp(nll),
        "n_predicted": n_pred,
        "n_windows": len(w),
        "window": window,
    }


def expert_usage(counts: np.ndarray) -> list[dict[str, Any]]:
    """Per-layer statistics of top-k assignment counts ``[L, E]``.

    Entropy is of the assignment distribution (each token contributes top_k assignments), in bits;
    the maximum is log2(E) (uniform routing).
    """
    counts = np.asarray(counts, dtype=np.float64)
    n_experts = counts.shape[1]
    out = []
    for layer, c in enumerate(counts):
        p = c / c.sum()
        nz = p[p > 0]
        h = float(-(nz * np.log2(nz)).sum())
        out.append(
            {
                "layer": layer,
                "entropy_bits": h,
                "max_entropy_bits": math.log2(n_experts),
                "normalized_entropy": h / math.log2(n_experts),
                "most_used_expert": int(p.argmax()),
                "most_used_share": float(p.max()),
                "least_used_expert": int(p.argmin()),
                "least_used_share": float(p.min()),
                "shares": [round(float(x), 5) for x in p],
                "assignments": int(c.sum()),
            }
        )
    return out


# ------------------------------------------------------------------------------------ torch backend
def load_model(model_dir: str | Path, threads: int = 2) -> Any:
    import torch
    from transformers import MixtralForCausalLM

    torch.set_num_threads(threads)
    model = MixtralForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


def torch_logits_fn(model: Any) -> LogitsFn:
    import torch

    def fn(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch), use_cache=False).logits.float().numpy()

    return fn


def torch_routing(
    model: Any, token_ids: np.ndarray, window: int = DEFAULT_WINDOW, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token routing over the evaluation windows, tokens in stream order (``N = n_windows * window``).

    Returns the top-k expert ids ``int64[L, N, k]`` (highest router score first) and the router's softmax
    over all experts ``float32[L, N, E]``.
    """
    import torch

    cfg = model.config
    w = windows(token_ids, window)
    top: list[list[np.ndarray]] = [[] for _ in range(cfg.num_hidden_layers)]
    probs: list[list[np.ndarray]] = [[] for _ in range(cfg.num_hidden_layers)]
    with torch.inference_mode():
        for i in range(0, len(w), batch_size):
            out = model(torch.from_numpy(w[i : i + batch_size]), use_cache=False, output_router_logits=True)
            for layer, logits in enumerate(out.router_logits):
                p = torch.softmax(logits.float(), dim=-1)
                top[layer].append(torch.topk(p, cfg.num_experts_per_tok, dim=-1).indices.numpy())
                probs[layer].append(p.numpy())
    return (
        np.stack([np.concatenate(t) for t in top]).astype(np.int64),
        np.stack([np.concatenate(p) for p in probs]).astype(np.float32),
    )


def routing_counts(top: np.ndarray, n_experts: int) -> np.ndarray:
    """Top-k assignment counts ``int64[L, E]`` from ``top`` ``[L, N, k]``."""
    return np.stack([np.bincount(t.reshape(-1), minlength=n_experts) for t in top]).astype(np.int64)


def _norm_entropy(counts: np.ndarray) -> np.ndarray:
    """Normalized entropy (1.0 = uniform) of count vectors along the last axis."""
    p = counts / counts.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=-1)
    return h / math.log2(counts.shape[-1])


def _window_entropy(top: np.ndarray, n_experts: int, window: int) -> float:
    n_win = top.shape[0] // window
    onehot = np.zeros((n_win, n_experts))
    for j in range(top.shape[1]):
        np.add.at(onehot, (np.arange(n_win).repeat(window), top[: n_win * window, j]), 1)
    return float(_norm_entropy(onehot).mean())


def _reuse(top: np.ndarray, window: int) -> float:
    n_win = top.shape[0] // window
    t = top[: n_win * window].reshape(n_win, window, -1)
    prev, cur = t[:, :-1, :], t[:, 1:, :]
    shared = (cur[..., :, None] == prev[..., None, :]).any(axis=-1).sum(axis=-1)
    return float(shared.mean() / top.shape[1])


def _next_layer_hit(
    top_l: np.ndarray, top_next: np.ndarray, n_experts: int, window: int
) -> tuple[float, float]:
    """Out-of-sample prefetch hit rates for layer l+1's top-k from layer l's top-1 expert.

    Fitted on the first half of the windows, scored on the second half. Returns (conditional, popularity):
    the share of layer l+1's top-k assignments covered by the k experts most often used after layer l's
    top-1 expert, and by the k most used experts of layer l+1 regardless of layer l.
    """
    k = top_next.shape[1]
    half = (top_l.shape[0] // window // 2) * window
    cond = np.zeros((n_experts, n_experts))
    np.add.at(cond, (top_l[:half, 0].repeat(k), top_next[:half].reshape(-1)), 1)
    guess = np.argsort(-cond, axis=1, kind="stable")[:, :k]  # [E_l, k]
    popular = np.argsort(-cond.sum(axis=0), kind="stable")[:k]
    test_l, test_next = top_l[half:, 0], top_next[half:]
    cond_hit = (test_next[:, :, None] == guess[test_l][:, None, :]).any(axis=-1).mean()
    pop_hit = (test_next[:, :, None] == popular[None, None, :]).any(axis=-1).mean()
    return float(cond_hit), float(pop_hit)


def routing_structure(
    top: np.ndarray, probs: np.ndarray, window: int = DEFAULT_WINDOW, seed: int = 0
) -> list[dict[str, Any]]:
    """How far routing is from uniform, and from random, per layer (what an expert cache can exploit).

    ``top`` ``[L, N, k]`` and ``probs`` ``[L, N, E]`` as returned by :func:`torch_routing`. Each metric that
    could be high by chance has a ``*_shuffled`` twin computed on the same assignments after one random
    permutation of the token positions (same permutation for every layer): that keeps each layer's
    overall usage and each token's cross-layer path, and removes only the ordering.

    - ``router_entropy``: mean normalized entropy of a token's router softmax (1.0 = uniform scores).
    - ``top_k_mass``: mean router probability on the chosen k experts (k/E for uniform scores).
    - ``window_entropy``: mean normalized usage entropy inside one ``window``-token window (one request).
    - ``reuse``: share of a token's top-k experts that the previous token also used.
    - ``next_hit`` / ``next_hit_popular``: see :func:`_next_layer_hit` (last layer: none).
    """
    n_layers, n_tokens, _ = top.shape
    n_experts = probs.shape[-1]
    perm = np.random.default_rng(seed).permutation(n_tokens)
    out = []
    for layer in range(n_layers):
        t, sh = top[layer], top[layer][perm]
        p = probs[layer].astype(np.float64)
        h = _norm_entropy(p)
        row: dict[str, Any] = {
            "layer": layer,
            "router_entropy": float(h.mean()),
            "top_k_mass": float(np.take_along_axis(p, t, axis=-1).sum(axis=-1).mean()),
            "window_entropy": _window_entropy(t, n_experts, window),
            "window_entropy_shuffled": _window_entropy(sh, n_experts, window),
            "reuse": _reuse(t, window),
            "reuse_shuffled": _reuse(sh, window),
        }
        if layer + 1 < n_layers:
            row["next_hit"], row["next_hit_popular"] = _next_layer_hit(t, top[layer + 1], n_experts, window)
        out.append(row)
    return out


def evaluate_checkpoint(
    model_dir: str | Path, n_tokens: int = DEFAULT_EVAL_TOKENS, window: int = DEFAULT_WINDOW, threads: int = 2
) -> dict[str, Any]:
    """Held-out perplexity and per-layer expert usage of a saved checkpoint (loaded in fp32)."""
    tok = load_tokenizer(model_dir)
    ids = heldout_token_ids(tok, n_tokens)
    model = load_model(model_dir, threads)
    ppl = perplexity(torch_logits_fn(model), ids, window)
    top, probs = torch_routing(model, ids, window)
    usage = expert_usage(routing_counts(top, model.config.num_local_experts))
    return {
        "python_version": python_version(),
        "eval_tokens": n_tokens,
        "heldout_ids_sha256": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest(),
        "heldout": ppl,
        "expert_usage": usage,
        "routing_structure": routing_structure(top, probs, window),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=str(Path(__file__).resolve().parent / "edgemoe-tiny-mixtral"))
    ap.add_argument("--n-tokens", type=int, default=DEFAULT_EVAL_TOKENS)
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument(
        "--check", action="store_true", help="compare with <model-dir>/eval.json (exit 1 on mismatch)"
    )
    args = ap.parse_args(argv)

    res = evaluate_checkpoint(args.model_dir, args.n_tokens, args.window, args.threads)
    print(f"python {res['python_version']}  held-out tokens {args.n_tokens}  window {args.window}")
    print(f"perplexity {res['heldout']['perplexity']:.3f}  (nll {res['heldout']['nll']:.4f} nats/token)")
    for u in res["expert_usage"]:
        print(
            f"layer {u['layer']}: entropy {u['entropy_bits']:.3f}/{u['max_entropy_bits']:.0f} bits "
            f"(normalized {u['normalized_entropy']:.3f}), most used e{u['most_used_expert']} "
            f"{u['most_used_share']:.1%}, least used e{u['least_used_expert']} {u['least_used_share']:.1%}"
        )
    for r in res["routing_structure"]:
        nxt = (
            f", next-layer prefetch hit {r['next_hit']:.1%} (popularity {r['next_hit_popular']:.1%})"
            if "next_hit" in r
            else ""
        )
        print(
            f"layer {r['layer']}: router entropy {r['router_entropy']:.3f}, "
            f"top-k mass {r['top_k_mass']:.3f}, 256-token window entropy {r['window_entropy']:.3f} "
            f"(shuffled {r['window_entropy_shuffled']:.3f}), "
            f"reuse {r['reuse']:.1%} (shuffled {r['reuse_shuffled']:.1%}){nxt}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if args.check:
        ref = json.loads((Path(args.model_dir) / "eval.json").read_text())
        if ref.get("python_version") != res["python_version"]:
            print(f"note: eval.json was made with Python {ref.get('python_version')}; the corpus may differ")
        if ref["heldout_ids_sha256"] != res["heldout_ids_sha256"]:
            print("MISMATCH: held-out token stream differs from eval.json")
            return 1
        d = abs(ref["heldout"]["perplexity"] - res["heldout"]["perplexity"])
        if d > 1e-3 * ref["heldout"]["perplexity"]:
            print(
                f"MISMATCH: perplexity {res['heldout']['perplexity']:.4f} "
                f"vs {ref['heldout']['perplexity']:.4f}"
            )
            return 1
        ent_ref = [u["entropy_bits"] for u in ref["expert_usage"]]
        ent = [u["entropy_bits"] for u in res["expert_usage"]]
        if max(abs(a - b) for a, b in zip(ent, ent_ref, strict=True)) > 1e-2:
            print(f"MISMATCH: usage entropy {ent} vs {ent_ref}")
            return 1
        print("OK: matches eval.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
