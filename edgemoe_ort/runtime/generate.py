"""Device-side text generation over a bundle: tokenizer, KV cache, greedy/sampling, streaming, stats.

Imports neither torch nor transformers: this is what runs on the device.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe_ort.bundle import Bundle
from edgemoe_ort.runtime.ops import (
    ExpertSession,
    RuntimeOptions,
    make_session_options,
    open_session,
    release_free_heap,
)


def decoder_feeds(
    input_ids: np.ndarray, past: dict[str, np.ndarray], input_names: Any
) -> dict[str, np.ndarray]:
    """The feeds of one decoder pass of ``input_ids [B, S]`` after ``past`` (the KV cache, possibly empty):
    ``attention_mask`` of ones and ``position_ids`` from the past length, where the graph has them."""
    batch, seq = input_ids.shape
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
    """A request the loaded bundle cannot serve (bad prompt, bad sampling parameters, ...)."""


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
    stop_reason: str  # "eos", "stop_string", "max_new_tokens"


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


def sample_next(logits: np.ndarray, *, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits: greedy when temperature == 0, else top-p sampling."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    probs = _softmax(logits.astype(np.float64) / temperature)
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
        # All sessions of one model share one expert store (one registration): one budget, one set of
        # stats, read through this session.
        self.session = session
        self.eos_token_ids = self._eos_ids()

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
        if self.tokenizer is None:
            raise GenerationError(f"{self.bundle.path}: the bundle has no tokenizer; pass token ids instead")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

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
        seed: int | None = None,
        stop: Sequence[str] = (),
        result: list[GenerationResult] | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as tokens are generated; the final GenerationResult is appended to `result`."""
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, found {max_new_tokens}")
        if temperature < 0:
            raise GenerationError(f"temperature must be >= 0, found {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], found {top_p}")
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not prompt_ids:
            raise GenerationError("the prompt is empty (no tokens)")
        rng = np.random.default_rng(seed)
        self.session.begin_call_stats()
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        t0 = time.perf_counter()
        logits, state = self._start(prompt_ids)
        token = sample_next(logits, temperature=temperature, top_p=top_p, rng=rng)
        t1 = time.perf_counter()
        stats.prefill_s = stats.ttft_s = t1 - t0
        tokens: list[int] = []
        text_so_far = ""
        stop_reason = "max_new_tokens"
        while True:
            if token in self.eos_token_ids:
                stop_reason = "eos"
                break
            tokens.append(token)
            text = self.decode(tokens)
            piece, text_so_far = text[len(text_so_far) :], text
            hit = next((s for s in stop if s and s in text_so_far), None)
            if hit is not None:
                cut = text_so_far.index(hit)
                if cut > len(text_so_far) - len(piece):
                    yield piece[: cut - (len(text_so_far) - len(piece))]
                text_so_far = text_so_far[:cut]
                stop_reason = "stop_string"
                break
            if piece:
                yield piece
            if len(tokens) >= max_new_tokens:
                break
            logits, state = self._step(token, state)
            token = sample_next(logits, temperature=temperature, top_p=top_p, rng=rng)
        stats.decode_s = time.perf_counter() - t1
        stats.generated_tokens = len(tokens)
        stats.peak_rss_bytes = peak_rss_bytes()
        stats.cache = self.session.call_stats()
        if result is not None:
            result.append(GenerationResult(text_so_far, tokens, stats, stop_reason))

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        out: list[GenerationResult] = []
        for piece in self.stream(
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            result=out,
        ):
            if on_text is not None:
                on_text(piece)
        return out[0]


class MoEModel(_Generator):
    """A decoder-only bundle loaded for generation.

    >>> model = MoEModel.load("bundles/tiny", RuntimeOptions(budget="25%"))
    >>> result = model.generate("def fib(n):", max_new_tokens=32)
    """

    def __init__(self, bundle: Bundle, session: ExpertSession, tokenizer: Any | None) -> None:
        super().__init__(bundle, session, tokenizer)
        graph = bundle.graph_path("decoder")
        _require(session, graph, ["input_ids"], ["logits"])
        self._input_names = [i.name for i in session.get_inputs()]
        self._output_names = [o.name for o in session.get_outputs()]
        self._past_specs = _past_specs(session, graph)

    @classmethod
    def load(cls, bundle_dir: str | Path, options: RuntimeOptions | None = None) -> MoEModel:
        bundle = Bundle.open(bundle_dir)
        if set(bundle.manifest.get("graphs", {})) != {"decoder"}:
            raise GenerationError(
                f"{bundle.path / 'manifest.json'}: graphs {sorted(bundle.manifest.get('graphs', {}))}:"
                " MoEModel serves decoder-only bundles (graphs: decoder); use load_model() for any bundle"
            )
        session = open_session(bundle.graph_path("decoder"), bundle.path, options or RuntimeOptions())
        return cls(bundle, session, load_tokenizer(bundle))

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, heads, 0, dim), np.float32) for name, heads, dim in self._past_specs}

    def forward(
        self, input_ids: np.ndarray, past: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One step: logits [B, S, V] for input_ids [B, S] after `past`; returns the new past."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise GenerationError(f"input_ids must be [batch, seq], found shape {input_ids.shape}")
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
    def load(cls, bundle_dir: str | Path, options: RuntimeOptions | None = None) -> Seq2SeqMoEModel:
        import onnxruntime as ort

        bundle = Bundle.open(bundle_dir)
        if set(bundle.manifest.get("graphs", {})) != {"encoder", "decoder"}:
            raise GenerationError(
                f"{bundle.path / 'manifest.json'}: graphs {sorted(bundle.manifest.get('graphs', {}))}:"
                " Seq2SeqMoEModel serves encoder-decoder bundles (graphs: encoder, decoder)"
            )
        options = options or RuntimeOptions()
        so, store_id = make_session_options(bundle.path, options)
        sessions = [
            ExpertSession(
                ort.InferenceSession(str(bundle.graph_path(role)), so, providers=["CPUExecutionProvider"]),
                store_id, bundle.path, options,
            )
            for role in ("encoder", "decoder")
        ]
        release_free_heap()
        return cls(bundle, sessions[0], sessions[1], load_tokenizer(bundle))

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


def load_model(bundle_dir: str | Path, options: RuntimeOptions | None = None) -> MoEModel | Seq2SeqMoEModel:
    """Load any bundle for generation: decoder-only → MoEModel, encoder-decoder → Seq2SeqMoEModel."""
    bundle = Bundle.open(bundle_dir)
    if "encoder" in bundle.manifest.get("graphs", {}):
        return Seq2SeqMoEModel.load(bundle.path, options)
    return MoEModel.load(bundle.path, options)


def load_tokenizer(bundle: Bundle) -> Any | None:
    rel = bundle.manifest.get("tokenizer")
    if not rel:
        return None
    path = bundle.path / rel / "tokenizer.json"
    if not path.is_file():
        raise GenerationError(f"{bundle.path / 'manifest.json'}: tokenizer '{rel}' has no tokenizer.json")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise GenerationError(f"{path}: not a valid tokenizer.json ({exc})") from exc

