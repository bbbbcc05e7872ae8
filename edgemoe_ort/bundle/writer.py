"""Write a bundle: experts streamed into the store blob by blob, then the manifest, then an atomic rename."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
import onnx
import xxhash

from edgemoe_ort.quant import quantize

from .errors import BundleError, BundleExistsError
from .format import (
    ACTIVATIONS,
    ALIGNMENT,
    CHECKSUM,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    STORE_FILE,
    TENSOR_ALIGNMENT,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    align_up,
    check_relpath,
    layer_shapes,
    matrix_tensors,
    record_format,
    version_string,
)
from .reader import Bundle

_GRAPH_EXTERNAL_THRESHOLD = 1 << 30  # protos above 1 GiB are saved with external data


def dump_manifest(manifest: dict[str, Any]) -> str:
    """Readable JSON: indented, with each layer and each expert record on one line."""
    head = {k: v for k, v in manifest.items() if k not in ("layers", "experts")}
    text = json.dumps(head, indent=2)[:-2]  # drop the closing "\n}"
    for key in ("layers", "experts"):
        if key in manifest:
            items = ",\n".join("    " + json.dumps(x, separators=(", ", ": ")) for x in manifest[key])
            text += f',\n  "{key}": [\n{items}\n  ]' if items else f',\n  "{key}": []'
    return text + "\n}\n"


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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise BundleError(
                self.path.parent, "cannot create the bundle's parent folder", expected="a folder",
                found="a file in the way",
            ) from exc
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}"
        self._tmp.mkdir()
        self._layers: dict[int, dict[str, Any]] = {}
        self._records: dict[tuple[int, int], dict[str, Any]] = {}
        self._graphs: dict[str, str] = {}
        self._tokenizer: str | None = None
        self._store_size = 0
        self._state = "open"
        try:
            self._store: BinaryIO = open(self._tmp / STORE_FILE, "wb")  # noqa: SIM115 - closed in close()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    # -- helpers ----------------------------------------------------------------------------------------
    def _check_target(self) -> None:
        p = self.path
        if not (p.exists() or p.is_symlink()):
            return
        if not self.force:
            raise BundleExistsError(
                p,
                "target exists; pass force=True to replace it",
                expected="no file or folder",
                found="an existing " + ("folder" if p.is_dir() else "file"),
            )
        if p.is_symlink() or not p.is_dir():
            raise BundleExistsError(
                p,
                "refusing to replace something that is not a bundle folder",
                expected="a bundle folder",
                found="a file or symlink",
            )
        if not (p / MANIFEST).is_file() and any(p.iterdir()):
            raise BundleExistsError(
                p,
                "refusing to replace a non-empty folder that is not a bundle",
                expected=f"a folder with {MANIFEST} (or empty)",
                found="other files",
            )

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
    ) -> dict[str, Any]:
        """Quantize one expert and append its blob to the store now. Returns its manifest record."""
        self._require_open()
        try:
            return self._add_expert(layer, expert, w_in, w_out, dtype, group_size, b_in, b_out)
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
        key = (int(layer), int(expert))
        if key in self._records:
            raise BundleError(self.path, "expert added twice", **kw)
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
            try:
                external = model.ByteSize() > _GRAPH_EXTERNAL_THRESHOLD
            except Exception:  # protobuf refuses to size messages > 2 GiB
                external = True
        dest = self._tmp / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        if external:
            m = onnx.ModelProto()
            m.CopyFrom(model)  # onnx.save_model strips raw data out of the proto it is given
            onnx.save_model(
                m,
                str(dest),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{Path(filename).name}.data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(dest))
        self._graphs[role] = filename
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

    # -- finish -----------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        layers = [self._layers[i] for i in sorted(self._layers)]
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": version_string(),
            "model": {"family": self.family, "config": self.config},
            "graphs": dict(self._graphs),
            "tokenizer": self._tokenizer,
            "store": {
                "file": STORE_FILE,
                "size": self._store_size,
                "alignment": ALIGNMENT,
                "checksum": CHECKSUM,
            },
            "layers": layers,
            "experts": [self._records[k] for k in sorted(self._records)],
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
                    if (li, e) not in self._records:
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
