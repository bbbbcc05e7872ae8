"""The text a profile is measured on: files and folders of UTF-8 text, tokenized, split train / held out.

- A corpus path is a file or a folder; a folder means every regular file below it, recursively, in sorted
  order of the path relative to it (entries whose name starts with ``.`` are skipped). Files are read as
  UTF-8 (``\\r\\n`` -> ``\\n``); a file that is not UTF-8 is an error naming it. Empty files are skipped.
- Each file is tokenized on its own (no special tokens added) and followed by the separator token (the
  model's ``eos_token_id``) if there is one; the files of a split are concatenated in corpus order.
- Split, deterministic: with several files, whole files are held out, taken in the order of a hash of
  their relative path until they hold ``heldout_share`` of the corpus bytes (at least one file; at least one
  stays for training); with a single file, the last ``heldout_share`` of its token stream is held out.
- ``max_tokens`` caps the profile: at most ``round(max_tokens * heldout_share)`` held-out tokens and the rest
  train tokens, each taken from the start of its split (files are tokenized only as far as needed).
- Token ids instead of text (a bundle without a tokenizer; ``edgemoe-profile --ids``): :func:`read_ids` reads
  one stream from a ``.npy`` file (a 1-D integer array) or a text file of integers separated by whitespace or
  commas, each in ``[0, vocab_size)``; :func:`split_ids` splits it like a single text file (its first
  ``max_tokens``, the last ``heldout_share`` held out).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_TOKENS",
    "CorpusError",
    "CorpusFile",
    "CorpusSplit",
    "list_corpus",
    "read_corpus",
    "heldout_stream",
    "split_corpus",
    "read_ids",
    "split_ids",
]

#: default cap on the tokens profiled (train + held out)
DEFAULT_TOKENS = 100_000
#: files tokenized per ``encode_batch`` call
_BATCH_FILES = 32


class CorpusError(ValueError):
    """The corpus cannot be used (missing path, nothing to read, a file that is not UTF-8, too few tokens)."""


@dataclass(frozen=True)
class CorpusFile:
    """One text file of the corpus."""

    path: Path  #: where it was read
    name: str  #: posix path relative to its corpus argument (a file argument: its name); the split hashes it
    text: str


@dataclass
class CorpusSplit:
    """Token streams (int64) of the train and held-out splits and the files each came from."""

    train: np.ndarray
    heldout: np.ndarray
    heldout_share: float
    train_files: list[str] = field(default_factory=list)
    #: held-out file names; empty when a single file's token stream was split
    heldout_files: list[str] = field(default_factory=list)


def list_corpus(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """``(path, name)`` of every file of the corpus paths, in order (see the module docstring)."""
    if not paths:
        raise CorpusError("corpus: expected at least one file or folder, found none")
    out: list[tuple[Path, str]] = []
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"corpus {raw}: no such file or folder")
        if root.is_file():
            out.append((root, root.name))
            continue
        if not root.is_dir():
            raise CorpusError(f"corpus {raw}: expected a file or a folder, found neither")
        found: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                p = Path(dirpath) / fn
                if not fn.startswith(".") and p.is_file():
                    found.append((p.relative_to(root).as_posix(), p))
        out.extend((p, rel) for rel, p in sorted(found))
    return out


def read_corpus(paths: Sequence[str | Path]) -> list[CorpusFile]:
    """Read every file of the corpus paths; raises :class:`CorpusError` (or FileNotFoundError) with one clear
    line for a missing path, a file that is not UTF-8, or a corpus without any text."""
    files = []
    listed = list_corpus(paths)
    for path, name in listed:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(
                f"corpus file {path}: expected UTF-8 text, found byte {exc.object[exc.start]:#04x} at offset "
                f"{exc.start} (remove the file or convert it)"
            ) from None
        except OSError as exc:
            raise CorpusError(f"corpus file {path}: cannot be read ({exc.strerror or exc})") from None
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if text:
            files.append(CorpusFile(path, name, text))
    if not files:
        where = ", ".join(str(p) for p in paths)
        what = f"{len(listed)} empty file(s)" if listed else "no files"
        raise CorpusError(f"corpus {where}: expected text files, found {what}")
    return files


def _hash(name: str) -> bytes:
    return hashlib.sha256(name.encode("utf-8")).digest()


def _tokenize(tokenizer: Any, texts: list[str], separator: int | None) -> list[np.ndarray]:
    encs = tokenizer.encode_batch(texts, add_special_tokens=False)
    tail = [separator] if separator is not None else []
    return [np.asarray(list(e.ids) + tail, dtype=np.int64) for e in encs]


def _stream(tokenizer: Any, files: list[CorpusFile], separator: int | None, cap: int | None) -> np.ndarray:
    parts: list[np.ndarray] = []
    n = 0
    for s in range(0, len(files), _BATCH_FILES):
        if cap is not None and n >= cap:
            break
        for ids in _tokenize(tokenizer, [f.text for f in files[s : s + _BATCH_FILES]], separator):
            parts.append(ids)
            n += len(ids)
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return ids[:cap] if cap is not None else ids


def _checked(files: Sequence[CorpusFile], heldout_share: float) -> list[CorpusFile]:
    if not 0.0 < heldout_share < 1.0:
        raise CorpusError(f"--heldout-share: expected a number in (0, 1), found {heldout_share}")
    if not files:
        raise CorpusError("corpus: expected text files, found none")
    return list(files)


def _heldout_files(files: Sequence[CorpusFile], heldout_share: float) -> set[int]:
    """Indices of the held-out files of a corpus of several files (module docstring)."""
    sizes = [len(f.text.encode("utf-8")) for f in files]
    total = sum(sizes)
    held: set[int] = set()
    got = 0
    for i in sorted(range(len(files)), key=lambda i: (_hash(files[i].name), files[i].name, i)):
        if held and (got >= heldout_share * total or len(held) == len(files) - 1):
            break
        held.add(i)
        got += sizes[i]
    return held


def heldout_stream(
    files: Sequence[CorpusFile],
    tokenizer: Any,
    *,
    heldout_share: float = 0.1,
    max_tokens: int | None = None,
    separator: int | None = None,
) -> np.ndarray:
    """The held-out token stream of :func:`split_corpus` (same files, same order), at most ``max_tokens``
    of it, tokenizing only the held-out files (a single file: the last ``heldout_share`` of its stream)."""
    files = _checked(files, heldout_share)
    if len(files) == 1:
        held = split_corpus(files, tokenizer, heldout_share=heldout_share, separator=separator).heldout
    else:
        chosen = _heldout_files(files, heldout_share)
        held = _stream(tokenizer, [f for i, f in enumerate(files) if i in chosen], separator, max_tokens)
    return held[:max_tokens] if max_tokens is not None else held


def split_corpus(
    files: Sequence[CorpusFile],
    tokenizer: Any,
    *,
    heldout_share: float = 0.1,
    max_tokens: int | None = None,
    separator: int | None = None,
) -> CorpusSplit:
    """Tokenize ``files`` with ``tokenizer`` (a ``tokenizers.Tokenizer``); split them (module docstring)."""
    if max_tokens is not None and max_tokens < 2:
        raise CorpusError(
            f"--tokens: expected at least 2 (one train and one held-out token), found {max_tokens}"
        )
    files = _checked(files, heldout_share)
    held_cap = train_cap = None
    if max_tokens is not None:
        held_cap = min(max(1, round(max_tokens * heldout_share)), max_tokens - 1)
        train_cap = max_tokens - held_cap
    if len(files) == 1:
        ids = _stream(tokenizer, files, separator, max_tokens)
        if len(ids) < 2:
            raise CorpusError(f"corpus file {files[0].path}: {len(ids)} token(s), expected at least 2")
        n_held = min(max(1, round(len(ids) * heldout_share)), len(ids) - 1)
        return CorpusSplit(ids[:-n_held].copy(), ids[-n_held:].copy(), heldout_share, [files[0].name], [])
    held = _heldout_files(files, heldout_share)
    train_files = [f for i, f in enumerate(files) if i not in held]
    held_files = [f for i, f in enumerate(files) if i in held]
    split = CorpusSplit(
        _stream(tokenizer, train_files, separator, train_cap),
        _stream(tokenizer, held_files, separator, held_cap),
        heldout_share,
        [f.name for f in train_files],
        [f.name for f in held_files],
    )
    for what, ids in (("train", split.train), ("held-out", split.heldout)):
        if len(ids) == 0:
            raise CorpusError(f"corpus: the {what} split has no tokens, expected at least 1")
    return split


def read_ids(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """The token-id corpus at ``path`` (module docstring) as int64; raises :class:`CorpusError` (or
    FileNotFoundError) naming the file and, for a bad id, its position, expected vs found."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--ids {path}: no such file")
    if p.suffix == ".npy":
        try:
            a = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise CorpusError(f"--ids {p}: expected a .npy array, found an unreadable file ({exc})") from None
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise CorpusError(f"--ids {p}: expected a 1-D integer array, found {a.ndim}-D {a.dtype}")
        ids = a.astype(np.int64)
    else:
        try:
            words = p.read_bytes().decode("ascii").replace(",", " ").split()
        except UnicodeDecodeError:
            raise CorpusError(
                f"--ids {p}: expected integers as ASCII text (or a .npy file), found binary"
            ) from None
        values = []
        for n, w in enumerate(words):
            try:
                values.append(int(w))
            except ValueError:
                raise CorpusError(f"--ids {p}: id {n}: expected an integer, found {w[:20]!r}") from None
        ids = np.asarray(values, np.int64)
    if len(ids) < 2:
        raise CorpusError(f"--ids {p}: {len(ids)} id(s), expected at least 2")
    bad = (ids < 0) | (ids >= vocab_size) if vocab_size is not None else ids < 0
    out = np.flatnonzero(bad)
    if out.size:
        n = int(out[0])
        rng = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise CorpusError(
            f"--ids {p}: id {n}: expected a token id in {rng} (vocab_size), found {int(ids[n])}"
        )
    return ids


def split_ids(ids: np.ndarray, *, heldout_share: float = 0.1, max_tokens: int | None = None) -> CorpusSplit:
    """Split one token-id stream: its first ``max_tokens``, the last ``heldout_share`` of them held out."""
    if not 0.0 < heldout_share < 1.0:
        raise CorpusError(f"--heldout-share: expected a number in (0, 1), found {heldout_share}")
    ids = np.asarray(ids, np.int64).ravel()[:max_tokens]
    if len(ids) < 2:
        raise CorpusError(f"--ids: {len(ids)} id(s), expected at least 2")
    n_held = min(max(1, round(len(ids) * heldout_share)), len(ids) - 1)
    return CorpusSplit(ids[:-n_held].copy(), ids[-n_held:].copy(), heldout_share)
