"""``plan_model``: the planner end to end — calibration tokens, uniform levels, ranking, search, the plan.

Calibration tokens: the **train** split of the corpus as edgemoe-profile splits it
(edgemoe_ort/profile/corpus.py: whole files by path hash, or the head of a single file), so
``edgemoe-eval --corpus`` with the same corpus (its default ``--split heldout``) scores text the planner
never saw. At most ``tokens`` of it, cut into windows of ``window`` tokens (fresh contexts).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe_ort.plan.format import METHODS, Plan, parse_bits, record_length
from edgemoe_ort.quant import BITS

__all__ = ["DEFAULT_TOKENS", "DEFAULT_WINDOW", "calibration_tokens", "plan_model", "store_bytes"]

#: default calibration tokens
DEFAULT_TOKENS = 8192
#: default tokens per window (capped at the model's context)
DEFAULT_WINDOW = 256

Progress = Callable[[str, int, int], None]


def passive_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless set, if torch is not imported yet: torch's OpenMP threads otherwise
    spin while they wait, and on a machine busy with other work (2 cores, load average 5) a calibration pass
    of the default model took 28.6 s with 2 threads, 2.9 s with passive waiting."""
    import os
    import sys

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def store_bytes(plan_layers: Sequence[Any], dtypes: dict[tuple[int, int], str], group_size: int) -> int:
    """Bytes of the expert store a bundle of these dtypes has."""
    return sum(record_length(lay, dtypes[(lay.layer, e)], group_size, lay.bias)
               for lay in plan_layers for e in range(lay.num_experts))


def calibration_tokens(corpus: Sequence[str | Path], tokenizer: Any, *, tokens: int, heldout_share: float,
                       separator: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The calibration token stream (the corpus's train split, at most ``tokens``) and its description."""
    from edgemoe_ort.profile.corpus import read_corpus, split_corpus

    files = read_corpus(corpus)
    cap = None if len(files) == 1 else math.ceil(tokens / (1 - heldout_share)) + 2
    split = split_corpus(files, tokenizer, heldout_share=heldout_share, max_tokens=cap, separator=separator)
    ids = split.train[:tokens]
    return ids, {"corpus": [str(p) for p in corpus], "split": "train", "heldout_share": heldout_share,
                 "files": len(split.train_files), "tokens": int(len(ids)),
                 "tokens_sha256": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()}


def _windows(ids: np.ndarray, window: int) -> np.ndarray:
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"--tokens: the calibration text has {len(ids)} tokens, expected at least one "
                         f"window of {window} (--window)")
    return ids[: n * window].reshape(n, window)


def plan_model(
    source: Any,
    *,
    tolerance: float,
    corpus: Sequence[str | Path] | None = None,
    token_ids: np.ndarray | None = None,
    bits: str | Sequence[str] | None = None,
    group_size: int = 64,
    tokens: int = DEFAULT_TOKENS,
    window: int = DEFAULT_WINDOW,
    heldout_share: float = 0.1,
    method: str = "loss",
    progress: Progress | None = None,
) -> Plan:
    """Plan the expert dtypes of checkpoint ``source`` (a folder, a hub id or a checked
    :class:`~edgemoe_ort.hub.ModelSource`) to ``tolerance`` (0.01 = 1% calibration perplexity over the
    uniform highest-offered model). Text from ``corpus`` (its train split; the model's tokenizer.json), or
    ``token_ids`` as given. ``bits``: "2,3,4,8", a list of dtypes, or None (every quantized format)."""
    from edgemoe_ort.hub import check_source, hub_offline

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    passive_openmp()

    def tick(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    levels = parse_bits(bits) if bits is None or isinstance(bits, str) else parse_bits(",".join(bits))
    if method not in METHODS:
        raise ValueError(f"--method: expected one of {', '.join(METHODS)}, found {method!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"--group-size: expected an integer >= 1, found {group_size!r}")
    if window < 2:
        raise ValueError(f"--window: expected an integer >= 2, found {window}")
    if (corpus is None) == (token_ids is None):
        raise ValueError("plan_model: give corpus or token_ids")
    src = check_source(source)
    with hub_offline(src.offline):
        return _plan(src.name, levels=levels, tolerance=tolerance, corpus=corpus, token_ids=token_ids,
                     group_size=group_size, tokens=tokens, window=window, heldout_share=heldout_share,
                     method=method, tick=tick, t0=t0, seconds=seconds)


def _plan(name: str, *, levels: list[str], tolerance: float, corpus: Sequence[str | Path] | None,
          token_ids: np.ndarray | None, group_size: int, tokens: int, window: int, heldout_share: float,
          method: str, tick: Progress, t0: float, seconds: dict[str, float]) -> Plan:
    from edgemoe_ort.export.load import _checkpoint_file, checkpoint_config, load_model
    from edgemoe_ort.plan.evaluate import Calibrator
    from edgemoe_ort.plan.rank import loss_scores, order, overlap, proxy_scores, spearman
    from edgemoe_ort.plan.search import bracket, search

    config = checkpoint_config(name)
    from edgemoe_ort.export.recipes import load_recipe

    if load_recipe(str(config.get("model_type"))).architecture == "encoder_decoder":  # before any load
        raise ValueError(f"{name}: an encoder-decoder model ({config.get('model_type')}); edgemoe-plan "
                         "measures decoder-only models (perplexity of a text continuation)")
    context = config.get("max_position_embeddings")
    if isinstance(context, int) and not isinstance(context, bool) and context >= 2:
        window = min(window, context)
    if token_ids is None:
        tok_file = _checkpoint_file(name, "tokenizer.json")
        if tok_file is None:
            raise ValueError(f"{name}: no tokenizer.json; edgemoe-plan reads text with the model's tokenizer")
        from tokenizers import Tokenizer

        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        sep = eos if isinstance(eos, int) and not isinstance(eos, bool) else None
        assert corpus is not None
        ids, calib = calibration_tokens(corpus, Tokenizer.from_file(str(tok_file)), tokens=tokens,
                                        heldout_share=heldout_share, separator=sep)
    else:
        ids = np.asarray(token_ids, dtype=np.int64).ravel()[:tokens]
        calib = {"corpus": [], "split": "given token ids", "tokens": int(len(ids)),
                 "tokens_sha256": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()}
    windows = _windows(ids, window)
    calib.update(window=window, windows=int(windows.shape[0]), scored_tokens=int(windows.size - len(windows)))

    tick("load", 0, 1)
    loaded = load_model(name, stream=False)
    cal = Calibrator(loaded, windows, group_size=group_size)
    seconds["load"] = time.perf_counter() - t0
    tick("load", 1, 1)
    try:
        t = time.perf_counter()
        uniform: dict[str, float] = {}
        for i, d in enumerate(levels):
            uniform[d] = cal.perplexity(cal.uniform(d))
            tick("uniform", i + 1, len(levels))
        seconds["uniform"] = time.perf_counter() - t
        ref = uniform[levels[0]]
        h = bracket(levels, uniform, tolerance)
        high, lowest = levels[h], levels[-1]
        loss: dict[tuple[int, int], float] | None = None
        proxy: dict[tuple[int, int], float] | None = None
        ranking = None
        if h < len(levels) - 1:
            t = time.perf_counter()
            tick("proxy", 0, 1)
            proxy = proxy_scores(cal, high, lowest)
            tick("proxy", 1, 1)
            seconds["proxy"] = time.perf_counter() - t
            if method == "loss":
                t = time.perf_counter()
                loss = loss_scores(cal, high, lowest, lambda d, n: tick("rank", d, n))
                seconds["rank"] = time.perf_counter() - t
            ranking = order(loss if loss is not None else proxy)
        t = time.perf_counter()
        result = search(cal.keys, levels, uniform, ranking, tolerance, cal.perplexity,
                        lambda d, n: tick("search", d, n))
        seconds["search"] = time.perf_counter() - t
        layers = cal.layers
        digests = dict(cal.digests)
        passes = cal.passes
        family = loaded.model.config.model_type
    finally:
        cal.close()
    seconds["total"] = time.perf_counter() - t0

    scores: dict[tuple[int, int], dict[str, float]] = {}
    for key in digests:
        s: dict[str, float] = {}
        if loss is not None:
            s["loss"] = loss[key]
        if proxy is not None:
            s["proxy"] = proxy[key]
        if s:
            scores[key] = s
    k_low = result.levels[0]["k"] if result.levels else 0
    compare: dict[str, Any] = {"spearman": None, "low_set_overlap": None}
    if loss is not None and proxy is not None:
        compare = {"spearman": spearman(loss, proxy), "low_set_overlap": overlap(loss, proxy, k_low)}
    uniform_bytes = {d: store_bytes(layers, dict.fromkeys(digests, d), group_size) for d in levels}
    planned = store_bytes(layers, result.dtypes, group_size)
    counts: dict[str, int] = {}
    for d in sorted(set(result.dtypes.values()), key=lambda d: -BITS[d]):
        counts[d] = sum(1 for v in result.dtypes.values() if v == d)
    return Plan(
        family=family, config=config, layers=layers, group_size=group_size, tolerance=tolerance,
        offered=levels, reference={"dtype": levels[0], "perplexity": ref,
                                   "what": "the uniform model at the highest offered bits"},
        method=method, dtypes=result.dtypes, digests=digests, source=name, calibration=calib,
        search={
            "uniform": [{"dtype": d, "perplexity": uniform[d], "degradation": uniform[d] / ref - 1}
                        for d in levels],
            "high": result.high, "low": result.low, "ranking_dtype": lowest if ranking else None,
            "levels": result.levels, "proxy_vs_loss": compare, "passes": passes,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        },
        result={"perplexity": result.perplexity, "degradation": result.degradation, "store_bytes": planned,
                "uniform_store_bytes": uniform_bytes, "counts": counts},
        scores=scores,
    )
