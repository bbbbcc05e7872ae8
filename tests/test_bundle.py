"""Bundle writer / reader / validation (docs/bundle-format.md) and the test fixtures of edgemoe_ort.bundle."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import xxhash
from onnx import TensorProto, helper, numpy_helper

from edgemoe_ort.bundle import Bundle, BundleError, BundleExistsError, BundleWriter
from edgemoe_ort.bundle.testing import (
    make_moe_graph,
    make_synthetic_bundle,
    random_routing,
    reference_chain,
    reference_expert,
    reference_moe,
)
from edgemoe_ort.bundle.writer import check_target
from edgemoe_ort.quant import BITS, DTYPES, QUANTIZED_DTYPES, quantize

H, I, E = 32, 48, 4  # noqa: E741 - hidden, intermediate, experts


def small_bundle(path: Path, **kw: Any) -> Bundle:
    args: dict[str, Any] = dict(num_experts=E, hidden=H, intermediate=I, group_size=16)
    args.update(kw)
    return make_synthetic_bundle(path, **args)


def load_manifest(b: Path) -> dict[str, Any]:
    return json.loads((b / "manifest.json").read_text())


def save_manifest(b: Path, m: dict[str, Any]) -> None:
    (b / "manifest.json").write_text(json.dumps(m))


def siblings(p: Path) -> list[str]:
    return sorted(x.name for x in p.parent.iterdir())


# -- round trip --
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
def test_round_trip_every_dtype(tmp_path: Path, dtype: str, gated: bool, bias: bool) -> None:
    rng = np.random.default_rng(7)
    rows_in = 2 * I if gated else I
    experts = []
    path = tmp_path / "b"
    with BundleWriter(path, family="test", config={"hidden_size": H}) as w:
        w.add_layer(0, num_experts=2, top_k=1, hidden=H, intermediate=I, gated=gated, activation="gelu")
        for e in range(2):
            w_in = rng.standard_normal((rows_in, H)).astype(np.float32)
            w_out = rng.standard_normal((H, I)).astype(np.float32)
            b_in = rng.standard_normal(rows_in).astype(np.float32) if bias else None
            b_out = rng.standard_normal(H).astype(np.float32) if bias else None
            experts.append((w_in, w_out, b_in, b_out))
            w.add_expert(0, e, w_in, w_out, dtype=dtype, group_size=20, b_in=b_in, b_out=b_out)
        w.add_graph(
            "decoder",
            make_moe_graph([dict(hidden=H, top_k=1, num_experts=2, activation="gelu", gated=gated)]),
        )
    b = Bundle.open(path)
    assert b.family == "test" and b.config == {"hidden_size": H}
    assert b.layers == [
        {
            "layer": 0,
            "num_experts": 2,
            "top_k": 1,
            "hidden": H,
            "intermediate": I,
            "gated": gated,
            "activation": "gelu",
        }
    ]
    assert b.store_path == path / "experts.bin"
    assert b.store_bytes == (path / "experts.bin").stat().st_size and b.store_bytes % 4096 == 0
    assert b.graph_path() == path / "model.onnx"
    assert b.dense_bytes == (path / "model.onnx").stat().st_size
    data = (path / "experts.bin").read_bytes()
    for e, (w_in, w_out, b_in, b_out) in enumerate(experts):
        rec = b.expert_record(0, e)
        assert rec["offset"] % 4096 == 0 and rec["length"] % 4096 == 0 and rec["size"] <= rec["length"]
        assert rec["length"] - rec["size"] < 4096
        assert rec["checksum"] == xxhash.xxh3_64_hexdigest(data[rec["offset"] : rec["offset"] + rec["size"]])
        gs = 20 if dtype in QUANTIZED_DTYPES else 0
        assert rec["format"]["dtype"] == dtype and rec["format"]["group_size"] == gs
        assert all(t["offset"] % 64 == 0 for t in rec["tensors"].values())
        qin, qout = quantize(w_in, dtype, 20), quantize(w_out, dtype, 20)
        raw = b.read_expert(0, e)
        np.testing.assert_array_equal(raw["w_in"], qin.data)
        np.testing.assert_array_equal(raw["w_out"], qout.data)
        if dtype in QUANTIZED_DTYPES:
            np.testing.assert_array_equal(raw["w_in.scales"], qin.scales)
            np.testing.assert_array_equal(raw["w_out.zeros"], qout.zeros)
            assert raw["w_in.scales"].shape == (rows_in, math.ceil(H / 20))
        else:
            assert "w_in.scales" not in raw
        mi, mo, bi, bo = b.expert_matrices(0, e)
        assert mi.dtype == dtype and mi.shape == (rows_in, H) and mo.shape == (H, I)
        d_in, d_out, bi2, bo2 = b.dequantized_expert(0, e)
        np.testing.assert_array_equal(d_in, qin.dequantize())
        np.testing.assert_array_equal(d_out, qout.dequantize())
        if bias:
            np.testing.assert_array_equal(bi2, b_in)
            np.testing.assert_array_equal(bo2, b_out)
            assert set(raw) >= {"b_in", "b_out"}
        else:
            assert bi2 is None and bo2 is None and "b_in" not in raw
    s = b.summary()
    assert s["family"] == "test" and s["layers"] == 1 and s["experts"] == 2
    assert s["dtypes"] == {dtype: 2} and s["bits"] == {BITS[dtype]: 2}
    assert s["store_bytes"] == b.store_bytes and s["dense_bytes"] == b.dense_bytes
    assert [x.name for x in tmp_path.iterdir()] == ["b"]  # no temp folder left


def test_mixed_format_layer(tmp_path: Path) -> None:
    fmts = ["int8", "int4", "fp16", "fp32"]
    b = small_bundle(tmp_path / "b", dtype=fmts, num_layers=2)
    for li in range(2):
        assert [b.expert_record(li, e)["format"]["dtype"] for e in range(E)] == fmts
    assert b.expert_record(0, 1)["tensors"]["w_in"]["dtype"] == "u4"
    assert b.expert_record(0, 2)["tensors"]["w_in"]["dtype"] == "f16"
    assert b.summary()["bits"] == {4: 2, 8: 2, 16: 2, 32: 2}
    b3 = small_bundle(tmp_path / "d", dtype=["int3", "int2", "int4", "int3"])
    assert [b3.expert_record(0, e)["tensors"]["w_in"]["dtype"] for e in range(E)] == ["u3", "u2", "u4", "u3"]
    assert b3.summary()["bits"] == {3: 2, 2: 1, 4: 1}
    # callable: per (layer, expert)
    b2 = small_bundle(tmp_path / "c", dtype=lambda li, e: "int4" if (li + e) % 2 else "int8", num_layers=2)
    assert [r["format"]["dtype"] for r in b2.manifest["experts"]] == [
        "int8",
        "int4",
        "int8",
        "int4",
        "int4",
        "int8",
        "int4",
        "int8",
    ]
    # offsets increase, blobs don't overlap
    recs = sorted(b.manifest["experts"], key=lambda r: r["offset"])
    for r0, r1 in zip(recs, recs[1:], strict=False):
        assert r0["offset"] + r0["length"] == r1["offset"]


def test_relative_paths_bundle_is_relocatable(tmp_path: Path) -> None:
    src = tmp_path / "orig"
    b = small_bundle(src, dtype=["int4", "int8", "fp16", "fp32"], bias=True)
    text = (src / "manifest.json").read_text()
    assert str(tmp_path) not in text
    before = {e: b.read_expert(0, e) for e in range(E)}
    dst = tmp_path / "elsewhere" / "moved"
    dst.parent.mkdir()
    shutil.copytree(src, dst)
    shutil.rmtree(src)
    b2 = Bundle.open(dst)
    assert b2.path == dst and b2.store_path == dst / "experts.bin"
    for e in range(E):
        after = b2.read_expert(0, e)
        assert after.keys() == before[e].keys()
        for k in after:
            np.testing.assert_array_equal(after[k], before[e][k])
    assert onnx.load(str(b2.graph_path())).graph.node[0].op_type == "OffloadedExpert"
    assert Bundle.open(dst / "manifest.json").path == dst


# -- validation --
def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def f(m: dict[str, Any]) -> None:
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return f


def _edit_expert(e: int, fn: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def f(m: dict[str, Any]) -> None:
        rec = next(r for r in m["experts"] if r["layer"] == 0 and r["expert"] == e)
        fn(rec)

    return f


def _store_size_plus(m: dict[str, Any]) -> None:
    m["store"]["size"] += 4096


def _misalign(r: dict[str, Any]) -> None:
    r["offset"] += 64


def _misalign_len(r: dict[str, Any]) -> None:
    r["length"] += 100


def _past_end(m: dict[str, Any]) -> None:
    r = m["experts"][-1]
    r["offset"] = m["store"]["size"]


def _dup(m: dict[str, Any]) -> None:
    m["experts"].append(dict(m["experts"][0]))


def _missing(m: dict[str, Any]) -> None:
    del m["experts"][2]


def _extra(m: dict[str, Any]) -> None:
    r = dict(m["experts"][0])
    r["expert"] = E
    m["experts"].append(r)


def _tensor_outside(r: dict[str, Any]) -> None:
    r["tensors"]["w_out"]["offset"] = r["length"]  # 64-aligned, but past `size`


def _tensor_nbytes(r: dict[str, Any]) -> None:
    r["tensors"]["w_in"]["nbytes"] -= 1


def _tensor_misaligned(r: dict[str, Any]) -> None:
    r["tensors"]["w_out"]["offset"] += 8


def _tensor_shape(r: dict[str, Any]) -> None:
    r["tensors"]["w_in"]["shape"] = [I, H]


def _layer_hidden(m: dict[str, Any]) -> None:
    m["layers"][0]["hidden"] = H * 2


def _layer_gated(m: dict[str, Any]) -> None:
    m["layers"][0]["gated"] = False


def _unknown_dtype(r: dict[str, Any]) -> None:
    r["format"]["dtype"] = "int5"


def _wrong_tensor_dtype(r: dict[str, Any]) -> None:
    r["tensors"]["w_in"]["dtype"] = "u8"


def _missing_scales(r: dict[str, Any]) -> None:
    del r["tensors"]["w_out.scales"]


def _overlap(r: dict[str, Any]) -> None:
    r["tensors"]["w_out"]["offset"] = 0


MANIFEST_CASES: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    (
        "format",
        _set(["format"], "onnx-bundle"),
        ["manifest.json", "format", "'edgemoe-bundle'", "'onnx-bundle'"],
    ),
    ("version", _set(["format_version"], 3),
     ["manifest.json", "format_version", "expected 1 or 2", "found 3"]),
    ("version_str", _set(["format_version"], "1"), ["format_version", "found '1'"]),
    (
        "abs_store",
        _set(["store", "file"], "/etc/passwd"),
        ["manifest.json", "store.file", "absolute", "/etc/passwd"],
    ),
    (
        "dotdot_graph",
        _set(["graphs", "decoder"], "../model.onnx"),
        ["graphs.decoder", "'..'", "../model.onnx"],
    ),
    ("dotdot_inner", _set(["store", "file"], "sub/../experts.bin"), ["store.file", "'..'"]),
    (
        "missing_graph",
        _set(["graphs", "decoder"], "nope.onnx"),
        ["nope.onnx", "graphs.decoder", "does not exist"],
    ),
    ("tokenizer_missing", _set(["tokenizer"], "tokenizer"), ["tokenizer", "does not exist"]),
    ("store_size", _store_size_plus, ["experts.bin", "store.size", "expected", "found"]),
    ("alignment", _set(["store", "alignment"], 512), ["store.alignment", "expected 4096", "found 512"]),
    ("checksum_algo", _set(["store", "checksum"], "crc32"), ["store.checksum", "'xxh3_64'", "'crc32'"]),
    ("activation", _set(["layers", 0, "activation"], "tanh"), ["layers[0].activation", "'tanh'"]),
    (
        "misaligned",
        _edit_expert(1, _misalign),
        ["manifest.json", "layer 0 expert 1", "offset", "multiple of 4096"],
    ),
    ("misaligned_len", _edit_expert(1, _misalign_len), ["layer 0 expert 1", "length", "multiple of 4096"]),
    ("past_end", _past_end, ["layer 0 expert 3", "past the end", "store.size"]),
    ("duplicate", _dup, ["duplicate expert record", "layer 0 expert 0"]),
    ("missing", _missing, ["missing expert record", "layer 0 expert 2"]),
    ("extra", _extra, ["layer 0", "expert", f"< num_experts ({E})", f"found {E}"]),
    (
        "tensor_outside",
        _edit_expert(2, _tensor_outside),
        ["layer 0 expert 2", "tensor outside the blob", "tensors.w_out"],
    ),
    (
        "tensor_nbytes",
        _edit_expert(2, _tensor_nbytes),
        ["layer 0 expert 2", "tensors.w_in.nbytes", "expected"],
    ),
    (
        "tensor_misaligned",
        _edit_expert(0, _tensor_misaligned),
        ["layer 0 expert 0", "tensors.w_out.offset", "multiple of 64"],
    ),
    ("tensor_overlap", _edit_expert(0, _overlap), ["layer 0 expert 0", "overlaps"]),
    (
        "shape",
        _edit_expert(3, _tensor_shape),
        [
            "layer 0 expert 3",
            "shape does not match the layer",
            f"expected [{2 * I}, {H}]",
            f"found [{I}, {H}]",
        ],
    ),
    ("layer_hidden", _layer_hidden, ["layer 0 expert 0", "shape does not match the layer"]),
    ("layer_gated", _layer_gated, ["layer 0 expert 0", "w_in.shape", f"expected [{I}, {H}]"]),
    ("unknown_dtype", _edit_expert(1, _unknown_dtype), ["layer 0 expert 1", "unknown dtype", "'int5'"]),
    (
        "tensor_dtype",
        _edit_expert(1, _wrong_tensor_dtype),
        ["layer 0 expert 1", "w_in.dtype", "'u4'", "'u8'"],
    ),
    ("missing_tensor", _edit_expert(1, _missing_scales), ["layer 0 expert 1", "w_out.scales"]),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("pristine") / "b"
    small_bundle(p, dtype="int4")
    return p


@pytest.fixture
def victim(pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "victim"
    shutil.copytree(pristine, dst)
    return dst


@pytest.mark.parametrize("name,mutate,needles", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_manifest_validation(
    victim: Path, name: str, mutate: Callable[[dict[str, Any]], None], needles: list[str]
) -> None:
    Bundle.open(victim)  # sane before
    m = load_manifest(victim)
    mutate(m)
    save_manifest(victim, m)
    with pytest.raises(BundleError) as ei:
        Bundle.open(victim)
    msg = str(ei.value)
    assert str(victim) in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_manifest(victim: Path) -> None:
    (victim / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"victim/manifest\.json: missing manifest"):
        Bundle.open(victim)
    with pytest.raises(BundleError, match="not a bundle folder"):
        Bundle.open(victim / "nowhere")


def test_invalid_json(victim: Path) -> None:
    (victim / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        Bundle.open(victim)


def test_truncated_store(victim: Path) -> None:
    size = (victim / "experts.bin").stat().st_size
    with open(victim / "experts.bin", "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(BundleError) as ei:
        Bundle.open(victim)
    msg = str(ei.value)
    assert "experts.bin" in msg and "truncated store" in msg
    assert f"expected {size}" in msg and f"found {size - 4096}" in msg


def test_store_grown(victim: Path) -> None:
    with open(victim / "experts.bin", "ab") as f:
        f.write(bytes(4096))
    with pytest.raises(BundleError, match="store size mismatch"):
        Bundle.open(victim)


def test_symlink_escaping_bundle(victim: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    shutil.move(victim / "experts.bin", outside)
    (victim / "experts.bin").symlink_to(outside)
    with pytest.raises(BundleError, match=r"store\.file.*inside the bundle"):
        Bundle.open(victim)


def test_checksum_mismatch_on_read(victim: Path) -> None:
    b = Bundle.open(victim)
    rec = b.expert_record(0, 2)
    good = b.read_expert(0, 1)
    with open(victim / "experts.bin", "r+b") as f:
        f.seek(rec["offset"] + 100)
        byte = f.read(1)
        f.seek(rec["offset"] + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    b = Bundle.open(victim)  # open does not hash
    with pytest.raises(BundleError) as ei:
        b.read_expert(0, 2)
    msg = str(ei.value)
    assert "experts.bin" in msg and "layer 0 expert 2" in msg and "checksum mismatch" in msg
    assert f"expected {rec['checksum']}" in msg
    with pytest.raises(BundleError, match="layer 0 expert 2.*checksum"):
        b.dequantized_expert(0, 2)
    raw = b.read_expert(0, 2, verify=False)  # readable when told not to verify
    assert raw["w_in"].shape == (2 * I, H // 2)
    other = b.read_expert(0, 1)  # other experts unaffected
    np.testing.assert_array_equal(other["w_in"], good["w_in"])


def test_unknown_expert(pristine: Path) -> None:
    b = Bundle.open(pristine)
    with pytest.raises(BundleError, match="layer 0 expert 99: no such expert"):
        b.read_expert(0, 99)
    with pytest.raises(BundleError, match=r"graphs\.encoder"):
        b.graph_path("encoder")


# -- writer --
def _write_one(path: Path, value: float, *, force: bool = False, fail: bool = False,
               tokenizer: Path | None = None) -> None:
    with BundleWriter(path, family="v", force=force) as w:
        w.add_layer(0, num_experts=1, top_k=1, hidden=4, intermediate=2, gated=False, activation="relu")
        w.add_expert(
            0, 0, np.full((2, 4), value, np.float32), np.full((4, 2), value, np.float32), dtype="fp32"
        )
        if tokenizer is not None:
            w.add_tokenizer(tokenizer)
        if fail:
            raise RuntimeError("boom")


def _value(path: Path) -> float:
    return float(Bundle.open(path).dequantized_expert(0, 0)[0][0, 0])


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
            for p in folder.rglob("*")}


def _tokenizer_src(tmp_path: Path) -> Path:
    src = tmp_path / "tok-src"
    src.mkdir(parents=True)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "vocab.json").write_text("{}")
    return src


def test_overwrite_refused_without_force(tmp_path: Path) -> None:
    p = tmp_path / "b"
    _write_one(p, 1.0)
    with pytest.raises(BundleExistsError) as ei:
        _write_one(p, 2.0)
    assert isinstance(ei.value, FileExistsError) and isinstance(ei.value, BundleError)
    assert str(p) in str(ei.value) and "pass force=True to replace it" in str(ei.value)
    assert _value(p) == 1.0
    assert siblings(p) == ["b"]


def test_without_force_says_when_force_would_not_help(tmp_path: Path) -> None:
    (tmp_path / "afile").write_bytes(b"mine\x00")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "precious.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "home")
    for name, needle in (("afile", "a file, not a bundle folder (force=True would not replace it)"),
                         ("home", "not an edgemoe bundle (force=True would not replace it); in the way: "
                                  "precious.txt"),
                         ("link", "a symlink, not a bundle folder (force=True would not replace it)")):
        with pytest.raises(BundleExistsError, match=re.escape(needle)):
            check_target(tmp_path / name)
    assert (tmp_path / "afile").read_bytes() == b"mine\x00" and (tmp_path / "link").is_symlink()


def test_check_target_checks_the_parent_up_front(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BundleError, match=r"afile/sub/b: cannot create the bundle's parent folder: "
                                          r".*afile is not a folder"):
        check_target(tmp_path / "afile" / "sub" / "b")
    check_target(tmp_path / "new" / "deeper" / "b")  # missing folders are fine: the writer makes them
    assert not (tmp_path / "new").exists()


def test_force_replaces_and_names_the_profile_it_removes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edgemoe_ort.bundle.profile import manifest_identity

    p = tmp_path / "b"
    _write_one(p, 1.0)
    own = {"format": "edgemoe-profile", "bundle": {"manifest_xxh3": manifest_identity(p)}}
    (p / "profile.json").write_text(json.dumps(own))  # edgemoe-profile's output for this very bundle
    with caplog.at_level("WARNING", logger="edgemoe_ort.bundle.writer"):
        _write_one(p, 2.0, force=True)
    assert _value(p) == 2.0
    assert not (p / "profile.json").exists()
    assert f"{p / 'profile.json'}: the old bundle's routing profile" in caplog.text
    assert siblings(p) == ["b"]


def test_force_keeps_a_profile_that_is_not_the_bundles(tmp_path: Path) -> None:
    p = tmp_path / "b"
    _write_one(p, 1.0)
    for content in (b"{}", b'{"format": "edgemoe-profile", "bundle": {"manifest_xxh3": "0123456789abcdef"}}',
                    b"my notes, not JSON\xff"):
        (p / "profile.json").write_bytes(content)
        before = _snapshot(p)
        with pytest.raises(BundleExistsError, match=r"holds other files; in the way: profile.json \("):
            _write_one(p, 2.0, force=True)
        assert _snapshot(p) == before and _value(p) == 1.0
    assert siblings(p) == ["b"]


def test_force_keeps_a_bundle_that_holds_user_files(tmp_path: Path) -> None:
    p = tmp_path / "b"
    _write_one(p, 1.0)
    notes = p / "NOTES.txt"
    notes.write_bytes(b"my notes\n\x00\xff")
    (p / "tokenizer").mkdir()  # this bundle has no tokenizer: the folder is the user's
    (p / "tokenizer" / "tokenizer.json").write_text("also mine")
    before = _snapshot(p)
    with pytest.raises(BundleExistsError, match=r"other files; in the way: NOTES.txt, tokenizer/ \("):
        _write_one(p, 2.0, force=True)
    assert _snapshot(p) == before
    assert _value(p) == 1.0 and siblings(p) == ["b"]


def test_force_keeps_user_files_below_the_tokenizer_folder(tmp_path: Path) -> None:
    """Only the tokenizer files directly in the bundle's tokenizer folder are the bundle's."""
    p = tmp_path / "b"
    _write_one(p, 1.0, tokenizer=_tokenizer_src(tmp_path))
    backup = p / "tokenizer" / "backup"
    backup.mkdir()
    (backup / "tokenizer.json").write_bytes(b'{"my": "older tokenizer"}\n')
    (backup / "vocab.json").write_bytes(b'{"a": 1}')
    before = _snapshot(p)
    with pytest.raises(BundleExistsError, match=r"in the way: tokenizer/backup/ \("):
        _write_one(p, 2.0, force=True)
    assert _snapshot(p) == before and _value(p) == 1.0
    shutil.rmtree(backup)
    _write_one(p, 2.0, force=True, tokenizer=_tokenizer_src(tmp_path / "again"))  # the bundle's own: replaced
    assert _value(p) == 2.0


def test_force_keeps_an_empty_user_folder(tmp_path: Path) -> None:
    p = tmp_path / "b"
    _write_one(p, 1.0)
    (p / "my-empty-dir").mkdir()
    (p / "results" / "run1").mkdir(parents=True)
    with pytest.raises(BundleExistsError, match=r"in the way: my-empty-dir/, results/ \("):
        _write_one(p, 2.0, force=True)
    assert (p / "my-empty-dir").is_dir() and (p / "results" / "run1").is_dir() and _value(p) == 1.0


def test_force_refuses_a_folder_with_a_foreign_manifest(tmp_path: Path) -> None:
    web = tmp_path / "web"
    (web / "src").mkdir(parents=True)
    files = {"manifest.json": b'{"name": "my app", "start_url": "/"}', "index.html": b"<html></html>",
             "src/app.js": b"console.log(1)"}
    for rel, data in files.items():
        (web / rel).write_bytes(data)
    in_the_way = r"not an edgemoe bundle; in the way: index.html, manifest.json, src/"
    with pytest.raises(BundleExistsError, match=in_the_way):
        _write_one(web, 1.0, force=True)
    assert {rel: (web / rel).read_bytes() for rel in files} == files
    assert siblings(web) == ["web"]


#: a writer killed after its first expert (no cleanup, like SIGKILL): leaves its temporary folder behind
_KILLED_WRITER = """
import os, sys
import numpy as np
from edgemoe_ort.bundle import BundleWriter
w = BundleWriter(sys.argv[1], family="v")
w.add_layer(0, num_experts=2, top_k=1, hidden=4, intermediate=2, gated=False, activation="relu")
w.add_expert(0, 0, np.ones((2, 4)), np.ones((4, 2)), dtype="fp32")
os._exit(0)
"""


@pytest.fixture(scope="module")
def killed_leftover(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary folder a killed writer left (its process is gone)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("killed")
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(root / "b")], check=True, timeout=120)
    (left,) = root.glob(".b.tmp-*")
    return left


def _marker(d: Path) -> dict[str, Any]:
    return json.loads((d / ".edgemoe-writer.json").read_text())


def test_a_killed_writers_leftover_is_removed(
    tmp_path: Path, killed_leftover: Path, caplog: pytest.LogCaptureFixture
) -> None:
    left = tmp_path / killed_leftover.name
    shutil.copytree(killed_leftover, left)
    assert sorted(f.name for f in left.iterdir()) == [".edgemoe-writer.json", "experts.bin"]
    set_aside = tmp_path / ".b.old-0123456789ab"  # may be the only copy of a bundle: reported only
    set_aside.mkdir()
    (set_aside / "NOTES.txt").write_text("mine")
    with caplog.at_level("WARNING", logger="edgemoe_ort.bundle.writer"):
        _write_one(tmp_path / "b", 1.0)
    assert not left.exists() and (set_aside / "NOTES.txt").read_text() == "mine"
    assert caplog.text.count(f"{left}: removed") == 1
    assert f"{set_aside}: a bundle set aside" in caplog.text
    assert not (tmp_path / "b" / ".edgemoe-writer.json").exists(), "the marker stays out of the bundle"


def test_leftovers_that_may_not_be_a_dead_writers_are_kept(
    tmp_path: Path, killed_leftover: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import subprocess
    import sys

    import psutil

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)

    def leftover(name: str, **marker: Any) -> Path:
        d = tmp_path / f".b.tmp-{dead}-{name}"
        shutil.copytree(killed_leftover, d)
        if marker:
            (d / ".edgemoe-writer.json").write_text(json.dumps({**_marker(d), **marker}))
        return d

    me = psutil.Process()
    cases = {
        "other host": leftover("00000000000a", host="another-machine"),
        "other pid namespace": leftover("00000000000b", pid_ns="pid:[1]"),
        "running": leftover("00000000000c", pid=me.pid, started=me.create_time()),
        "user file": leftover("00000000000d"),
        "no marker": leftover("00000000000e"),
        "user folder": leftover("00000000000f"),
        "bad marker": leftover("000000000010"),
    }
    (cases["user file"] / "NOTES.txt").write_text("mine")
    (cases["no marker"] / ".edgemoe-writer.json").unlink()
    (cases["user folder"] / "tokenizer" / "backup").mkdir(parents=True)
    (cases["bad marker"] / ".edgemoe-writer.json").write_text("{not json")
    reused = leftover("000000000011", pid=me.pid, started=me.create_time() - 3600)  # pid reused since
    before = {k: _snapshot(d) for k, d in cases.items()}
    with caplog.at_level("WARNING", logger="edgemoe_ort.bundle.writer"):
        _write_one(tmp_path / "b", 1.0)
    assert {k: _snapshot(d) for k, d in cases.items()} == before
    assert not reused.exists()
    text = caplog.text
    for why, d in cases.items():
        assert text.count(f"{d}: the temporary folder of an export, left alone") == 1, why
    assert "made on 'another-machine'" in text and f"being written by process {me.pid}" in text
    assert "what a writer does not write: NOTES.txt" in text and "tokenizer/backup/" in text
    assert "without a readable .edgemoe-writer.json" in text


def test_failed_write_leaves_old_bundle_intact(tmp_path: Path) -> None:
    p = tmp_path / "b"
    _write_one(p, 1.0)
    before = {f.name: f.read_bytes() for f in p.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        _write_one(p, 2.0, force=True, fail=True)
    assert {f.name: f.read_bytes() for f in p.iterdir()} == before
    assert siblings(p) == ["b"]
    # incomplete bundle: close() refuses, nothing is installed
    q = tmp_path / "q"
    w = BundleWriter(q, family="v")
    w.add_layer(0, num_experts=2, top_k=1, hidden=4, intermediate=2, gated=False, activation="relu")
    w.add_expert(0, 0, np.ones((2, 4)), np.ones((4, 2)), dtype="fp16")
    with pytest.raises(BundleError, match="layer 0 expert 1: expert never added"):
        w.close()
    assert siblings(p) == ["b"]


def test_force_refuses_non_bundle_folder(tmp_path: Path) -> None:
    p = tmp_path / "home"
    p.mkdir()
    (p / "precious.txt").write_text("keep")
    with pytest.raises(BundleExistsError, match="not an edgemoe bundle; in the way: precious.txt"):
        _write_one(p, 1.0, force=True)
    assert (p / "precious.txt").read_text() == "keep"


def test_writer_input_errors(tmp_path: Path) -> None:
    p = tmp_path / "b"
    with pytest.raises(
        BundleError,
        match=r"layer 0 expert 0: w_in: shape does not match the layer.*"
        r"expected \[8, 4\].*found \[4, 4\]",
    ):
        with BundleWriter(p, family="v") as w:
            w.add_layer(0, num_experts=2, top_k=1, hidden=4, intermediate=4, gated=True, activation="silu")
            w.add_expert(0, 0, np.ones((4, 4)), np.ones((4, 4)))
    assert siblings(p) == []
    with pytest.raises(BundleError, match="layer 0 expert 0: expert added twice"):
        with BundleWriter(p, family="v") as w:
            w.add_layer(0, num_experts=2, top_k=1, hidden=4, intermediate=4, gated=False, activation="silu")
            w.add_expert(0, 0, np.ones((4, 4)), np.ones((4, 4)))
            w.add_expert(0, 0, np.ones((4, 4)), np.ones((4, 4)))
    with pytest.raises(BundleError, match="layer 0 expert 2: expert"):
        with BundleWriter(p, family="v") as w:
            w.add_layer(0, num_experts=2, top_k=1, hidden=4, intermediate=4, gated=False, activation="silu")
            w.add_expert(0, 2, np.ones((4, 4)), np.ones((4, 4)))
    with pytest.raises(BundleError, match="layer 0 expert 0: weights must be finite"):
        with BundleWriter(p, family="v") as w:
            w.add_layer(0, num_experts=1, top_k=1, hidden=4, intermediate=4, gated=False, activation="silu")
            w.add_expert(0, 0, np.full((4, 4), np.nan), np.ones((4, 4)))
    with pytest.raises(BundleError, match="layer 0 expert 0: unknown dtype 'int5'"):
        with BundleWriter(p, family="v") as w:
            w.add_layer(0, num_experts=1, top_k=1, hidden=4, intermediate=4, gated=False, activation="silu")
            w.add_expert(0, 0, np.ones((4, 4)), np.ones((4, 4)), dtype="int5")
    with pytest.raises(BundleError, match="activation"):
        with BundleWriter(p, family="v") as w:
            w.add_layer(0, num_experts=1, top_k=1, hidden=4, intermediate=4, gated=False, activation="swish")
    with pytest.raises(BundleError, match="numbered 0..N-1"):
        with BundleWriter(p, family="v") as w:
            w.add_layer(1, num_experts=1, top_k=1, hidden=4, intermediate=4, gated=False, activation="silu")
            w.add_expert(1, 0, np.ones((4, 4)), np.ones((4, 4)))
    assert siblings(p) == []


def test_graph_external_data_and_tokenizer(tmp_path: Path) -> None:
    weight = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    init = numpy_helper.from_array(weight, "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 64])],
        [init],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    before = model.SerializeToString()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "pytorch_model.bin").write_text("not a tokenizer file")
    p = tmp_path / "b"
    with BundleWriter(p, family="switch_transformers") as w:
        w.add_layer(0, num_experts=1, top_k=1, hidden=4, intermediate=2, gated=False, activation="relu")
        w.add_expert(0, 0, np.ones((2, 4)), np.ones((4, 2)), dtype="int8", group_size=3)
        w.add_graph("decoder", model, external_data=True)
        w.add_graph("encoder", model)
        w.add_tokenizer(tok)
    assert model.SerializeToString() == before  # caller's proto untouched
    b = Bundle.open(p)
    assert b.manifest["graphs"] == {"decoder": "model.onnx", "encoder": "encoder.onnx"}
    assert (p / "model.onnx.data").stat().st_size >= weight.nbytes
    assert (p / "model.onnx").stat().st_size < weight.nbytes
    assert b.dense_bytes == sum(
        (p / f).stat().st_size for f in ("model.onnx", "model.onnx.data", "encoder.onnx")
    )
    loaded = onnx.load(str(b.graph_path("decoder")))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight)
    assert b.manifest["tokenizer"] == "tokenizer" and b.tokenizer_path == p / "tokenizer"
    assert sorted(f.name for f in (p / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert b.summary()["tokenizer"] == "tokenizer"
    with pytest.raises(BundleError, match="tokenizer.json"):
        with BundleWriter(tmp_path / "c", family="x") as w:
            w.add_tokenizer(tmp_path)


def test_store_streams_blobs(tmp_path: Path) -> None:
    # the store grows as experts are added (blobs are not buffered until close)
    w = BundleWriter(tmp_path / "b", family="v")
    w.add_layer(0, num_experts=2, top_k=1, hidden=64, intermediate=64, gated=False, activation="relu")
    w.add_expert(0, 0, np.ones((64, 64)), np.ones((64, 64)), dtype="fp32")
    store = next(tmp_path.glob(".b.tmp-*")) / "experts.bin"
    w._store.flush()
    assert store.stat().st_size == 32768  # 2 * 64*64*4 bytes, already a multiple of 4096
    w.add_expert(0, 1, np.ones((64, 64)), np.ones((64, 64)), dtype="int4")
    w._store.flush()
    assert store.stat().st_size == 32768 + 8192  # 2 * (2048 + 128 + 64) -> 8192
    w.close()
    assert siblings(tmp_path / "b") == ["b"]


# -- fixtures --
def test_random_routing() -> None:
    idx, w = random_routing(50, 8, 3, np.random.default_rng(0))
    assert idx.shape == (50, 3) and idx.dtype == np.int64 and w.dtype == np.float32
    assert all(len(set(r)) == 3 for r in idx.tolist())
    assert idx.min() >= 0 and idx.max() < 8
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    assert np.all(w > 0)
    idx2, _ = random_routing(50, 8, 3, 0)
    idx3, _ = random_routing(50, 8, 3, 0)
    np.testing.assert_array_equal(idx2, idx3)


def test_synthetic_graph_structure(tmp_path: Path) -> None:
    b = small_bundle(tmp_path / "b", num_layers=3, top_k=2, activation="gelu_tanh", gated=False)
    m = onnx.load(str(b.graph_path()))
    assert {(o.domain, o.version) for o in m.opset_import} == {("", 17), ("edgemoe", 1)}
    assert [i.name for i in m.graph.input] == [
        "X",
        "topk_indices_0",
        "topk_weights_0",
        "topk_indices_1",
        "topk_weights_1",
        "topk_indices_2",
        "topk_weights_2",
    ]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "T"
    assert m.graph.input[1].type.tensor_type.elem_type == TensorProto.INT64
    assert [o.name for o in m.graph.output] == ["Y"]
    assert [list(n.input) for n in m.graph.node] == [
        ["X", "topk_indices_0", "topk_weights_0"],
        ["Y_0", "topk_indices_1", "topk_weights_1"],
        ["Y_1", "topk_indices_2", "topk_weights_2"],
    ]
    n = m.graph.node[1]
    assert n.op_type == "OffloadedExpert" and n.domain == "edgemoe"
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    assert attrs == {
        "layer": 1,
        "num_experts": E,
        "top_k": 2,
        "activation": b"gelu_tanh",
        "gated": 0,
        "manifest": b"manifest.json",
    }


def _loop_reference(b: Bundle, layer: int, X: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    lay = b.layers[layer]
    out = np.zeros(X.shape, np.float64)
    for t in range(X.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e < 0:
                continue
            w_in, w_out, b_in, b_out = b.dequantized_expert(layer, e)
            a = w_in.astype(np.float64) @ X[t].astype(np.float64) + (0 if b_in is None else b_in)
            gate, up = a[:I], a[I:]
            act = lay["activation"]
            if act == "silu":
                h = gate / (1 + np.exp(-gate)) * up
            elif act == "relu":
                h = np.maximum(a, 0)
            else:  # swiglu_oai
                g = np.minimum(gate, 7.0)
                h = (np.clip(up, -7.0, 7.0) + 1) * g / (1 + np.exp(-1.702 * g))
            out[t] += w[t, k] * (w_out.astype(np.float64) @ h + (0 if b_out is None else b_out))
    return out


@pytest.mark.parametrize("activation,gated", [("silu", True), ("relu", False), ("swiglu_oai", True)])
def test_reference_moe_matches_loop(tmp_path: Path, activation: str, gated: bool) -> None:
    b = small_bundle(
        tmp_path / "b", dtype=["int4", "int8", "fp16", "fp32"], bias=True, activation=activation, gated=gated
    )
    rng = np.random.default_rng(1)
    X = rng.standard_normal((6, H)).astype(np.float32) * 3
    idx, w = random_routing(6, E, 2, rng)
    idx[1, 0] = -1
    idx[4, :] = -1
    y = reference_moe(b, 0, X, idx, w)
    assert y.shape == X.shape and y.dtype == np.float64
    np.testing.assert_allclose(y, _loop_reference(b, 0, X, idx, w), rtol=1e-12, atol=1e-12)
    assert np.all(y[4] == 0)
    # leading dims are flattened like the op does
    y3 = reference_moe(b, 0, X.reshape(2, 3, H), idx.reshape(2, 3, 2), w.reshape(2, 3, 2))
    np.testing.assert_allclose(y3.reshape(6, H), y, rtol=1e-12)
    bad = idx.copy()
    bad[0, 0] = E
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        reference_moe(b, 0, X, bad, w)


def test_reference_activations() -> None:
    x = np.array([[1.0]])
    one = np.array([[1.0]])
    val = {}
    for act in ("silu", "gelu", "gelu_tanh", "relu"):
        val[act] = float(
            reference_expert(np.array([[-0.5]]), one, one, None, None, intermediate=1, gated=False, act=act)[
                0, 0
            ]
        )
    assert val["relu"] == 0.0
    assert val["silu"] == pytest.approx(-0.5 / (1 + math.exp(0.5)), rel=1e-12)
    assert val["gelu"] == pytest.approx(-0.5 * 0.5 * (1 + math.erf(-0.5 / math.sqrt(2))), rel=1e-12)
    assert val["gelu_tanh"] == pytest.approx(-0.154285, abs=1e-6)
    # swiglu_oai: gate 10 clamps to 7, up 9 clamps to 7: (7 + 1) * 7 * sigmoid(1.702 * 7)
    w_in = np.array([[10.0], [9.0]])
    y = reference_expert(x, w_in, one, None, None, intermediate=1, gated=True, act="swiglu_oai")
    assert float(y[0, 0]) == pytest.approx(8 * 7 / (1 + math.exp(-1.702 * 7)), rel=1e-12)


def test_reference_chain(tmp_path: Path) -> None:
    b = small_bundle(tmp_path / "b", num_layers=2, dtype="int8")
    rng = np.random.default_rng(2)
    X = rng.standard_normal((5, H)).astype(np.float32)
    r0, r1 = random_routing(5, E, 2, rng), random_routing(5, E, 2, rng)
    y = reference_chain(b, X, [r0, r1])
    np.testing.assert_allclose(y, reference_moe(b, 1, reference_moe(b, 0, X, *r0), *r1), rtol=1e-12)
    assert not np.allclose(y, reference_moe(b, 0, X, *r0))
    with pytest.raises(ValueError, match="routing"):
        reference_chain(b, X, [r0])


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = small_bundle(tmp_path / "a", seed=3, dtype="int4")
    b = small_bundle(tmp_path / "b", seed=3, dtype="int4")
    c = small_bundle(tmp_path / "c", seed=4, dtype="int4")
    assert (tmp_path / "a" / "experts.bin").read_bytes() == (tmp_path / "b" / "experts.bin").read_bytes()
    assert a.expert_record(0, 0)["checksum"] == b.expert_record(0, 0)["checksum"]
    assert a.expert_record(0, 0)["checksum"] != c.expert_record(0, 0)["checksum"]
    w_in = a.dequantized_expert(0, 0)[0]
    assert 0.5 / math.sqrt(H) < float(w_in.std()) < 2 / math.sqrt(H)  # ~N(0, 1/sqrt(in))


def test_writer_creates_missing_parent_folders(tmp_path: Path) -> None:
    bundle = make_synthetic_bundle(tmp_path / "a" / "b" / "bundle", dtype="int8")
    assert bundle.path == (tmp_path / "a" / "b" / "bundle").absolute()
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="parent folder"):
        make_synthetic_bundle(tmp_path / "file" / "bundle")
    assert (tmp_path / "file").read_text() == "x"


# --- hostile manifests (issue 15, defect 6): one BundleError naming the file, never another exception ---


def _bundle_with_manifest(tmp_path, good, text: bytes | str, name: str):
    """A copy of the bundle ``good`` whose manifest.json holds ``text``."""
    folder = tmp_path / name
    shutil.copytree(good, folder)
    (folder / "manifest.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return folder


def test_hostile_manifests_are_bundle_errors(tmp_path):
    cases = {
        "deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        "huge-int": ('{"format": "edgemoe-bundle", "version": ' + "9" * 6000 + "}", "not valid JSON"),
        "not-utf8": (b'{"format": "\xff\xfe"}', "not UTF-8 text (byte 0xff at offset 12)"),
        "long-path": (None, "longer than 4096 bytes"),
    }
    good = make_synthetic_bundle(tmp_path / "good").path
    m = json.loads((good / "manifest.json").read_text())
    long_path = dict(m, store=dict(m["store"], file="a/" * 40_000 + "experts.bin"))
    for name, (text, want) in cases.items():
        folder = _bundle_with_manifest(tmp_path, good, json.dumps(long_path) if text is None else text, name)
        with pytest.raises(BundleError) as info:
            Bundle.open(folder)
        msg = str(info.value)
        assert str(folder / "manifest.json") in msg and want in msg, (name, msg[:300])
        assert len(msg) < 2000, name
    folder = tmp_path / "dir-manifest"
    (folder / "manifest.json").mkdir(parents=True)
    with pytest.raises(BundleError, match="manifest.json: missing manifest.*a regular file, found a folder"):
        Bundle.open(folder)


def test_graph_file_is_written_piecewise_with_save_models_bytes(tmp_path: Path) -> None:
    """add_graph serializes the graph one element at a time (memory), and must still write exactly what
    onnx.save_model writes: every field kind of ModelProto / GraphProto present."""
    from edgemoe_ort.bundle.writer import _save_model_piecewise

    w = numpy_helper.from_array(np.arange(300, dtype=np.float32).reshape(20, 15), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm", doc_string="d")
    node.metadata_props.add(key="k", value="v")
    sub = helper.make_graph([helper.make_node("Identity", ["y"], ["z"])], "sub", [],
                            [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    branch = helper.make_node("If", ["c"], ["o"], then_branch=sub, else_branch=sub)
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 20]),
           helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    g = helper.make_graph([node, branch], "g", ins,
                          [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)], [w], doc_string="gd",
                          value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 15])])
    model = helper.make_model(g, producer_name="p", doc_string="md",
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("x.y", 1)])
    model.metadata_props.add(key="a", value="b")
    _save_model_piecewise(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()
    onnx.save_model(model, str(tmp_path / "ref.onnx"))
    assert (tmp_path / "m.onnx").read_bytes() == (tmp_path / "ref.onnx").read_bytes()


def test_external_graph_is_written_piecewise_and_loads_back(tmp_path: Path) -> None:
    """Graphs over the threshold (or external_data=True) put each large initializer in <file>.data at an
    aligned offset, without copying the model; onnx loads them back equal, small ones stay inline."""
    from edgemoe_ort.bundle.writer import _save_model_external

    big = [numpy_helper.from_array(np.arange(i, i + 700, dtype=np.float32), f"w{i}") for i in range(3)]
    small = numpy_helper.from_array(np.array([1, 2, 3], np.int64), "shape")
    nodes = [helper.make_node("Add", ["x", f"w{i}"], [f"y{i}"]) for i in range(3)]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [700]) for i in range(3)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [700])], outs,
                          [*big, small])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    before = model.SerializeToString()
    _save_model_external(model, tmp_path / "m.onnx", "m.onnx.data")
    assert model.SerializeToString() == before  # the proto given is not modified
    light = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    external = [t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in external]
    assert len(offsets) == 3 and all(o % 4096 == 0 for o in offsets)
    back = onnx.load(str(tmp_path / "m.onnx"))
    for a, b in zip(model.graph.initializer, back.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    kept = back.graph.initializer[3]
    assert kept.raw_data == small.raw_data and not kept.external_data


def test_tensor_nbytes_and_stored_shape_of_packed_dtypes() -> None:
    from edgemoe_ort.bundle.format import PACKED_TENSOR_DTYPES, TENSOR_DTYPES, stored_shape, tensor_nbytes

    assert PACKED_TENSOR_DTYPES == ("u4", "u3", "u2")
    assert {k: v.str for k, v in TENSOR_DTYPES.items()} == {
        "f32": "<f4", "f16": "<f2", "u8": "|u1", "u4": "|u1", "u3": "|u1", "u2": "|u1"
    }
    # rows * ceil(bits * cols / 8): every row starts on a byte
    assert [tensor_nbytes(dt, [3, 7]) for dt in ("u4", "u3", "u2", "u8", "f16")] == [12, 9, 6, 21, 42]
    assert tensor_nbytes("u3", [1, 19]) == 8 and tensor_nbytes("u2", [4, 1]) == 4
    assert tensor_nbytes("f32", [5]) == 20
    assert stored_shape("u3", [3, 7]) == [3, 3] and stored_shape("f16", [3, 7]) == [3, 7]
    with pytest.raises(ValueError, match=r"u3 tensors must be 2-D, found shape \[5\]"):
        tensor_nbytes("u3", [5])
