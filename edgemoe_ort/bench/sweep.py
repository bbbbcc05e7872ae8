"""One fresh session per setting over the same held-out tokens (the routing and twins sweeps' common loop)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["evaluate_settings"]


def evaluate_settings(
    bundle: str | Path,
    token_ids: Any,
    settings: list[str],
    options_of: Callable[[str], Any],
    *,
    window: int = 128,
) -> Iterator[tuple[str, Any, float]]:
    """``(setting, EvalResult, seconds)`` per setting, ``exact`` first (added if missing): ``token_ids``
    scored in decode mode (one token per pass through the KV cache, windows of ``window``) by
    :func:`edgemoe_ort.eval.evaluate` in a fresh session of ``options_of(setting)`` (a RuntimeOptions)."""
    from edgemoe_ort.eval import evaluate
    from edgemoe_ort.runtime.generate import MoEModel

    settings = list(settings)
    if "exact" not in settings:
        settings.insert(0, "exact")
    for spec in settings:
        t0 = time.perf_counter()
        with MoEModel.load(bundle, options_of(spec)) as model:
            r = evaluate(model, token_ids, window=window, mode="decode")
        yield spec, r, time.perf_counter() - t0
