"""Routing profiles: record which experts a bundle chooses on a text corpus and write ``profile.json``.

    doc = profile_bundle("bundles/tiny", ["corpus/"], tokens=100_000)   # the profile document
    write_profile("bundles/tiny", doc, force=True)                     # edgemoe_ort.bundle.profile

Pieces: :mod:`.routing` (run the bundle with its routing exposed), :mod:`.corpus` (read and split the
text), :mod:`.tables` (the tables of the train split), :mod:`.recall` (held-out recall of every predictor
and the cache hit rates), :mod:`.cli` (``edgemoe-profile``). Imports neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe_ort.bundle import Bundle
from edgemoe_ort.bundle.profile import (
    PROFILE_FORMAT,
    PROFILE_VERSION,
    RECALL_AT,
    manifest_identity,
    read_profile,
    write_profile,
)

from .corpus import DEFAULT_TOKENS, CorpusError, CorpusFile, read_corpus, split_corpus, split_ids
from .probe import ProbeFitter, ProbeScores, probe_section
from .recall import BUDGETS, heldout_recall, hit_rates
from .routing import DEFAULT_BATCH, DEFAULT_WINDOW, RoutingRecorder
from .tables import DEFAULT_MIN_COUNT, DEFAULT_TOP_M, build_layers

__all__ = [
    "DEFAULT_TOKENS",
    "check_options",
    "profile_bundle",
    "separator_token",
    "read_profile",
    "write_profile",
    "RoutingRecorder",
    "CorpusError",
]

Progress = Callable[[str, int, int], None]


def separator_token(bundle: Bundle) -> int | None:
    """The token put after each corpus file: the model's ``eos_token_id`` (the first, if a list)."""
    eos = bundle.config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return int(eos) if isinstance(eos, int) and not isinstance(eos, bool) else None


def check_options(
    bundle: Bundle,
    *,
    tokens: int | None = DEFAULT_TOKENS,
    heldout_share: float = 0.1,
    window: int = DEFAULT_WINDOW,
    top_m: int = DEFAULT_TOP_M,
    min_count: int = DEFAULT_MIN_COUNT,
    ids: bool = False,
) -> None:
    """Raise ValueError (one line, naming the ``edgemoe-profile`` flag) for options :func:`profile_bundle`
    cannot use with ``bundle``: checked before anything runs. ``ids``: the corpus is token ids (no
    tokenizer needed)."""
    from edgemoe_ort.bundle.format import model_graph_roles

    graphs = model_graph_roles(bundle.manifest.get("graphs", {}))  # the tokenizer graphs aside
    if graphs != ["decoder"]:
        raise ValueError(
            f"{bundle.path / 'manifest.json'}: graphs {graphs}: edgemoe-profile serves decoder-only bundles"
        )
    if not ids and not bundle.manifest.get("tokenizer"):
        raise ValueError(
            f"{bundle.path / 'manifest.json'}: tokenizer: expected a tokenizer folder (the corpus is text), "
            "found null; profile token ids instead with --ids FILE"
        )
    if tokens is not None and tokens < 2:
        raise ValueError(f"--tokens: expected at least 2 (one train and one held-out token), found {tokens}")
    if not 0.0 < heldout_share < 1.0:
        raise ValueError(f"--heldout-share: expected a number in (0, 1), found {heldout_share}")
    for flag, v in (("--top-m", top_m), ("--min-count", min_count), ("--window", window)):
        if v < 1:
            raise ValueError(f"{flag}: expected an integer >= 1, found {v}")
    limit = bundle.config.get("max_position_embeddings")
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < window:
        raise ValueError(
            f"--window: expected at most {limit} (the model's max_position_embeddings), found {window}"
        )


def profile_bundle(
    bundle_dir: str | Path,
    corpus: Sequence[str | Path],
    *,
    tokens: int | None = DEFAULT_TOKENS,
    heldout_share: float = 0.1,
    window: int = DEFAULT_WINDOW,
    batch: int = DEFAULT_BATCH,
    top_m: int = DEFAULT_TOP_M,
    min_count: int = DEFAULT_MIN_COUNT,
    budgets: Sequence[str] = BUDGETS,
    options: Any = None,
    progress: Progress | None = None,
    files: Sequence[CorpusFile] | None = None,
    probe: bool = True,
    ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """Profile a decoder bundle on ``corpus`` (files / folders, :mod:`.corpus`); returns the
    ``profile.json`` document (not written: see :func:`write_profile`).

    ``tokens``: at most this many tokens (train + held out; None = all). ``window``: tokens per fresh-context
    window the routing is recorded in (at most the model's ``max_position_embeddings``), ``batch`` windows
    per pass. ``progress(stage, done, total)``: stages ``"train"``, ``"heldout"`` (tokens), ``"cache"``.
    ``files``: the corpus already read (:func:`.corpus.read_corpus` of ``corpus``). ``probe``: fit the
    probes of the graph's prediction sites (the ``ResidualPrefetch`` scores, the rows of the stacked gates)
    on the train split (:mod:`.probe`); the document then carries them (``probes``), the ``residual`` and
    ``gates`` recall are the probes', and :func:`write_profile` installs them into the decoder graph.
    ``ids``: profile this token-id stream instead of text (``corpus`` then only names it in the document;
    :func:`.corpus.split_ids`).
    """
    from edgemoe_ort.runtime.generate import load_tokenizer

    bundle = Bundle.open(bundle_dir)
    check_options(
        bundle,
        tokens=tokens,
        heldout_share=heldout_share,
        window=window,
        top_m=top_m,
        min_count=min_count,
        ids=ids is not None,
    )
    identity = manifest_identity(bundle.path)
    if ids is not None:
        split = split_ids(ids, heldout_share=heldout_share, max_tokens=tokens)
    else:
        tok = load_tokenizer(bundle)
        files = read_corpus(corpus) if files is None else files
        split = split_corpus(
            files, tok, heldout_share=heldout_share, max_tokens=tokens, separator=separator_token(bundle)
        )

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    with RoutingRecorder(bundle, options, probes=probe) as rec:
        fitter = ProbeFitter(rec.probe_sites)
        train = rec.record(
            split.train, window=window, batch=batch, progress=stage("train"), on_outputs=fitter.add
        )
        scores = ProbeScores(fitter.sites, fitter.fit())
        heldout = rec.record(
            split.heldout, window=window, batch=batch, progress=stage("heldout"), on_outputs=scores.add
        )
    layers = build_layers(train, bundle.layers, top_m=top_m, min_count=min_count)
    probe_doc = probe_section(fitter, scores, heldout, layers)
    recall, auto = heldout_recall(layers, heldout)
    if progress is not None:
        progress("cache", 0, 1)
    rates = hit_rates(bundle, heldout, [lay["frequency"] for lay in layers], budgets=budgets)
    if progress is not None:
        progress("cache", 1, 1)
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "bundle": {"manifest_xxh3": identity},
        "corpus": {
            "paths": [str(p) for p in corpus],
            "train_tokens": int(train.num_tokens),
            "heldout_tokens": int(heldout.num_tokens),
            "heldout_share": float(heldout_share),
        },
        "top_m": int(top_m),
        "min_count": int(min_count),
        "layers": layers,
        "heldout": {"recall_at": RECALL_AT, "recall": recall, "hit_rates": rates},
        "auto": auto,
        **({"probes": probe_doc} if probe_doc is not None else {}),
    }
