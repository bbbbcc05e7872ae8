"""Tokenizer graphs (issue 16, item 2): the exporter writes tokenizer / detokenizer ONNX graphs
(onnxruntime-extensions ops) into the bundle, the device runtime can run them instead of ``tokenizers``, and a
C++ host runs a bundle end to end with the ONNX Runtime C/C++ API only.

On the default model: the graph tokenizer gives the ids of ``tokenizers`` on the whole held-out split (each
file on its own, as edgemoe-eval / edgemoe-profile tokenize, in batches as the profile does, and in
600-character chunks) and the detokenizer its text; a bundle without graphs keeps working; an unsupported
tokenizer is reported, not a crash.

``python tests/test_tokenizer_graphs.py [BUNDLE]`` measures both engines on the held-out split (the numbers
behind ``tokenizer="auto"``, docs/bundle-format.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # models/ (the default model's corpus) when run as a script
    sys.path.insert(0, str(REPO))

from edgemoe_ort.bundle import Bundle  # noqa: E402
from edgemoe_ort.bundle.writer import dump_manifest  # noqa: E402
from edgemoe_ort.runtime.generate import load_tokenizer  # noqa: E402
from edgemoe_ort.runtime.tokenizer import OrtxTokenizer, ortx_library_path  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "edgemoe-tiny-mixtral"
DEMO_BUNDLE = REPO / "build" / "demo-bundle"
HOST_SRC = REPO / "examples" / "host"
HOST_BUILD = REPO / "build" / "host-demo"
PROMPT = "def fibonacci(n):"
CHUNK_CHARS = 600

needs_ortx = pytest.mark.skipif(ortx_library_path() is None, reason="onnxruntime-extensions is not installed")
pytestmark = needs_ortx


def heldout_texts() -> list[str]:
    """The default model's held-out split (models/eval_default.py): its files, in the split's order."""
    from models.eval_default import load_corpus

    return [f.text for f in load_corpus("heldout")]


def chunks(texts: list[str], size: int = CHUNK_CHARS) -> list[str]:
    """The split's text cut every ``size`` characters (starts inside words, lines and runs of spaces)."""
    text = "".join(texts)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _strip_graphs(bundle: Path) -> None:
    """Make ``bundle`` look exported before tokenizer graphs existed."""
    m = json.loads((bundle / "manifest.json").read_text())
    m["graphs"] = {r: f for r, f in m["graphs"].items() if r not in ("tokenizer", "detokenizer")}
    m.pop("tokenizer_graphs", None)
    (bundle / "manifest.json").write_text(dump_manifest(m))
    for name in ("tokenizer.onnx", "detokenizer.onnx"):
        (bundle / name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The default model's bundle with tokenizer graphs: ``build/demo-bundle`` (``make demo``) upgraded with
    :func:`add_tokenizer_graphs` if it is there (seconds), else the session's exported ``tiny_bundle`` (the
    exporter wrote them). Tests must not modify it: copy it."""
    dst = tmp_path_factory.mktemp("tokgraphs") / "tiny"
    try:
        Bundle.open(DEMO_BUNDLE)
        shutil.copytree(DEMO_BUNDLE, dst)
        _strip_graphs(dst)
        from edgemoe_ort.export.tokenizer_graphs import add_tokenizer_graphs

        assert add_tokenizer_graphs(dst).ok
    except Exception:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(request.getfixturevalue("tiny_bundle"), dst)
    return dst


@pytest.fixture(scope="module")
def engines(bundle: Path) -> tuple[Any, OrtxTokenizer]:
    b = Bundle.open(bundle)
    ref, graphs = load_tokenizer(b, "tokenizers"), load_tokenizer(b, "ortx")
    assert isinstance(graphs, OrtxTokenizer) and not isinstance(ref, OrtxTokenizer)
    return ref, graphs


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


# --- identity on the held-out split ---------------------------------------------------------------------
def test_heldout_ids_identical(engines: tuple[Any, OrtxTokenizer]) -> None:
    ref, graphs = engines
    texts = heldout_texts()
    assert len(texts) >= 20
    n_ids = 0
    for i, text in enumerate(texts):  # each file on its own, as edgemoe-eval and edgemoe-profile do
        want = ref.encode(text, add_special_tokens=False).ids
        assert graphs.encode(text).ids == want, f"held-out file {i}"
        n_ids += len(want)
    for s in range(0, len(texts), 32):  # batches of 32 files, as edgemoe-profile (corpus._stream)
        batch = texts[s : s + 32]
        want_b = [e.ids for e in ref.encode_batch(batch, add_special_tokens=False)]
        assert [e.ids for e in graphs.encode_batch(batch)] == want_b, f"batch at file {s}"
    cut = chunks(texts)
    want_c = [e.ids for e in ref.encode_batch(cut, add_special_tokens=False)]
    got_c = [graphs.encode(c).ids for c in cut]
    bad = [i for i, (g, w) in enumerate(zip(got_c, want_c, strict=True)) if g != w]
    assert not bad, f"{len(bad)} of {len(cut)} chunks differ, first {bad[0]}: {cut[bad[0]][:60]!r}"
    print(f"\nheld-out split: {len(texts)} files, {n_ids} ids identical; {len(cut)} chunks of {CHUNK_CHARS} "
          f"characters ({sum(map(len, want_c))} ids) identical")


def test_heldout_detokenize_identical(engines: tuple[Any, OrtxTokenizer]) -> None:
    ref, graphs = engines
    texts = heldout_texts()
    for i, text in enumerate(texts):
        ids = ref.encode(text, add_special_tokens=False).ids
        want = ref.decode(ids, skip_special_tokens=True)
        assert want == text  # byte-level BPE is lossless
        assert graphs.decode(ids) == want, f"held-out file {i}"
    # what generation does: decode the tokens so far after every token, also inside a UTF-8 character
    text = "caf\u00e9 \u65e5\u672c\u8a9e emoji \U0001f600\U0001f44d\U0001f3fd <|endoftext|> end"
    ids = ref.encode(text, add_special_tokens=False).ids
    for k in range(len(ids) + 1):
        assert graphs.decode(ids[:k]) == ref.decode(ids[:k], skip_special_tokens=True), k
    rng = np.random.default_rng(0)  # arbitrary token sequences: invalid UTF-8 becomes U+FFFD alike
    vocab = ref.get_vocab_size()
    for _ in range(200):
        seq = rng.integers(0, vocab, size=int(rng.integers(1, 12))).tolist()
        assert graphs.decode(seq) == ref.decode(seq, skip_special_tokens=True), seq


# --- the runtime --------------------------------------------------------------------------------------------
def test_runtime_engines_generate_alike(bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edgemoe_ort.runtime import MoEModel

    results = {}
    for engine in ("tokenizers", "ortx", "auto"):
        with MoEModel.load(bundle, tokenizer=engine) as model:
            results[engine] = (model.tokenizer_backend, model.prompt_ids(PROMPT),
                               model.generate(PROMPT, max_new_tokens=12))
    assert [results[e][0] for e in ("tokenizers", "ortx", "auto")] == ["tokenizers", "ortx", "tokenizers"]
    ref = results["tokenizers"]
    for engine in ("ortx", "auto"):
        assert results[engine][1] == ref[1]
        assert results[engine][2].tokens == ref[2].tokens and results[engine][2].text == ref[2].text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_runtime_imports_neither_torch_nor_transformers(bundle: Path) -> None:
    code = (
        "import sys\n"
        "from edgemoe_ort.runtime import MoEModel\n"
        f"m = MoEModel.load({str(bundle)!r}, tokenizer='ortx')\n"
        f"r = m.generate({PROMPT!r}, max_new_tokens=4)\n"
        "assert m.tokenizer_backend == 'ortx' and r.tokens\n"
        "print(sorted(k for k in ('torch', 'transformers', 'onnxruntime_extensions', 'tokenizers') "
        "if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout  # not even tokenizers: the graphs alone


def test_cli_tokenizer_flag(bundle: Path) -> None:
    from typer.testing import CliRunner

    from edgemoe_ort.cli import run_app

    def run(*args: str) -> Any:
        return CliRunner().invoke(run_app, [str(bundle), "-p", PROMPT, "-n", "6", "--json", *args],
                                  prog_name="edgemoe-run")

    got = {t: run("--tokenizer", t) for t in ("ortx", "tokenizers")}
    assert all(r.exit_code == 0 for r in got.values()), {t: r.stderr for t, r in got.items()}
    docs = {t: json.loads(r.stdout) for t, r in got.items()}
    for key in ("tokens", "text", "prompt_tokens"):
        assert docs["ortx"][key] == docs["tokenizers"][key], key
    bad = run("--tokenizer", "sentencepiece")
    assert bad.exit_code == 2 and "--tokenizer" in bad.stderr and "Traceback" not in bad.stderr


def test_bundle_without_graphs_keeps_working(bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
                                              ) -> None:
    from edgemoe_ort.runtime import MoEModel

    old = copy_of(bundle, tmp_path)
    _strip_graphs(old)
    with MoEModel.load(old) as model:
        want = model.generate(PROMPT, max_new_tokens=8)
        assert model.tokenizer_backend == "tokenizers"
    with caplog.at_level(logging.WARNING, logger="edgemoe_ort"):
        with MoEModel.load(old, tokenizer="ortx") as model:  # asked for graphs: says why not, falls back
            assert model.tokenizer_backend == "tokenizers"
            assert model.generate(PROMPT, max_new_tokens=8).tokens == want.tokens
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "no tokenizer graphs" in warned and "using the tokenizers package" in warned
    # ids-only bundles stay ids-only, graphs or not
    ids_only = copy_of(bundle, tmp_path / "ids")
    m = json.loads((ids_only / "manifest.json").read_text())
    m["tokenizer"] = None
    shutil.rmtree(ids_only / "tokenizer")
    (ids_only / "manifest.json").write_text(dump_manifest(m))
    with MoEModel.load(ids_only, tokenizer="ortx") as model:
        assert model.tokenizer is None and model.tokenizer_backend is None
        assert model.generate(want.tokens[:3], max_new_tokens=2).tokens


def test_add_tokenizer_graphs_to_an_existing_bundle(bundle: Path, tmp_path: Path) -> None:
    from edgemoe_ort.bundle.profile import manifest_identity, read_profile, write_profile
    from edgemoe_ort.bundle.writer import foreign_entries
    from edgemoe_ort.export.tokenizer_graphs import main
    from edgemoe_ort.profile import profile_bundle
    from edgemoe_ort.runtime import MoEModel

    old = copy_of(bundle, tmp_path)
    _strip_graphs(old)
    (old / "profile.json").unlink(missing_ok=True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "shlex.py"):
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, corpus / name)
    write_profile(old, profile_bundle(old, [corpus], tokens=600, budgets=("50%",)))
    assert main([str(old)]) == 0
    b = Bundle.open(old)
    assert b.graphs == {"decoder": "model.onnx", "tokenizer": "tokenizer.onnx",
                        "detokenizer": "detokenizer.onnx"}
    assert b.manifest["tokenizer_graphs"]["status"] == "ok"
    assert read_profile(old)["bundle"]["manifest_xxh3"] == manifest_identity(old)  # the profile is stamped
    assert foreign_entries(old) == (True, [])  # everything it wrote is part of the bundle (--force may go)
    before = (old / "manifest.json").read_bytes()
    assert main([str(old)]) == 0 and (old / "manifest.json").read_bytes() == before  # idempotent
    with MoEModel.load(old, tokenizer="ortx") as model:
        assert model.tokenizer_backend == "ortx"


def test_stale_graphs_are_not_used(bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edgemoe_ort.runtime import MoEModel

    b = copy_of(bundle, tmp_path)
    tj = b / "tokenizer" / "tokenizer.json"
    tj.write_text(json.dumps(json.loads(tj.read_text()), indent=1))  # the same tokenizer, other bytes
    with caplog.at_level(logging.WARNING, logger="edgemoe_ort"), MoEModel.load(b, tokenizer="ortx") as model:
        assert model.tokenizer_backend == "tokenizers"
    assert "made from another" in caplog.text


# --- unsupported tokenizers ---------------------------------------------------------------------------------
def _variant(name: str) -> dict[str, Any]:
    tok = json.loads((DEFAULT_MODEL / "tokenizer.json").read_text())
    if name == "metaspace":  # SentencePiece style (Mixtral, Llama 2)
        tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                                "split": True}
        tok["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                          "split": True}
    elif name == "split-regex":  # Llama 3 / Qwen2 style
        tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    elif name == "normalizer":
        tok["normalizer"] = {"type": "NFC"}
    elif name == "wordlevel":
        tok["model"] = {"type": "WordLevel", "vocab": tok["model"]["vocab"], "unk_token": "<|endoftext|>"}
    elif name == "no-endoftext":
        tok["added_tokens"] = [a for a in tok["added_tokens"] if a["content"] != "<|endoftext|>"]
    return tok


@pytest.mark.parametrize(("name", "reason"), [
    ("metaspace", "pre_tokenizer Metaspace"),
    ("split-regex", "pre_tokenizer Sequence[Split, ByteLevel]"),
    ("normalizer", "normalizer NFC"),
    ("wordlevel", "model 'WordLevel'"),
    ("no-endoftext", "'<|endoftext|>'"),
])
def test_unsupported_tokenizer_is_reported(name: str, reason: str, tmp_path: Path) -> None:
    from edgemoe_ort.export.tokenizer_graphs import build_tokenizer_graphs

    (tmp_path / "tokenizer.json").write_text(json.dumps(_variant(name)))
    made = build_tokenizer_graphs(tmp_path)
    assert made.status == "unsupported" and made.tokenizer is None
    assert reason in made.reason, made.reason
    assert made.info == {"status": "unsupported", "reason": made.reason}


def test_unsupported_tokenizer_bundle_falls_back(bundle: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from edgemoe_ort.export.tokenizer_graphs import main
    from edgemoe_ort.runtime import MoEModel

    b = copy_of(bundle, tmp_path)
    (b / "tokenizer" / "tokenizer.json").write_text(json.dumps(_variant("metaspace")))
    assert main([str(b), "--force"]) == 1  # cannot be expressed: recorded, not written
    manifest = Bundle.open(b).manifest
    assert manifest["tokenizer_graphs"]["status"] == "unsupported"
    assert "Metaspace" in manifest["tokenizer_graphs"]["reason"]
    assert set(manifest["graphs"]) == {"decoder"} and not (b / "tokenizer.onnx").exists()
    with caplog.at_level(logging.WARNING, logger="edgemoe_ort"), MoEModel.load(b, tokenizer="ortx") as model:
        assert model.tokenizer_backend == "tokenizers"
        assert model.generate(PROMPT, max_new_tokens=4).tokens
    assert "unsupported: pre_tokenizer Metaspace" in caplog.text
    assert "using the tokenizers package" in caplog.text


def test_export_hook_records_the_graphs(tmp_path: Path) -> None:
    from edgemoe_ort.bundle import BundleWriter
    from edgemoe_ort.bundle.writer import foreign_entries
    from edgemoe_ort.export.tokenizer_graphs import write_tokenizer_graphs

    rng = np.random.default_rng(0)
    with BundleWriter(tmp_path / "b", family="synthetic") as w:
        w.add_layer(0, num_experts=2, top_k=1, hidden=8, intermediate=4, gated=True, activation="silu")
        for e in range(2):
            w_in, w_out = rng.standard_normal((8, 8), np.float32), rng.standard_normal((8, 4), np.float32)
            w.add_expert(0, e, w_in, w_out, dtype="fp32")
        w.add_tokenizer(DEFAULT_MODEL)
        assert write_tokenizer_graphs(w, DEFAULT_MODEL).ok
    b = Bundle.open(tmp_path / "b")
    assert b.graphs == {"tokenizer": "tokenizer.onnx", "detokenizer": "detokenizer.onnx"}
    info = b.manifest["tokenizer_graphs"]
    assert info["status"] == "ok" and info["made_with"].startswith("onnxruntime-extensions ")
    assert foreign_entries(b.path) == (True, [])


# --- the C++ host -------------------------------------------------------------------------------------------
def _ort_include() -> Path | None:
    for cand in (os.environ.get("ORT_INCLUDE_DIR"),
                 (REPO / "build" / "ort-include.txt").read_text().strip()
                 if (REPO / "build" / "ort-include.txt").is_file() else None,
                 "/usr/include/onnxruntime"):
        if cand and (Path(cand) / "onnxruntime_cxx_api.h").is_file():
            return Path(cand)
    return None


def _ort_library() -> Path | None:
    import onnxruntime

    found = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.1*"))
    return found[0] if found else None


def _libpython() -> Path | None:
    """libpython, for the wheel's extensions library (a Python extension module) to resolve its symbols."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    p = Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("LDLIBRARY")
    return p if p.is_file() else None


def test_cpp_host_runs_the_bundle_end_to_end(bundle: Path) -> None:
    from edgemoe_ort.runtime import MoEModel, RuntimeOptions
    from edgemoe_ort.runtime.ops import library_path, session_config_entries

    include, ortlib, libpython = _ort_include(), _ort_library(), _libpython()
    if shutil.which("cmake") is None or include is None or ortlib is None:
        pytest.skip("needs cmake, the ORT headers (make lib fetches them) and the wheel's libonnxruntime")
    if libpython is None:
        pytest.skip("this Python has no libpython.so for the wheel's extensions library to resolve against")
    cfg = subprocess.run(["cmake", "-S", HOST_SRC, "-B", HOST_BUILD, "-DCMAKE_BUILD_TYPE=Release",
                          f"-DORT_INCLUDE_DIR={include}", f"-DORT_LIBRARY={ortlib}"],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    build = subprocess.run(["cmake", "--build", HOST_BUILD, "-j2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    entries = session_config_entries(bundle.resolve(), RuntimeOptions(), "host-demo")
    argv = [str(HOST_BUILD / "host_demo"), str(bundle), "--ortx-lib", str(ortx_library_path()),
            "--edgemoe-lib", str(library_path()), "--preload", str(libpython), "--prompt", PROMPT,
            "--max-new-tokens", "16", *[a for k, v in entries.items() for a in ("--config", f"{k}={v}")]]
    ran = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    host = json.loads(ran.stdout)
    with MoEModel.load(bundle, RuntimeOptions()) as model:
        want = model.generate(PROMPT, max_new_tokens=16)
        assert host["prompt_ids"] == model.prompt_ids(PROMPT)
    assert host["tokens"] == want.tokens and host["text"] == want.text
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    print("\n" + shown.stdout)


# --- measurement (not a test) ------------------------------------------------------------------------------
def _best(fn: Any, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(bundle_dir: Path) -> None:
    """Both engines on the default model's held-out split, best of 3, one thread: encode each file, encode
    600-character chunks (prompt-sized), decode each file, and generation's pattern (decode the tokens so far
    after each of 64 tokens)."""
    b = Bundle.open(bundle_dir)
    t0 = time.perf_counter()
    ref = load_tokenizer(b, "tokenizers")
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    graphs = load_tokenizer(b, "ortx")
    t_graphs = time.perf_counter() - t0
    texts = heldout_texts()
    cut = chunks(texts)
    ids = [ref.encode(t, add_special_tokens=False).ids for t in texts]
    n = sum(map(len, ids))
    flat = [i for seq in ids for i in seq]
    wins = [flat[i : i + 64] for i in range(0, 64 * 200, 64)]
    print(f"held-out split: {len(texts)} files, {sum(map(len, texts))} characters, {n} tokens; "
          f"load: tokenizers {t_ref * 1e3:.0f} ms, ortx {t_graphs * 1e3:.0f} ms")
    rows = [
        ("encode, each file", n / 1e6, "Mtok/s",
         lambda e: [e.encode(t, add_special_tokens=False) for t in texts]),
        ("encode, 600-char chunks", len(cut), "us/chunk",
         lambda e: [e.encode(c, add_special_tokens=False) for c in cut]),
        ("decode, each file", n / 1e6, "Mtok/s",
         lambda e: [e.decode(i, skip_special_tokens=True) for i in ids]),
        ("decode after each token (64)", len(wins) * 64, "us/call",
         lambda e: [e.decode(w[:k], skip_special_tokens=True) for w in wins for k in range(1, 65)]),
    ]
    for name, amount, unit, fn in rows:
        tr, tg = _best(lambda fn=fn: fn(ref)), _best(lambda fn=fn: fn(graphs))
        if unit == "Mtok/s":
            vals = f"tokenizers {amount / tr:6.2f}  ortx {amount / tg:6.2f} {unit}"
        else:
            vals = f"tokenizers {tr / amount * 1e6:6.1f}  ortx {tg / amount * 1e6:6.1f} {unit}"
        print(f"{name:<30} {vals}   (ortx/tokenizers time {tg / tr:.2f})")


if __name__ == "__main__":
    import tempfile

    from edgemoe_ort.runtime.tokenizer import tokenizer_graphs_problem

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_BUNDLE
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer_graphs_problem(Bundle.open(target)) is not None:  # a copy with graphs
            from edgemoe_ort.export.tokenizer_graphs import add_tokenizer_graphs

            shutil.copytree(target, Path(tmp) / "b")
            target = Path(tmp) / "b"
            add_tokenizer_graphs(target)
        measure(target)
