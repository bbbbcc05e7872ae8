"""Every bad input gives a Python exception naming the file / expert, never a crash or wrong numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgemoe_ort.bundle.testing import make_moe_graph, make_synthetic_bundle, random_routing
from edgemoe_ort.runtime import ops
from edgemoe_ort.runtime.ops import RuntimeOptions, open_session, parse_budget


@pytest.fixture
def bundle(tmp_path):
    return make_synthetic_bundle(tmp_path / "b", num_experts=8, top_k=2, dtype="int8")


def edit_manifest(b, fn):
    p = b.path / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def feeds(X, idx, w):
    return {"X": X, "topk_indices_0": idx, "topk_weights_0": w}


def inputs(T=4, seed=0):
    rng = np.random.default_rng(seed)
    idx, w = random_routing(T, 8, 2, rng)
    return rng.standard_normal((T, 64)).astype(np.float32), idx, w


def test_budget_below_largest_expert(bundle):
    largest = max(int(bundle.expert_record(0, e)["length"]) for e in range(8))
    with pytest.raises(Exception, match="budget below the largest expert") as ei:
        open_session(bundle.graph_path(), bundle.path, RuntimeOptions(budget=largest - 1))
    msg = str(ei.value)
    assert "manifest.json" in msg and "layer 0 expert" in msg and str(largest) in msg
    open_session(bundle.graph_path(), bundle.path, RuntimeOptions(budget=largest))  # exactly enough is fine


def test_missing_store(bundle):
    (bundle.path / "experts.bin").unlink()
    with pytest.raises(Exception, match="missing store") as ei:
        open_session(bundle.graph_path(), bundle.path)
    assert "experts.bin" in str(ei.value)


def test_truncated_store(bundle):
    p = bundle.path / "experts.bin"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 4096)
    with pytest.raises(Exception, match="truncated store") as ei:
        open_session(bundle.graph_path(), bundle.path)
    assert "experts.bin" in str(ei.value) and "expected" in str(ei.value)


@pytest.mark.parametrize("io", ["direct", "buffered", "mmap"])
def test_checksum_mismatch(bundle, io):
    rec = bundle.expert_record(0, 5)
    with open(bundle.store_path, "r+b") as f:
        f.seek(rec["offset"] + 100)
        c = f.read(1)
        f.seek(rec["offset"] + 100)
        f.write(bytes([c[0] ^ 0xFF]))
    s = open_session(bundle.graph_path(), bundle.path, RuntimeOptions(io=io))
    X, idx, w = inputs()
    ok = np.where(idx == 5, -1, idx)
    s.run(None, feeds(X, ok, w))  # other experts are fine
    idx[0, 0] = 5
    for _ in range(2):  # the corrupt blob is never cached: it fails every time
        with pytest.raises(Exception, match="checksum mismatch") as ei:
            s.run(None, feeds(X, idx, w))
        msg = str(ei.value)
        assert "experts.bin" in msg and "layer 0 expert 5" in msg and rec["checksum"] in msg
    st = s.stats()
    assert st["resident_bytes"] <= st["budget_bytes"]


def test_manifest_path_outside_bundle(bundle, tmp_path):
    shutil.copy(bundle.store_path, tmp_path / "experts.bin")  # exists, but outside the bundle
    edit_manifest(bundle, lambda m: m["store"].__setitem__("file", "../experts.bin"))
    with pytest.raises(Exception, match="inside the bundle") as ei:
        open_session(bundle.graph_path(), bundle.path)
    assert "manifest.json" in str(ei.value) and "store.file" in str(ei.value)
    edit_manifest(bundle, lambda m: m["store"].__setitem__("file", str(tmp_path / "experts.bin")))
    with pytest.raises(Exception, match="absolute"):
        open_session(bundle.graph_path(), bundle.path)


def test_record_past_end_of_store(bundle):
    def past(m):
        for r in m["experts"]:
            if r["expert"] == 3:
                r["offset"] = m["store"]["size"]

    edit_manifest(bundle, past)
    with pytest.raises(Exception, match="past the end of the store") as ei:
        open_session(bundle.graph_path(), bundle.path)
    assert "layer 0 expert 3" in str(ei.value) and "manifest.json" in str(ei.value)


def test_bad_index(bundle):
    s = open_session(bundle.graph_path(), bundle.path)
    X, idx, w = inputs()
    idx[2, 1] = 8
    with pytest.raises(Exception, match=r"topk_indices\[2, 1\]") as ei:
        s.run(None, feeds(X, idx, w))
    assert "found 8" in str(ei.value) and "manifest.json" in str(ei.value) and "layer 0" in str(ei.value)
    idx[2, 1] = -2
    with pytest.raises(Exception, match="found -2"):
        s.run(None, feeds(X, idx, w))
    idx[2, 1] = -1  # -1 is fine
    s.run(None, feeds(X, idx, w))


def dynamic_k_model(bundle, path: Path, **overrides) -> Path:
    lay = dict(bundle.layers[0])
    lay.update(overrides)
    model = make_moe_graph([lay])
    for vi in model.graph.input:
        if vi.name.startswith("topk_"):
            vi.type.tensor_type.shape.dim[1].dim_param = "K"
    onnx.save(model, path)
    return path


def test_k_mismatch(bundle, tmp_path):
    model = dynamic_k_model(bundle, tmp_path / "dynk.onnx")
    s = open_session(model, bundle.path)
    rng = np.random.default_rng(0)
    idx, w = random_routing(4, 8, 3, rng)
    X = rng.standard_normal((4, 64)).astype(np.float32)
    with pytest.raises(Exception, match="top_k = 2") as ei:
        s.run(None, feeds(X, idx, w))
    assert "found 3" in str(ei.value) and "manifest.json" in str(ei.value)
    with pytest.raises(Exception, match="topk_weights shape"):
        s.run(None, feeds(X, idx[:, :2], w))


def test_attribute_mismatch(bundle, tmp_path):
    with pytest.raises(Exception, match="num_experts") as ei:
        open_session(dynamic_k_model(bundle, tmp_path / "ne.onnx", num_experts=7), bundle.path)
    assert "manifest.json" in str(ei.value)
    with pytest.raises(Exception, match="activation"):
        open_session(dynamic_k_model(bundle, tmp_path / "act.onnx", activation="relu"), bundle.path)
    with pytest.raises(Exception, match="layer"):
        open_session(dynamic_k_model(bundle, tmp_path / "layer.onnx", layer=3), bundle.path)


def test_bad_options():
    with pytest.raises(ValueError, match="policy"):
        RuntimeOptions(policy="fifo")
    with pytest.raises(ValueError, match="io"):
        RuntimeOptions(io="aio")
    with pytest.raises(ValueError, match="io_threads"):
        RuntimeOptions(io_threads=0)
    with pytest.raises(ValueError, match="budget"):
        RuntimeOptions(budget="12 parsecs")
    with pytest.raises(ValueError, match="intra_op_threads"):
        RuntimeOptions(intra_op_threads=-1)


def test_parse_budget():
    assert parse_budget(None, 1000) == 1000
    assert parse_budget(4096, 1000) == 4096
    assert parse_budget("256MB", 0) == 256 * 10**6
    assert parse_budget("1GiB", 0) == 2**30
    assert parse_budget("1.5 KiB", 0) == 1536
    assert parse_budget("25%", 1000) == 250
    for bad in ("0", "-3", "150%", "abc", "1.5", True, 0, 2.5):
        with pytest.raises(ValueError):
            parse_budget(bad, 1000)


def test_missing_bundle_dir_and_library(tmp_path, monkeypatch, bundle):
    with pytest.raises(FileNotFoundError, match="not a bundle folder"):
        open_session(bundle.graph_path(), tmp_path / "nope")
    monkeypatch.setenv(ops.ENV_LIB, str(tmp_path / "libnothing.so"))
    with pytest.raises(FileNotFoundError, match="EDGEMOE_CUSTOMOPS_LIB"):
        ops.library_path()
    monkeypatch.delenv(ops.ENV_LIB)
    assert ops.library_path().name == "libedgemoe_customops.so"


@pytest.mark.parametrize("io", ["direct", "buffered", "mmap"])
def test_checksum_verified_on_every_read(bundle, io):
    """A blob that reads back corrupt after a good first read fails that run and is not cached (issue 15)."""
    largest = max(int(bundle.expert_record(0, e)["length"]) for e in range(8))
    opts = RuntimeOptions(io=io, budget=2 * largest, policy="lru")
    s = open_session(bundle.graph_path(), bundle.path, opts)
    X, idx, w = inputs()
    idx[:] = [5, 6]
    s.run(None, feeds(X, idx, w))  # experts 5 and 6 read, verified, cached
    idx[:] = [1, 2]
    s.run(None, feeds(X, idx, w))  # evicts them
    rec = bundle.expert_record(0, 5)
    with open(bundle.store_path, "r+b") as f:
        f.seek(rec["offset"] + 100)
        c = f.read(1)
        f.seek(rec["offset"] + 100)
        f.write(bytes([c[0] ^ 0xFF]))
    idx[:] = [5, 6]
    with pytest.raises(Exception, match="checksum mismatch") as ei:
        s.run(None, feeds(X, idx, w))
    msg = str(ei.value)
    assert "experts.bin" in msg and "layer 0 expert 5" in msg and rec["checksum"] in msg
    with open(bundle.store_path, "r+b") as f:  # repaired: the next run reads expert 5 again and succeeds
        f.seek(rec["offset"] + 100)
        f.write(c)
    s.run(None, feeds(X, idx, w))
    st = s.stats()
    assert st["resident_bytes"] <= st["budget_bytes"]


def test_deeply_nested_manifest_is_an_error_not_a_crash(bundle):
    """A value nested 100,000 levels deep (~200 KB) once overflowed the native reader's stack (issue 15)."""
    p = bundle.path / "manifest.json"
    m = json.loads(p.read_text())
    text = json.dumps(m).replace('"format_version": 1', '"format_version": ' + "[" * 100000 + "]" * 100000, 1)
    assert len(text) > 200000
    p.write_text(text)
    code = (
        "import sys\n"
        "from edgemoe_ort.runtime.ops import open_session\n"
        "try:\n"
        f"    open_session({str(bundle.graph_path())!r}, {str(bundle.path)!r})\n"
        "except Exception as e:\n"
        "    print(str(e)[:2000]); sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])  # an exception, not SIGSEGV (-11)
    assert "manifest.json" in r.stdout and "nested too deeply" in r.stdout


def test_invalid_utf8_in_the_manifest_is_our_error(bundle):
    """Bytes that are not UTF-8, quoted by the native parser's message, once reached Python as a
    UnicodeDecodeError hiding the real error (issue 15, defect 6)."""
    p = bundle.path / "manifest.json"
    raw = p.read_bytes()
    assert b'"activation": "silu"' in raw
    p.write_bytes(raw.replace(b'"activation": "silu"', b'"activation": "si\xfflu"', 1))
    with pytest.raises(Exception) as info:
        open_session(bundle.graph_path(), bundle.path)
    assert not isinstance(info.value, UnicodeDecodeError), info.value
    msg = str(info.value)
    assert "manifest.json" in msg and "not valid JSON" in msg and "UTF-8" in msg, msg
