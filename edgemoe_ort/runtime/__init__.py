"""Device-side runtime: the OffloadedExpert op wrapper (:mod:`.ops`), text generation (:mod:`.generate`)."""

from __future__ import annotations

from typing import Any

from .ops import (
    ExpertSession,
    RuntimeOptions,
    kernel_path,
    library_path,
    make_session_options,
    open_session,
    parse_budget,
    reset_store_stats,
    store_stats,
)

__all__ = [
    "ExpertSession",
    "RuntimeOptions",
    "kernel_path",
    "library_path",
    "make_session_options",
    "open_session",
    "parse_budget",
    "reset_store_stats",
    "store_stats",
    "MoEModel",
    "Seq2SeqMoEModel",
    "load_model",
]


def __getattr__(name: str) -> Any:  # generation is imported lazily (it pulls in the tokenizer stack)
    if name in ("MoEModel", "Seq2SeqMoEModel", "load_model", "GenerationStats", "GenerationResult",
                "GenerationError"):
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
