"""Device-side text generation over a bundle: tokenizer, KV cache, greedy/sampling, streaming, stats.

Imports neither torch nor transformers: this is what runs on the device.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe_ort.bundle import Bundle
from edgemoe_ort.bundle.format import model_graph_roles
from edgemoe_ort.runtime.kvcache import KVRunner, KVState, kv_layout, layer_groups
from edgemoe_ort.runtime.ops import (
    ExpertSession,
    RuntimeOptions,
    make_session_options,
    open_session,
    release_free_heap,
)
from edgemoe_ort.runtime.tokenizer import open_tokenizer, tokenizer_backend

log = logging.getLogger(__name__)


def decoder_feeds(
    input_ids: np.ndarray, past: Mapping[str, np.ndarray], input_names: Any, *, past_len: int | None = None
) -> dict[str, np.ndarray]:
    """The feeds of one decoder pass of ``input_ids [B, S]`` after ``past`` (the KV cache, possibly empty):
    ``attention_mask`` of ones and ``position_ids`` from the past length (``past_len``, else read from
    ``past``), where the graph has them."""
    batch, seq = input_ids.shape
    if past_len is None:
        past_len = next(iter(past.values())).shape[2] if past else 0
    feeds: dict[str, np.ndarray] = {"input_ids": input_ids}
    if "attention_mask" in input_names:
        feeds["attention_mask"] = np.ones((batch, past_len + seq), np.int64)
    if "position_ids" in input_names:
        feeds["position_ids"] = np.broadcast_to(
            np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)
        ).copy()
    feeds.update(past)
    return feeds


class GenerationError(ValueError):
    """A request the loaded bundle cannot serve: a bad prompt (empty, longer than the context), a bad
    sampling parameter (the message starts with its name), a bundle or options the runtime cannot load."""


#: why a generation stopped (:attr:`GenerationResult.stop_reason`)
STOP_REASONS = ("eos", "stop_string", "max_new_tokens", "context", "interrupted")


def check_generation_args(
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | str = (),
) -> tuple[str, ...]:
    """Check the sampling parameters of :meth:`MoEModel.generate` (one :class:`GenerationError` naming the
    parameter, expected vs found) and return ``stop`` as a tuple of strings."""

    def is_int(v: object) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_real(v: object) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens: expected an integer >= 1, found {max_new_tokens!r}")
    if not is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(
            f"temperature: expected a finite number >= 0 (0 = greedy), found {temperature!r}"
        )
    if not is_real(top_p) or not 0.0 < top_p <= 1.0:  # NaN fails the comparison
        raise GenerationError(f"top_p: expected a number in (0, 1], found {top_p!r}")
    if not is_int(top_k) or top_k < 0:
        raise GenerationError(f"top_k: expected an integer >= 0 (0 = all tokens), found {top_k!r}")
    if not is_real(repetition_penalty) or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise GenerationError(
            f"repetition_penalty: expected a finite number > 0 (1 = none), found {repetition_penalty!r}"
        )
    if seed is not None and (not is_int(seed) or seed < 0):
        raise GenerationError(f"seed: expected None or an integer >= 0, found {seed!r}")
    stops = (stop,) if isinstance(stop, str) else stop
    try:
        stops = tuple(stops)
    except TypeError:
        raise GenerationError(f"stop: expected a string or a list of strings, found {stop!r}") from None
    bad = [x for x in stops if not isinstance(x, str) or not x]
    if bad:
        raise GenerationError(f"stop: expected non-empty strings, found {bad[0]!r}")
    return stops


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    peak_rss_bytes: int = 0
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first generated token comes out of the prefill step; decode steps produce the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "ttft_s": self.ttft_s,
            "peak_rss_bytes": self.peak_rss_bytes,
            "cache": self.cache,
        }


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    stats: GenerationStats
    #: "eos", "stop_string", "max_new_tokens", "context" (the model's context is full) or "interrupted"
    #: (KeyboardInterrupt: the result holds what was generated until then)
    stop_reason: str


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: ``VmHWM`` of /proc/self/status (``ru_maxrss`` is carried
    over from the parent across fork + exec, so a child of a large process would report the parent's peak);
    ``ru_maxrss`` where /proc is absent."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max()
    e = np.exp(z)
    return e / e.sum()


def sample_next(
    logits: np.ndarray,
    *,
    temperature: float,
    top_p: float,
    rng: np.random.Generator,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seen: Sequence[int] | np.ndarray = (),
) -> int:
    """Pick the next token from one row of logits: greedy when temperature == 0, else sampling from the
    ``top_k`` most likely tokens (0 = all) within nucleus ``top_p``. ``repetition_penalty`` > 1 makes the
    tokens in ``seen`` less likely (CTRL's rule, as transformers: a positive logit is divided by it, a
    negative one multiplied)."""
    if repetition_penalty != 1.0 and len(seen):
        logits = logits.astype(np.float64, copy=True)
        idx = np.unique(np.asarray(seen, dtype=np.int64))
        idx = idx[(idx >= 0) & (idx < logits.shape[0])]
        v = logits[idx]
        logits[idx] = np.where(v > 0, v / repetition_penalty, v * repetition_penalty)
    if temperature <= 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.shape[0]:
        kth = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = _softmax(scaled)
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.shape[0], p=probs))


def _past_specs(session: Any, graph: Path) -> list[tuple[str, int, int]]:
    """(name, kv_heads, head_dim) of every ``past_key_values.*`` input, in layer order."""
    specs = []
    for spec in session.get_inputs():
        if not spec.name.startswith("past_key_values."):
            continue
        shape = spec.shape  # [batch, kv_heads, past_len, head_dim]
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise GenerationError(
                f"{graph}: input {spec.name} should be [batch, kv_heads, past, head_dim] with static"
                f" kv_heads/head_dim, found {shape}"
            )
        specs.append((spec.name, shape[1], shape[3]))
    return specs


def _require(session: Any, graph: Path, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    have_in = [i.name for i in session.get_inputs()]
    have_out = [o.name for o in session.get_outputs()]
    if not set(inputs) <= set(have_in) or not set(outputs) <= set(have_out):
        raise GenerationError(
            f"{graph}: expected inputs {list(inputs)} and outputs {list(outputs)},"
            f" found inputs {have_in} and outputs {have_out}"
        )


class _Generator:
    """Tokenization, sampling, streaming and stats shared by decoder-only and encoder-decoder bundles.

    Subclasses implement ``_start(prompt_ids) -> (logits of the next token, state)`` and
    ``_step(token, state) -> (logits of the next token, state)``.
    """

    def __init__(self, bundle: Bundle, session: ExpertSession, tokenizer: Any | None) -> None:
        self.bundle = bundle
        self.tokenizer = tokenizer
        #: which engine tokenizes: "tokenizers", "ortx" (the bundle's tokenizer graphs in ORT) or None
        self.tokenizer_backend = tokenizer_backend(tokenizer)
        # All sessions of one model share one expert store (one registration): one budget, one set of
        # stats, read through this session.
        self.session = session
        self.eos_token_ids = self._eos_ids()
        #: the longest sequence (prompt + generated tokens) the model takes, from its config; None: no limit
        #: (relative-position models)
        self.context_length: int | None = None
        self._closed = False

    # -- lifetime ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the ONNX Runtime sessions and the expert cache (statistics stay readable through
        :func:`~edgemoe_ort.runtime.store_stats`). Further calls raise :class:`GenerationError`; closing
        twice is fine."""
        if self._closed:
            return
        self._closed = True
        for name in ("session", "encoder", "decoder"):
            if hasattr(self, name):
                setattr(self, name, None)
        release_free_heap()

    def __enter__(self) -> _Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._closed:
            raise GenerationError(f"{self.bundle.path}: the model is closed")

    def _start(self, prompt_ids: list[int]) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def _step(self, token: int, state: Any) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    # -- tokenization --------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = self.bundle.config.get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        if self.tokenizer is None:
            raise GenerationError(
                f"{self.bundle.path}: the bundle has no tokenizer; pass token ids instead "
                "(a list of ints; edgemoe-run --ids 1,2,3)"
            )
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def prompt_ids(self, prompt: str | Sequence[int], *, check_context: bool = True) -> list[int]:
        """The prompt as token ids, checked: not empty, ids within the vocabulary, shorter than the context
        (:attr:`context_length`, unless ``check_context`` is False): one :class:`GenerationError` saying
        both numbers otherwise."""
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise GenerationError(
                    f"prompt: expected a string or a sequence of token ids, found {prompt!r:.80}"
                ) from None
        if not ids:
            raise GenerationError("the prompt is empty (no tokens)")
        vocab = self.vocab_size
        bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise GenerationError(
                f"prompt: token id {bad[0]} is outside the vocabulary (expected 0..{(vocab or 1) - 1})"
            )
        ctx = self.context_length
        if check_context and ctx is not None and len(ids) >= ctx:
            raise GenerationError(
                f"the prompt is {len(ids)} tokens, but the model's context is {ctx} tokens (at most "
                f"{ctx - 1} leave room for a new token)"
            )
        return ids

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary size from the model's config, or None."""
        v = self.bundle.config.get("vocab_size")
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- generation ------------------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
        result: list[GenerationResult] | None = None,
    ) -> Iterator[str]:
        """Generate from ``prompt`` (text, or token ids), yielding the text of each new token as it comes.

        Stops at an end-of-sequence token (``stop_reason`` "eos"), at the first of the ``stop`` strings
        ("stop_string": the text is cut before it), after ``max_new_tokens`` tokens ("max_new_tokens"), or
        when prompt + generated tokens fill the model's context ("context", :attr:`context_length`). On a
        KeyboardInterrupt the result so far ("interrupted") is appended to ``result`` before it propagates.
        ``temperature`` 0 is greedy; otherwise sampling from the ``top_k`` most likely tokens (0 = all) within
        nucleus ``top_p``, with ``seed`` for repeatable draws; ``repetition_penalty`` > 1 discourages tokens
        already in the prompt or the output. The final :class:`GenerationResult` (text, tokens, stats,
        stop_reason) is appended to ``result`` if given. Raises :class:`GenerationError`, naming the
        parameter, for bad arguments and for a prompt that is empty or does not fit the context, before
        anything runs."""
        stops = check_generation_args(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop,
        )
        self._require_open()
        prompt_ids = self.prompt_ids(prompt)
        yield from self._decode_loop(
            prompt_ids, lambda: self._start(prompt_ids), max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
            seed=seed, stops=stops, result=result,
        )

    def _decode_loop(
        self,
        feed_ids: list[int],
        start: Callable[[], tuple[np.ndarray, Any]],
        *,
        history: Sequence[int] = (),
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        repetition_penalty: float,
        seed: int | None,
        stops: tuple[str, ...],
        result: list[GenerationResult] | None,
        track: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """The generation loop of :meth:`stream` after ``history`` (token ids already in the model's state):
        ``start()`` passes ``feed_ids`` through the model and returns (the next token's logits, state).
        ``track``, if given, holds the latest ``state`` and ``fed``, how many of the generated tokens that
        state has seen (the others were sampled but not yet passed through the model)."""
        context_ids = [*history, *feed_ids]
        rng = np.random.default_rng(seed)
        room = max_new_tokens
        if self.context_length is not None:
            room = min(max_new_tokens, self.context_length - len(context_ids))

        def pick(logits: np.ndarray, history: list[int]) -> int:
            return sample_next(logits, temperature=temperature, top_p=top_p, rng=rng, top_k=top_k,
                               repetition_penalty=repetition_penalty,
                               seen=context_ids + history if repetition_penalty != 1.0 else ())

        stats = GenerationStats(prompt_tokens=len(feed_ids))
        if room < 1:  # the context is full before this call (a chat's earlier turns filled it)
            stats.peak_rss_bytes = peak_rss_bytes()
            if result is not None:
                result.append(GenerationResult("", [], stats, "context"))
            return
        self.session.begin_call_stats()
        t0 = t1 = time.perf_counter()
        tokens: list[int] = []
        text_so_far = ""
        stop_reason = "max_new_tokens"
        interrupted: KeyboardInterrupt | None = None
        try:
            logits, state = start()
            if track is not None:
                track.update(state=state, fed=0)
            token = pick(logits, tokens)
            t1 = time.perf_counter()
            stats.prefill_s = stats.ttft_s = t1 - t0
            while True:
                if token in self.eos_token_ids:
                    stop_reason = "eos"
                    break
                tokens.append(token)
                text = self.decode(tokens)
                piece, text_so_far = text[len(text_so_far) :], text
                hit = next((x for x in stops if x in text_so_far), None)
                if hit is not None:
                    cut = text_so_far.index(hit)
                    if cut > len(text_so_far) - len(piece):
                        yield piece[: cut - (len(text_so_far) - len(piece))]
                    text_so_far = text_so_far[:cut]
                    stop_reason = "stop_string"
                    break
                if piece:
                    yield piece
                if len(tokens) >= room:
                    stop_reason = "max_new_tokens" if len(tokens) >= max_new_tokens else "context"
                    break
                logits, state = self._step(token, state)
                if track is not None:
                    track.update(state=state, fed=len(tokens))
                token = pick(logits, tokens)
        except KeyboardInterrupt as exc:
            stop_reason, interrupted = "interrupted", exc
            if not stats.prefill_s:
                t1 = time.perf_counter()
                stats.prefill_s = stats.ttft_s = t1 - t0
        stats.decode_s = time.perf_counter() - t1
        stats.generated_tokens = len(tokens)
        stats.peak_rss_bytes = peak_rss_bytes()
        stats.cache = self.session.call_stats()
        if result is not None:
            result.append(GenerationResult(text_so_far, tokens, stats, stop_reason))
        if interrupted is not None:
            raise interrupted

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate from ``prompt`` (text, or token ids) and return a :class:`GenerationResult`: the text,
        the token ids, :class:`GenerationStats` (prefill/decode tokens per second, TTFT, peak RSS, the expert
        cache's counters) and why it stopped. The arguments are those of :meth:`stream`; ``on_text`` is
        called with each piece of text as it is generated.

        >>> model.generate("def fib(n):", max_new_tokens=32).text
        >>> model.generate("import ", temperature=0.8, top_k=40, top_p=0.95, seed=1, stop=["\\n\\n"])
        """
        out: list[GenerationResult] = []
        for piece in self.stream(
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            result=out,
        ):
            if on_text is not None:
                on_text(piece)
        return out[0]


def _check_options(options: object) -> RuntimeOptions:
    if options is None:
        return RuntimeOptions()
    if not isinstance(options, RuntimeOptions):
        raise GenerationError(
            f"options: expected a RuntimeOptions (e.g. RuntimeOptions(budget='25%')), found "
            f"{type(options).__name__} {options!r:.60}"
        )
    try:
        options.validate()
    except ValueError as exc:
        raise GenerationError(str(exc)) from None
    return options


def _check_budget(bundle: Bundle, options: RuntimeOptions) -> None:
    """The budget against the bundle, before any session exists: the store would refuse one below the
    largest expert (as an ORT RUNTIME_EXCEPTION); this says it in our words."""
    from .memory import minimum_budget
    from .ops import parse_budget

    if options.budget is None:
        return
    budget = parse_budget(options.budget, bundle.store_bytes, bundle.primary_bytes)
    floor = minimum_budget(bundle)
    if budget < floor:
        big = max(bundle.manifest["experts"], key=lambda r: int(r["length"]))
        raise GenerationError(
            f"budget: {options.budget!r} is {budget} bytes, below the largest expert (layer {big['layer']} "
            f"expert {big['expert']}: {floor} bytes = {floor / 1024:.1f} KiB), the smallest budget "
            f"{bundle.path.name} accepts"
        )


_LAYOUTS: dict[tuple[str, int, int], str | None] = {}


def _kv_layout(graph: Path, groups: list[list[tuple[str, int, int]]]) -> str | None:
    """:func:`~edgemoe_ort.runtime.kvcache.kv_layout`, once per graph file (path, size, mtime)."""
    try:
        st = graph.stat()
    except OSError:
        return None
    key = (str(graph.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = kv_layout(graph, groups)
    return _LAYOUTS[key]


def _open_graph(path: Path, make: Callable[[], Any]) -> Any:
    """Create a session for ``path``; an unreadable graph file is a :class:`GenerationError` naming it."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    try:
        return make()
    except (ort_state.InvalidProtobuf, ort_state.InvalidGraph) as exc:
        kind = "truncated or corrupt" if isinstance(exc, ort_state.InvalidProtobuf) else "an invalid graph"
        raise GenerationError(
            f"{path}: not a valid ONNX model ({kind}); export the bundle again"
        ) from None


class MoEModel(_Generator):
    """A decoder-only bundle loaded for generation. Close it (or use it as a context manager) to free its
    sessions and expert cache at once.

    >>> with MoEModel.load("bundles/tiny", RuntimeOptions(budget="25%")) as model:
    ...     result = model.generate("def fib(n):", max_new_tokens=32)
    """

    def __init__(self, bundle: Bundle, session: ExpertSession, tokenizer: Any | None) -> None:
        super().__init__(bundle, session, tokenizer)
        graph = bundle.graph_path("decoder")
        _require(session, graph, ["input_ids"], ["logits"])
        self._input_names = [i.name for i in session.get_inputs()]
        self._output_names = [o.name for o in session.get_outputs()]
        self._past_specs = _past_specs(session, graph)
        from .memory import config_context

        self.context_length = config_context(bundle)
        #: runs the steps with the KV cache held once (:mod:`.kvcache`); None: plain ``session.run``
        self._kv: KVRunner | None = None
        runs = Path(getattr(session, "graph_path", None) or graph)  # the graph the session runs
        layout = _kv_layout(runs, layer_groups(self._past_specs)) if self._past_specs else None
        if layout is not None and hasattr(session, "io_binding"):
            self._kv = KVRunner(session, self._past_specs, self._output_names, ordered=layout == "ordered",
                                capacity=self.context_length)

    @classmethod
    def load(
        cls, bundle_dir: str | Path, options: RuntimeOptions | None = None, *, tokenizer: str = "auto"
    ) -> MoEModel:
        """Open the decoder-only bundle at ``bundle_dir`` with ``options`` (budget, cache policy, I/O mode,
        prefetching, threads: :class:`RuntimeOptions`; default: the whole store in cache, direct I/O).
        ``tokenizer``: ``"auto"``, ``"tokenizers"`` or ``"ortx"`` (the bundle's tokenizer graphs in ORT),
        see :func:`load_tokenizer`.

        Raises :class:`GenerationError` for options of the wrong type, a budget below the largest expert,
        an encoder-decoder bundle (use :func:`load_model`) or a graph file that is not valid ONNX, and
        :class:`~edgemoe_ort.bundle.BundleError` for a missing or malformed bundle, each naming the file or
        the option."""
        options = _check_options(options)
        bundle = Bundle.open(bundle_dir)
        roles = model_graph_roles(bundle.manifest.get("graphs", {}))
        if roles != ["decoder"]:
            raise GenerationError(
                f"{bundle.path / 'manifest.json'}: graphs {roles}:"
                " MoEModel serves decoder-only bundles (graphs: decoder); use load_model() for any bundle"
            )
        _check_budget(bundle, options)
        tok = load_tokenizer(bundle, tokenizer)
        graph = bundle.graph_path("decoder")
        session = _open_graph(graph, lambda: open_session(graph, bundle.path, options))
        return cls(bundle, session, tok)

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, heads, 0, dim), np.float32) for name, heads, dim in self._past_specs}

    def forward(
        self, input_ids: np.ndarray, past: Mapping[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        """One step: logits [B, S, V] for input_ids [B, S] after ``past`` (None: an empty cache); returns the
        logits and the new past, a :class:`~edgemoe_ort.runtime.kvcache.KVState` (``past_key_values.* ->
        [B, kv_heads, length, head_dim]``, read-only). Passing that state as ``past`` consumes it: the step
        writes the new cache into its buffers, so each state can be passed on once (``state.copy()`` keeps
        one); a dict of arrays is read as given."""
        self._require_open()
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise GenerationError(f"input_ids must be [batch, seq], found shape {input_ids.shape}")
        if self._kv is not None:
            if isinstance(past, KVState):
                n = past.length
            else:
                n = next(iter(past.values())).shape[2] if past else 0
            out, state = self._kv.run(decoder_feeds(input_ids, {}, self._input_names, past_len=n), past)
            return out["logits"], state
        past = past if past is not None else self._empty_past(input_ids.shape[0])
        feeds = decoder_feeds(input_ids, past, self._input_names)
        outputs = self.session.run(None, feeds)
        named = dict(zip(self._output_names, outputs, strict=True))
        present = {
            name: named[name.replace("past_key_values.", "present.")] for name, _, _ in self._past_specs
        }
        return named["logits"], present

    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        """Logits [S, V] of one sequence in a single pass (used for perplexity)."""
        out, _ = self.forward(np.asarray([list(input_ids)], dtype=np.int64))
        return out[0]

    def _start(self, prompt_ids: list[int]) -> tuple[np.ndarray, Any]:
        logits, past = self.forward(np.asarray([prompt_ids], dtype=np.int64))
        return logits[0, -1], past

    def chat(self, *, template: bool = True) -> ChatSession:
        """A conversation that keeps the KV cache across turns (:class:`ChatSession`). ``template``: format
        the turns with the tokenizer's chat template when the bundle has one (and jinja2 is installed);
        False, or without one: the turns are plain text, joined as given.

        >>> chat = model.chat()
        >>> print("".join(chat.send("def fib(n):", max_new_tokens=32)))
        """
        self._require_open()
        return ChatSession(self, template=_chat_template(self.bundle) if template else None)

    def _step(self, token: int, state: Any) -> tuple[np.ndarray, Any]:
        logits, past = self.forward(np.asarray([[token]], dtype=np.int64), state)
        return logits[0, -1], past


class Seq2SeqMoEModel(_Generator):
    """An encoder-decoder bundle (SwitchTransformers): the prompt is encoded once, then the decoder
    generates from ``decoder_start_token_id`` with its self-attention cache. Both graphs share one expert
    store, so the budget covers encoder and decoder experts together."""

    def __init__(
        self, bundle: Bundle, encoder: ExpertSession, decoder: ExpertSession, tokenizer: Any | None
    ) -> None:
        super().__init__(bundle, decoder, tokenizer)
        self.encoder, self.decoder = encoder, decoder
        enc_graph = bundle.graph_path("encoder")
        _require(encoder, enc_graph, ["input_ids", "attention_mask"], ["last_hidden_state"])
        dec_graph = bundle.graph_path("decoder")
        _require(decoder, dec_graph, ["input_ids", "encoder_attention_mask", "encoder_hidden_states"],
                 ["logits"])
        self._output_names = [o.name for o in decoder.get_outputs()]
        self._past_specs = _past_specs(decoder, dec_graph)
        start = bundle.config.get("decoder_start_token_id", bundle.config.get("pad_token_id"))
        if not isinstance(start, int):
            raise GenerationError(
                f"{bundle.path / 'manifest.json'}: model.config.decoder_start_token_id: expected an int,"
                f" found {start!r}"
            )
        self.decoder_start_token_id = start

    @classmethod
    def load(
        cls, bundle_dir: str | Path, options: RuntimeOptions | None = None, *, tokenizer: str = "auto"
    ) -> Seq2SeqMoEModel:
        """Open the encoder-decoder bundle at ``bundle_dir``; as :meth:`MoEModel.load`."""
        import onnxruntime as ort

        options = _check_options(options)
        bundle = Bundle.open(bundle_dir)
        roles = model_graph_roles(bundle.manifest.get("graphs", {}))
        if roles != ["decoder", "encoder"]:
            raise GenerationError(
                f"{bundle.path / 'manifest.json'}: graphs {roles}:"
                " Seq2SeqMoEModel serves encoder-decoder bundles (graphs: encoder, decoder)"
            )
        _check_budget(bundle, options)
        tok = load_tokenizer(bundle, tokenizer)
        so, store_id = make_session_options(bundle.path, options)
        sessions = []
        for role in ("encoder", "decoder"):
            graph = bundle.graph_path(role)
            sess = _open_graph(
                graph, lambda g=graph: ort.InferenceSession(str(g), so, providers=["CPUExecutionProvider"])
            )
            sessions.append(ExpertSession(sess, store_id, bundle.path, options))
        release_free_heap()
        return cls(bundle, sessions[0], sessions[1], tok)

    def _decode(self, token: int, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {"input_ids": np.asarray([[token]], dtype=np.int64), **state}
        named = dict(zip(self._output_names, self.decoder.run(None, feeds), strict=True))
        nxt = {k: v for k, v in state.items() if not k.startswith("past_key_values.")}
        for name, _, _ in self._past_specs:
            nxt[name] = named[name.replace("past_key_values.", "present.")]
        return named["logits"][0, -1], nxt

    def _start(self, prompt_ids: list[int]) -> tuple[np.ndarray, Any]:
        ids = np.asarray([prompt_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        states = self.encoder.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
        state: dict[str, np.ndarray] = {"encoder_attention_mask": mask, "encoder_hidden_states": states}
        for name, heads, dim in self._past_specs:
            state[name] = np.zeros((1, heads, 0, dim), np.float32)
        return self._decode(self.decoder_start_token_id, state)

    def _step(self, token: int, state: Any) -> tuple[np.ndarray, Any]:
        return self._decode(token, state)


def load_model(
    bundle_dir: str | Path, options: RuntimeOptions | None = None, *, tokenizer: str = "auto"
) -> MoEModel | Seq2SeqMoEModel:
    """Load any bundle for generation: decoder-only → MoEModel, encoder-decoder → Seq2SeqMoEModel (see
    :meth:`MoEModel.load`)."""
    bundle = Bundle.open(bundle_dir)
    if "encoder" in bundle.manifest.get("graphs", {}):
        return Seq2SeqMoEModel.load(bundle.path, options, tokenizer=tokenizer)
    return MoEModel.load(bundle.path, options, tokenizer=tokenizer)


def load_tokenizer(bundle: Bundle, tokenizer: str = "auto") -> Any | None:
    """The bundle's tokenizer, or None if it has none: a ``tokenizers.Tokenizer``, or with
    ``tokenizer="ortx"`` an :class:`~edgemoe_ort.runtime.tokenizer.OrtxTokenizer` running the bundle's
    tokenizer graphs in ORT (a bundle without usable graphs falls back to ``tokenizers``, with a warning
    saying why). ``"auto"``: ``tokenizers`` if installed, else the graphs
    (:func:`edgemoe_ort.runtime.tokenizer.open_tokenizer`)."""
    return open_tokenizer(bundle, tokenizer)



# -- chat --------------------------------------------------------------------------------------------------
_SENTINEL = "\x00edgemoe-reply\x00"


@dataclass
class ChatTemplate:
    """A tokenizer's chat template (``tokenizer_config.json`` ``chat_template``), compiled with jinja2."""

    source: str
    special: dict[str, str]
    _compiled: Any = None

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        if self._compiled is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.source)
        return str(self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special))


def _chat_template(bundle: Bundle) -> ChatTemplate | None:
    """The chat template of the bundle's tokenizer, or None: no tokenizer, no ``chat_template``, or jinja2
    is not installed (said once, as a warning: the turns are then plain text)."""
    import json

    rel = bundle.manifest.get("tokenizer")
    cfg_path = bundle.path / rel / "tokenizer_config.json" if rel else None
    if cfg_path is None or not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GenerationError(f"{cfg_path}: not valid JSON ({exc})") from None
    source = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default", next(iter(named.values()), None))
    if not isinstance(source, str) or not source.strip():
        return None
    try:
        import jinja2  # noqa: F401
    except ImportError:
        log.warning("%s has a chat template, but jinja2 is not installed: the turns are plain text "
                    "(pip install jinja2 to use it)", cfg_path)
        return None
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        special[key] = v if isinstance(v, str) else ""
    return ChatTemplate(source, special)


class ChatSession:
    """A conversation with a :class:`MoEModel` that keeps the model's KV cache across turns: each
    :meth:`send` passes only the tokens that are new since the previous turn (the token the previous reply
    ended with, if it was sampled but not yet fed, and the new turn) through the model, never the whole
    conversation again. Made by :meth:`MoEModel.chat`.

    With a chat template (:attr:`template`) each turn is the text the template puts between the previous
    reply and the new one (the end of the reply, the user message, the assistant header); without one the
    turns are plain text, joined as given. An end-of-sequence token ending a reply is not kept (with a
    template, its end-of-turn text takes its place).
    """

    def __init__(self, model: MoEModel, template: ChatTemplate | None = None) -> None:
        self.model = model
        #: the chat template formatting the turns, or None (plain text)
        self.template = template
        self.reset()

    def reset(self) -> None:
        """Forget the conversation: the next :meth:`send` starts from an empty KV cache."""
        #: token ids of the conversation the KV cache holds (:attr:`pending` not yet included)
        self.tokens: list[int] = []
        #: generated token ids not yet passed through the model (fed first by the next turn)
        self.pending: list[int] = []
        #: the conversation as {"role", "content"} messages (user turns and replies)
        self.messages: list[dict[str, str]] = []
        #: the :class:`GenerationResult` of the last turn (``stats.prompt_tokens``: the tokens it fed)
        self.last_result: GenerationResult | None = None
        self._past: Mapping[str, np.ndarray] | None = None
        self._warned = False

    @property
    def context_tokens(self) -> int:
        """Tokens of the conversation so far (what the model's context holds, pending tokens included)."""
        return len(self.tokens) + len(self.pending)

    def turn_ids(self, text: str | Sequence[int]) -> list[int]:
        """The token ids a turn adds after the conversation so far (before :attr:`pending`): ``text``
        formatted with the template (if any) and encoded, or token ids as given. Raises
        :class:`GenerationError` for an empty turn or ids outside the vocabulary."""
        if isinstance(text, str) and self.template is not None:
            user = {"role": "user", "content": text}
            if not self.messages:
                text = self.template.render([user], add_generation_prompt=True)
            else:
                past = [*self.messages[:-1], {"role": "assistant", "content": _SENTINEL}]
                full = self.template.render([*past, user], add_generation_prompt=True)
                if full.count(_SENTINEL) == 1:
                    text = full.split(_SENTINEL, 1)[1]
                else:  # the template drops or repeats earlier replies: no incremental form
                    if not self._warned:
                        log.warning("the chat template does not keep earlier replies as they are: each turn "
                                    "is formatted on its own")
                        self._warned = True
                    text = self.template.render([user], add_generation_prompt=True)
        return self.model.prompt_ids(text, check_context=False)

    def send(
        self,
        text: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
    ) -> Iterator[str]:
        """Add the user turn ``text`` (or token ids) and yield the reply's text as it is generated; the
        sampling arguments and stop reasons are those of :meth:`MoEModel.stream`. The reply's
        :class:`GenerationResult` is then :attr:`last_result`. When the conversation fills the model's
        context the reply stops with ``stop_reason`` "context" (a turn that does not fit at all yields
        nothing and leaves the conversation as it was): :meth:`reset` to start over. Raises
        :class:`GenerationError` for bad arguments or an empty turn, before anything runs."""
        stops = check_generation_args(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop,
        )
        model = self.model
        model._require_open()
        feed = [*self.pending, *self.turn_ids(text)]
        past = self._past
        track: dict[str, Any] = {}
        out: list[GenerationResult] = []

        def start() -> tuple[np.ndarray, Any]:
            logits, present = model.forward(np.asarray([feed], dtype=np.int64), past)
            return logits[0, -1], present

        try:
            yield from model._decode_loop(
                feed, start, history=self.tokens, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, stops=stops,
                result=out, track=track,
            )
        finally:
            if out:
                self._record(text, feed, out[0], track)
            self._keep_valid_cache()

    def _keep_valid_cache(self) -> None:
        """After a turn that ended inside a step (interrupted, or an error): the step rewrote the cache in
        place (:class:`~edgemoe_ort.runtime.kvcache.KVState`), so the conversation's tokens are fed again
        by the next turn instead."""
        if isinstance(self._past, KVState) and not self._past.valid:
            self.pending = [*self.tokens, *self.pending]
            self.tokens = []
            self._past = None

    def _record(self, text: str | Sequence[int], feed: list[int], result: GenerationResult,
                track: dict[str, Any]) -> None:
        """Keep the state the turn left: the tokens the KV cache holds and those generated but not fed."""
        self.last_result = result
        if "state" not in track:  # nothing was passed through the model (a full context, or interrupted)
            return
        fed = int(track["fed"])
        self._past = track["state"]
        self.tokens += [*feed, *result.tokens[:fed]]
        self.pending = list(result.tokens[fed:])
        user = text if isinstance(text, str) else self.model.decode(list(text))
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": result.text}]
