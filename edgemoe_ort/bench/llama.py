"""llama.cpp as a baseline: convert a HF checkpoint to GGUF, check it, and (``bench``) time it beside edgemoe.

``python -m edgemoe_ort.bench.llama convert --llama-cpp DIR --bin DIR --hf CKPT --out DIR`` (``make
bench-llama`` runs it; mk/llama.mk builds the tools from the llama.cpp tree vendored in the llama-cpp-python
sdist):

1. ``f16.gguf`` with the vendored ``convert_hf_to_gguf.py``, run in a subprocess with one runtime patch and no
   edit of the vendored file: its ``get_vocab_base_pre`` raises NotImplementedError for a BPE vocabulary whose
   hash it does not know (ours: the default model's tokenizer, trained here); the patch answers ``"gpt-2"``
   when ``tokenizer.json`` is a GPT-2 style byte-level BPE (:func:`bpe_pre_tokenizer`), else re-raises.
   A checkpoint without a tokenizer (the large bench model) is staged with the ``--tokenizer-from`` files
   (the converter pads the vocabulary to ``vocab_size`` with unused tokens);
2. the greedy check, before anything is timed: transformers (float32) and llama.cpp (the f16 GGUF, through
   the ctypes bindings shipped in the same sdist, loaded from our own build) decode the same prompt ids
   greedily; the token ids must be equal (and with a tokenizer, llama.cpp's tokenization of the prompt text
   must equal transformers'). A difference raises :class:`CheckFailed` and nothing is written but
   ``check-failed.json``;
3. ``Q4_0.gguf`` and ``Q4_K_M.gguf`` with ``llama-quantize``; rows whose width is not a multiple of 256
   cannot be k-quantized and llama-quantize falls back (q5_0 / q8_0): those lines are kept in ``notes``;
4. ``check.json``: the check, every GGUF's dense / expert tensor bytes (:func:`gguf_split_bytes`), the notes.

``python -m edgemoe_ort.bench.llama bench ...``: see :mod:`edgemoe_ort.bench.llama_cap`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CheckFailed",
    "EXPERT_TENSOR_RE",
    "bpe_pre_tokenizer",
    "compare_greedy",
    "forced_mismatches",
    "convert_checkpoint",
    "gguf_split_bytes",
    "load_llama_bindings",
    "parse_llama_bench",
    "parse_quantize_fallbacks",
    "split_tensor_bytes",
    "stage_checkpoint",
]

MiB = 1 << 20
#: GGUF tensors of routed experts (Mixtral: ``blk.N.ffn_{gate,up,down}_exps.weight``, or fused gate_up);
#: shared experts (``*_shexp``) and the router (``ffn_gate_inp``) are dense.
EXPERT_TENSOR_RE = re.compile(r"^blk\.\d+\.ffn_(gate|up|down|gate_up)_exps\.")
#: Greedy tokens compared by the check, after the prompt.
CHECK_TOKENS = 16
CHECK_PROMPT_TEXT = "def fibonacci(n):\n    "
CHECK_PROMPT_IDS = [1, 17, 42, 300, 1000, 9, 77, 5]
QUANT_TYPES = ("Q4_0", "Q4_K_M")


class CheckFailed(RuntimeError):
    """The f16 GGUF does not reproduce transformers' greedy tokens (or tokenization); ``record``: both."""

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record = {"error": message} if record is None else record


# --- the tokenizer mapping ---------------------------------------------------------------------------------
def _is_gpt2_byte_level(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        return len(parts) == 1 and _is_gpt2_byte_level(parts[0])
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) is True


def bpe_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a HF ``tokenizer.json`` (parsed) that the converter's hash
    table does not know, or None: ``"gpt-2"`` for a BPE model whose only pre-tokenizer is
    ``ByteLevel(use_regex=True)`` (GPT-2's regex split, then bytes to unicode) with no normalizer — what
    ``edgemoe_ort``'s default model uses. Anything else (a Split regex, Metaspace, a normalizer, WordPiece)
    is left to the converter (None)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        return None
    if tokenizer_json.get("normalizer") not in (None, {}):
        return None
    return "gpt-2" if _is_gpt2_byte_level(tokenizer_json.get("pre_tokenizer")) else None


def _patch_converter(llama_cpp: Path) -> None:
    """Import the vendored converter's package and wrap ``TextModel.get_vocab_base_pre`` (in memory only)."""
    sys.path.insert(0, str(llama_cpp))
    from conversion import base  # the vendored tree's package (convert_hf_to_gguf.py imports it too)

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            path = Path(self.dir_model) / "tokenizer.json"
            mapped = bpe_pre_tokenizer(json.loads(path.read_text())) if path.is_file() else None
            if mapped is None:
                raise
            print(f"edgemoe_ort.bench.llama: {path}: unknown BPE hash, byte-level GPT-2 pre-tokenizer: "
                  f"tokenizer.ggml.pre = {mapped!r}", file=sys.stderr)
            return mapped

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def _run_converter(llama_cpp: Path, args: Sequence[str]) -> None:
    """``convert_hf_to_gguf.py ARGS`` in this process, with the patch (the ``_convert`` subcommand)."""
    import runpy

    _patch_converter(llama_cpp)
    script = llama_cpp / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


# --- staging and sizes -------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def stage_checkpoint(hf_dir: str | Path, stage: str | Path, tokenizer_from: str | Path | None) -> Path:
    """``hf_dir`` itself if it has a ``tokenizer.json``; else ``stage``: symlinks to ``hf_dir``'s files plus
    copies of ``tokenizer_from``'s tokenizer files (the checkpoint is never modified). Raises ValueError if
    there is no tokenizer anywhere."""
    hf_dir = Path(hf_dir).resolve()
    if (hf_dir / "tokenizer.json").is_file():
        return hf_dir
    if tokenizer_from is None or not (Path(tokenizer_from) / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer-from: {hf_dir} has no tokenizer.json; expected a folder with one, "
                         f"found {tokenizer_from}")
    stage = Path(stage)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for f in hf_dir.iterdir():
        if f.is_file():
            (stage / f.name).symlink_to(f)
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_from) / name
        if src.is_file():
            shutil.copy(src, stage / name)
    return stage


def split_tensor_bytes(tensors: Iterable[tuple[str, int]]) -> dict[str, int]:
    """(name, bytes) of GGUF tensors -> ``{"expert_bytes", "dense_bytes", "expert_tensors", "tensors"}``:
    routed-expert tensors (:data:`EXPERT_TENSOR_RE`) vs everything else."""
    out = {"expert_bytes": 0, "dense_bytes": 0, "expert_tensors": 0, "tensors": 0}
    for name, n in tensors:
        out["tensors"] += 1
        if EXPERT_TENSOR_RE.match(name):
            out["expert_bytes"] += int(n)
            out["expert_tensors"] += 1
        else:
            out["dense_bytes"] += int(n)
    return out


def gguf_split_bytes(path: str | Path) -> dict[str, Any]:
    """:func:`split_tensor_bytes` of a GGUF file (gguf-py's reader), plus ``file_bytes``, ``overhead_bytes``
    (header, metadata and vocabulary: file - tensors) and the tensor types of the expert tensors."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    out: dict[str, Any] = split_tensor_bytes((t.name, int(t.n_bytes)) for t in r.tensors)
    out["file_bytes"] = Path(path).stat().st_size
    out["overhead_bytes"] = out["file_bytes"] - out["expert_bytes"] - out["dense_bytes"]
    types_: dict[str, int] = {}
    for t in r.tensors:
        if EXPERT_TENSOR_RE.match(t.name):
            types_[t.tensor_type.name] = types_.get(t.tensor_type.name, 0) + 1
    out["expert_types"] = types_
    return out


_FALLBACK_RE = re.compile(r"(?i)(fallback|not divisible)")


def parse_quantize_fallbacks(log: str) -> list[str]:
    """The lines of a ``llama-quantize`` log that report a tensor quantized to another type than asked (rows
    not divisible by the k-quant block of 256), deduplicated by message with the tensor name removed."""
    seen: dict[str, int] = {}
    for line in log.splitlines():
        if _FALLBACK_RE.search(line):
            key = re.sub(r"blk\.\d+\.", "blk.N.", line.strip())
            key = re.sub(r"^\[\s*\d+/\s*\d+\]\s*", "", key)
            key = re.sub(r"\s+", " ", key)
            seen[key] = seen.get(key, 0) + 1
    return [f"{k} (x{n})" if n > 1 else k for k, n in seen.items()]


def parse_llama_bench(text: str) -> list[dict[str, Any]]:
    """The test results of ``llama-bench -o json`` (a JSON array) or ``-o jsonl`` (one object a line): each
    with ``n_prompt``, ``n_gen``, ``avg_ts`` (tokens/s), ``samples_ts`` and the model's ``model_size``.
    Text before or after the JSON (logs) is skipped. Raises ValueError if no result is found."""
    text = text.strip()
    start, end = text.find("["), text.rfind("]")
    if start >= 0 and end > start:
        try:
            data = json.loads(text[start:end + 1])
            if isinstance(data, list) and all(isinstance(d, dict) for d in data) and data:
                return data
        except json.JSONDecodeError:
            pass
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "avg_ts" in d:
                rows.append(d)
    if not rows:
        raise ValueError(f"llama-bench output: expected JSON results with avg_ts, found {text[-300:]!r}")
    return rows


# --- llama.cpp through the sdist's own ctypes bindings ------------------------------------------------------
def load_llama_bindings(sdist: str | Path, lib_dir: str | Path) -> Any:
    """``llama_cpp.llama_cpp`` (the ctypes bindings that match the vendored C API) from the extracted sdist
    ``sdist``, loading ``lib_dir``/libllama.so (our build), without the package's ``__init__`` (which needs
    the compiled extension's other dependencies)."""
    import importlib

    os.environ["LLAMA_CPP_LIB_PATH"] = str(Path(lib_dir).resolve())
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [str(Path(sdist) / "llama_cpp")]
    sys.modules.setdefault("llama_cpp", pkg)
    return importlib.import_module("llama_cpp.llama_cpp")


def _llama_greedy(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding with llama.cpp (the ``_greedy`` subcommand; runs in its own process)."""
    import ctypes

    import numpy as np

    ll = load_llama_bindings(spec["sdist"], spec["lib_dir"])
    quiet = ll.llama_log_callback(lambda level, text, user: None)
    ll.llama_log_set(quiet, ctypes.c_void_p())
    ll.llama_backend_init()
    mp = ll.llama_model_default_params()
    mp.load_mode = ll.LLAMA_LOAD_MODE_MMAP
    mp.use_extra_bufts = False
    model = ll.llama_model_load_from_file(spec["gguf"].encode(), mp)
    if not model:
        raise RuntimeError(f"{spec['gguf']}: llama.cpp could not load it")
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    out: dict[str, Any] = {"n_vocab": n_vocab}
    ids = list(spec.get("prompt_ids") or [])
    if spec.get("prompt_text") is not None:
        raw = spec["prompt_text"].encode()
        buf = (ll.llama_token * (len(raw) + 16))()
        n = ll.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize: needs {-n} tokens")
        ids = [int(buf[i]) for i in range(n)]
        out["prompt_ids"] = ids
    cp = ll.llama_context_default_params()
    cp.n_ctx = len(ids) + int(spec["tokens"]) + 8
    cp.n_batch = cp.n_ctx
    cp.n_ubatch = cp.n_ctx
    cp.n_threads = cp.n_threads_batch = int(spec.get("threads", 2))
    ctx = ll.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    tokens: list[int] = []
    margins: list[float] = []
    forced = spec.get("forced")  # teacher forcing: feed these tokens instead of our own argmax
    feed = ids
    for i in range(int(spec["tokens"])):
        arr = (ll.llama_token * len(feed))(*feed)
        rc = ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(feed)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
        top = np.argsort(logits)[-2:]
        tokens.append(int(top[-1]))
        margins.append(float(logits[top[-1]] - logits[top[-2]]))
        feed = [int(forced[i])] if forced else [tokens[-1]]
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    out.update(tokens=tokens, margins=margins)
    return out


def _hf_greedy(hf_dir: Path, prompt_ids: list[int], tokens: int) -> dict[str, Any]:
    """Greedy decoding with transformers, float32, KV cache: token ids and the top-1 - top-2 logit margin."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    out_tokens: list[int] = []
    margins: list[float] = []
    with torch.no_grad():
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        res = model(input_ids=ids, use_cache=True)
        for _ in range(tokens):
            logits = res.logits[0, -1].float()
            top = torch.topk(logits, 2)
            tok = int(top.indices[0])
            out_tokens.append(tok)
            margins.append(float(top.values[0] - top.values[1]))
            res = model(input_ids=torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    del model
    return {"tokens": out_tokens, "margins": margins}


def compare_greedy(hf: Sequence[int], llama: Sequence[int]) -> int | None:
    """The first position where two greedy token sequences differ (a shorter one differs where it ends), or
    None if they are equal."""
    for i, (a, b) in enumerate(zip(hf, llama, strict=False)):
        if a != b:
            return i
    return None if len(hf) == len(llama) else min(len(hf), len(llama))


def forced_mismatches(
    hf: Sequence[int], llama: Sequence[int], hf_margins: Sequence[float], tie_margin: float
) -> tuple[list[int], list[int]]:
    """Teacher-forced comparison (llama.cpp predicting each next token after transformers' own prefix):
    (positions that differ although transformers' top-1 margin there is >= ``tie_margin``: failures,
    positions that differ at a near-tie, margin < ``tie_margin``: excused)."""
    bad, ties = [], []
    for i, (a, b) in enumerate(zip(hf, llama, strict=True)):
        if a != b:
            (ties if hf_margins[i] < tie_margin else bad).append(i)
    return bad, ties


def greedy_check(
    hf_dir: Path, gguf: Path, *, sdist: Path, lib_dir: Path, tokens: int = CHECK_TOKENS,
    tie_margin: float = 0.0,
) -> dict[str, Any]:
    """Greedy tokens of the f16 GGUF vs transformers on the same prompt (text through both tokenizers if
    the checkpoint has one, else :data:`CHECK_PROMPT_IDS`). Raises :class:`CheckFailed` on any difference.

    ``tie_margin`` > 0 (opt-in, recorded): after a strict free-running mismatch, the tokens are compared
    teacher-forced, and a position may differ only where transformers' float32 top-1 - top-2 logit gap is
    below ``tie_margin`` (a tie that f16 weights cannot resolve; random-weight models have them). Each
    excused position is recorded in ``near_ties``; any other difference still fails."""
    has_tok = (hf_dir / "tokenizer.json").is_file()
    spec: dict[str, Any] = {"sdist": str(sdist), "lib_dir": str(lib_dir), "gguf": str(gguf), "tokens": tokens,
                            "threads": 2}
    result: dict[str, Any] = {"gguf": str(gguf), "hf": str(hf_dir), "tokens": tokens}
    if has_tok:
        from tokenizers import Tokenizer

        prompt_ids = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(
            CHECK_PROMPT_TEXT, add_special_tokens=False).ids
        spec["prompt_text"] = CHECK_PROMPT_TEXT
        result["prompt_text"] = CHECK_PROMPT_TEXT
    else:
        prompt_ids = list(CHECK_PROMPT_IDS)
        spec["prompt_ids"] = prompt_ids
    result["prompt_ids"] = prompt_ids
    t0 = time.perf_counter()
    ref = _hf_greedy(hf_dir, prompt_ids, tokens)
    proc = subprocess.run([sys.executable, "-m", "edgemoe_ort.bench.llama", "_greedy", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckFailed(f"llama.cpp greedy run failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(hf_tokens=ref["tokens"], hf_margins=ref["margins"], llama_tokens=got["tokens"],
                  llama_margins=got["margins"], seconds=time.perf_counter() - t0)
    if has_tok and got.get("prompt_ids") != prompt_ids:
        result["passed"] = False
        result["error"] = (f"tokenization differs: llama.cpp {got.get('prompt_ids')} vs transformers "
                           f"{prompt_ids} for {CHECK_PROMPT_TEXT!r}")
        raise CheckFailed(result["error"], result)
    first = compare_greedy(ref["tokens"], got["tokens"])
    result["first_difference"] = first
    result["passed"] = first is None
    result["mode"] = "strict"
    if first is not None and tie_margin > 0:
        forced = subprocess.run([sys.executable, "-m", "edgemoe_ort.bench.llama", "_greedy",
                                 json.dumps({**spec, "forced": ref["tokens"]})],
                                capture_output=True, text=True)
        if forced.returncode != 0:
            raise CheckFailed(f"llama.cpp forced run failed (rc {forced.returncode}): "
                              f"{forced.stderr[-2000:]}")
        fgot = json.loads(forced.stdout.strip().splitlines()[-1])
        bad, ties = forced_mismatches(ref["tokens"], fgot["tokens"], ref["margins"], tie_margin)
        result.update(mode=f"teacher-forced, near-ties (margin < {tie_margin}) excused",
                      forced_llama_tokens=fgot["tokens"], near_ties=ties, tie_margin=tie_margin,
                      strict_error=(f"free-running greedy tokens differ from position {first} (transformers' "
                                    f"margin there {ref['margins'][first]:.4f})"))
        if not bad:
            result["passed"] = True
            print(f"edgemoe_ort.bench.llama: WARNING: strict greedy check failed at position {first}; "
                  f"teacher-forced, {len(ties)} near-tie position(s) {ties} excused (--tie-margin "
                  f"{tie_margin}), all others equal", file=sys.stderr)
            return result
        result["error"] = (f"teacher-forced tokens differ at positions {bad} where transformers' margin is "
                           f">= {tie_margin}: transformers {ref['tokens']} vs llama.cpp {fgot['tokens']}")
        raise CheckFailed(result["error"], result)
    if first is not None:
        result["error"] = (f"greedy tokens differ from position {first}: transformers {ref['tokens']} vs "
                           f"llama.cpp {got['tokens']} (transformers' top-1 margin there "
                           f"{ref['margins'][first] if first < len(ref['margins']) else float('nan'):.4f})")
        raise CheckFailed(result["error"], result)
    return result


# --- the convert subcommand --------------------------------------------------------------------------------
def _atomic_run(cmd: Sequence[str], out: Path, log: Path) -> str:
    """Run ``cmd`` (which writes ``out`` + ``.tmp``), then move the result into place; returns the log."""
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    log.write_text(text)
    tmp = out.with_name(out.name + ".tmp")
    if proc.returncode != 0 or not tmp.is_file():
        raise RuntimeError(f"{' '.join(cmd)}: rc {proc.returncode}; log {log}:\n{text[-3000:]}")
    tmp.replace(out)
    print(f"  {out} ({out.stat().st_size / MiB:.0f} MiB, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return text


def convert_checkpoint(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    llama_cpp: str | Path,
    bin_dir: str | Path,
    tokenizer_from: str | Path | None = None,
    quant_types: Sequence[str] = QUANT_TYPES,
    check_tokens: int = CHECK_TOKENS,
    tie_margin: float = 0.0,
) -> dict[str, Any]:
    """f16 GGUF -> greedy check -> quantized GGUFs -> ``out_dir/check.json`` (returned). Existing GGUFs are
    kept (delete them to redo). Raises :class:`CheckFailed` (after writing ``check-failed.json``)."""
    out, llama_cpp, bin_dir = Path(out_dir), Path(llama_cpp).resolve(), Path(bin_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sdist = llama_cpp.parent.parent
    src = stage_checkpoint(hf_dir, out / "hf", tokenizer_from)
    nice = ["nice", "-n", "10"]
    f16 = out / "f16.gguf"
    if not f16.is_file():
        cmd = [*nice, sys.executable, "-m", "edgemoe_ort.bench.llama", "_convert", str(llama_cpp), str(src),
               "--outtype", "f16", "--outfile", str(f16) + ".tmp"]
        _atomic_run(cmd, f16, out / "convert-f16.log")
    try:
        check = greedy_check(src, f16, sdist=sdist, lib_dir=bin_dir, tokens=check_tokens,
                             tie_margin=tie_margin)
    except CheckFailed as exc:
        (out / "check-failed.json").write_text(json.dumps(exc.record, indent=1))
        raise
    (out / "check-failed.json").unlink(missing_ok=True)
    report: dict[str, Any] = {"hf": str(Path(hf_dir).resolve()), "staged": str(src), "check": check,
                              "gguf": {}, "notes": []}
    for q in quant_types:
        dst = out / f"{q}.gguf"
        qlog = out / f"quantize-{q}.log"
        if not dst.is_file():
            cmd = [*nice, str(bin_dir / "llama-quantize"), str(f16), str(dst) + ".tmp", q, "2"]
            _atomic_run(cmd, dst, qlog)
        fallbacks = parse_quantize_fallbacks(qlog.read_text()) if qlog.is_file() else []
        report["notes"] += [f"{q}: {line}" for line in fallbacks]
    for g in sorted(out.glob("*.gguf")):
        report["gguf"][g.stem] = gguf_split_bytes(g)
    (out / "check.json").write_text(json.dumps(report, indent=1))
    return report


def _print_report(report: dict[str, Any]) -> None:
    c = report["check"]
    if c.get("near_ties"):
        print(f"greedy check passed ({c['mode']}): {c['strict_error']}; near-tie positions {c['near_ties']}")
    else:
        print(f"greedy check passed: {len(c['hf_tokens'])} tokens equal (transformers float32 vs f16 GGUF), "
              f"smallest top-1 margin {min(c['hf_margins']):.4f}")
    for name, s in report["gguf"].items():
        print(f"  {name}: dense {s['dense_bytes'] / MiB:.1f} MiB, experts {s['expert_bytes'] / MiB:.1f} MiB "
              f"({s['expert_types']}), file {s['file_bytes'] / MiB:.1f} MiB")
    for n in report["notes"]:
        print(f"  note: {n}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``convert`` (see the module docstring), ``bench`` (:mod:`.llama_cap`); ``_convert`` and
    ``_greedy`` are internal (one process each)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_convert"]:
        _run_converter(Path(argv[1]), [argv[2], *argv[3:]])
        return 0
    if argv[:1] == ["_greedy"]:
        print(json.dumps(_llama_greedy(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["bench"]:
        from edgemoe_ort.bench.llama_cap import main as bench_main

        return bench_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m edgemoe_ort.bench.llama",
                                 description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="HF checkpoint -> f16 GGUF -> greedy check -> Q4_0, Q4_K_M")
    c.add_argument("--llama-cpp", required=True, type=Path, help="the vendored llama.cpp tree")
    c.add_argument("--bin", required=True, type=Path, help="the folder of llama-quantize and libllama.so")
    c.add_argument("--hf", required=True, type=Path, help="HF checkpoint folder")
    c.add_argument("--out", required=True, type=Path, help="output folder (GGUFs, logs, check.json)")
    c.add_argument("--tokenizer-from", type=Path, help="tokenizer files for a checkpoint without any")
    c.add_argument("--quant", default=",".join(QUANT_TYPES), help="llama-quantize types (comma-separated)")
    c.add_argument("--check-tokens", type=int, default=CHECK_TOKENS)
    c.add_argument("--tie-margin", type=float, default=0.0,
                   help="opt-in: excuse teacher-forced differences where transformers' top-2 gap is below "
                        "this (default 0: strict free-running equality)")
    sub.add_parser("bench", help="llama.cpp vs edgemoe under memory caps (python -m ... bench -h)")
    a = ap.parse_args(argv)
    try:
        report = convert_checkpoint(a.hf, a.out, llama_cpp=a.llama_cpp, bin_dir=a.bin,
                                    tokenizer_from=a.tokenizer_from,
                                    quant_types=[q for q in a.quant.split(",") if q],
                                    check_tokens=a.check_tokens, tie_margin=a.tie_margin)
    except CheckFailed as exc:
        print(f"error: GREEDY CHECK FAILED, nothing is timed: {exc}", file=sys.stderr)
        return 1
    _print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
