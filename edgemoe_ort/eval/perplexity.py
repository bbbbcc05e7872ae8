"""Perplexity of a bundle on text, measured through the real runtime (torch-free).

Everything the runtime does to the computation is in the measurement: the expert store under its budget,
the cache policy, prefetching, and the routing rule of ``CacheAwareTopK`` (which may choose other experts
than the router's own top-k). The token stream is cut into consecutive windows of ``window`` tokens, each a
fresh context; in a window, token ``t`` is scored with the logits after tokens ``0..t-1``.

Two ways to run a window:

* ``decode`` (default): one token per pass with the KV cache, as generation runs. Each token is routed with
  the cache as the previous tokens left it, so a cache-aware routing rule acts as it would in generation.
* ``prefill``: the whole window in one pass (faster; every token of a window sees the same cache state).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["MODES", "EvalResult", "cache_summary", "evaluate"]

MODES = ("decode", "prefill")
#: default tokens per fresh-context window
DEFAULT_WINDOW = 128


@dataclass
class EvalResult:
    """What :func:`evaluate` measured."""

    perplexity: float  #: exp(mean negative log-likelihood) over the scored tokens
    tokens: int  #: tokens scored (each window's first token is not: nothing precedes it)
    nll: float  #: mean negative log-likelihood, nats per token
    windows: int
    window: int
    mode: str
    seconds: float
    tokens_run: int  #: tokens passed through the model (decode: the scored ones; prefill: whole windows)
    cache: dict[str, Any] = field(default_factory=dict)  #: :func:`cache_summary` of the store's counters

    @property
    def tokens_per_s(self) -> float:
        """Tokens run per second."""
        return self.tokens_run / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{perplexity, tokens, nll, windows, window, mode, seconds, tokens_run, tokens_per_s,
        cache}``."""
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d


def cache_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The store counters a quality measurement is read with: hits, misses, hit rate, reads, bytes, stalls,
    the routing counters (``selections``, ``changed``, ``misses_avoided``, ``rule``), the prefetch summary,
    the uses by precision (``high``, ``low``, ``skipped``) and the miss-precision rule in effect."""
    hits, misses = int(stats.get("hits", 0)), int(stats.get("misses", 0))
    return {
        "budget_bytes": stats.get("budget_bytes"),
        "policy": stats.get("policy"),
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "reads": stats.get("reads", 0),
        "bytes_read": stats.get("bytes_read", 0),
        "stall_s": stats.get("stall_s", 0.0),
        "routing": stats.get("routing", {}),
        "prefetch": stats.get("prefetch", {}),
        "uses": stats.get("uses", {}),
        "miss_precision": stats.get("miss_precision", {}),
    }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def evaluate(
    model: Any,
    token_ids: np.ndarray | list[int],
    *,
    window: int = DEFAULT_WINDOW,
    mode: str = "decode",
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Perplexity of ``model`` (a :class:`~edgemoe_ort.runtime.generate.MoEModel`) on ``token_ids``.

    ``window``: tokens per fresh context (at least 2; the last window may be shorter, and a final window of
    one token is dropped). ``mode``: see the module docstring. ``progress(done, total)`` gets token counts.
    The ``cache`` field holds the store's counters over this call (the session's own since it opened, so
    pass a freshly loaded model to measure one setting).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, found {mode!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window: expected an int >= 2, found {window!r}")
    ids = np.asarray(token_ids, dtype=np.int64).ravel()
    n = int(ids.shape[0])
    spans = [(s, min(s + window, n)) for s in range(0, n, window)]
    spans = [(a, b) for a, b in spans if b - a >= 2]
    if not spans:
        raise ValueError(f"token_ids: expected at least 2 tokens to score one, found {n}")
    total_nll, scored, run, done = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    for a, b in spans:
        win = ids[a:b]
        if mode == "prefill":
            logits, _ = model.forward(win[None, :])
            lp = _log_softmax(logits[0, :-1])
            total_nll -= float(lp[np.arange(len(win) - 1), win[1:]].sum())
            run += len(win)
        else:
            past = None
            for t in range(len(win) - 1):
                logits, past = model.forward(win[None, t : t + 1], past)
                total_nll -= float(_log_softmax(logits[0, -1])[win[t + 1]])
            run += len(win) - 1  # the last token is only a target
        scored += len(win) - 1
        done += len(win)
        if progress is not None:
            progress(done, n)
    seconds = time.perf_counter() - t0
    mean = total_nll / scored
    return EvalResult(
        perplexity=math.exp(mean),
        tokens=scored,
        nll=mean,
        windows=len(spans),
        window=window,
        mode=mode,
        seconds=seconds,
        tokens_run=run,
        cache=cache_summary(model.session.stats()),
    )
