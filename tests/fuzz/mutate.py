"""Seeded structured mutations of small valid bundles (the cases of the fuzzer, tests/fuzz/run.py).

A case is fully determined by ``(seed, index)``: :func:`case_spec` draws, from a ``Random`` seeded with both,
one of the base bundles of :data:`BASES` (made by ``make_synthetic_bundle``: fp32 / fp16 / int8 / int4 /
int3 + int2 / mixed, 1-2 layers, 2-4 experts) and 1-3 mutations, each an :class:`Op` ``(name, seed)``
whose own random choices come from ``Random(seed)``. :func:`materialize` writes the case as a bundle folder:
the base's files (the store and the graph hard-linked until a mutation changes them), the mutated
``manifest.json``, and whatever a file-system mutation adds (symlinks, a FIFO, folders).

Mutations, in three phases (applied in the op order within each phase):

- ``json``: on the parsed manifest: delete / duplicate (repeated keys) / retype fields, boundary and huge
  integers (2^20, 2^24, 2^63, negatives, floats, 400- and 6000-digit integers), NaN / Infinity, deep nesting,
  long strings, lone surrogates (``\\ud800``), confusable names, unknown extra fields; targeted edits of
  layers, records (offsets overlapping / misaligned / past the store, lengths, sizes), checksums, formats
  (dtype, group size, scheme), tensors (shape, dtype, offset, nbytes, extra / missing tensors);
- ``fs``: path tricks for ``store.file`` (absolute, ``..``, ``experts.bin/.``, a trailing slash, symlinks
  out of the bundle, a loop, a FIFO or a folder as the store), ``graphs`` and ``tokenizer``; the store
  truncated / extended (with or without ``store.size`` following), bytes of a blob flipped; the manifest
  replaced by a folder, a FIFO, a symlink, nothing, an empty or a >128 MiB (sparse) file;
- ``text``: on the serialized bytes: a UTF-8 BOM, invalid UTF-8 inside strings, byte flips / inserts /
  deletes, truncation, trailing garbage (also after a NUL), exotic whitespace, comments, trailing commas.

Serialization is this module's own (:func:`dump`): it writes raw number text (``1e400``, ``NaN``, 6000
digits), objects with repeated keys and, with ``ensure_ascii`` off, lone surrogates as their CESU-8 bytes.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALIGN = 4096
MANIFEST = "manifest.json"
STORE = "experts.bin"
GRAPH = "model.onnx"


# --- base bundles -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseSpec:
    """A base bundle: ``make_synthetic_bundle(**kwargs)``."""

    name: str
    kwargs: dict[str, Any]


BASES: tuple[BaseSpec, ...] = (
    BaseSpec(
        "fp32-1x4", dict(num_layers=1, num_experts=4, top_k=2, hidden=16, intermediate=24, dtype="fp32")
    ),
    BaseSpec(
        "int4-2x3",
        dict(num_layers=2, num_experts=3, top_k=2, hidden=48, intermediate=40, dtype="int4", group_size=32),
    ),
    BaseSpec(
        "int8-1x2-bias-relu",
        dict(
            num_layers=1,
            num_experts=2,
            top_k=1,
            hidden=32,
            intermediate=20,
            dtype="int8",
            group_size=16,
            gated=False,
            activation="relu",
            bias=True,
        ),
    ),
    BaseSpec(
        "mixed-1x4-swiglu",
        dict(
            num_layers=1,
            num_experts=4,
            top_k=2,
            hidden=32,
            intermediate=16,
            dtype=["fp32", "fp16", "int8", "int4"],
            group_size=8,
            activation="swiglu_oai",
        ),
    ),
    BaseSpec(
        "int4-1x3-odd",
        dict(num_layers=1, num_experts=3, top_k=2, hidden=33, intermediate=21, dtype="int4", group_size=8),
    ),
    BaseSpec(
        "lowbit-1x3-odd",
        dict(
            num_layers=1, num_experts=3, top_k=2, hidden=35, intermediate=19, dtype=["int3", "int2", "int3"],
            group_size=8,
        ),
    ),
    BaseSpec(
        "fp16-2x2-wired",
        dict(
            num_layers=2,
            num_experts=2,
            top_k=1,
            hidden=16,
            intermediate=8,
            dtype="fp16",
            lookahead=1,
            token_ids=True,
        ),
    ),
)


@dataclass
class Base:
    """A base bundle on disk: its folder, manifest text and object, and what the ORT worker feeds it."""

    spec: BaseSpec
    path: Path
    manifest: dict[str, Any]

    @property
    def feeds(self) -> dict[str, Any]:
        """Per layer ``[num_experts, top_k]`` and the hidden size (the base's, not the mutated manifest's)."""
        lays = self.manifest["layers"]
        return {
            "hidden": int(lays[0]["hidden"]),
            "layers": [[int(x["num_experts"]), int(x["top_k"])] for x in lays],
        }


def build_bases(root: Path) -> dict[str, Base]:
    """Writes every base bundle under ``root`` (once; reused if already there) and returns them by name."""
    from edgemoe_ort.bundle.testing import make_synthetic_bundle

    out: dict[str, Base] = {}
    root.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(BASES):
        p = root / spec.name
        if not (p / MANIFEST).is_file():
            make_synthetic_bundle(p, seed=i, force=True, **spec.kwargs)
        out[spec.name] = Base(spec, p, json.loads((p / MANIFEST).read_text()))
    return out


# --- serialization ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Raw:
    """JSON text written as is (numbers Python's json cannot write, deep nesting, escapes)."""

    text: str


@dataclass
class Pairs:
    """An object written with its keys in this order, repeats allowed."""

    items: list[tuple[str | Raw, Any]]


@dataclass(frozen=True)
class Style:
    indent: int | None  # None: compact
    ensure_ascii: bool


def _dump_str(s: str, style: Style) -> str:
    return json.dumps(s, ensure_ascii=style.ensure_ascii)


def dump(v: Any, style: Style, level: int = 0) -> str:
    """JSON text of ``v`` (dict, list, str, int, float, bool, None, :class:`Raw`, :class:`Pairs`)."""
    if isinstance(v, Raw):
        return v.text
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return int.__repr__(v) if abs(v) < 10**4000 else Raw(str(v)).text
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return repr(v)
    if isinstance(v, str):
        return _dump_str(v, style)
    if isinstance(v, (dict, Pairs)):
        items = list(v.items.copy() if isinstance(v, Pairs) else v.items())
        if not items:
            return "{}"
        parts = [
            f"{k.text if isinstance(k, Raw) else _dump_str(str(k), style)}: {dump(x, style, level + 1)}"
            for k, x in items
        ]
        return _join("{", parts, "}", style, level)
    if isinstance(v, (list, tuple)):
        if not v:
            return "[]"
        return _join("[", [dump(x, style, level + 1) for x in v], "]", style, level)
    raise TypeError(f"cannot serialize {type(v).__name__}")


def _join(open_: str, parts: list[str], close: str, style: Style, level: int) -> str:
    if style.indent is None:
        return open_ + ", ".join(parts) + close
    pad = "\n" + " " * (style.indent * (level + 1))
    return open_ + pad + ("," + pad).join(parts) + "\n" + " " * (style.indent * level) + close


def encode(text: str) -> bytes:
    """UTF-8 bytes; lone surrogates (``ensure_ascii`` off) become their CESU-8 bytes (invalid UTF-8)."""
    return text.encode("utf-8", "surrogatepass")


# --- cases --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    """One mutation: its name (a key of :data:`MUTATIONS`) and the seed of its random choices."""

    name: str
    seed: int

    def to_json(self) -> list[Any]:
        return [self.name, self.seed]


@dataclass(frozen=True)
class CaseSpec:
    seed: int
    index: int
    base: str
    ops: tuple[Op, ...]
    style: Style
    io: str  # the I/O mode the native readers use for this case

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "index": self.index,
            "base": self.base,
            "ops": [o.to_json() for o in self.ops],
            "style": {"indent": self.style.indent, "ensure_ascii": self.style.ensure_ascii},
            "io": self.io,
        }

    def without(self, j: int) -> CaseSpec:
        return CaseSpec(
            self.seed, self.index, self.base, self.ops[:j] + self.ops[j + 1 :], self.style, self.io
        )


def case_spec(seed: int, index: int) -> CaseSpec:
    """The case ``index`` of run ``seed`` (deterministic)."""
    rng = random.Random(f"edgemoe-fuzz:{seed}:{index}")
    base = rng.choice(BASES).name
    n = rng.choices((1, 2, 3), weights=(6, 3, 1))[0]
    names = list(MUTATIONS)
    weights = [MUTATIONS[k][1] for k in names]
    ops = tuple(Op(rng.choices(names, weights=weights)[0], rng.getrandbits(32)) for _ in range(n))
    style = Style(rng.choice((None, None, 1, 2)), rng.random() < 0.5)
    io = ("buffered", "direct", "mmap")[index % 3]
    return CaseSpec(seed, index, base, ops, style, io)


@dataclass
class State:
    """What the mutations of one case work on."""

    dir: Path
    base: Base
    doc: Any
    shared: Path  # a folder outside every case (symlink targets)
    text_ops: list[Callable[[bytearray], str]] = field(default_factory=list)
    manifest_kind: str = "file"  # file | none: a mutation has put something else in its place
    store_owned: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def store(self) -> Path:
        return self.dir / STORE

    def own_store(self) -> Path:
        """The case's store as its own file (no longer a hard link to the base's): safe to change."""
        if not self.store_owned:
            tmp = self.dir / (STORE + ".tmp")
            shutil.copyfile(self.base.path / STORE, tmp)
            os.replace(tmp, self.store)
            self.store_owned = True
        return self.store


@dataclass
class Case:
    spec: CaseSpec
    dir: Path
    notes: list[str]

    def request(self) -> dict[str, Any]:
        """What a reader worker is sent for this case."""
        return {"id": self.spec.index, "dir": str(self.dir), "io": self.spec.io}


def shared_dir(root: Path, bases: dict[str, Base]) -> Path:
    """The folder outside every case that symlinks of the cases point into: a copy of each base."""
    out = root / "outside"
    for name, b in bases.items():
        d = out / name
        if not (d / MANIFEST).exists():
            d.mkdir(parents=True, exist_ok=True)
            for f in (MANIFEST, STORE, GRAPH):
                shutil.copyfile(b.path / f, d / f)
    return out


def materialize(spec: CaseSpec, bases: dict[str, Base], dest: Path, shared: Path) -> Case:
    """Writes the case ``spec`` as a bundle folder ``dest`` (replaced if it exists)."""
    if dest.exists() or dest.is_symlink():
        shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    base = bases[spec.base]
    for f in (STORE, GRAPH):
        os.link(base.path / f, dest / f)
    st = State(dest, base, json.loads(json.dumps(base.manifest)), shared / spec.base)
    phases = {"json": 0, "fs": 1, "text": 2}
    for op in sorted(spec.ops, key=lambda o: phases[MUTATIONS[o.name][2]]):
        fn = MUTATIONS[op.name][0]
        rng = random.Random(op.seed)
        try:
            note = fn(rng, st)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, OSError) as exc:
            note = f"n/a ({type(exc).__name__})"
        st.notes.append(f"{op.name}: {note}")
    if st.manifest_kind == "file":
        data = bytearray(encode(dump(st.doc, spec.style)))
        for t in st.text_ops:
            try:
                st.notes.append(t(data))
            except (IndexError, ValueError) as exc:  # nothing to work on (an empty or odd text)
                st.notes.append(f"  text: n/a ({type(exc).__name__})")
        (dest / MANIFEST).write_bytes(bytes(data))
    return Case(spec, dest, st.notes)


# --- helpers of the mutations -------------------------------------------------------------------------------
Path_ = tuple[Any, ...]


def walk(v: Any, path: Path_ = ()) -> list[tuple[Path_, Any]]:
    """Every (path, value) below ``v`` (iterative; :class:`Raw` and :class:`Pairs` are leaves)."""
    out: list[tuple[Path_, Any]] = []
    stack: list[tuple[Path_, Any]] = [(path, v)]
    while stack:
        p, x = stack.pop()
        out.append((p, x))
        if isinstance(x, dict):
            stack.extend((p + (k,), y) for k, y in x.items())
        elif isinstance(x, list):
            stack.extend((p + (i,), y) for i, y in enumerate(x))
    out.reverse()
    return out


def get(doc: Any, path: Path_) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def put(st: State, path: Path_, value: Any) -> None:
    if not path:
        st.doc = value
        return
    get(st.doc, path[:-1])[path[-1]] = value


def pstr(path: Path_) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out or "<root>"


def short(v: Any, n: int = 60) -> str:
    s = v.text if isinstance(v, Raw) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def pick_path(rng: random.Random, st: State, pred: Callable[[Any], bool] = lambda v: True) -> Path_:
    cands = [p for p, v in walk(st.doc) if p and pred(v)]
    if not cands:
        raise KeyError("no candidate")
    return rng.choice(cands)


def records(st: State) -> list[dict[str, Any]]:
    return [r for r in st.doc["experts"] if isinstance(r, dict)]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


BIG = [
    0,
    1,
    -1,
    2,
    7,
    63,
    64,
    65,
    4095,
    4096,
    4097,
    8192,
    2**16,
    2**20,
    2**20 + 1,
    2**24,
    2**24 + 1,
    2**31 - 1,
    2**31,
    2**32,
    2**32 + 1,
    2**53 + 1,
    2**62,
    2**63 - 4096,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    2**64 + 1,
    -(2**31),
    -(2**63),
    -(2**63) - 1,
    -4096,
]
RAW_NUMBERS = [
    "1e3",
    "4096.0",
    "1.0",
    "-0",
    "0.0",
    "1E400",
    "-1e400",
    "1e-400",
    "NaN",
    "Infinity",
    "-Infinity",
    "0x10",
    "01",
    "+1",
    ".5",
    "1.",
    "1" + "0" * 400,
    "1" + "0" * 6000,
    "-" + "9" * 5000,
    "4096e0",
    "18446744073709551616",
]


def int_variant(rng: random.Random, v: Any) -> Any:
    r = rng.random()
    if r < 0.45:
        return rng.choice(BIG)
    if r < 0.7 and is_int(v):
        return v + rng.choice((1, -1, 64, -64, 4096, -4096, 2 * v, -2 * v, -v))
    if r < 0.8 and is_int(v):
        return float(v)
    return Raw(rng.choice(RAW_NUMBERS))


OTHER_TYPES: list[Any] = [None, True, False, 0, -1, 1.5, "1", "", [], {}, [1], {"a": 1}, "true", "null"]


def retype_value(rng: random.Random, v: Any) -> Any:
    cands = [x for x in OTHER_TYPES if type(x) is not type(v)]
    return json.loads(json.dumps(rng.choice(cands)))


def string_variant(rng: random.Random, v: str) -> Any:
    c = rng.randrange(14)
    if c == 0:
        return v + "a" * rng.choice((100, 5000, 70000))
    if c == 1:
        return "x" * rng.choice((4096, 4097, 1 << 20))
    if c == 2:
        return Raw('"' + v + '\\ud800"')
    if c == 3:
        return Raw('"\\udc00' + v + '"')
    if c == 4:
        return v + "\ud800"  # written raw (CESU-8) or escaped, by the case's style
    if c == 5:
        return "\ufeff" + v
    if c == 6:
        return v.upper()
    if c == 7:
        return v + rng.choice((" ", "\n", "\t", "\r\n"))
    if c == 8:
        return v + "\x00"
    if c == 9:
        return v.replace("e", "\u0435").replace("a", "\u0430")  # Cyrillic look-alikes
    if c == 10:
        return Raw('"' + v + '\\u0000"')
    if c == 11:
        return ""
    if c == 12:
        return Raw('"' + "".join(f"\\u{ord(ch):04x}" for ch in v) + '"')  # all escaped: the same string
    return v[:-1] if v else "a"


def deep(rng: random.Random) -> Raw:
    d = rng.choice((10, 63, 64, 65, 100, 1000, 100000))
    if rng.random() < 0.5:
        return Raw("[" * d + "]" * d)
    return Raw('{"a": ' * d + "1" + "}" * d)


# --- json-phase mutations -----------------------------------------------------------------------------------
def m_delete(rng: random.Random, st: State) -> str:
    p = pick_path(rng, st)
    parent = get(st.doc, p[:-1])
    del parent[p[-1]]
    return f"delete {pstr(p)}"


def m_retype(rng: random.Random, st: State) -> str:
    p = pick_path(rng, st)
    v = retype_value(rng, get(st.doc, p))
    put(st, p, v)
    return f"{pstr(p)} = {short(v)}"


def m_int(rng: random.Random, st: State) -> str:
    p = pick_path(rng, st, is_int)
    v = int_variant(rng, get(st.doc, p))
    put(st, p, v)
    return f"{pstr(p)} = {short(v)}"


def m_dup_key(rng: random.Random, st: State) -> str:
    p = pick_path(rng, st, lambda v: isinstance(v, dict) and bool(v))
    d = get(st.doc, p)
    k = rng.choice(list(d))
    old = d[k]
    new = int_variant(rng, old) if is_int(old) else (retype_value(rng, old) if rng.random() < 0.5 else old)
    items = list(d.items())
    j = next(i for i, (kk, _) in enumerate(items) if kk == k)
    if rng.random() < 0.5:
        items.insert(j, (k, new))  # the repeat first: a reader that keeps the last sees the original
        order = "before"
    else:
        items.insert(j + 1, (k, new))
        order = "after"
    put(st, p, Pairs(items))
    return f"{pstr(p)}: key {k!r} repeated {order} the original with {short(new)}"


def m_string(rng: random.Random, st: State) -> str:
    p = pick_path(rng, st, lambda v: isinstance(v, str))
    v = string_variant(rng, get(st.doc, p))
    put(st, p, v)
    return f"{pstr(p)} = {short(v)}"


def m_key(rng: random.Random, st: State) -> str:
    p = pick_path(rng, st, lambda v: isinstance(v, dict) and bool(v))
    d = get(st.doc, p)
    k = rng.choice(list(d))
    nk = string_variant(rng, k)
    items = [(nk, x) if kk == k else (kk, x) for kk, x in d.items()]
    if isinstance(nk, Raw):  # the key's JSON text written as is (escapes)
        put(st, p, Pairs(items))
        return f"{pstr(p)}: key {k!r} -> raw {short(nk)}"
    put(st, p, dict(items))
    return f"{pstr(p)}: key {k!r} -> {short(nk)}"


def m_deep(rng: random.Random, st: State) -> str:
    p = pick_path(rng, st)
    v = deep(rng)
    put(st, p, v)
    return f"{pstr(p)} = {short(v)}"


def extra_value(rng: random.Random) -> Any:
    c = rng.randrange(10)
    if c < 4:
        return Raw(rng.choice(RAW_NUMBERS))
    if c == 4:
        return deep(rng)
    if c == 5:
        return Raw('"\\ud800"')
    if c == 6:
        return "\ud800"
    if c == 7:
        return "x" * rng.choice((10, 100000))
    if c == 8:
        return rng.choice(BIG)
    return {"nested": [1, 2, {"a": None}]}


def m_extra(rng: random.Random, st: State) -> str:
    """An unknown field (ignored by both readers) holding something a JSON parser may choke on."""
    cands = [p for p, v in walk(st.doc) if isinstance(v, dict)]
    p = rng.choice(cands)
    d = get(st.doc, p)
    key = rng.choice(("x_extra", "comment", "config", "x\ud800", "\u00e9", ""))
    if key in d:
        key = "x_extra"
    v = extra_value(rng)
    d[key] = v
    return f"{pstr(p)}.{key!r} = {short(v)}"


def m_config(rng: random.Random, st: State) -> str:
    """model.config / created_by (free-form parts of the manifest) get odd values."""
    v = extra_value(rng)
    if rng.random() < 0.5:
        st.doc["model"]["config"] = {"vocab_size": v}
        return f"model.config.vocab_size = {short(v)}"
    st.doc["created_by"] = v
    return f"created_by = {short(v)}"


LAYER_FIELDS = ("layer", "num_experts", "top_k", "hidden", "intermediate", "gated", "activation")
ACTS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai", "SILU", "swiglu", "", "gelu ", "tanh")


def m_layer(rng: random.Random, st: State) -> str:
    lays = st.doc["layers"]
    i = rng.randrange(len(lays))
    lay = lays[i]
    k = rng.choice(LAYER_FIELDS)
    if k == "gated":
        v: Any = rng.choice((not lay.get("gated", True), 0, 1, "true", None))
    elif k == "activation":
        v = rng.choice(ACTS)
    elif k == "num_experts" and rng.random() < 0.4:
        v = rng.choice((2**20, 2**20 + 1, 4 * 2**20, 2**31, lay[k] + 1, lay[k] - 1, 0))
    else:
        v = int_variant(rng, lay.get(k, 1))
    lay[k] = v
    return f"layers[{i}].{k} = {short(v)}"


def m_layers(rng: random.Random, st: State) -> str:
    lays = st.doc["layers"]
    c = rng.randrange(6)
    if c == 0:
        j = rng.randrange(len(lays))
        del lays[j]
        return f"delete layers[{j}]"
    if c == 1:
        extra = dict(lays[-1], layer=len(lays))
        lays.append(extra)
        return f"layers += copy of the last as layer {len(lays) - 1} (no records)"
    if c == 2 and len(lays) > 1:
        lays[0], lays[1] = lays[1], lays[0]
        return "swap layers[0] and layers[1]"
    if c == 3:
        n = rng.choice((2**20, 2**20 + 1, 2**24))
        for lay in lays:
            lay["num_experts"] = n
        return f"every layer's num_experts = {n} (records unchanged)"
    if c == 4:
        st.doc["layers"] = []
        return "layers = []"
    n = rng.choice((100, 5000))
    for j in range(len(lays), n):
        lays.append(dict(lays[-1], layer=j))
    return f"layers extended to {n} (no records)"


def m_record(rng: random.Random, st: State) -> str:
    recs = records(st)
    r = rng.choice(recs)
    other = rng.choice(recs)
    size = st.doc["store"]["size"] if is_int(st.doc["store"].get("size")) else 0
    k = rng.choice(("offset", "offset", "length", "size", "layer", "expert", "offset+length"))
    tag = f"experts[{st.doc['experts'].index(r)}]"
    if k == "offset":
        v: Any = rng.choice(
            (
                other["offset"],
                r["offset"] + 1,
                r["offset"] + 64,
                r["offset"] + ALIGN,
                r["offset"] - ALIGN,
                size,
                size - ALIGN,
                size + ALIGN,
                2**63 - ALIGN,
                2**64 - ALIGN,
                -ALIGN,
                int_variant(rng, r["offset"]),
            )
        )
    elif k == "length":
        v = rng.choice(
            (
                0,
                ALIGN,
                r["length"] + ALIGN,
                r["length"] - ALIGN,
                r["length"] + 1,
                size,
                size + ALIGN,
                2**63 - ALIGN,
                2**64 - ALIGN,
                int_variant(rng, r["length"]),
            )
        )
    elif k == "size":
        v = rng.choice(
            (0, 1, r["size"] - 1, r["size"] + 1, r["length"], r["length"] + 1, int_variant(rng, r["size"]))
        )
    elif k == "offset+length":
        r["offset"] = rng.choice((size - ALIGN, 2**63 - ALIGN, 2**64 - 2 * ALIGN))
        r["length"] = rng.choice((2 * ALIGN, 2**63, 2**64 - ALIGN))
        return f"{tag}.offset, length = {r['offset']}, {r['length']} (wrap-around)"
    elif k == "layer":
        v = rng.choice((other["layer"], r["layer"] + 1, -1, 2**32, 2**31))
    else:
        v = rng.choice((other["expert"], r["expert"] + 1, -1, 2**32, 2**31, 2**20))
    r[k] = v
    return f"{tag}.{k} = {short(v)}"


def m_records(rng: random.Random, st: State) -> str:
    exp = st.doc["experts"]
    c = rng.randrange(7)
    if c == 0:
        j = rng.randrange(len(exp))
        del exp[j]
        return f"delete experts[{j}]"
    if c == 1:
        j = rng.randrange(len(exp))
        exp.append(json.loads(json.dumps(exp[j])))
        return f"experts += copy of experts[{j}]"
    if c == 2:
        rng.shuffle(exp)
        return "experts shuffled"
    if c == 3 and len(exp) > 1:
        a, b = rng.sample(range(len(exp)), 2)
        exp[a]["expert"], exp[b]["expert"] = exp[b]["expert"], exp[a]["expert"]
        exp[a]["layer"], exp[b]["layer"] = exp[b]["layer"], exp[a]["layer"]
        return f"experts[{a}] and experts[{b}] swap (layer, expert)"
    if c == 4 and len(exp) > 1:
        a, b = rng.sample(range(len(exp)), 2)
        for k in ("offset", "checksum") if rng.random() < 0.5 else ("offset",):
            exp[a][k], exp[b][k] = exp[b][k], exp[a][k]
        return f"experts[{a}] and experts[{b}] swap offsets"
    if c == 5:
        rec = json.loads(json.dumps(exp[-1]))
        rec["expert"] = int(rec["expert"]) + 1
        exp.append(rec)
        return "experts += a record for an expert past num_experts"
    st.doc["experts"] = []
    return "experts = []"


HEX = "0123456789abcdef"


def m_checksum(rng: random.Random, st: State) -> str:
    r = rng.choice(records(st))
    ck = r["checksum"]
    c = rng.randrange(7)
    if c <= 2:
        i = rng.randrange(len(ck))
        v = ck[:i] + rng.choice(HEX.replace(ck[i], "")) + ck[i + 1 :]
    elif c == 3:
        v = ck.upper()
    elif c == 4:
        v = rng.choice(
            (
                ck[:-1],
                ck + "0",
                "0x" + ck,
                ck[:15] + "g",
                ck[:15] + "\u0660",
                " " + ck[1:],
                ck + "\n",
                "\n" + ck,
                ck[:8].upper() + ck[8:],
                ck[:15] + "\n",
            )
        )
    elif c == 5:
        v = rng.choice(records(st))["checksum"]
    else:
        v = Raw(rng.choice(("0", str(int(ck, 16)), "null")))
    r["checksum"] = v
    return f"experts[{st.doc['experts'].index(r)}].checksum = {short(v)}"


DTYPES = ("fp32", "fp16", "int8", "int4", "int3", "int2", "int5", "int1", "bf16", "FP32", "int4 ", "")


def m_format(rng: random.Random, st: State) -> str:
    r = rng.choice(records(st))
    fmt = r["format"]
    k = rng.choice(("dtype", "group_size", "group_size", "scheme", "delete"))
    tag = f"experts[{st.doc['experts'].index(r)}].format"
    if k == "dtype":
        fmt["dtype"] = v = rng.choice(DTYPES)
    elif k == "group_size":
        fmt["group_size"] = v = rng.choice(
            (
                0,
                -1,
                1,
                2,
                3,
                7,
                15,
                17,
                31,
                33,
                1000,
                2**24,
                2**24 + 1,
                2**31,
                2**63 - 1,
                2**63,
                int_variant(rng, fmt.get("group_size", 0)),
            )
        )
    elif k == "scheme":
        fmt["scheme"] = v = rng.choice(("none", "asym_u", "sym", None, "", 0, "ASYM_U"))
    else:
        kk = rng.choice(list(fmt))
        del fmt[kk]
        return f"delete {tag}.{kk}"
    return f"{tag}.{k} = {short(v)}"


def m_tensor(rng: random.Random, st: State) -> str:
    r = rng.choice(records(st))
    ts = r["tensors"]
    name = rng.choice(list(ts))
    t = ts[name]
    tag = f"experts[{st.doc['experts'].index(r)}].tensors.{name}"
    c = rng.randrange(9)
    if c == 0:
        shp = list(t["shape"])
        j = rng.randrange(len(shp))
        shp[j] = rng.choice((shp[j] + 1, shp[j] - 1, 0, -shp[j], 2**31, 2**63, float(shp[j])))
        t["shape"] = shp
        return f"{tag}.shape = {shp}"
    if c == 1:
        t["shape"] = rng.choice(
            (list(reversed(t["shape"])), t["shape"] + [1], t["shape"][:1], [], [[2]], None)
        )
        return f"{tag}.shape = {short(t['shape'])}"
    if c == 2:
        t["dtype"] = v = rng.choice(("f32", "f16", "u8", "u4", "u3", "u2", "u5", "bf16", "", None))
        return f"{tag}.dtype = {short(v)}"
    if c == 3:
        t["offset"] = v = rng.choice(
            (
                t["offset"] + 64,
                t["offset"] + 1,
                t["offset"] - 64,
                r["size"],
                r["length"],
                2**63 - 64,
                2**64 - 64,
                -64,
                int_variant(rng, t["offset"]),
            )
        )
        return f"{tag}.offset = {short(v)}"
    if c == 4:
        t["nbytes"] = v = rng.choice(
            (t["nbytes"] + 1, t["nbytes"] - 1, 0, 2 * t["nbytes"], 2**63, int_variant(rng, t["nbytes"]))
        )
        return f"{tag}.nbytes = {short(v)}"
    if c == 5:
        del ts[name]
        return f"delete {tag}"
    if c == 6:
        others = [n for n in ts if n != name]
        if others:
            o = ts[rng.choice(others)]
            t["offset"], o["offset"] = o["offset"], t["offset"]
            return f"{tag} swaps its offset with another tensor"
        return "n/a"
    if c == 7:
        lay = st.doc["layers"][r["layer"]]
        rows = 2 * lay["intermediate"] if lay["gated"] else lay["intermediate"]
        b = rng.choice(("b_in", "b_out", "w_gate", "w_in.bias"))
        shape = [rows] if b != "b_out" else [lay["hidden"]]
        nb = 4 * shape[0]
        off = -(-int(r["size"]) // 64) * 64
        ts[b] = {"offset": off, "nbytes": nb, "dtype": "f32", "shape": shape}
        if rng.random() < 0.5:
            r["size"] = off + nb
        return f"add tensor {b} at {off} (size {r['size']})"
    t[rng.choice(("extra", "Offset", "stride"))] = 1
    return f"{tag} gets an unknown field"


STORE_FIELDS = ("size", "alignment", "checksum", "file")


def m_store_field(rng: random.Random, st: State) -> str:
    s = st.doc["store"]
    k = rng.choice(STORE_FIELDS[:3])
    if k == "size":
        v: Any = int_variant(rng, s["size"])
    elif k == "alignment":
        v = rng.choice(
            (0, 1, 64, 512, 4095, 8192, 2**63, -4096, 4096.0, "4096", Raw("4096.0"), Raw("4.096e3"))
        )
    else:
        v = rng.choice(("xxh64", "XXH3_64", "xxh3_128", "", None, "xxh3_64 ", "xxh3-64"))
    s[k] = v
    return f"store.{k} = {short(v)}"


def m_top(rng: random.Random, st: State) -> str:
    c = rng.randrange(9)
    d = st.doc
    if c == 0:
        d["format"] = v = rng.choice(("edgemoe-bundl", "EDGEMOE-BUNDLE", "edgemoe-bundle ", None, 1))
    elif c == 1:
        d["format_version"] = v = rng.choice(
            (
                0,
                2,
                1.0,
                True,
                "1",
                Raw("1.0"),
                Raw("1e0"),
                2**64 + 1,
                2**64 + 1 - 2**64,
                -1,
                Raw("10000000000000000000001"),
            )
        )
    elif c == 2:
        d["model"] = v = rng.choice(
            ({}, {"family": 1, "config": {}}, {"family": "x", "config": []}, None, "m")
        )
    elif c == 3:
        d["graphs"] = v = rng.choice(({}, [], None, {"decoder": 1}))
    elif c == 4:
        d["tokenizer"] = v = rng.choice(("tokenizer", "", 0, [], "model.onnx", "."))
    elif c == 5:
        st.doc = v = rng.choice(([], "", 0, None, [d], Raw('"edgemoe-bundle"')))
    elif c == 6:
        for k in ("created_by", "model", "graphs", "tokenizer"):
            d.pop(k, None)
        return "delete created_by, model, graphs, tokenizer"
    elif c == 7:
        st.doc = Pairs([(k, x) for k, x in reversed(d.items())])
        return "top-level keys in reverse order"
    else:
        d["store"] = v = rng.choice((None, [], {}, "experts.bin", {"file": "experts.bin"}))
    return f"top-level set {short(v)}"


# --- fs-phase mutations -------------------------------------------------------------------------------------
PATH_TRICKS = (
    "experts.bin/.",
    "./experts.bin",
    "experts.bin/",
    "experts.bin//",
    ".//experts.bin",
    "sub/../experts.bin",
    "..",
    ".",
    "",
    "experts.bin\x00",
    "experts.bin\\",
    "C:experts.bin",
    "EXPERTS.BIN",
    "experts.bin ",
    "~/experts.bin",
    "%2e%2e/experts.bin",
    "experts.bin/..",
    "./sub/./experts.bin",
    "sub/experts.bin",
    "manifest.json",
    "model.onnx",
    "/dev/zero",
    "ABS",
    "x" * 5000,
    "a/" * 2100 + "experts.bin",
    "link_out.bin",
    "link_in.bin",
    "link_dir/experts.bin",
    "loop.bin",
    "dangling.bin",
    "fifo.bin",
    "dir.bin",
    "link_up.bin",
    "experts.bin\u00a0",
    "exp\u0435rts.bin",
    "experts.bin\n",
    "sub//experts.bin",
    "experts.bin/./",
)


def make_path_object(st: State, rel: str) -> None:
    """Creates in the case what the trick path ``rel`` points at."""
    d = st.dir
    if rel in ("sub/experts.bin", "./sub/./experts.bin", "sub/../experts.bin"):
        (d / "sub").mkdir(exist_ok=True)
        if rel != "sub/../experts.bin":
            os.link(st.base.path / STORE, d / "sub" / STORE)
    elif rel == "link_out.bin":
        os.symlink(st.shared / STORE, d / rel)  # leaves the bundle (an identical store outside)
    elif rel == "link_in.bin":
        os.symlink(STORE, d / rel)
    elif rel == "link_dir/experts.bin":
        os.symlink(st.shared, d / "link_dir")  # a folder symlink that leaves the bundle
    elif rel == "link_up.bin":
        os.symlink("../" + d.name + "/" + STORE, d / rel)  # relative, via '..', lands back inside
    elif rel == "loop.bin":
        os.symlink("loop.bin", d / rel)
    elif rel == "dangling.bin":
        os.symlink("nothing-here.bin", d / rel)
    elif rel == "fifo.bin":
        os.mkfifo(d / rel)
    elif rel == "dir.bin":
        (d / rel).mkdir()


def m_store_path(rng: random.Random, st: State) -> str:
    rel = rng.choice(PATH_TRICKS)
    if rel == "ABS":
        rel = str(st.dir / STORE)
    make_path_object(st, rel)
    st.doc["store"]["file"] = rel
    return f"store.file = {short(rel)}"


def m_store_replace(rng: random.Random, st: State) -> str:
    """experts.bin itself (store.file unchanged) becomes something else."""
    c = rng.choice(("symlink_out", "symlink_out_abs", "fifo", "dir", "missing", "symlink_in", "hardlink_out"))
    st.store.unlink()
    if c == "symlink_out":
        os.symlink(os.path.relpath(st.shared / STORE, st.dir), st.store)
    elif c == "symlink_out_abs":
        os.symlink(st.shared / STORE, st.store)
    elif c == "fifo":
        os.mkfifo(st.store)
    elif c == "dir":
        st.store.mkdir()
    elif c == "symlink_in":
        os.link(st.base.path / STORE, st.dir / "real.bin")
        os.symlink("real.bin", st.store)
    elif c == "hardlink_out":
        os.link(st.shared / STORE, st.store)
    return f"experts.bin -> {c}"


def m_store_resize(rng: random.Random, st: State) -> str:
    p = st.own_store()
    size = p.stat().st_size
    new = rng.choice(
        (
            0,
            1,
            size - 1,
            size - ALIGN,
            size + 1,
            size + ALIGN,
            size + 2 * ALIGN,
            size // 2,
            1 << 30,
            (1 << 30) + 1,
        )
    )
    with open(p, "r+b") as f:
        f.truncate(new)
    follow = rng.random() < 0.5
    if follow:
        st.doc["store"]["size"] = new
    return f"store resized {size} -> {new}" + (" (store.size follows)" if follow else "")


def m_store_bytes(rng: random.Random, st: State) -> str:
    p = st.own_store()
    recs = records(st)
    r = rng.choice(recs)
    where = rng.choice(("blob", "blob", "padding", "first", "last"))
    off, size, length = int(r["offset"]), int(r["size"]), int(r["length"])
    if where == "blob" or (where == "padding" and size >= length):
        pos = off + rng.randrange(max(size, 1))
    elif where == "padding":
        pos = off + size + rng.randrange(length - size)
    elif where == "first":
        pos = off
    else:
        pos = off + max(size, 1) - 1
    if pos >= p.stat().st_size:
        return "n/a (past the store)"
    with open(p, "r+b") as f:  # in place: the store may be a sparse GiB (store_resize)
        f.seek(pos)
        old = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([old ^ (1 << rng.randrange(8))]))
    return f"store byte {pos} flipped ({where} of layer {r['layer']} expert {r['expert']})"


def m_manifest_kind(rng: random.Random, st: State) -> str:
    c = rng.choice(
        (
            "dir",
            "fifo",
            "missing",
            "symlink_out",
            "symlink_in",
            "empty",
            "sparse_huge",
            "dangling",
            "whitespace",
        )
    )
    mf = st.dir / MANIFEST
    # Whatever an earlier op put there goes first: never write into a FIFO (blocks) or through a symlink (it
    # would change the shared copy outside the bundle).
    if mf.is_dir() and not mf.is_symlink():
        shutil.rmtree(mf)
    elif mf.exists() or mf.is_symlink():
        mf.unlink()
    st.manifest_kind = "none"
    if c == "dir":
        mf.mkdir()
    elif c == "fifo":
        os.mkfifo(mf)
    elif c == "symlink_out":
        os.symlink(st.shared / MANIFEST, mf)  # the same manifest, outside the bundle
    elif c == "symlink_in":
        (st.dir / "real.json").write_bytes((st.base.path / MANIFEST).read_bytes())
        os.symlink("real.json", mf)
    elif c == "empty":
        mf.write_bytes(b"")
    elif c == "sparse_huge":
        with open(mf, "wb") as f:
            f.write(b"{")
            f.truncate((128 << 20) + 1)
    elif c == "dangling":
        os.symlink("nothing.json", mf)
    elif c == "whitespace":
        mf.write_bytes(b" \n\t\r")
    return f"manifest.json -> {c}"


def m_graph_path(rng: random.Random, st: State) -> str:
    rel = rng.choice(
        (
            "model.onnx/.",
            "/abs/model.onnx",
            "../model.onnx",
            "missing.onnx",
            "link_out.onnx",
            "gdir",
            "",
            "model.onnx/",
            "loop.onnx",
        )
    )
    if rel == "link_out.onnx":
        os.symlink(st.shared / GRAPH, st.dir / rel)
    elif rel == "gdir":
        (st.dir / rel).mkdir()
    elif rel == "loop.onnx":
        os.symlink("loop.onnx", st.dir / rel)
    st.doc["graphs"][rng.choice(("decoder", "encoder"))] = rel
    return f"graphs.* = {short(rel)}"


def m_tokenizer(rng: random.Random, st: State) -> str:
    rel = rng.choice(("tokenizer", "tokenizer/", "model.onnx", "/tmp", "..", "tok_out", "tokenizer/."))
    if rel.startswith("tokenizer") and rng.random() < 0.6:
        (st.dir / "tokenizer").mkdir(exist_ok=True)
    elif rel == "tok_out":
        os.symlink(st.shared, st.dir / rel)
    st.doc["tokenizer"] = rel
    return f"tokenizer = {short(rel)}"


# --- text-phase mutations -----------------------------------------------------------------------------------
def _text(fn: Callable[[random.Random, bytearray], str]) -> Callable[[random.Random, State], str]:
    def m(rng: random.Random, st: State) -> str:
        sub = random.Random(rng.getrandbits(32))
        st.text_ops.append(lambda data: "  text: " + fn(sub, data))
        return "(on the text)"

    return m


def _string_positions(data: bytearray) -> list[int]:
    return [i + 1 for i, c in enumerate(data) if c == 0x22]  # just after a '"'


def t_bom(rng: random.Random, data: bytearray) -> str:
    data[0:0] = b"\xef\xbb\xbf"
    return "UTF-8 BOM prepended"


BAD_UTF8 = (
    b"\xff",
    b"\xc3",
    b"\xc3(",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xf4\x90\x80\x80",
    b"\xe2\x82",
    b"\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xef\xbf\xbe",
)


def t_bad_utf8(rng: random.Random, data: bytearray) -> str:
    pos = rng.choice(_string_positions(data))
    b = rng.choice(BAD_UTF8)
    data[pos:pos] = b
    return f"bytes {b!r} inserted at {pos} (in a string)"


def t_flip(rng: random.Random, data: bytearray) -> str:
    out = []
    for _ in range(rng.choice((1, 1, 2, 8))):
        pos = rng.randrange(len(data))
        old = data[pos]
        data[pos] ^= 1 << rng.randrange(8)
        out.append(f"{pos}: {bytes([old])!r}->{bytes([data[pos]])!r}")
    return "byte flips " + ", ".join(out)


def t_insert(rng: random.Random, data: bytearray) -> str:
    pos = rng.randrange(len(data) + 1)
    b = rng.choice((b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"0", b"-", b"\x00", b"\n", b" ", b"e"))
    data[pos:pos] = b
    return f"{b!r} inserted at {pos}"


def t_delete(rng: random.Random, data: bytearray) -> str:
    pos = rng.randrange(len(data))
    n = rng.choice((1, 1, 2, 10))
    del data[pos : pos + n]
    return f"{n} bytes deleted at {pos}"


def t_truncate(rng: random.Random, data: bytearray) -> str:
    pos = rng.randrange(len(data))
    del data[pos:]
    return f"truncated to {pos} bytes"


def t_trailing(rng: random.Random, data: bytearray) -> str:
    b = rng.choice(
        (
            b"x",
            b"\x00",
            b"\x00garbage",
            b"\x00{]",
            b"{}",
            b" \n",
            b"\n\x00",
            b"//c",
            b"/*c*/",
            b"\x1a",
            b"\xef\xbb\xbf",
            b"\x00\xff",
        )
    )
    data.extend(b)
    return f"{b!r} appended"


def t_whitespace(rng: random.Random, data: bytearray) -> str:
    cands = [
        i for i, c in enumerate(data) if c in (0x2C, 0x3A)
    ]  # after a ',' or ':' (outside strings, mostly)
    pos = rng.choice(cands) + 1
    b = rng.choice((b"\x0b", b"\x0c", b"\xc2\xa0", b"\xe2\x80\xa8", b"\x00", b"\t", b"\r", b"\xef\xbb\xbf"))
    data[pos:pos] = b
    return f"whitespace {b!r} inserted at {pos}"


def t_comment(rng: random.Random, data: bytearray) -> str:
    cands = [i for i, c in enumerate(data) if c == 0x2C]
    pos = rng.choice(cands) + 1
    b = rng.choice((b"/* c */", b"// c\n", b"# c\n"))
    data[pos:pos] = b
    return f"comment {b!r} at {pos}"


def t_trailing_comma(rng: random.Random, data: bytearray) -> str:
    cands = [i for i, c in enumerate(data) if c in (0x5D, 0x7D)]
    pos = rng.choice(cands)
    data[pos:pos] = b","
    return f"',' inserted before the bracket at {pos}"


def t_literal(rng: random.Random, data: bytearray) -> str:
    for a, b in ((b"true", b"True"), (b"false", b"FALSE"), (b"null", b"None"), (b"true", b"tru\\u0065")):
        if a in data and rng.random() < 0.5:
            i = data.find(a)
            data[i : i + len(a)] = b
            return f"{a!r} -> {b!r} at {i}"
    i = data.find(b'"')
    data[i : i + 1] = b"'"
    return f"a double quote -> single quote at {i}"


# name -> (function, weight, phase)
MUTATIONS: dict[str, tuple[Callable[[random.Random, State], str], float, str]] = {
    "delete": (m_delete, 3, "json"),
    "retype": (m_retype, 3, "json"),
    "int": (m_int, 5, "json"),
    "dup_key": (m_dup_key, 3, "json"),
    "string": (m_string, 3, "json"),
    "key": (m_key, 1.5, "json"),
    "deep": (m_deep, 1, "json"),
    "extra": (m_extra, 3, "json"),
    "config": (m_config, 2, "json"),
    "layer": (m_layer, 3, "json"),
    "layers": (m_layers, 1.5, "json"),
    "record": (m_record, 5, "json"),
    "records": (m_records, 2.5, "json"),
    "checksum": (m_checksum, 2, "json"),
    "format": (m_format, 3, "json"),
    "tensor": (m_tensor, 4, "json"),
    "store_field": (m_store_field, 2, "json"),
    "top": (m_top, 1.5, "json"),
    "store_path": (m_store_path, 3, "fs"),
    "store_replace": (m_store_replace, 1.5, "fs"),
    "store_resize": (m_store_resize, 2, "fs"),
    "store_bytes": (m_store_bytes, 2, "fs"),
    "manifest_kind": (m_manifest_kind, 1, "fs"),
    "graph_path": (m_graph_path, 1, "fs"),
    "tokenizer": (m_tokenizer, 1, "fs"),
    "bom": (_text(t_bom), 0.7, "text"),
    "bad_utf8": (_text(t_bad_utf8), 1, "text"),
    "flip": (_text(t_flip), 3, "text"),
    "insert": (_text(t_insert), 1, "text"),
    "delete_bytes": (_text(t_delete), 1, "text"),
    "truncate": (_text(t_truncate), 0.7, "text"),
    "trailing": (_text(t_trailing), 1.5, "text"),
    "whitespace": (_text(t_whitespace), 1, "text"),
    "comment": (_text(t_comment), 0.5, "text"),
    "trailing_comma": (_text(t_trailing_comma), 0.5, "text"),
    "literal": (_text(t_literal), 0.5, "text"),
}
