"""Constants and shared helpers of the bundle format, versions 1 and 2 (docs/bundle-format.md)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgemoe_ort.bundle.errors import MAX_MESSAGE_PART
from edgemoe_ort.quant import (
    BITS,
    DTYPES,
    FORMATS,
    QUANTIZED_DTYPES,
    TENSOR_DTYPE_BITS,
    QuantizedMatrix,
    num_groups,
    packed_row_bytes,
)

FORMAT = "edgemoe-bundle"
#: the newest format version; a bundle is written with the lowest version that can hold it
#: (:func:`manifest_version`), so bundles without twins stay readable by version-1 readers
FORMAT_VERSION = 2
#: the versions the readers accept (the native reader: customops/src/manifest.cc, the same rules)
FORMAT_VERSIONS = (1, 2)
#: expert record ``variant`` (version 2): 0 the primary copy, 1 its low-bit twin (HOBBIT); version-1
#: records have no ``variant`` and are primaries
PRIMARY = 0
TWIN = 1
VARIANTS = (PRIMARY, TWIN)
MANIFEST = "manifest.json"
STORE_FILE = "experts.bin"
ALIGNMENT = 4096
TENSOR_ALIGNMENT = 64
CHECKSUM = "xxh3_64"
SCHEME_QUANT = "asym_u"
SCHEME_FLOAT = "none"
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")
# Limits both readers apply: the library's table (customops/include/edgemoe/manifest.h reader_limits(),
# edgemoe_ort.runtime.ops.reader_limits()) holds the same values; tests/test_bundle.py checks they agree, and
# docs/bundle-format.md lists them.
MAX_MANIFEST_BYTES = 128 << 20
MAX_JSON_DEPTH = 64
MAX_PATH_BYTES = 4096
MAX_EXPERTS = 1 << 20
MAX_DIM = 1 << 24
#: the limits under the library's names (``edgemoe_ort.runtime.ops.reader_limits()`` returns the same dict)
READER_LIMITS: dict[str, int] = {
    "max_manifest_bytes": MAX_MANIFEST_BYTES,
    "max_json_depth": MAX_JSON_DEPTH,
    "max_path_bytes": MAX_PATH_BYTES,
    "max_message_part": MAX_MESSAGE_PART,
    "max_experts": MAX_EXPERTS,
    "max_dim": MAX_DIM,
}
#: the manifest ``graphs`` roles of the tokenizer graphs (docs/bundle-format.md, "Tokenizer graphs"); every
#: other role is a model graph (``decoder``; ``encoder`` + ``decoder``)
TOKENIZER_GRAPH_ROLES = ("tokenizer", "detokenizer")
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "generation_config.json",
)

#: tensor dtype name -> numpy dtype of its stored elements (packed u4 / u3 / u2 are stored as bytes)
TENSOR_DTYPES: dict[str, np.dtype] = {
    dt: np.dtype({32: "<f4", 16: "<f2"}.get(bits, "u1")) for dt, bits in TENSOR_DTYPE_BITS.items()
}
#: the packed tensor dtypes (fewer than 8 bits per element; rows of ``ceil(bits * cols / 8)`` bytes)
PACKED_TENSOR_DTYPES: tuple[str, ...] = tuple(dt for dt, bits in TENSOR_DTYPE_BITS.items() if bits < 8)
#: weight dtype of each expert format
WEIGHT_TENSOR_DTYPE: dict[str, str] = {f.name: f.tensor_dtype for f in FORMATS}
QUANTIZED = QUANTIZED_DTYPES


def manifest_version(has_twins: bool) -> int:
    """The format version a bundle is written with: 2 if it holds a twin record, else 1."""
    return 2 if has_twins else 1


def twin_error(primary_dtype: str, twin_dtype: str) -> str | None:
    """Why a twin of ``twin_dtype`` cannot stand beside a primary of ``primary_dtype`` (a twin has fewer
    bits than its primary), or None."""
    if BITS[twin_dtype] >= BITS[primary_dtype]:
        return (f"a twin has fewer bits than its primary: twin {twin_dtype} ({BITS[twin_dtype]} bits) beside "
                f"primary {primary_dtype} ({BITS[primary_dtype]} bits)")
    return None


def twin_choices(primary_dtype: str) -> tuple[str, ...]:
    """The formats a twin of a ``primary_dtype`` expert may have: the quantized ones with fewer bits."""
    return tuple(d for d in QUANTIZED if BITS[d] < BITS[primary_dtype])


def model_graph_roles(graphs: Any) -> list[str]:
    """The roles of ``graphs`` (a manifest's ``graphs``) that are model graphs, sorted: all but the
    tokenizer graphs' (``decoder``; ``encoder`` and ``decoder`` for encoder-decoder bundles)."""
    return sorted(r for r in graphs if r not in TOKENIZER_GRAPH_ROLES)


def version_string() -> str:
    try:
        from importlib.metadata import version

        return f"edgemoe-ort {version('edgemoe-ort')}"
    except Exception:  # pragma: no cover - not installed
        return "edgemoe-ort"


def align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def tensor_nbytes(dtype: str, shape: list[int] | tuple[int, ...]) -> int:
    """Bytes a tensor of ``dtype`` and ``shape`` occupies (packed u4 / u3 / u2, ``bits`` per element:
    ``rows * ceil(bits * cols / 8)``)."""
    if dtype in PACKED_TENSOR_DTYPES:
        if len(shape) != 2:
            raise ValueError(f"{dtype} tensors must be 2-D, found shape {list(shape)}")
        return int(shape[0]) * packed_row_bytes(int(shape[1]), TENSOR_DTYPE_BITS[dtype])
    n = 1
    for d in shape:
        n *= int(d)
    return n * TENSOR_DTYPES[dtype].itemsize


def stored_shape(dtype: str, shape: list[int] | tuple[int, ...]) -> list[int]:
    """The numpy shape of a tensor's stored elements: ``shape``, or ``[rows, ceil(bits * cols / 8)]`` bytes
    for a packed dtype."""
    if dtype in PACKED_TENSOR_DTYPES:
        return [int(shape[0]), packed_row_bytes(int(shape[1]), TENSOR_DTYPE_BITS[dtype])]
    return [int(d) for d in shape]


def layer_shapes(layer: dict[str, Any]) -> dict[str, list[int]]:
    """Expected shapes of the weight tensors (and optional biases) of an expert of ``layer``."""
    h, i = int(layer["hidden"]), int(layer["intermediate"])
    rows_in = 2 * i if layer["gated"] else i
    return {"w_in": [rows_in, h], "w_out": [h, i], "b_in": [rows_in], "b_out": [h]}


def expected_tensors(
    layer: dict[str, Any], fmt: dict[str, Any], biases: set[str]
) -> dict[str, tuple[str, list[int]]]:
    """name -> (tensor dtype, shape) that an expert record of ``layer`` in format ``fmt`` must hold."""
    shapes = layer_shapes(layer)
    dtype = fmt["dtype"]
    out: dict[str, tuple[str, list[int]]] = {}
    for w in ("w_in", "w_out"):
        out[w] = (WEIGHT_TENSOR_DTYPE[dtype], shapes[w])
        if dtype in QUANTIZED:
            rows, cols = shapes[w]
            g = num_groups(cols, int(fmt["group_size"]))
            out[f"{w}.scales"] = ("f16", [rows, g])
            out[f"{w}.zeros"] = ("u8", [rows, g])
    for b in ("b_in", "b_out"):
        if b in biases:
            out[b] = ("f32", shapes[b])
    return out


def matrix_tensors(name: str, qm: QuantizedMatrix) -> list[tuple[str, str, list[int], np.ndarray]]:
    """The stored tensors of one quantized matrix: ``(name, dtype, shape, array)``."""
    rows, cols = qm.shape
    wdt = WEIGHT_TENSOR_DTYPE[qm.dtype]
    out = [(name, wdt, [rows, cols], np.ascontiguousarray(qm.data, dtype=TENSOR_DTYPES[wdt]))]
    if qm.dtype in QUANTIZED:
        assert qm.scales is not None and qm.zeros is not None
        g = num_groups(cols, qm.group_size)
        out.append((f"{name}.scales", "f16", [rows, g], np.ascontiguousarray(qm.scales, dtype="<f2")))
        out.append((f"{name}.zeros", "u8", [rows, g], np.ascontiguousarray(qm.zeros, dtype="u1")))
    return out


def record_format(dtype: str, group_size: int) -> dict[str, Any]:
    """The ``format`` object of an expert record (fp32/fp16: ``group_size`` 0, ``scheme`` "none")."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if dtype in QUANTIZED:
        return {"dtype": dtype, "group_size": int(group_size), "scheme": SCHEME_QUANT}
    return {"dtype": dtype, "group_size": 0, "scheme": SCHEME_FLOAT}


def check_relpath(p: object) -> str | None:
    """Return why ``p`` is not an acceptable bundle-relative path (e.g. "absolute path"), or None if it is."""
    if not isinstance(p, str) or not p:
        return "not a non-empty string"
    if len(p.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return f"longer than {MAX_PATH_BYTES} bytes"
    if "\\" in p or "\x00" in p:
        return "not a POSIX path (contains a backslash or NUL)"
    if PurePosixPath(p).is_absolute() or os.path.isabs(p) or (len(p) > 1 and p[1] == ":"):
        return "absolute path"
    parts = p.split("/")
    if ".." in parts:
        return "contains '..'"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' component (no '//', trailing '/' or '/./')"
    return None


def json_nesting_error(text: str, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``text`` nests lists/objects deeper than ``max_depth`` (brackets outside strings, scanned before
    parsing, as the C++ reader does), or None."""
    depth, in_string, i, n = 0, False, 0, len(text)
    while i < n:
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > max_depth:
                return f"at most {max_depth} levels of nested lists/objects (found more at character {i})"
        elif c in "]}" and depth > 0:
            depth -= 1
        i += 1
    return None


def inside(root: Path, p: Path) -> bool:
    """True if ``p`` (after resolving symlinks) lies inside ``root``."""
    try:
        p.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True
