"""Write a bundle: experts streamed into the store blob by blob, then the manifest, then an atomic rename."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import uuid
from glob import escape as glob_escape
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
import onnx
import psutil
import xxhash

from edgemoe_ort.quant import DTYPES, quantize

from .errors import BundleError, BundleExistsError
from .format import (
    ACTIVATIONS,
    ALIGNMENT,
    CHECKSUM,
    FORMAT,
    MANIFEST,
    PRIMARY,
    STORE_FILE,
    TENSOR_ALIGNMENT,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    TWIN,
    VARIANTS,
    align_up,
    check_relpath,
    layer_shapes,
    manifest_version,
    matrix_tensors,
    record_format,
    twin_error,
    version_string,
)
from .profile import PROFILE, PROFILE_FORMAT, manifest_identity
from .reader import Bundle

_GRAPH_EXTERNAL_THRESHOLD = 1 << 30  # protos above 1 GiB are saved with external data
_TMP_RE = re.compile(r"tmp-(\d+)-[0-9a-f]{12}")
#: the leftover of an interrupted edgemoe-profile (its write_profile temp file): part of the bundle
_PROFILE_TMP_RE = re.compile(rf"\.{re.escape(PROFILE)}\.\d+\.tmp")
#: the file in a writer's temporary folder that says who writes it: host, pid, process start, graphs so far
#: (:func:`sweep_leftovers` removes a leftover only on its word; it never reaches the bundle)
WRITER_MARKER = ".edgemoe-writer.json"
_MARKER_FORMAT = "edgemoe-writer"

log = logging.getLogger(__name__)


def _names(paths: list[str], limit: int = 6) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _ancestors(rels: set[str]) -> set[str]:
    return {p.as_posix() for rel in rels for p in PurePosixPath(rel).parents if p.as_posix() != "."}


def _unlisted(root: Path, files: set[str], dirs: set[str], extra: re.Pattern[str] | None = None) -> list[str]:
    """What under ``root`` is neither one of ``files`` nor in one of ``dirs`` (relative POSIX paths; a folder
    not in ``dirs`` is listed once, with a trailing ``/``, and not entered; symlinks are always listed)."""
    found: list[str] = []

    def visit(folder: Path) -> None:
        for p in sorted(folder.iterdir()):
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                found.append(rel)
            elif p.is_dir():
                if rel in dirs:
                    visit(p)
                else:
                    found.append(rel + "/")
            elif rel not in files and not (extra is not None and extra.fullmatch(rel)):
                found.append(rel)

    visit(root)
    return found


def _bundle_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def _tokenizer_files(tok_dir: str) -> set[str]:
    """What :meth:`BundleWriter.add_tokenizer` may write: the tokenizer files, directly in ``tok_dir``."""
    return {f"{tok_dir}/{name}" for name in TOKENIZER_FILES}


def _graph_files(graphs: list[str]) -> set[str]:
    """A graph file and its external data (``<file>.data`` beside it, :meth:`BundleWriter.add_graph`)."""
    return {f for rel in graphs for f in (rel, f"{rel}.data")}


def own_profile(folder: str | Path) -> bool:
    """Whether ``folder/profile.json`` is the routing profile of the bundle in ``folder`` (made by
    edgemoe-profile for this very ``manifest.json``, docs/bundle-format.md): only then is it part of the
    bundle that ``force`` may replace."""
    root = Path(folder)
    try:
        doc = json.loads((root / PROFILE).read_text(encoding="utf-8"))
        identity = manifest_identity(root)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    stamp = doc.get("bundle") if isinstance(doc, dict) else None
    return (doc.get("format") == PROFILE_FORMAT and isinstance(stamp, dict)
            and stamp.get("manifest_xxh3") == identity)


def foreign_entries(folder: str | Path) -> tuple[bool, list[str]]:
    """Whether ``folder`` is an edgemoe bundle (its ``manifest.json`` is an edgemoe manifest), and what in it
    is not part of one (relative paths, folders with a trailing ``/``): everything if it is not a bundle;
    ``[]`` for an empty folder or a bundle that holds nothing else. Part of a bundle are the files its
    manifest names (store, graphs and their ``.data``), the tokenizer files directly in its tokenizer folder,
    and its own ``profile.json`` (:func:`own_profile`); any other file or folder, empty or not, is listed.
    Only what this list leaves out may be deleted by ``force``."""
    root = Path(folder)
    entries = sorted(root.iterdir())
    if not entries:
        return True, []
    manifest = _bundle_manifest(root)
    if manifest is None:
        return False, [e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in entries]
    files: set[str] = {MANIFEST}
    store = manifest.get("store")
    if isinstance(store, dict) and isinstance(store.get("file"), str):
        files.add(store["file"])
    graphs = manifest.get("graphs")
    if isinstance(graphs, dict):
        files |= _graph_files([g for g in graphs.values() if isinstance(g, str)])
    tok = manifest.get("tokenizer")
    dirs: set[str] = set()
    if isinstance(tok, str) and tok:
        dirs.add(tok)
        files |= _tokenizer_files(tok)
    if own_profile(root):
        files.add(PROFILE)
    return True, _unlisted(root, files, dirs | _ancestors(files), _PROFILE_TMP_RE)


def dump_manifest(manifest: dict[str, Any]) -> str:
    """Readable JSON: indented, with each layer and each expert record on one line."""
    head = {k: v for k, v in manifest.items() if k not in ("layers", "experts")}
    text = json.dumps(head, indent=2)[:-2]  # drop the closing "\n}"
    for key in ("layers", "experts"):
        if key in manifest:
            items = ",\n".join("    " + json.dumps(x, separators=(", ", ": ")) for x in manifest[key])
            text += f',\n  "{key}": [\n{items}\n  ]' if items else f',\n  "{key}": []'
    return text + "\n}\n"


def check_target(path: str | Path, *, force: bool = False) -> None:
    """Raise :class:`BundleExistsError` unless a bundle may be written at ``path``: nothing there, or with
    ``force`` an empty folder or an edgemoe bundle that holds nothing else (:func:`foreign_entries`). The
    message names what is in the way and, without ``force``, whether ``force`` would help. Raise
    :class:`BundleError` if the parent folder cannot be made there (a file in the way, not writable)."""
    p = Path(path).absolute()
    ancestor = p.parent
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BundleError(p, f"cannot create the bundle's parent folder: {ancestor} is not a folder",
                          expected="a folder", found="a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BundleError(p, f"cannot write in {ancestor}", expected="a writable folder",
                          found="no permission")
    if not (p.exists() or p.is_symlink()):
        return
    hint = "" if force else " (force=True would not replace it)"  # said up front: do not try it
    if p.is_symlink() or not p.is_dir():
        what = "a symlink" if p.is_symlink() else "a file"
        raise BundleExistsError(p, f"refusing to replace {what}, not a bundle folder{hint}; choose another "
                                "output folder")
    is_bundle, in_the_way = foreign_entries(p)
    if in_the_way:
        what = "a bundle that holds other files" if is_bundle else "a folder that is not an edgemoe bundle"
        raise BundleExistsError(
            p,
            f"refusing to replace {what}{hint}; in the way: {_names(in_the_way)} (move them away or choose "
            "another output folder)",
        )
    if not force:
        what = "an edgemoe bundle" if any(p.iterdir()) else "an empty folder"
        raise BundleExistsError(p, "target exists; pass force=True to replace it",
                                expected="no file or folder", found=what)


def _host() -> dict[str, Any]:
    """This machine and PID namespace: a pid means a process only where both match."""
    try:
        pid_ns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "pid_ns": pid_ns}


def _started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch); None if there is no such (live) process."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.NoSuchProcess:
        return None


def _leftover_verdict(d: Path) -> tuple[bool, str]:
    """``(removable, why)`` for a temporary folder ``d`` of an earlier writer: removable only if its marker
    says it was made on this machine by a process that is gone, and it holds nothing a writer does not
    write."""
    try:
        marker = json.loads((d / WRITER_MARKER).read_text(encoding="utf-8"))
        ok = isinstance(marker, dict) and marker.get("format") == _MARKER_FORMAT
        pid, started, graphs = int(marker["pid"]), float(marker["started"]), list(marker["graphs"])
        ok = ok and all(isinstance(g, str) for g in graphs)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        return False, f"without a readable {WRITER_MARKER} (not made by this version of the writer)"
    here = _host()
    if {k: marker.get(k) for k in here} != here:
        return False, (f"made on {marker.get('host')!r} (pid namespace {marker.get('pid_ns')}), not here: "
                       "it may still be in use there")
    now = _started(pid)
    if now is not None and abs(now - started) < 1.0:  # its process (another start time: the pid was reused)
        return False, f"being written by process {pid} (another export to the same folder?)"
    files = {WRITER_MARKER, STORE_FILE, MANIFEST} | _graph_files(graphs) | _tokenizer_files(TOKENIZER_DIR)
    extra = _unlisted(d, files, {TOKENIZER_DIR} | _ancestors(files))
    if extra:
        return False, f"it holds what a writer does not write: {_names(extra)}"
    return True, ""


def sweep_leftovers(path: str | Path) -> list[Path]:
    """Temporary folders of earlier writers to the same target (``.NAME.tmp-*``): removed only if their
    marker says they were made on this machine by a process that is gone, and they hold nothing but what a
    writer writes; reported and left alone otherwise. A bundle set aside by an interrupted replace
    (``.NAME.old-*``) is reported, never removed (it may be the only copy). Each is logged as a warning;
    returns the removed folders. (:class:`BundleWriter` sweeps when it opens.)"""
    target = Path(path).absolute()
    parent, name = target.parent, target.name
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for d in sorted(parent.glob(f".{glob_escape(name)}.tmp-*")):
        if not d.is_dir() or d.is_symlink():
            continue
        if _TMP_RE.fullmatch(d.name[len(name) + 2 :]) is None:
            removable, why = False, "not named like a writer's temporary folder"
        else:
            removable, why = _leftover_verdict(d)
        if removable:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
                log.warning("%s: removed, the temporary folder of an export that was interrupted", d)
                continue
            why = "could not be removed"
        log.warning("%s: the temporary folder of an export, left alone: %s; remove it if no export is "
                    "writing it", d, why)
    for d in sorted(parent.glob(f".{glob_escape(name)}.old-*")):
        log.warning("%s: a bundle set aside by an interrupted --force export; move it back to %s or "
                    "remove it", d, target)
    return removed


class BundleWriter:
    """Write a bundle folder at ``path``.

    Everything goes into a temporary sibling folder that is renamed to ``path`` by :meth:`close`. An existing
    ``path`` is refused unless ``force=True``; with ``force`` the old bundle is replaced only once the new one
    is complete and valid. On an exception (or :meth:`abort`) the temporary folder is removed and ``path`` is
    left untouched. As a context manager, ``close()`` runs on a clean exit and ``abort()`` on an exception.
    """

    def __init__(
        self, path: str | Path, *, family: str, config: dict[str, Any] | None = None, force: bool = False
    ) -> None:
        self.path = Path(path).absolute()
        self.family = family
        self.config = dict(config) if config is not None else {}
        self.force = force
        if not isinstance(family, str) or not family:
            raise BundleError(self.path, field="family", expected="a non-empty string", found=repr(family))
        try:
            json.dumps(self.config)
        except (TypeError, ValueError) as exc:
            raise BundleError(self.path, f"config is not JSON-serialisable: {exc}", field="config") from exc
        self._check_target()
        #: leftover temporary folders of killed exports that this writer removed
        self.leftovers: list[Path] = sweep_leftovers(self.path)
        if force and (self.path / PROFILE).is_file():  # own_profile(): check_target refuses anyone else's
            log.warning("%s: the old bundle's routing profile (edgemoe-profile); --force removes it with the "
                        "old bundle when the new one is in place (run edgemoe-profile again then)",
                        self.path / PROFILE)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BundleError(
                self.path, f"cannot create the bundle's parent folder {self.path.parent}",
                expected="a folder that can be made", found=exc.strerror or type(exc).__name__,
            ) from None
        # the pid in the name and the marker inside let a later writer tell a killed writer's leftovers from
        # a running one's (sweep_leftovers)
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._tmp.mkdir()
        self._layers: dict[int, dict[str, Any]] = {}
        self._records: dict[tuple[int, int, int], dict[str, Any]] = {}  # (layer, expert, variant)
        self._graphs: dict[str, str] = {}
        self._tokenizer: str | None = None
        self._tokenizer_graphs: dict[str, Any] | None = None
        self._store_size = 0
        self._state = "open"
        try:
            self._write_marker()
            self._store: BinaryIO = open(self._tmp / STORE_FILE, "wb")  # noqa: SIM115 - closed in close()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    # -- helpers ----------------------------------------------------------------------------------------
    def _check_target(self) -> None:
        check_target(self.path, force=self.force)

    def _write_marker(self) -> None:
        """Who writes the temporary folder (host, pid, process start) and the graph files so far."""
        marker = {"format": _MARKER_FORMAT, **_host(), "pid": os.getpid(), "started": _started(os.getpid()),
                  "graphs": sorted(self._graphs.values())}
        with open(self._tmp / WRITER_MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f)

    def _require_open(self) -> None:
        if self._state != "open":
            raise BundleError(self.path, f"writer is {self._state}")

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    # -- content ----------------------------------------------------------------------------------------
    def add_layer(
        self,
        layer: int,
        *,
        num_experts: int,
        top_k: int,
        hidden: int,
        intermediate: int,
        gated: bool,
        activation: str,
    ) -> None:
        """Declare MoE layer ``layer`` (layers must end up numbered 0..N-1, the order of execution)."""
        self._require_open()
        try:
            if layer in self._layers:
                raise BundleError(self.path, "layer added twice", layer=layer)
            for name, v, lo in (
                ("layer", layer, 0),
                ("num_experts", num_experts, 1),
                ("top_k", top_k, 1),
                ("hidden", hidden, 1),
                ("intermediate", intermediate, 1),
            ):
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                    raise BundleError(self.path, field=name, layer=layer, expected=f"an int >= {lo}", found=v)
            if top_k > num_experts:
                raise BundleError(
                    self.path,
                    field="top_k",
                    layer=layer,
                    expected=f"<= num_experts ({num_experts})",
                    found=top_k,
                )
            if activation not in ACTIVATIONS:
                raise BundleError(
                    self.path,
                    field="activation",
                    layer=layer,
                    expected=f"one of {', '.join(ACTIVATIONS)}",
                    found=repr(activation),
                )
            if activation == "swiglu_oai" and not gated:
                raise BundleError(
                    self.path, field="gated", layer=layer, expected="True for swiglu_oai", found=gated
                )
        except BaseException:
            self.abort()
            raise
        self._layers[int(layer)] = {
            "layer": int(layer),
            "num_experts": int(num_experts),
            "top_k": int(top_k),
            "hidden": int(hidden),
            "intermediate": int(intermediate),
            "gated": bool(gated),
            "activation": activation,
        }

    def add_expert(
        self,
        layer: int,
        expert: int,
        w_in: np.ndarray,
        w_out: np.ndarray,
        *,
        dtype: str = "int4",
        group_size: int = 64,
        b_in: np.ndarray | None = None,
        b_out: np.ndarray | None = None,
        variant: int = PRIMARY,
    ) -> dict[str, Any]:
        """Quantize one expert and append its blob to the store now. Returns its manifest record.

        ``variant`` :data:`~edgemoe_ort.bundle.format.TWIN` adds the expert's low-bit twin (fewer bits than
        its primary, which is added first); a bundle with twins is written as format version 2.
        """
        self._require_open()
        try:
            return self._add_expert(layer, expert, w_in, w_out, dtype, group_size, b_in, b_out, variant)
        except BaseException:
            self.abort()
            raise

    def _add_expert(
        self,
        layer: int,
        expert: int,
        w_in: np.ndarray,
        w_out: np.ndarray,
        dtype: str,
        group_size: int,
        b_in: np.ndarray | None,
        b_out: np.ndarray | None,
        variant: int = PRIMARY,
    ) -> dict[str, Any]:
        kw: dict[str, Any] = {"layer": layer, "expert": expert}
        if layer not in self._layers:
            raise BundleError(
                self.path,
                "add_layer() first",
                field="layer",
                expected=sorted(self._layers),
                found=layer,
                **kw,
            )
        lay = self._layers[layer]
        if (
            isinstance(expert, bool)
            or not isinstance(expert, (int, np.integer))
            or not 0 <= expert < lay["num_experts"]
        ):
            raise BundleError(
                self.path, field="expert", expected=f"0 <= expert < {lay['num_experts']}", found=expert, **kw
            )
        if isinstance(variant, bool) or variant not in VARIANTS:
            raise BundleError(
                self.path, field="variant", expected=f"one of {list(VARIANTS)}", found=variant, **kw
            )
        key = (int(layer), int(expert), int(variant))
        if key in self._records:
            raise BundleError(self.path, "twin added twice" if variant else "expert added twice", **kw)
        if variant == TWIN:
            primary = self._records.get((key[0], key[1], PRIMARY))
            if primary is None:
                raise BundleError(self.path, "add the primary before its twin", field="variant", **kw)
            why = twin_error(primary["format"]["dtype"], dtype) if dtype in DTYPES else None
            if why:
                raise BundleError(self.path, why, field="dtype", **kw)
        shapes = layer_shapes(lay)
        arrays = {"w_in": w_in, "w_out": w_out, "b_in": b_in, "b_out": b_out}
        for name, a in arrays.items():
            if a is None:
                continue
            if tuple(np.shape(a)) != tuple(shapes[name]):
                raise BundleError(
                    self.path,
                    "shape does not match the layer",
                    field=name,
                    expected=shapes[name],
                    found=list(np.shape(a)),
                    **kw,
                )
        try:
            fmt = record_format(dtype, group_size)
            qin = quantize(w_in, dtype, group_size)
            qout = quantize(w_out, dtype, group_size)
        except ValueError as exc:
            raise BundleError(self.path, str(exc), **kw) from exc
        tensors = matrix_tensors("w_in", qin) + matrix_tensors("w_out", qout)
        for name in ("b_in", "b_out"):
            a = arrays[name]
            if a is not None:
                b = np.ascontiguousarray(a, dtype="<f4")
                if not np.isfinite(b).all():
                    raise BundleError(self.path, "bias must be finite", field=name, **kw)
                tensors.append((name, "f32", list(shapes[name]), b))

        offset = self._store_size
        h = xxhash.xxh3_64()
        pos = 0
        meta: dict[str, Any] = {}
        for name, tdt, shape, arr in tensors:
            start = align_up(pos, TENSOR_ALIGNMENT)
            if start > pos:
                pad = bytes(start - pos)
                self._store.write(pad)
                h.update(pad)
            data = memoryview(arr).cast("B")
            self._store.write(data)
            h.update(data)
            meta[name] = {"offset": start, "nbytes": int(arr.nbytes), "dtype": tdt, "shape": shape}
            pos = start + int(arr.nbytes)
        size = pos
        length = align_up(max(size, 1), ALIGNMENT)
        self._store.write(bytes(length - size))
        self._store_size += length
        rec = {
            "layer": key[0],
            "expert": key[1],
            "offset": offset,
            "length": length,
            "size": size,
            "checksum": h.hexdigest(),
            "format": fmt,
            "tensors": meta,
        }
        self._records[key] = rec
        return rec

    def add_graph(
        self, role: str, model: onnx.ModelProto, filename: str | None = None, *, external_data: bool = False
    ) -> Path:
        """Save a dense graph for ``role`` ("decoder", "encoder", ...). Returns its path in the bundle.

        Saved with external initializers in ``<filename>.data`` when ``external_data`` is true or the proto
        is larger than 1 GiB. ``model`` itself is not modified.
        """
        self._require_open()
        try:
            return self._add_graph(role, model, filename, external_data)
        except BaseException:
            self.abort()
            raise

    def _add_graph(self, role: str, model: onnx.ModelProto, filename: str | None, external: bool) -> Path:
        if not isinstance(role, str) or not role:
            raise BundleError(self.path, field="graphs", expected="a non-empty role name", found=repr(role))
        if role in self._graphs:
            raise BundleError(self.path, "graph role added twice", field=f"graphs.{role}")
        if filename is None:
            filename = "model.onnx" if role == "decoder" else f"{role}.onnx"
        why = check_relpath(filename)
        if why is not None:
            raise BundleError(
                self.path,
                why,
                field=f"graphs.{role}",
                expected="a relative path inside the bundle",
                found=repr(filename),
            )
        reserved = {
            MANIFEST,
            STORE_FILE,
            TOKENIZER_DIR,
            *self._graphs.values(),
            *(f"{g}.data" for g in self._graphs.values()),
        }
        if filename in reserved or filename.split("/")[0] == TOKENIZER_DIR:
            raise BundleError(
                self.path,
                "file name already used in the bundle",
                field=f"graphs.{role}",
                found=repr(filename),
            )
        if not external:
            external = sum(len(t.raw_data) for t in model.graph.initializer) > _GRAPH_EXTERNAL_THRESHOLD
        dest = self._tmp / filename
        self._graphs[role] = filename
        self._write_marker()  # before the file: a killed writer's leftover never holds an unlisted graph
        dest.parent.mkdir(parents=True, exist_ok=True)
        if external:
            _save_model_external(model, dest, f"{Path(filename).name}.data")
        else:
            _save_model_piecewise(model, dest)
        return self.path / filename

    def add_tokenizer(self, src_dir: str | Path) -> None:
        """Copy the tokenizer files of ``src_dir`` (``tokenizer.json`` required) into ``tokenizer/``."""
        self._require_open()
        try:
            src = Path(src_dir)
            if self._tokenizer is not None:
                raise BundleError(self.path, "tokenizer added twice", field="tokenizer")
            if not (src / "tokenizer.json").is_file():
                raise BundleError(
                    src / "tokenizer.json",
                    "tokenizer file missing",
                    field="tokenizer",
                    expected="a file",
                    found="nothing",
                )
            dst = self._tmp / TOKENIZER_DIR
            dst.mkdir()
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, dst / name)
            self._tokenizer = TOKENIZER_DIR
        except BaseException:
            self.abort()
            raise

    def set_tokenizer_graphs(self, info: dict[str, Any]) -> None:
        """The manifest's ``tokenizer_graphs`` field (docs/bundle-format.md, "Tokenizer graphs"): whether the
        bundle has tokenizer / detokenizer graphs (added with :meth:`add_graph`), and why not."""
        self._require_open()
        try:
            json.dumps(info, allow_nan=False)
        except (TypeError, ValueError) as exc:
            self.abort()
            raise BundleError(self.path, f"not JSON-serialisable: {exc}", field="tokenizer_graphs") from exc
        self._tokenizer_graphs = dict(info)

    # -- finish -----------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        layers = [self._layers[i] for i in sorted(self._layers)]
        version = manifest_version(any(k[2] == TWIN for k in self._records))
        records = [self._records[k] for k in sorted(self._records)]
        if version >= 2:  # every record names its variant, after its expert (version 1 has none)
            records = [{"layer": r["layer"], "expert": r["expert"], "variant": k[2],
                        **{f: v for f, v in r.items() if f not in ("layer", "expert")}}
                       for k, r in zip(sorted(self._records), records, strict=True)]
        extra = {} if self._tokenizer_graphs is None else {"tokenizer_graphs": self._tokenizer_graphs}
        return {
            "format": FORMAT,
            "format_version": version,
            "created_by": version_string(),
            "model": {"family": self.family, "config": self.config},
            "graphs": dict(self._graphs),
            "tokenizer": self._tokenizer,
            **extra,
            "store": {
                "file": STORE_FILE,
                "size": self._store_size,
                "alignment": ALIGNMENT,
                "checksum": CHECKSUM,
            },
            "layers": layers,
            "experts": records,
        }

    def close(self) -> Bundle:
        """Check completeness, write the manifest, validate, and move the bundle into place."""
        self._require_open()
        try:
            ids = sorted(self._layers)
            if ids != list(range(len(ids))):
                raise BundleError(
                    self.path,
                    "layers must be numbered 0..N-1",
                    field="layers",
                    expected=list(range(len(ids))),
                    found=ids,
                )
            for li in ids:
                for e in range(self._layers[li]["num_experts"]):
                    if (li, e, PRIMARY) not in self._records:
                        raise BundleError(self.path, "expert never added", layer=li, expert=e)
            self._store.flush()
            os.fsync(self._store.fileno())
            self._store.close()
            mf = self._tmp / MANIFEST
            with open(mf, "w", encoding="utf-8") as f:
                f.write(dump_manifest(self.manifest()))
                f.flush()
                os.fsync(f.fileno())
            Bundle.open(self._tmp)  # validate what we wrote
            (self._tmp / WRITER_MARKER).unlink()
            self._install()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return Bundle.open(self.path)

    def _install(self) -> None:
        old: Path | None = None
        if self.path.exists() or self.path.is_symlink():
            self._check_target()  # may raise: the target appeared or changed while writing
            old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(self.path, old)
        try:
            os.replace(self._tmp, self.path)
        except BaseException:
            if old is not None:
                os.replace(old, self.path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Discard everything written so far; the target is left untouched."""
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            self._store.close()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _save_model_external(
    model: onnx.ModelProto, dest: Path, data_name: str, *, threshold: int = 1024
) -> None:
    """``model`` with every initializer of at least ``threshold`` bytes in ``dest.parent / data_name`` (one
    file, each tensor at a 4096-byte aligned offset), one tensor at a time: neither the model nor its weights
    are copied whole (``onnx.save_model`` needs a copy of the proto to strip)."""
    data = dest.parent / data_name
    with open(data, "wb") as f:

        def outside(t: onnx.TensorProto) -> onnx.TensorProto:
            raw = t.raw_data if t.HasField("raw_data") else b""
            if len(raw) < threshold:
                return t
            offset = -(-f.tell() // 4096) * 4096
            f.seek(offset)
            f.write(raw)
            light = onnx.TensorProto()
            light.name = t.name
            light.data_type = t.data_type
            light.dims.extend(t.dims)
            light.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                light.external_data.add(key=key, value=value)
            return light

        _save_model_piecewise(model, dest, initializer=outside)


def _save_model_piecewise(model: onnx.ModelProto, dest: Path, *, initializer: Any = None) -> None:
    """Write ``model`` to ``dest`` as ``onnx.save_model`` would (the same bytes), serializing its graph one
    field element at a time, so the file's bytes are never all in memory beside the proto (``save_model``
    serializes the whole model first, and so does protobuf's ``ByteSize``: twice the dense weights at the end
    of an export). The graph's length prefix comes from a first pass over the same pieces.

    A message's encoding is its fields' encodings in field-number order; ``ListFields`` yields them in that
    order, and a one-field message of the same type encodes exactly that field.

    ``initializer`` (optional) maps each graph initializer to the tensor written in its place; it is called
    once per initializer, in order, and its results are kept for the second pass.
    """
    graph = model.graph
    done: dict[int, onnx.TensorProto] = {}

    def graph_pieces() -> Any:
        for fd, value in graph.ListFields():
            if fd.name == "initializer" and initializer is not None:
                for i, t in enumerate(value):
                    if i not in done:
                        done[i] = initializer(t)
                    yield from _field_pieces(graph, fd, [done[i]], repeated=True)
            else:
                yield from _field_pieces(graph, fd, value)

    with open(dest, "wb") as f:
        for fd, value in model.ListFields():
            if fd.name == "graph":
                size = sum(len(p) for p in graph_pieces())
                f.write(_varint((fd.number << 3) | 2) + _varint(size))
                for piece in graph_pieces():
                    f.write(piece)
            else:
                for piece in _field_pieces(model, fd, value):
                    f.write(piece)


def _field_pieces(msg: Any, fd: Any, value: Any, *, repeated: bool | None = None) -> Any:
    """The encoding of field ``fd`` of ``msg``, one element of a repeated field at a time."""
    for item in value if (fd.is_repeated if repeated is None else repeated) else [value]:
        one = type(msg)()
        field = getattr(one, fd.name)
        if fd.is_repeated and fd.type == fd.TYPE_MESSAGE:
            field.add().CopyFrom(item)
        elif fd.is_repeated:
            field.append(item)
        elif fd.type == fd.TYPE_MESSAGE:
            field.CopyFrom(item)
        else:
            setattr(one, fd.name, item)
        yield one.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
