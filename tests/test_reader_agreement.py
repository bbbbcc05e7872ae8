"""The two bundle readers decide alike (issue 15, defect 7): every case below is opened by the Python reader
(``Bundle.open``) and by the native one (``open_session``: the library's ``load_manifest`` through ONNX
Runtime, no Python check in between), and both must accept it or both refuse it, naming the same field.

The rules are docs/bundle-format.md, "Validation"; the limits are one table (``format.READER_LIMITS`` ==
the library's ``reader_limits()``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from edgemoe_ort.bundle import Bundle, BundleError
from edgemoe_ort.bundle import format as fmt
from edgemoe_ort.bundle.testing import make_synthetic_bundle, reader_errors
from edgemoe_ort.runtime import ops


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("agree") / "b"
    make_synthetic_bundle(p, num_experts=4, top_k=2, dtype="int4")
    return p


def _edit(key_path: list[str | int], value: object) -> Callable[[Path], None]:
    def run(b: Path) -> None:
        m = json.loads((b / "manifest.json").read_text())
        d = m
        for k in key_path[:-1]:
            d = d[k]
        d[key_path[-1]] = value
        (b / "manifest.json").write_text(json.dumps(m))

    return run


def _replace_text(old: str, new: str) -> Callable[[Path], None]:
    def run(b: Path) -> None:
        p = b / "manifest.json"
        text = p.read_text()
        assert old in text, old
        p.write_text(text.replace(old, new, 1))

    return run


def _store_outside(b: Path) -> None:
    outside = b.parent / f"{b.name}-outside.bin"
    shutil.move(b / "experts.bin", outside)
    (b / "experts.bin").symlink_to(outside)


def _store_symlink_inside(b: Path) -> None:
    (b / "data").mkdir()
    shutil.move(b / "experts.bin", b / "data" / "store.bin")
    (b / "experts.bin").symlink_to("data/store.bin")


def _manifest_outside(b: Path) -> None:
    outside = b.parent / f"{b.name}-manifest.json"
    shutil.move(b / "manifest.json", outside)
    (b / "manifest.json").symlink_to(outside)


def _append_bytes(data: bytes) -> Callable[[Path], None]:
    def run(b: Path) -> None:
        p = b / "manifest.json"
        p.write_bytes(p.read_bytes() + data)

    return run


def _checksum_newline(b: Path) -> None:
    m = json.loads((b / "manifest.json").read_text())
    m["experts"][0]["checksum"] += "\n"
    (b / "manifest.json").write_text(json.dumps(m))


def _bom(b: Path) -> None:
    p = b / "manifest.json"
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())


# (id, mutation, None if both accept else a text both messages contain)
CASES: list[tuple[str, Callable[[Path], None], str | None]] = [
    ("pristine", lambda b: None, None),
    ("store_symlink_leaves_bundle", _store_outside, "store.file"),
    ("store_symlink_inside_bundle", _store_symlink_inside, None),
    ("manifest_symlink_leaves_bundle", _manifest_outside, "inside the bundle"),
    ("store_file_dot_component", _edit(["store", "file"], "experts.bin/."), "store.file"),
    ("store_file_trailing_slash", _edit(["store", "file"], "experts.bin/"), "store.file"),
    ("store_file_dot_slash", _edit(["store", "file"], "./experts.bin"), "store.file"),
    ("store_file_double_slash", _edit(["store", "file"], "data//experts.bin"), "store.file"),
    ("utf8_bom", _bom, None),
    ("lone_surrogate_escape", _replace_text('"silu"', '"\\ud800silu"'), "not valid JSON"),
    ("surrogate_pair_escape", _edit(["model", "family"], "synthetic\U0001f600"), None),
    ("nan_literal", _replace_text('"model": {', '"nan": NaN, "model": {'), "not valid JSON"),
    ("number_out_of_range", _replace_text('"model": {', '"big": 1e999, "model": {'), "not valid JSON"),
    ("num_experts_over_cap", _edit(["layers", 0, "num_experts"], fmt.MAX_EXPERTS + 1), "num_experts"),
    ("hidden_over_cap", _edit(["layers", 0, "hidden"], fmt.MAX_DIM + 1), "hidden"),
    ("intermediate_over_cap", _edit(["layers", 0, "intermediate"], fmt.MAX_DIM + 1), "intermediate"),
    ("group_size_over_cap", _edit(["experts", 0, "format", "group_size"], fmt.MAX_DIM + 1), "group_size"),
    ("length_zero", _edit(["experts", 0, "length"], 0), "experts[0].length"),
    # found by the fuzzer (tests/fuzz): nlohmann took a NUL for the end of the input; "$" matched before "\n";
    # an integer past the double range is a parse error natively
    ("nul_then_garbage", _append_bytes(b"\x00garbage"), "not valid JSON"),
    ("checksum_trailing_newline", _checksum_newline, "checksum"),
    ("int_beyond_double", _replace_text('"model": {', f'"n": {"9" * 400}, "model": {{'), "not valid JSON"),
    ("int_beyond_double_under_a_repeated_key",
     _replace_text('"format_version": 1', f'"format_version": 1{"0" * 400}, "format_version": 1'),
     "not valid JSON"),
]


@pytest.mark.parametrize(("name", "mutate", "needle"), CASES, ids=[c[0] for c in CASES])
def test_both_readers_decide_alike(
    name: str, mutate: Callable[[Path], None], needle: str | None, pristine: Path, tmp_path: Path
) -> None:
    b = tmp_path / "b"
    shutil.copytree(pristine, b, symlinks=True)
    mutate(b)
    py_err, native_err = reader_errors(b)
    verdicts = (py_err is None, native_err is None)
    assert verdicts == (needle is None, needle is None), f"python: {py_err}\nnative: {native_err}"
    if needle is not None:
        assert needle in str(py_err) and needle in str(native_err), f"python: {py_err}\nnative: {native_err}"


def test_a_path_the_os_refuses_names_the_field(pristine: Path, tmp_path: Path) -> None:
    """A graph path within the length limit whose component is longer than NAME_MAX (fuzzer): Bundle.open's
    message named only the path, not the field."""
    b = tmp_path / "b"
    shutil.copytree(pristine, b, symlinks=True)
    _edit(["graphs", "decoder"], "x" * 4096)(b)
    want = r"manifest\.json: graphs\.decoder: cannot be read: File name too long"
    with pytest.raises(BundleError, match=want):
        Bundle.open(b)


def test_limits_are_one_table() -> None:
    """The Python reader's limits are the library's (customops/include/edgemoe/manifest.h reader_limits())."""
    assert fmt.READER_LIMITS == ops.reader_limits()


def _unpacked_nbytes(b: Path) -> None:
    """w_out's nbytes as if its weights took a byte each (not rows * ceil(bits * cols / 8))."""
    m = json.loads((b / "manifest.json").read_text())
    t = m["experts"][0]["tensors"]["w_out"]
    t["nbytes"] = t["shape"][0] * t["shape"][1]
    (b / "manifest.json").write_text(json.dumps(m))


#: packed low-bit bundles (int3 / int2, odd widths): accepted by both readers, and the same refusals when the
#: format and the tensors disagree (tensor dtype, packed nbytes)
LOW_BIT_CASES: list[tuple[str, str, Callable[[Path], None], str | None]] = [
    ("int3_pristine", "int3", lambda b: None, None),
    ("int2_pristine", "int2", lambda b: None, None),
    ("int3_as_int4", "int3", _edit(["experts", 0, "format", "dtype"], "int4"), "w_in.dtype"),
    ("int4_tensor_in_int2", "int2", _edit(["experts", 0, "tensors", "w_in", "dtype"], "u4"), "w_in.dtype"),
    ("int3_nbytes_unpacked", "int3", _unpacked_nbytes, "w_out.nbytes"),
]


@pytest.mark.parametrize(
    ("name", "dtype", "mutate", "needle"), LOW_BIT_CASES, ids=[c[0] for c in LOW_BIT_CASES]
)
def test_both_readers_decide_alike_on_low_bit_bundles(
    name: str, dtype: str, mutate: Callable[[Path], None], needle: str | None, tmp_path: Path
) -> None:
    b = tmp_path / "b"
    make_synthetic_bundle(b, num_experts=2, top_k=1, hidden=40, intermediate=37, dtype=dtype, group_size=16)
    mutate(b)
    py_err, native_err = reader_errors(b)
    assert (py_err is None, native_err is None) == (needle is None, needle is None), (
        f"python: {py_err}\nnative: {native_err}"
    )
    if needle is not None:
        assert needle in str(py_err) and needle in str(native_err), f"python: {py_err}\nnative: {native_err}"
