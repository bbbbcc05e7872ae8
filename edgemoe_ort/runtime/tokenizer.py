"""The bundle's tokenizer on the device: ``tokenizers``, or the bundle's tokenizer graphs run by ONNX Runtime
with the onnxruntime-extensions op library (docs/bundle-format.md, "Tokenizer graphs").

Device-side code: imports neither torch nor transformers. The extensions' op library is found without
importing ``onnxruntime_extensions`` (its ``__init__`` imports transformers and torch when they are
installed).

Which engine :func:`open_tokenizer` picks (``tokenizer=``):

- ``"tokenizers"``: the ``tokenizers`` package on ``tokenizer/tokenizer.json``.
- ``"ortx"``: the bundle's ``tokenizer`` / ``detokenizer`` graphs in ORT. A bundle without usable graphs (none
  written, its tokenizer cannot be expressed, the graphs were made from another ``tokenizer.json``, or the op
  library is not installed) falls back to ``tokenizers`` with a warning saying why.
- ``"auto"`` (the default): ``tokenizers`` if it is installed, else the graphs. Measured on the default
  model's held-out split (docs/bundle-format.md, "Tokenizer graphs"): the graphs encode whole files 2-3.6x
  and prompt-sized text 1.05-1.5x faster, decode whole files in 0.9-1.5x the time, but one decode call
  takes 2.7-6x as long (one ORT run, 13-34 us against 4-9 us), and generation decodes the text so far after
  every token; they also take ~8 MiB more RSS (15.7 against 8.1 MiB).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from edgemoe_ort.bundle.format import TOKENIZER_GRAPH_ROLES, model_graph_roles

__all__ = [
    "ENV_ORTX_LIB",
    "TOKENIZER_BACKENDS",
    "TOKENIZER_GRAPH_ROLES",
    "Encoding",
    "OrtxTokenizer",
    "model_graph_roles",
    "open_tokenizer",
    "ortx_library_path",
    "tokenizer_graphs_problem",
]

log = logging.getLogger(__name__)

#: ``tokenizer=`` of :func:`open_tokenizer`, ``MoEModel.load`` and ``edgemoe-run --tokenizer``
TOKENIZER_BACKENDS = ("auto", "ortx", "tokenizers")
#: the onnxruntime-extensions op library to register (default: the installed package's)
ENV_ORTX_LIB = "EDGEMOE_ORTX_LIB"
#: the manifest field that says whether the bundle has tokenizer graphs, and why not
MANIFEST_FIELD = "tokenizer_graphs"


def ortx_library_path() -> Path | None:
    """The onnxruntime-extensions custom-op library: ``$EDGEMOE_ORTX_LIB`` if set (e.g. a
    ``libortextensions.so`` built from source), else the one inside the installed ``onnxruntime_extensions``
    package (what its ``get_library_path()`` returns), located without importing the package; None if it is
    not installed."""
    env = os.environ.get(ENV_ORTX_LIB)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{ENV_ORTX_LIB}={env}: no such file (unset it to use the installed "
                                    "onnxruntime-extensions)")
        return p.resolve()
    try:
        spec = importlib.util.find_spec("onnxruntime_extensions")  # finds the package, does not run it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            p = Path(folder) / f"_extensions_pydll{suffix}"
            if p.is_file():
                return p.resolve()
    return None


def _xxh3_file(path: Path) -> str:
    return xxhash.xxh3_64_hexdigest(path.read_bytes())


def tokenizer_graphs_problem(bundle: Any) -> str | None:
    """Why the bundle's tokenizer graphs cannot be used, or None if they can (the op library aside): the
    bundle has no tokenizer, no graphs (exported before they existed, or its tokenizer cannot be expressed:
    the manifest's reason), or graphs made from another ``tokenizer.json``."""
    m = bundle.manifest
    rel = m.get("tokenizer")
    if not rel:
        return "the bundle has no tokenizer"
    info = m.get(MANIFEST_FIELD)
    graphs = m.get("graphs", {})
    if not isinstance(info, dict):
        return ("the bundle has no tokenizer graphs (exported before they existed; add them with "
                "`python -m edgemoe_ort.export.tokenizer_graphs BUNDLE`)")
    if info.get("status") != "ok":
        return f"the bundle has no tokenizer graphs ({info.get('status')}: {info.get('reason')})"
    missing = [r for r in TOKENIZER_GRAPH_ROLES if r not in graphs]
    if missing:
        return f"manifest.json: tokenizer_graphs says ok, but graphs has no {' or '.join(missing)} role"
    tj = bundle.path / rel / "tokenizer.json"
    want = info.get("tokenizer_json_xxh3")
    if tj.is_file() and want is not None and _xxh3_file(tj) != want:
        return (f"the tokenizer graphs were made from another {rel}/tokenizer.json (xxh3 {want}, the "
                f"file's is {_xxh3_file(tj)}); make them again with `python -m "
                "edgemoe_ort.export.tokenizer_graphs BUNDLE --force`")
    return None


@dataclass
class Encoding:
    """What :meth:`OrtxTokenizer.encode` returns: the token ids (as ``tokenizers.Encoding.ids``)."""

    ids: list[int]


class OrtxTokenizer:
    """A bundle's tokenizer graphs in ONNX Runtime with the onnxruntime-extensions ops: the part of
    ``tokenizers.Tokenizer`` the runtime uses (``encode``, ``encode_batch``, ``decode``), giving the same ids
    and text. The graphs tokenize without adding special tokens and detokenize skipping them (what the
    runtime asks ``tokenizers`` for)."""

    backend = "ortx"

    def __init__(self, tokenizer_graph: str | Path, detokenizer_graph: str | Path,
                 library: str | Path | None = None) -> None:
        import onnxruntime as ort

        lib = Path(library) if library is not None else ortx_library_path()
        if lib is None:
            raise FileNotFoundError("onnxruntime-extensions is not installed (pip install "
                                    f"onnxruntime-extensions, or set {ENV_ORTX_LIB} to its op library)")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1  # the tokenizer kernels are sequential: no thread pool
        so.inter_op_num_threads = 1
        so.register_custom_ops_library(str(lib))
        self.library = lib
        self.graphs = (Path(tokenizer_graph), Path(detokenizer_graph))
        self._enc = ort.InferenceSession(str(tokenizer_graph), so, providers=["CPUExecutionProvider"])
        self._dec = ort.InferenceSession(str(detokenizer_graph), so, providers=["CPUExecutionProvider"])
        self._text_in = self._enc.get_inputs()[0].name
        outs = [o.name for o in self._enc.get_outputs()]
        self._ids_out = "input_ids" if "input_ids" in outs else outs[0]
        self._mask_out = "attention_mask" if "attention_mask" in outs else None
        self._ids_in = self._dec.get_inputs()[0].name

    def encode(self, text: str, add_special_tokens: bool = False) -> Encoding:
        """The token ids of ``text`` (no special tokens added: the graph adds none)."""
        self._no_special(add_special_tokens)
        ids = self._enc.run([self._ids_out], {self._text_in: np.array([text], dtype=object)})[0]
        return Encoding([int(i) for i in ids[0]])

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = False) -> list[Encoding]:
        """:meth:`encode` of each text, in one graph run."""
        self._no_special(add_special_tokens)
        batch = list(texts)
        if not batch:
            return []
        if self._mask_out is None:
            return [self.encode(t) for t in batch]
        ids, mask = self._enc.run([self._ids_out, self._mask_out],
                                  {self._text_in: np.array(batch, dtype=object)})
        return [Encoding([int(i) for i in row[m.astype(bool)]]) for row, m in zip(ids, mask, strict=True)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``, special tokens skipped. A sequence that ends inside a UTF-8 character (a
        stream cut mid-character) gives U+FFFD for the incomplete bytes, as ``tokenizers`` does."""
        if not skip_special_tokens:
            raise ValueError("skip_special_tokens: the detokenizer graph skips special tokens (made with "
                             "skip_special_tokens=1); use tokenizer='tokenizers' to keep them")
        seq = np.asarray([int(i) for i in ids], dtype=np.int64)
        if seq.size == 0:  # onnxruntime-extensions 0.15 divides by the length: never feed it []
            return ""
        try:
            out = self._dec.run(None, {self._ids_in: seq})[0]
        except UnicodeDecodeError as exc:  # the op returned bytes that are not UTF-8 (a cut character)
            if not isinstance(exc.object, bytes):
                raise
            return exc.object.decode("utf-8", errors="replace")
        return str(out.reshape(-1)[0]) if out.size else ""

    @staticmethod
    def _no_special(add_special_tokens: bool) -> None:
        if add_special_tokens:
            raise ValueError("add_special_tokens: the tokenizer graph adds no special tokens; use "
                             "tokenizer='tokenizers' for that")

    def __repr__(self) -> str:
        return f"OrtxTokenizer({self.graphs[0]}, {self.graphs[1]}, library={self.library})"


def _tokenizers_missing() -> str | None:
    """Why the ``tokenizers`` package cannot be used, or None."""
    if importlib.util.find_spec("tokenizers") is None:
        return "the tokenizers package is not installed"
    return None


def _open_tokenizers(path: Path) -> Any:
    from tokenizers import Tokenizer

    from .generate import GenerationError

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise GenerationError(f"{path}: not a valid tokenizer.json ({exc})") from exc


def _open_graphs(bundle: Any) -> tuple[OrtxTokenizer | None, str | None]:
    """The bundle's tokenizer graphs opened, or (None, why not)."""
    why = tokenizer_graphs_problem(bundle)
    if why is not None:
        return None, why
    try:
        lib = ortx_library_path()
    except FileNotFoundError as exc:
        return None, str(exc)
    if lib is None:
        return None, ("onnxruntime-extensions is not installed (pip install 'edgemoe-ort[ortx]' or "
                      f"onnxruntime-extensions, or set {ENV_ORTX_LIB})")
    try:
        return OrtxTokenizer(bundle.graph_path("tokenizer"), bundle.graph_path("detokenizer"), lib), None
    except Exception as exc:  # ORT: the library does not load, or a graph is not valid
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"the tokenizer graphs do not open ({first})"


def open_tokenizer(bundle: Any, tokenizer: str = "auto") -> Any | None:
    """The bundle's tokenizer (None if the bundle has none) with the engine ``tokenizer`` names:
    ``"tokenizers"``, ``"ortx"`` (the tokenizer graphs; without usable graphs a warning says why and
    ``tokenizers`` is used) or ``"auto"`` (``tokenizers`` if installed, else the graphs; see the module
    docstring for the measurement behind it). Raises :class:`~edgemoe_ort.runtime.generate.GenerationError`
    for an unknown ``tokenizer``, a tokenizer folder without ``tokenizer.json``, or when no engine can run."""
    from .generate import GenerationError

    if tokenizer not in TOKENIZER_BACKENDS:
        raise GenerationError(
            f"tokenizer: expected one of {', '.join(TOKENIZER_BACKENDS)}, found {tokenizer!r}"
        )
    rel = bundle.manifest.get("tokenizer")
    if not rel:
        return None
    path = bundle.path / rel / "tokenizer.json"
    if not path.is_file():
        raise GenerationError(f"{bundle.path / 'manifest.json'}: tokenizer '{rel}' has no tokenizer.json")
    if tokenizer == "tokenizers":
        missing = _tokenizers_missing()
        if missing is not None:
            raise GenerationError(f"tokenizer 'tokenizers': {missing} (pip install tokenizers, or use "
                                  "tokenizer='ortx' with a bundle that has tokenizer graphs)")
        return _open_tokenizers(path)
    if tokenizer == "auto" and _tokenizers_missing() is None:
        return _open_tokenizers(path)
    graphs, why = _open_graphs(bundle)
    if graphs is not None:
        log.info("%s: tokenizing with the bundle's tokenizer graphs in ONNX Runtime (%s)", bundle.path,
                 graphs.library.name)
        return graphs
    missing = _tokenizers_missing()
    if missing is not None:
        raise GenerationError(f"{bundle.path}: no tokenizer can run: {why}, and {missing}")
    log.warning("%s: tokenizer 'ortx': %s; using the tokenizers package instead", bundle.path, why)
    return _open_tokenizers(path)


def tokenizer_backend(tok: Any | None) -> str | None:
    """``"ortx"``, ``"tokenizers"`` or None (no tokenizer): which engine ``tok`` is."""
    if tok is None:
        return None
    return "ortx" if isinstance(tok, OrtxTokenizer) else "tokenizers"
