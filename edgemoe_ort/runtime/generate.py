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
from edgemoe_ort.runtime.ops import ExpertSession, RuntimeOptions, open_session


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
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
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


class MoEModel:
    """A decoder-only bundle loaded for generation.

    >>> model = MoEModel.load("bundles/tiny", RuntimeOptions(budget="25%"))
    >>> result = model.generate("def fib(n):", max_new_tokens=32)
    """

    def __init__(self, bundle: Bundle, session: ExpertSession, tokenizer: Any | None) -> None:
        self.bundle = bundle
        self.session = session
        self.tokenizer = tokenizer
        sess = session.session
        self._input_names = [i.name for i in sess.get_inputs()]
        self._output_names = [o.name for o in sess.get_outputs()]
        past = sorted(
            (i for i in sess.get_inputs() if i.name.startswith("past_key_values.")),
            key=lambda i: (int(i.name.split(".")[1]), i.name.split(".")[2]),
        )
        if "input_ids" not in self._input_names or "logits" not in self._output_names:
            raise GenerationError(
                f"{bundle.graph_path('decoder')}: expected a decoder graph with input 'input_ids' and output"
                f" 'logits', found inputs {self._input_names} and outputs {self._output_names}"
            )
        self._past_specs: list[tuple[str, int, int]] = []
        for spec in past:
            shape = spec.shape  # [batch, kv_heads, past_len, head_dim]
            if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
                raise GenerationError(
                    f"{bundle.graph_path('decoder')}: input {spec.name} should be [batch, kv_heads, past,"
                    f" head_dim] with static kv_heads/head_dim, found {shape}"
                )
            self._past_specs.append((spec.name, shape[1], shape[3]))
        self.eos_token_ids = self._eos_ids()

    @classmethod
    def load(cls, bundle_dir: str | Path, options: RuntimeOptions | None = None) -> MoEModel:
        bundle = Bundle.open(bundle_dir)
        if "decoder" not in bundle.manifest.get("graphs", {}) or "encoder" in bundle.manifest["graphs"]:
            raise GenerationError(
                f"{bundle.path / 'manifest.json'}: graphs {sorted(bundle.manifest.get('graphs', {}))}:"
                " MoEModel serves decoder-only bundles (graphs: decoder)"
            )
        session = open_session(bundle.graph_path("decoder"), bundle.path, options or RuntimeOptions())
        return cls(bundle, session, _load_tokenizer(bundle))

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

    # -- forward ---------------------------------------------------------------------------------------
    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, heads, 0, dim), np.float32) for name, heads, dim in self._past_specs}

    def forward(
        self, input_ids: np.ndarray, past: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One step: logits [B, S, V] for input_ids [B, S] after `past`; returns the new past."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise GenerationError(f"input_ids must be [batch, seq], found shape {input_ids.shape}")
        batch, seq = input_ids.shape
        past = past if past is not None else self._empty_past(batch)
        past_len = next(iter(past.values())).shape[2] if past else 0
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids}
        if "attention_mask" in self._input_names:
            feeds["attention_mask"] = np.ones((batch, past_len + seq), np.int64)
        if "position_ids" in self._input_names:
            feeds["position_ids"] = np.broadcast_to(
                np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)
            ).copy()
        feeds.update(past)
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
        self.session.reset_stats()
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        t0 = time.perf_counter()
        logits, past = self.forward(np.asarray([prompt_ids], dtype=np.int64))
        token = sample_next(logits[0, -1], temperature=temperature, top_p=top_p, rng=rng)
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
            logits, past = self.forward(np.asarray([[token]], dtype=np.int64), past)
            token = sample_next(logits[0, -1], temperature=temperature, top_p=top_p, rng=rng)
        stats.decode_s = time.perf_counter() - t1
        stats.generated_tokens = len(tokens)
        stats.peak_rss_bytes = peak_rss_bytes()
        stats.cache = self.session.stats()
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


def _load_tokenizer(bundle: Bundle) -> Any | None:
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

