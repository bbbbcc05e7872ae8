"""Open and validate a bundle (docs/bundle-format.md, "Validation"); read expert blobs."""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from edgemoe_ort.quant import BITS, DTYPES, QuantizedMatrix

from .errors import BundleError
from .format import (
    ACTIVATIONS,
    ALIGNMENT,
    CHECKSUM,
    FORMAT,
    FORMAT_VERSIONS,
    MANIFEST,
    MAX_DIM,
    MAX_EXPERTS,
    MAX_MANIFEST_BYTES,
    QUANTIZED,
    SCHEME_FLOAT,
    SCHEME_QUANT,
    TENSOR_ALIGNMENT,
    TENSOR_DTYPES,
    TWIN,
    VARIANTS,
    check_relpath,
    expected_tensors,
    inside,
    json_nesting_error,
    stored_shape,
    tensor_nbytes,
    twin_error,
)

_HEX16 = re.compile(r"[0-9a-f]{16}")  # used with fullmatch: "$" would also match before a final newline


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Validator:
    def __init__(self, root: Path, manifest_path: Path, m: Any) -> None:
        self.version = 1
        self.twins: dict[tuple[int, int], dict[str, Any]] = {}
        self.root = root
        self.mf = manifest_path
        self.m = m

    def err(self, message: str = "", **kw: Any) -> BundleError:
        return BundleError(self.mf, message, **kw)

    def get(self, d: dict[str, Any], key: str, field: str, kind: str, **kw: Any) -> Any:
        if key not in d:
            raise self.err("missing", field=field, expected=kind, found="nothing", **kw)
        v = d[key]
        ok = {
            "int": _is_int(v),
            "bool": isinstance(v, bool),
            "str": isinstance(v, str),
            "dict": isinstance(v, dict),
            "list": isinstance(v, list),
        }[kind]
        if not ok:
            raise self.err(field=field, expected=f"a JSON {kind}", found=repr(v), **kw)
        return v

    def get_int(
        self,
        d: dict[str, Any],
        key: str,
        field: str,
        lo: int = 0,
        hi: tuple[int, str] | None = None,
        **kw: Any,
    ) -> int:
        """``d[key]``, an int >= ``lo`` (and <= ``hi[0]``, written ``hi[1]`` in the message)."""
        v = self.get(d, key, field, "int", **kw)
        if v < lo:
            raise self.err(field=field, expected=f">= {lo}", found=v, **kw)
        if hi is not None and v > hi[0]:
            raise self.err(field=field, expected=f"<= {hi[1]}", found=v, **kw)
        return int(v)

    def path(self, p: object, field: str, *, is_dir: bool = False) -> Path:
        why = check_relpath(p)
        if why is not None:
            raise self.err(why, field=field, expected="a relative path inside the bundle", found=repr(p))
        assert isinstance(p, str)
        full = self.root / p
        try:
            return self._existing(full, p, field, is_dir)
        except OSError as exc:  # a name the OS refuses (a component over NAME_MAX, a symlink loop, ...)
            why = f"cannot be read: {exc.strerror or exc}"
            raise self.err(why, field=field, expected="a readable path", found=repr(p)) from None

    def _existing(self, full: Path, p: str, field: str, is_dir: bool) -> Path:
        if not full.exists():
            raise BundleError(
                full,
                "does not exist",
                field=field,
                expected="an existing " + ("folder" if is_dir else "file"),
                found="nothing",
            )
        if not inside(self.root, full):
            raise self.err(
                field=field, expected="a path inside the bundle", found=f"{p!r} -> {full.resolve()}"
            )
        if is_dir and not full.is_dir():
            raise BundleError(full, field=field, expected="a folder", found="a file")
        if not is_dir and not full.is_file():
            raise BundleError(full, field=field, expected="a regular file", found="not a file")
        return full

    def run(self) -> tuple[Path, list[dict[str, Any]], dict[tuple[int, int], dict[str, Any]]]:
        m = self.m
        if not isinstance(m, dict):
            raise self.err(expected="a JSON object", found=type(m).__name__)
        fmt = m.get("format")
        if fmt != FORMAT:
            raise self.err(field="format", expected=repr(FORMAT), found=repr(fmt))
        ver = m.get("format_version")
        if not _is_int(ver) or ver not in FORMAT_VERSIONS:
            raise self.err(
                "unsupported format version",
                field="format_version",
                expected=" or ".join(map(str, FORMAT_VERSIONS)),
                found=repr(ver),
            )
        self.version = int(ver)
        model = self.get(m, "model", "model", "dict")
        self.get(model, "family", "model.family", "str")
        self.get(model, "config", "model.config", "dict")

        graphs = self.get(m, "graphs", "graphs", "dict")
        for role, p in graphs.items():
            self.path(p, f"graphs.{role}")
        tok = m.get("tokenizer")
        if tok is not None:
            self.path(tok, "tokenizer", is_dir=True)

        store = self.get(m, "store", "store", "dict")
        store_path = self.path(store.get("file"), "store.file")
        alignment = self.get_int(store, "alignment", "store.alignment", 1)
        if alignment != ALIGNMENT:
            raise self.err(field="store.alignment", expected=ALIGNMENT, found=alignment)
        size = self.get_int(store, "size", "store.size")
        if size % alignment:
            raise self.err(field="store.size", expected=f"a multiple of {alignment}", found=size)
        actual = store_path.stat().st_size
        if actual != size:
            what = "truncated store" if actual < size else "store size mismatch"
            raise BundleError(
                store_path, what, field="size (manifest store.size)", expected=size, found=actual
            )
        algo = store.get("checksum")
        if algo != CHECKSUM:
            raise self.err(field="store.checksum", expected=repr(CHECKSUM), found=repr(algo))

        layers = self.get(m, "layers", "layers", "list")
        for i, layer in enumerate(layers):
            f = f"layers[{i}]"
            if not isinstance(layer, dict):
                raise self.err(field=f, expected="a JSON object", found=repr(layer))
            li = self.get_int(layer, "layer", f"{f}.layer")
            if li != i:
                raise self.err("layers must be listed in order", field=f"{f}.layer", expected=i, found=li)
            ne = self.get_int(layer, "num_experts", f"{f}.num_experts", 1, layer=i, hi=(MAX_EXPERTS, "2^20"))
            tk = self.get_int(layer, "top_k", f"{f}.top_k", 1, layer=i)
            if tk > ne:
                raise self.err(field=f"{f}.top_k", expected=f"<= num_experts ({ne})", found=tk, layer=i)
            # caps keep every product of dimensions far from int64 overflow in the native reader
            self.get_int(layer, "hidden", f"{f}.hidden", 1, layer=i, hi=(MAX_DIM, "2^24"))
            self.get_int(layer, "intermediate", f"{f}.intermediate", 1, layer=i, hi=(MAX_DIM, "2^24"))
            gated = self.get(layer, "gated", f"{f}.gated", "bool", layer=i)
            act = self.get(layer, "activation", f"{f}.activation", "str", layer=i)
            if act not in ACTIVATIONS:
                raise self.err(
                    field=f"{f}.activation",
                    expected=f"one of {', '.join(ACTIVATIONS)}",
                    found=repr(act),
                    layer=i,
                )
            if act == "swiglu_oai" and not gated:
                raise self.err(
                    field=f"{f}.gated", expected="true for activation swiglu_oai", found=gated, layer=i
                )

        records = self.get(m, "experts", "experts", "list")
        by_key: dict[tuple[int, int], dict[str, Any]] = {}
        twins: dict[tuple[int, int], dict[str, Any]] = {}
        where: dict[tuple[int, int, int], int] = {}
        for n, rec in enumerate(records):
            item = self.record(n, rec, layers, size)
            key = (item["layer"], item["expert"])
            variant = item["variant"]
            table = twins if variant == TWIN else by_key
            if key in table:
                raise self.err(
                    "duplicate twin record" if variant == TWIN else "duplicate expert record",
                    field=f"experts[{n}]",
                    layer=key[0],
                    expert=key[1],
                    expected="one record",
                    found=f"another at experts[{where[(*key, variant)]}]",
                )
            table[key] = rec
            where[(*key, variant)] = n
        for li, layer in enumerate(layers):
            for e in range(layer["num_experts"]):
                if (li, e) not in by_key:
                    raise self.err(
                        "missing expert record",
                        field="experts",
                        layer=li,
                        expert=e,
                        expected="one record",
                        found="none",
                    )
        for key, twin in twins.items():  # every twin stands beside its primary (checked complete above)
            why = twin_error(by_key[key]["format"]["dtype"], twin["format"]["dtype"])
            if why:
                raise self.err(
                    why, field=f"experts[{where[(*key, TWIN)]}].format.dtype", layer=key[0], expert=key[1]
                )
        self.twins = twins
        # blobs must not overlap
        spans = sorted(  # by (offset, layer, expert, variant), as the native reader
            [(r["offset"], r["offset"] + r["length"], (*k, 0)) for k, r in by_key.items()]
            + [(r["offset"], r["offset"] + r["length"], (*k, TWIN)) for k, r in twins.items()],
            key=lambda t: (t[0], t[2]),
        )
        for (_, end0, k0), (start1, _, k1) in zip(spans, spans[1:], strict=False):
            if start1 < end0:
                raise self.err(
                    f"blob{' of the twin' if k1[2] else ''} overlaps the blob of layer {k0[0]} expert {k0[1]}"
                    f"{' (its twin)' if k0[2] else ''}",
                    field="offset",
                    layer=k1[0],
                    expert=k1[1],
                    expected=f">= {end0}",
                    found=start1,
                )
        return store_path, layers, by_key

    def record(self, n: int, rec: Any, layers: list[dict[str, Any]], store_size: int) -> dict[str, Any]:
        f = f"experts[{n}]"
        if not isinstance(rec, dict):
            raise self.err(field=f, expected="a JSON object", found=repr(rec))
        li = self.get_int(rec, "layer", f"{f}.layer")
        if li >= len(layers):
            raise self.err(field=f"{f}.layer", expected=f"< {len(layers)} (number of layers)", found=li)
        ne = layers[li]["num_experts"]
        e = self.get_int(rec, "expert", f"{f}.expert", layer=li)
        if e >= ne:
            raise self.err(field=f"{f}.expert", layer=li, expected=f"< num_experts ({ne})", found=e)
        kw: dict[str, Any] = {"layer": li, "expert": e}
        variant = 0
        if "variant" in rec:
            if self.version < 2:
                raise self.err(field=f"{f}.variant", expected="no variant in format_version 1",
                               found=repr(rec["variant"]), **kw)
            variant = rec["variant"]
            if not _is_int(variant) or variant not in VARIANTS:
                raise self.err(field=f"{f}.variant", expected=f"one of {', '.join(map(str, VARIANTS))}",
                               found=repr(variant), **kw)
        off = self.get_int(rec, "offset", f"{f}.offset", **kw)
        length = self.get_int(rec, "length", f"{f}.length", 1, **kw)
        size = self.get_int(rec, "size", f"{f}.size", **kw)
        if off % ALIGNMENT:
            raise self.err(
                "misaligned offset",
                field=f"{f}.offset",
                expected=f"a multiple of {ALIGNMENT}",
                found=off,
                **kw,
            )
        if length % ALIGNMENT:
            raise self.err(
                "misaligned length",
                field=f"{f}.length",
                expected=f"a multiple of {ALIGNMENT}",
                found=length,
                **kw,
            )
        if size > length:
            raise self.err(field=f"{f}.size", expected=f"<= length ({length})", found=size, **kw)
        if off + length > store_size:
            raise self.err(
                "record past the end of the store",
                field=f"{f}.offset + length",
                expected=f"<= store.size ({store_size})",
                found=off + length,
                **kw,
            )
        ck = self.get(rec, "checksum", f"{f}.checksum", "str", **kw)
        if not _HEX16.fullmatch(ck):
            raise self.err(field=f"{f}.checksum", expected="16 lowercase hex digits", found=repr(ck), **kw)

        fmt = self.get(rec, "format", f"{f}.format", "dict", **kw)
        dtype = self.get(fmt, "dtype", f"{f}.format.dtype", "str", **kw)
        if dtype not in DTYPES:
            raise self.err(
                "unknown dtype",
                field=f"{f}.format.dtype",
                expected=f"one of {', '.join(DTYPES)}",
                found=repr(dtype),
                **kw,
            )
        scheme = fmt.get("scheme")
        if dtype in QUANTIZED:
            self.get_int(fmt, "group_size", f"{f}.format.group_size", 1, hi=(MAX_DIM, "2^24"), **kw)
            if scheme != SCHEME_QUANT:
                raise self.err(
                    field=f"{f}.format.scheme", expected=repr(SCHEME_QUANT), found=repr(scheme), **kw
                )
        elif scheme not in (None, SCHEME_FLOAT):
            raise self.err(field=f"{f}.format.scheme", expected=repr(SCHEME_FLOAT), found=repr(scheme), **kw)

        tensors = self.get(rec, "tensors", f"{f}.tensors", "dict", **kw)
        biases = {b for b in ("b_in", "b_out") if b in tensors}
        want = expected_tensors(layers[li], fmt, biases)
        if set(tensors) != set(want):
            missing = sorted(set(want) - set(tensors))
            extra = sorted(set(tensors) - set(want))
            raise self.err(
                f"tensors for format {dtype}",
                field=f"{f}.tensors",
                expected=sorted(want),
                found=f"{sorted(tensors)} (missing {missing}, unexpected {extra})",
                **kw,
            )
        spans = []
        for name, (tdt, tshape) in want.items():
            tf = f"{f}.tensors.{name}"
            t = tensors[name]
            if not isinstance(t, dict):
                raise self.err(field=tf, expected="a JSON object", found=repr(t), **kw)
            got_dt = t.get("dtype")
            if got_dt != tdt:
                raise self.err(field=f"{tf}.dtype", expected=repr(tdt), found=repr(got_dt), **kw)
            shape = self.get(t, "shape", f"{tf}.shape", "list", **kw)
            if shape != tshape or not all(_is_int(d) for d in shape):
                raise self.err(
                    "shape does not match the layer", field=f"{tf}.shape", expected=tshape, found=shape, **kw
                )
            toff = self.get_int(t, "offset", f"{tf}.offset", **kw)
            nb = self.get_int(t, "nbytes", f"{tf}.nbytes", **kw)
            if toff % TENSOR_ALIGNMENT:
                raise self.err(
                    "misaligned tensor",
                    field=f"{tf}.offset",
                    expected=f"a multiple of {TENSOR_ALIGNMENT}",
                    found=toff,
                    **kw,
                )
            want_nb = tensor_nbytes(tdt, tshape)
            if nb != want_nb:
                raise self.err(
                    f"nbytes of {tdt} {tshape}", field=f"{tf}.nbytes", expected=want_nb, found=nb, **kw
                )
            if toff + nb > size:
                raise self.err(
                    "tensor outside the blob",
                    field=f"{tf}.offset + nbytes",
                    expected=f"<= size ({size})",
                    found=toff + nb,
                    **kw,
                )
            spans.append((toff, toff + nb, name))
        spans.sort()
        for (_, end0, n0), (s1, _, n1) in zip(spans, spans[1:], strict=False):
            if s1 < end0:
                raise self.err(
                    f"tensor {n1} overlaps tensor {n0}",
                    field=f"{f}.tensors.{n1}.offset",
                    expected=f">= {end0}",
                    found=s1,
                    **kw,
                )
        return {"layer": li, "expert": e, "variant": int(variant)}


def _read_manifest(mf: Path) -> Any:
    """The parsed ``manifest.json``: a regular file of at most MAX_MANIFEST_BYTES, UTF-8, JSON nested at most
    MAX_JSON_DEPTH deep (as the C++ reader); any other content is one BundleError naming the file."""
    if not mf.exists():
        raise BundleError(mf, "missing manifest", expected="a file", found="nothing")
    if not mf.is_file():
        raise BundleError(mf, "missing manifest", expected="a regular file", found="a folder" if mf.is_dir()
                          else "another kind of file")
    if not inside(mf.parent, mf):  # the same rule as every path the manifest names
        raise BundleError(mf, expected="a file inside the bundle", found=f"a symlink to {mf.resolve()}")
    size = mf.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(
            mf, "too large", expected=f"at most {MAX_MANIFEST_BYTES} bytes", found=f"{size} bytes"
        )
    raw = mf.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(mf, f"not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})") from None
    text = text.removeprefix("\ufeff")  # a leading byte-order mark is ignored (RFC 8259; both readers)
    deep = json_nesting_error(text)
    if deep is not None:
        raise BundleError(mf, f"nested too deeply: expected {deep}")
    try:
        # integers past the double range are refused as they are parsed (a repeated key may replace one
        # later): the hook costs a call per integer, so it runs only when the text has such long digit runs
        huge = _double_range_int if _LONG_DIGITS.search(text) else None
        doc = json.loads(text, parse_constant=_not_json, parse_float=_finite_float, parse_int=huge)
    except json.JSONDecodeError as exc:
        raise BundleError(mf, f"not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, NaN, 1e999, ...
        raise BundleError(mf, f"not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(doc):
        raise BundleError(mf, "not valid JSON: a string holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)")
    return doc


# What JSON (RFC 8259) and the native parser refuse but Python's json module accepts by default.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(s: str) -> float:
    x = float(s)
    if math.isinf(x):
        raise ValueError(f"number {s[:40]} is out of range")
    return x


def _double_range_int(s: str) -> int:
    """An integer literal; one beyond the double range is refused, as the native parser refuses it (it reads
    integers past 64 bits as doubles: ``number overflow``)."""
    x = int(s)
    if abs(x) > _MAX_DOUBLE_INT:
        raise ValueError(f"number {s[:20]}... ({len(s)} digits) is beyond the double range")
    return x


_MAX_DOUBLE_INT = int(sys.float_info.max)
_LONG_DIGITS = re.compile(r"\d{309}")  # fewer digits cannot exceed the double range (~1.8e308)


def _has_lone_surrogate(doc: Any) -> bool:
    """True if a key or string anywhere in ``doc`` holds a code point in U+D800..U+DFFF (an escape that was
    not a valid pair). Iterative: ``doc`` is at most MAX_JSON_DEPTH deep anyway."""
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if any("\ud800" <= c <= "\udfff" for c in v):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


class Bundle:
    """A validated, read-only view of a bundle folder. Use :meth:`Bundle.open`."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        store_path: Path,
        records: dict[tuple[int, int], dict[str, Any]],
        twins: dict[tuple[int, int], dict[str, Any]] | None = None,
    ) -> None:
        self._path = path
        self._manifest = manifest
        self._store_path = store_path
        self._records = records
        self._twins = dict(twins or {})

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Open and validate the bundle at ``path`` (its folder, or its ``manifest.json``).

        Everything in the spec's Validation section is checked except checksums, which
        :meth:`read_expert` verifies.
        """
        p = Path(path)
        if p.is_file() and p.name == MANIFEST:
            p = p.parent
        if not p.is_dir():
            raise BundleError(
                p, "not a bundle folder", expected="a folder", found="nothing" if not p.exists() else "a file"
            )
        root = p.absolute()
        mf = root / MANIFEST
        manifest = _read_manifest(mf)
        try:
            validator = _Validator(root, mf, manifest)
            store_path, _, records = validator.run()
        except OSError as exc:  # a path the OS refuses (too long a name, a loop of symlinks...)
            where = Path(exc.filename) if isinstance(exc.filename, str) else mf
            raise BundleError(where, f"cannot be read: {exc.strerror or exc}") from None
        return cls(root, manifest, store_path, records, validator.twins)

    # -- properties -------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def family(self) -> str:
        return str(self._manifest["model"]["family"])

    @property
    def config(self) -> dict[str, Any]:
        return self._manifest["model"]["config"]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self._manifest["layers"]

    @property
    def graphs(self) -> dict[str, str]:
        return self._manifest["graphs"]

    @property
    def tokenizer_path(self) -> Path | None:
        tok = self._manifest.get("tokenizer")
        return None if tok is None else self._path / tok

    @property
    def store_path(self) -> Path:
        return self._store_path

    @property
    def store_bytes(self) -> int:
        return int(self._manifest["store"]["size"])

    @property
    def primary_bytes(self) -> int:
        """What a budget given in percent is a share of: the primary experts' bytes (the sum of their
        ``length``) in a bundle with twins, the whole store (``store.size``) in one without."""
        if not self._twins:
            return self.store_bytes
        return sum(int(r["length"]) for r in self._records.values())

    @property
    def twins(self) -> dict[tuple[int, int], dict[str, Any]]:
        """The low-bit twin records by ``(layer, expert)`` (empty for a bundle without twins)."""
        return dict(self._twins)

    @property
    def dense_bytes(self) -> int:
        """Bytes of the graph files and their external data (sibling files named ``<graph file>*``)."""
        files: set[Path] = set()
        for rel in self.graphs.values():
            g = self._path / rel
            files.add(g)
            for sib in g.parent.iterdir():
                if sib.is_file() and sib.name.startswith(g.name) and sib != g:
                    files.add(sib)
        return sum(f.stat().st_size for f in files)

    def graph_path(self, role: str = "decoder") -> Path:
        graphs = self.graphs
        if role not in graphs:
            raise BundleError(
                self._path / MANIFEST,
                field=f"graphs.{role}",
                expected=f"a graph for role {role!r}",
                found=f"roles {sorted(graphs)}",
            )
        return self._path / graphs[role]

    def expert_record(self, layer: int, expert: int, variant: int = 0) -> dict[str, Any]:
        """The manifest record of ``(layer, expert)``: its primary, or its twin for ``variant`` 1."""
        table = self._twins if variant == TWIN else self._records
        rec = table.get((int(layer), int(expert)))
        if rec is None:
            raise BundleError(
                self._path / MANIFEST,
                "no such twin" if variant == TWIN else "no such expert",
                layer=layer,
                expert=expert,
                expected=f"layer < {len(self.layers)} and expert < num_experts"
                + (" with a twin record" if variant == TWIN else ""),
                found="no record",
            )
        return rec

    # -- reading ----------------------------------------------------------------------------------------
    def read_blob(self, layer: int, expert: int, verify: bool = True, variant: int = 0) -> bytes:
        """The meaningful bytes ``blob[0:size]`` of one expert (its twin for ``variant`` 1); checksum verified
        unless ``verify=False``."""
        rec = self.expert_record(layer, expert, variant)
        with open(self._store_path, "rb") as f:
            f.seek(rec["offset"])
            buf = f.read(rec["size"])
        if len(buf) != rec["size"]:
            raise BundleError(
                self._store_path,
                "truncated store",
                layer=layer,
                expert=expert,
                field="blob bytes",
                expected=f"{rec['size']} at offset {rec['offset']}",
                found=len(buf),
            )
        if verify:
            got = xxhash.xxh3_64_hexdigest(buf)
            if got != rec["checksum"]:
                raise BundleError(
                    self._store_path,
                    "checksum mismatch",
                    layer=layer,
                    expert=expert,
                    field=f"{CHECKSUM} checksum",
                    expected=rec["checksum"],
                    found=got,
                )
        return buf

    def read_expert(
        self, layer: int, expert: int, verify: bool = True, variant: int = 0
    ) -> dict[str, np.ndarray]:
        """Raw stored tensors of one expert by name (packed dtypes as ``uint8 [rows, ceil(bits*cols/8)]``)."""
        rec = self.expert_record(layer, expert, variant)
        buf = self.read_blob(layer, expert, verify=verify, variant=variant)
        out: dict[str, np.ndarray] = {}
        for name, t in rec["tensors"].items():
            dt = TENSOR_DTYPES[t["dtype"]]
            shape = stored_shape(t["dtype"], t["shape"])
            count = t["nbytes"] // dt.itemsize
            arr = np.frombuffer(buf, dtype=dt, count=count, offset=t["offset"]).reshape(shape)
            out[name] = arr
        return out

    def expert_matrices(
        self, layer: int, expert: int, verify: bool = True, variant: int = 0
    ) -> tuple[QuantizedMatrix, QuantizedMatrix, np.ndarray | None, np.ndarray | None]:
        rec = self.expert_record(layer, expert, variant)
        fmt = rec["format"]
        dtype = fmt["dtype"]
        gs = int(fmt["group_size"]) if dtype in QUANTIZED else 0
        t = self.read_expert(layer, expert, verify=verify, variant=variant)
        mats = []
        for w in ("w_in", "w_out"):
            shape = rec["tensors"][w]["shape"]
            mats.append(
                QuantizedMatrix(
                    dtype, (shape[0], shape[1]), gs, t[w], t.get(f"{w}.scales"), t.get(f"{w}.zeros")
                )
            )
        return mats[0], mats[1], t.get("b_in"), t.get("b_out")

    def dequantized_expert(
        self, layer: int, expert: int, verify: bool = True, variant: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(w_in f32 [rows_in, H], w_out f32 [H, I], b_in, b_out)`` exactly as the kernels see them."""
        w_in, w_out, b_in, b_out = self.expert_matrices(layer, expert, verify=verify, variant=variant)
        return w_in.dequantize(), w_out.dequantize(), b_in, b_out

    # -- reporting --------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        recs = list(self._records.values())
        dtypes = Counter(r["format"]["dtype"] for r in recs)
        bits = Counter(BITS[r["format"]["dtype"]] for r in recs)
        return {
            "path": str(self._path),
            "format_version": self._manifest["format_version"],
            "family": self.family,
            "layers": len(self.layers),
            "experts": len(recs),
            "dtypes": dict(sorted(dtypes.items())),
            "bits": {b: bits[b] for b in sorted(bits)},
            "store_bytes": self.store_bytes,
            "dense_bytes": self.dense_bytes,
            "expert_bytes": sum(int(r["size"]) for r in recs),
            "twins": len(self._twins),
            "twin_dtypes": dict(sorted(Counter(r["format"]["dtype"] for r in self._twins.values()).items())),
            "twin_bytes": sum(int(r["size"]) for r in self._twins.values()),
            "primary_bytes": self.primary_bytes,
            "largest_expert_bytes": max(
                (int(r["length"]) for r in [*recs, *self._twins.values()]), default=0
            ),
            "graphs": dict(self.graphs),
            "tokenizer": self._manifest.get("tokenizer"),
        }

    def __repr__(self) -> str:
        return (
            f"Bundle({str(self._path)!r}, family={self.family!r}, layers={len(self.layers)}, "
            f"experts={len(self._records)})"
        )
