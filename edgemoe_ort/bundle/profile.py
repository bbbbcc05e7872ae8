"""``profile.json``: the routing profile of a bundle (docs/bundle-format.md, "profile.json").

The one Python definition of the format: its constants, the bundle identity it is tied to, the writer and
the validating reader. ``edgemoe-profile`` (edgemoe_ort/profile) makes the file; the prefetch predictors of
the op library read it. A bundle without one keeps working.

A profile belongs to exactly one bundle: ``bundle.manifest_xxh3`` is the xxh3_64 of the ``manifest.json``
bytes it was made with, so re-exporting (or editing the manifest) makes an old profile stale, and
:func:`read_profile` says so.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xxhash

from .errors import BundleError, BundleExistsError
from .format import MANIFEST

if TYPE_CHECKING:
    from .probe import Probe

__all__ = [
    "PROFILE",
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "PREDICTORS",
    "COMBINATIONS",
    "RECALL_AT",
    "combination_name",
    "combination_members",
    "manifest_identity",
    "check_writable",
    "write_profile",
    "read_profile",
    "validate_profile",
    "encode_f32",
    "decode_f32",
    "profile_probes",
]

PROFILE = "profile.json"
PROFILE_FORMAT = "edgemoe-profile"
PROFILE_VERSION = 1
#: predictor names, in the preference order ``auto`` breaks ties with (the op library's ``predictor_names()``
#: is the same list: ``residual`` is the ``ResidualPrefetch`` node's)
PREDICTORS: tuple[str, ...] = ("table", "gates", "token", "residual")
RECALL_AT = "top_k of the layer"

_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_TOP_KEYS = ("format", "version", "bundle", "corpus", "top_m", "min_count", "layers", "heldout", "auto")
_LAYER_KEYS = (
    "layer",
    "num_experts",
    "top_k",
    "tokens_seen",
    "frequency",
    "coactivation",
    "gate_weights",
    "transitions",
    "tokens",
)


_PROBE_KEYS = ("ridge", "train_tokens", "sites")
_PROBE_SITE_KEYS = (
    "kind", "node", "layer", "hidden", "num_experts", "weight", "bias", "recall_router", "recall_probe",
)  # fmt: skip


def encode_f32(a: Any) -> str:
    """A float32 array as the profile stores it: base64 of its little-endian bytes, row-major."""
    return base64.b64encode(np.ascontiguousarray(a, "<f4").tobytes()).decode("ascii")


def decode_f32(text: str, shape: Sequence[int]) -> np.ndarray:
    """:func:`encode_f32` undone; ValueError (saying what it found) unless ``text`` holds ``shape``."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not base64 text") from None
    want = 4 * math.prod(shape)
    if len(raw) != want:
        raise ValueError(f"{len(raw)} bytes, not {want} (float32 {list(shape)})")
    return np.frombuffer(raw, "<f4").reshape(tuple(shape)).astype(np.float32)


def profile_probes(doc: dict[str, Any]) -> list[Probe]:
    """The fitted probes of a validated profile document, in its order (none without ``probes``)."""
    from .probe import Probe

    out = []
    for e in doc.get("probes", {}).get("sites", []):
        H, E = int(e["hidden"]), int(e["num_experts"])
        w, b = decode_f32(e["weight"], (H, E)), decode_f32(e["bias"], (E,))
        out.append(Probe(str(e["kind"]), int(e["node"]), int(e["layer"]), w, b))
    return out


def combination_name(members: Sequence[str]) -> str:
    """``["table", "gates"]`` -> ``"gates+table"``: the distinct names joined by ``+`` in alphabetical
    order (the contract's spelling: ``"gates+table"``, ``"gates+table+token"``)."""
    names = sorted(set(members))
    for n in names:
        if n not in PREDICTORS:
            raise ValueError(f"predictor: expected one of {', '.join(PREDICTORS)}, found {n!r}")
    if not names:
        raise ValueError("predictor combination: expected at least one name, found none")
    return "+".join(names)


def combination_members(name: str) -> list[str]:
    """``"gates+table"`` -> ``["gates", "table"]``; raises ValueError for a name that is not a combination."""
    parts = name.split("+")
    if combination_name(parts) != name or len(set(parts)) != len(parts):
        raise ValueError(
            f"predictor combination: expected names of {', '.join(PREDICTORS)} joined by '+' in "
            f"alphabetical order, found {name!r}"
        )
    return parts


#: every predictor and combination: singles first, then pairs, then triples, then all four
COMBINATIONS: tuple[str, ...] = tuple(
    combination_name(c) for n in range(1, len(PREDICTORS) + 1) for c in combinations(PREDICTORS, n)
)


def manifest_identity(bundle_dir: str | Path) -> str:
    """``bundle.manifest_xxh3``: xxh3_64 of the bundle's ``manifest.json`` bytes, 16 lowercase hex digits."""
    path = Path(bundle_dir) / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(path, "does not exist", expected="a bundle manifest", found="nothing") from None
    return _identity(data)


def _identity(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def check_writable(bundle_dir: str | Path, force: bool) -> Path:
    """The profile path of ``bundle_dir``; :class:`BundleExistsError` if it exists and not ``force``."""
    path = Path(bundle_dir) / PROFILE
    if path.exists() and not force:
        raise BundleExistsError(path, "exists; pass --force (edgemoe-profile) or force=True to replace it")
    return path


def write_profile(bundle_dir: str | Path, doc: dict[str, Any], force: bool = False) -> Path:
    """Validate ``doc`` against the bundle and write it as ``bundle_dir/profile.json`` (tmp + rename, so a
    reader never sees half a file). Refuses to replace an existing profile unless ``force``. A document with
    ``probes`` sites first installs those probes into the decoder graph
    (:func:`edgemoe_ort.bundle.probe.install_probes`)."""
    bundle_dir = Path(bundle_dir)
    path = check_writable(bundle_dir, force)
    manifest = (bundle_dir / MANIFEST).read_bytes()
    validate_profile(doc, path, manifest=manifest)
    probes = profile_probes(doc)
    if probes:  # the graph first: a profile is never written without the probes its recall measured
        from .probe import install_probes
        from .reader import Bundle

        try:
            install_probes(Bundle.open(bundle_dir).graph_path("decoder"), probes)
        except ValueError as e:
            raise BundleError(path, f"probes: {e}") from None
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False) + "\n"
    tmp = path.with_name(f".{PROFILE}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_profile(
    path: str | Path, *, manifest: str | Path | bytes | Literal[False] | None = None
) -> dict[str, Any]:
    """Read and validate a profile. ``path`` is a bundle folder or a ``profile.json`` file.

    ``manifest``: the bundle's ``manifest.json`` (path or bytes) whose identity the profile must carry;
    ``None`` = the ``manifest.json`` beside the profile; ``False`` = do not check the identity (nor the
    layers against the manifest). Every problem raises :class:`BundleError` naming the file, the field (as
    ``layers[2].tokens.next[5]``) and expected vs found.
    """
    p = Path(path)
    if p.is_dir():
        p = p / PROFILE
    if not p.is_file():
        raise BundleError(
            p, "does not exist", expected="a profile (made by edgemoe-profile)", found="nothing"
        )
    mbytes: bytes | None
    if manifest is None:
        mpath = p.parent / MANIFEST
        if not mpath.is_file():
            raise BundleError(
                mpath, "does not exist", expected="the manifest of the profile's bundle", found="nothing"
            )
        mbytes = mpath.read_bytes()
    elif manifest is False:
        mbytes = None
    elif isinstance(manifest, bytes):
        mbytes = manifest
    else:
        mbytes = Path(manifest).read_bytes()
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(p, expected="UTF-8 JSON", found=f"undecodable bytes ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise BundleError(p, expected="JSON", found=f"invalid JSON ({exc})") from None
    validate_profile(doc, p, manifest=mbytes)
    return doc


# --------------------------------------------------------------------------------------------- validation
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


class _Check:
    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, field: str, expected: Any, found: Any, message: str = "") -> BundleError:
        return BundleError(self.file, message, field=field, expected=expected, found=found)

    def obj(self, v: Any, field: str, keys: Sequence[str]) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(field or "(top level)", "a JSON object", _short(v))
        for k in keys:
            if k not in v:
                raise self.fail(f"{field}.{k}" if field else k, "present", "nothing", "missing")
        return v

    def as_list(self, v: Any, field: str, length: int | None = None) -> list[Any]:
        if not isinstance(v, list):
            raise self.fail(field, "a JSON list", _short(v))
        if length is not None and len(v) != length:
            raise self.fail(field, f"{length} entries", len(v))
        return v

    def as_int(self, v: Any, field: str, lo: int | None = 0, hi: int | None = None) -> int:
        if not _is_int(v):
            raise self.fail(field, "an integer", _short(v))
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
            raise self.fail(field, rng, v)
        return int(v)

    def as_num(self, v: Any, field: str, lo: float = 0.0, hi: float = 1.0, lo_open: bool = False) -> float:
        if not _is_num(v) or v > hi or v < lo or (lo_open and v == lo):
            raise self.fail(field, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]", _short(v))
        return float(v)

    def as_str(self, v: Any, field: str) -> str:
        if not isinstance(v, str):
            raise self.fail(field, "a string", _short(v))
        return v

    def expert_set(self, v: Any, field: str, num_experts: int, top_k: int) -> tuple[int, ...]:
        items = self.as_list(v, field)
        if not 1 <= len(items) <= top_k:
            raise self.fail(field, f"1 to {top_k} experts", len(items))
        out = tuple(self.as_int(e, f"{field}[{i}]", 0, num_experts - 1) for i, e in enumerate(items))
        if list(out) != sorted(set(out)):
            raise self.fail(field, "distinct experts in ascending order", list(out))
        return out

    def next_list(self, v: Any, field: str, num_experts: int, top_m: int) -> None:
        items = self.as_list(v, field)
        if len(items) > top_m:
            raise self.fail(field, f"at most top_m = {top_m} entries", len(items))
        seen: set[int] = set()
        prev = math.inf
        for i, item in enumerate(items):
            f = f"{field}[{i}]"
            pair = self.as_list(item, f, 2)
            e = self.as_int(pair[0], f"{f}[0]", 0, num_experts - 1)
            p = self.as_num(pair[1], f"{f}[1]", 0.0, 1.0, lo_open=True)
            if e in seen:
                raise self.fail(f"{f}[0]", "each expert once", f"expert {e} again")
            if p > prev:
                raise self.fail(f"{f}[1]", f"entries sorted by p descending (<= {prev})", p)
            seen.add(e)
            prev = p


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def validate_profile(doc: Any, file: str | Path = PROFILE, *, manifest: bytes | None = None) -> None:
    """Check every field of a profile document (see :func:`read_profile`); ``manifest`` = the bundle's
    ``manifest.json`` bytes (identity and layers are checked against it), ``None`` to skip that."""
    c = _Check(Path(file))
    top = c.obj(doc, "", _TOP_KEYS)
    if top["format"] != PROFILE_FORMAT:
        raise c.fail("format", repr(PROFILE_FORMAT), _short(top["format"]))
    if not _is_int(top["version"]) or top["version"] != PROFILE_VERSION:
        raise c.fail("version", PROFILE_VERSION, _short(top["version"]), "unsupported profile version")
    bundle = c.obj(top["bundle"], "bundle", ("manifest_xxh3",))
    ident = c.as_str(bundle["manifest_xxh3"], "bundle.manifest_xxh3")
    if not _HEX16.match(ident):
        raise c.fail("bundle.manifest_xxh3", "16 lowercase hex digits", repr(ident))
    mlayers: list[Any] | None = None
    if manifest is not None:
        want = _identity(manifest)
        if ident != want:
            raise BundleError(
                c.file,
                f"{PROFILE} was made for another bundle (manifest_xxh3 expected {want}, found "
                f"{ident}); re-run edgemoe-profile",
            )
        try:
            mlayers = json.loads(manifest).get("layers")
        except (ValueError, AttributeError):
            mlayers = None

    corpus = c.obj(top["corpus"], "corpus", ("paths", "train_tokens", "heldout_tokens", "heldout_share"))
    for i, s in enumerate(c.as_list(corpus["paths"], "corpus.paths")):
        c.as_str(s, f"corpus.paths[{i}]")
    c.as_int(corpus["train_tokens"], "corpus.train_tokens", 1)
    heldout_tokens = c.as_int(corpus["heldout_tokens"], "corpus.heldout_tokens", 0)
    c.as_num(corpus["heldout_share"], "corpus.heldout_share", 0.0, 1.0)
    top_m = c.as_int(top["top_m"], "top_m", 1)
    c.as_int(top["min_count"], "min_count", 1)

    layers = c.as_list(top["layers"], "layers", len(mlayers) if isinstance(mlayers, list) else None)
    if not layers:
        raise c.fail("layers", "at least one layer", "[]")
    shapes: list[tuple[int, int]] = []
    for li, lay in enumerate(layers):
        f = f"layers[{li}]"
        c.obj(lay, f, _LAYER_KEYS)
        if not _is_int(lay["layer"]) or lay["layer"] != li:
            raise c.fail(f"{f}.layer", li, _short(lay["layer"]))
        E = c.as_int(lay["num_experts"], f"{f}.num_experts", 1)
        K = c.as_int(lay["top_k"], f"{f}.top_k", 1, E)
        if isinstance(mlayers, list) and isinstance(mlayers[li], dict):
            for key, v in (("num_experts", E), ("top_k", K)):
                if mlayers[li].get(key) != v:
                    raise c.fail(f"{f}.{key}", f"{mlayers[li].get(key)} (manifest layers[{li}].{key})", v)
        shapes.append((E, K))
        seen = c.as_int(lay["tokens_seen"], f"{f}.tokens_seen", 0)
        freq = c.as_list(lay["frequency"], f"{f}.frequency", E)
        total = sum(c.as_int(v, f"{f}.frequency[{e}]") for e, v in enumerate(freq))
        if total > K * seen:
            raise c.fail(f"{f}.frequency", f"a sum <= top_k * tokens_seen = {K * seen}", total)
        co = c.as_list(lay["coactivation"], f"{f}.coactivation", E)
        rows = [c.as_list(r, f"{f}.coactivation[{i}]", E) for i, r in enumerate(co)]
        for i, r in enumerate(rows):
            for j, v in enumerate(r):
                c.as_int(v, f"{f}.coactivation[{i}][{j}]")
                if i == j and v != 0:
                    raise c.fail(f"{f}.coactivation[{i}][{j}]", 0, v, "diagonal")
                if v != rows[j][i]:
                    raise c.fail(f"{f}.coactivation[{i}][{j}]", f"{rows[j][i]} (symmetric)", v)
        _check_gate_weights(c, lay["gate_weights"], f"{f}.gate_weights", K)
        tr = c.obj(lay["transitions"], f"{f}.transitions", ("order2", "order1"))
        for order in (2, 1):
            name = f"order{order}"
            entries = c.as_list(tr[name], f"{f}.transitions.{name}")
            if li < order and entries:
                raise c.fail(
                    f"{f}.transitions.{name}",
                    f"[] (layer {li}: fewer than {order} earlier layers)",
                    f"{len(entries)} entries",
                )
            keys: set[tuple[tuple[int, ...], ...]] = set()
            for i, ent in enumerate(entries):
                g = f"{f}.transitions.{name}[{i}]"
                c.obj(ent, g, ("prev", "next"))
                prev = c.as_list(ent["prev"], f"{g}.prev", order)
                key = tuple(
                    c.expert_set(s, f"{g}.prev[{j}]", *shapes[li - order + j]) for j, s in enumerate(prev)
                )
                if key in keys:
                    raise c.fail(f"{g}.prev", "each key once", f"{[list(k) for k in key]} again")
                keys.add(key)
                c.next_list(ent["next"], f"{g}.next", E, top_m)
        tok = c.obj(lay["tokens"], f"{f}.tokens", ("ids", "next"))
        ids = c.as_list(tok["ids"], f"{f}.tokens.ids")
        last = -1
        for i, t in enumerate(ids):
            v = c.as_int(t, f"{f}.tokens.ids[{i}]")
            if v <= last:
                raise c.fail(f"{f}.tokens.ids[{i}]", f"ascending distinct ids (> {last})", v)
            last = v
        nxt = c.as_list(tok["next"], f"{f}.tokens.next", len(ids))
        for i, ent in enumerate(nxt):
            c.next_list(ent, f"{f}.tokens.next[{i}]", E, top_m)

    L = len(layers)
    held = c.obj(top["heldout"], "heldout", ("recall_at", "recall", "hit_rates"))
    if held["recall_at"] != RECALL_AT:
        raise c.fail("heldout.recall_at", repr(RECALL_AT), _short(held["recall_at"]))
    recall = c.obj(held["recall"], "heldout.recall", ())
    for name, vals in recall.items():
        g = f"heldout.recall.{name}"
        if name not in COMBINATIONS:
            raise c.fail(g, f"a predictor or combination ({', '.join(COMBINATIONS)})", repr(name))
        for li, v in enumerate(c.as_list(vals, g, L)):
            if v is not None:
                c.as_num(v, f"{g}[{li}]")
            elif heldout_tokens and name == "token":
                raise c.fail(f"{g}[{li}]", "a number (token applies to every layer)", "null")
    for i, row in enumerate(c.as_list(held["hit_rates"], "heldout.hit_rates")):
        g = f"heldout.hit_rates[{i}]"
        c.obj(row, g, ("budget", "policy", "hit_rate"))
        c.as_str(row["budget"], f"{g}.budget")
        c.as_str(row["policy"], f"{g}.policy")
        c.as_num(row["hit_rate"], f"{g}.hit_rate")
    auto = c.as_list(top["auto"], "auto", L)
    for li, members in enumerate(auto):
        g = f"auto[{li}]"
        names = [c.as_str(m, f"{g}[{j}]") for j, m in enumerate(c.as_list(members, g))]
        if not names:
            raise c.fail(g, "at least one predictor", "[]")
        try:
            combination_members("+".join(names))
        except ValueError:
            raise c.fail(
                g, f"distinct names of {', '.join(PREDICTORS)} in alphabetical order", _short(names)
            ) from None
        if li == 0 and names != ["token"]:
            raise c.fail(g, '["token"] (only token applies at layer 0)', _short(names))
    if "probes" in top:
        _check_probes(c, top["probes"], shapes)


def _check_probes(c: _Check, v: Any, shapes: Sequence[tuple[int, int]]) -> None:
    from .probe import PROBE_KINDS

    rp = c.obj(v, "probes", _PROBE_KEYS)
    c.as_num(rp["ridge"], "probes.ridge", 0.0, math.inf)
    c.as_int(rp["train_tokens"], "probes.train_tokens", 0)
    if "note" in rp:
        c.as_str(rp["note"], "probes.note")
    seen: set[tuple[str, int, int]] = set()
    L = len(shapes)
    for i, e in enumerate(c.as_list(rp["sites"], "probes.sites")):
        f = f"probes.sites[{i}]"
        c.obj(e, f, _PROBE_SITE_KEYS)
        kind = c.as_str(e["kind"], f"{f}.kind")
        if kind not in PROBE_KINDS:
            raise c.fail(f"{f}.kind", " or ".join(PROBE_KINDS), repr(kind))
        t = c.as_int(e["layer"], f"{f}.layer", 1, L - 1)
        if kind == "residual":
            c.as_int(e["node"], f"{f}.node", t, t)  # the ResidualPrefetch node of the layer it predicts
        else:
            c.as_int(e["node"], f"{f}.node", 0, t - 1)  # an earlier OffloadedExpert node
        key = (kind, int(e["node"]), t)
        if key in seen:
            raise c.fail(f, "each site once", f"{kind} node {key[1]} -> layer {t} again")
        seen.add(key)
        H = c.as_int(e["hidden"], f"{f}.hidden", 1)
        E = c.as_int(e["num_experts"], f"{f}.num_experts", shapes[t][0], shapes[t][0])
        for name, shape in (("weight", (H, E)), ("bias", (E,))):
            try:
                a = decode_f32(c.as_str(e[name], f"{f}.{name}"), shape)
            except ValueError as err:
                raise c.fail(f"{f}.{name}", f"base64 of float32 {list(shape)}", str(err)) from None
            if not np.isfinite(a).all():
                raise c.fail(f"{f}.{name}", "finite numbers", "NaN or inf")
        for name in ("recall_router", "recall_probe"):
            if e[name] is not None:
                c.as_num(e[name], f"{f}.{name}")


def _check_gate_weights(c: _Check, v: Any, f: str, top_k: int) -> None:
    gw = c.obj(v, f, ("edges", "counts"))
    edges = [c.as_num(x, f"{f}.edges[{i}]") for i, x in enumerate(c.as_list(gw["edges"], f"{f}.edges"))]
    if len(edges) < 2:
        raise c.fail(f"{f}.edges", "at least 2 edges", len(edges))
    for i in range(1, len(edges)):
        if edges[i] <= edges[i - 1]:
            raise c.fail(f"{f}.edges[{i}]", f"increasing edges (> {edges[i - 1]})", edges[i])
    counts = c.as_list(gw["counts"], f"{f}.counts", top_k)
    for r, row in enumerate(counts):
        for b, x in enumerate(c.as_list(row, f"{f}.counts[{r}]", len(edges) - 1)):
            c.as_int(x, f"{f}.counts[{r}][{b}]")
