"""Exporter, SwitchTransformers (encoder-decoder, top-1 with expert capacity): encoder + decoder graphs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForSeq2SeqLM  # noqa: E402

from edgemoe_ort.export import export_model_with_report, load_model, patch_model  # noqa: E402
from edgemoe_ort.export.testing import VOCAB, save_tiny_checkpoint, tiny_config  # noqa: E402

pytestmark = pytest.mark.export

ENC_LEN, DEC_LEN, NEW_TOKENS = 9, 9, 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint("switch_transformers", tmp_path_factory.mktemp("ckpt") / "switch", seed=5)


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    report = export_model_with_report(checkpoint, tmp_path_factory.mktemp("bundles") / "switch", bits=32)
    return report.bundle, report


def _ids(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (2, length), generator=g)


def _hf(ckpt: Path) -> Any:
    return AutoModelForSeq2SeqLM.from_pretrained(ckpt).eval()


def test_capacity_drops_tokens() -> None:
    cfg = tiny_config("switch_transformers")
    # more tokens than num_experts * expert_capacity: some tokens are always dropped
    assert ENC_LEN > cfg.num_experts * cfg.expert_capacity


def test_patched_model_matches_hf(checkpoint: Path) -> None:
    ref = _hf(checkpoint)
    loaded = load_model(checkpoint)
    patched = patch_model(loaded.model, loaded.recipe)
    try:
        # encoder_sparse_step=1, decoder_sparse_step=2: 2 encoder MoE layers then 1 decoder MoE layer
        assert [(m.role, m.spec.layer) for m in patched.layers] == [
            ("encoder", 0),
            ("encoder", 1),
            ("decoder", 2),
        ]
        assert all(m.spec.top_k == 1 and not m.spec.gated for m in patched.layers)
        kw = {"input_ids": _ids(ENC_LEN, 1), "decoder_input_ids": _ids(DEC_LEN, 2)}
        with torch.no_grad():
            want = ref(**kw).logits
            got = loaded.model(**kw).logits
        diff = (got - want).abs().max().item()
        assert diff <= 1e-5 * want.abs().max().item(), f"patched vs HF max abs diff {diff}"
    finally:
        patched.release()


def _session(bundle: Path, role: str) -> Any:
    ops = pytest.importorskip(
        "edgemoe_ort.runtime.ops", reason="runtime (edgemoe_ort.runtime.ops) not there yet"
    )
    if not Path(ops.library_path()).is_file():
        pytest.skip("op library not built (make lib)")
    graph = json.loads((bundle / "manifest.json").read_text())["graphs"][role]
    return ops.open_session(bundle / graph, bundle, ops.RuntimeOptions()).session


def _empty_past(sess: Any, batch: int) -> dict[str, np.ndarray]:
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, dim = i.shape
            feeds[i.name] = np.zeros((batch, int(heads), 0, int(dim)), dtype=np.float32)
    return feeds


def _decode(dec: Any, ids: np.ndarray, enc_mask: np.ndarray, enc_states: np.ndarray, past: dict) -> dict:
    names = [o.name for o in dec.get_outputs()]
    feeds = {
        "input_ids": ids,
        "encoder_attention_mask": enc_mask,
        "encoder_hidden_states": enc_states,
        **past,
    }
    return dict(zip(names, dec.run(names, feeds), strict=True))


def test_bundle_matches_hf(checkpoint: Path, exported: tuple[Path, Any]) -> None:
    bundle, report = exported
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["graphs"] == {"encoder": "encoder.onnx", "decoder": "model.onnx"}
    assert [g.offloaded_nodes for g in report.graphs] == [2, 1]
    enc, dec = _session(bundle, "encoder"), _session(bundle, "decoder")
    ref = _hf(checkpoint)
    ids, dids = _ids(ENC_LEN, 1), _ids(DEC_LEN, 2)
    mask = np.ones(ids.shape, dtype=np.int64)

    states = enc.run(["last_hidden_state"], {"input_ids": ids.numpy(), "attention_mask": mask})[0]
    with torch.no_grad():
        want_states = ref.get_encoder()(input_ids=ids).last_hidden_state.numpy()
        want = ref(input_ids=ids, decoder_input_ids=dids).logits.numpy()
    assert float(np.abs(states - want_states).max()) <= 1e-4 * float(np.abs(want_states).max())
    got = _decode(dec, dids.numpy(), mask, states, _empty_past(dec, 2))["logits"]
    diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    print(
        f"switch: logits max abs diff {diff:.3g} (max |logit| {scale:.3g}), "
        f"export {report.seconds['total']:.1f}s"
    )
    assert diff <= 1e-4 * scale

    # greedy, one decoder token per call with the self-attention cache
    start = int(ref.config.decoder_start_token_id)
    step = np.full((2, 1), start, dtype=np.int64)
    past = _empty_past(dec, 2)
    tokens = []
    for _ in range(NEW_TOKENS):
        outs = _decode(dec, step, mask, states, past)
        step = outs["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        tokens.append(step)
        past = {
            k.replace("present.", "past_key_values."): v for k, v in outs.items() if k.startswith("present.")
        }
    with torch.no_grad():
        hf = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )[:, 1:].numpy()
    np.testing.assert_array_equal(np.concatenate(tokens, axis=1), hf)


def test_runtime_generates_like_hf(checkpoint: Path, exported: tuple[Path, Any]) -> None:
    """The runtime's Seq2SeqMoEModel (one store for encoder + decoder) reproduces HF greedy decoding."""
    from edgemoe_ort.runtime import RuntimeOptions, Seq2SeqMoEModel
    from edgemoe_ort.runtime import load_model as load_runtime_model

    bundle, _ = exported
    ids = _ids(ENC_LEN, 3)[:1]
    with torch.no_grad():
        want = _hf(checkpoint).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                        do_sample=False, min_new_tokens=NEW_TOKENS)[0, 1:].tolist()
    model = load_runtime_model(bundle, RuntimeOptions(budget="50%"))
    assert isinstance(model, Seq2SeqMoEModel)
    result = model.generate(ids[0].tolist(), max_new_tokens=NEW_TOKENS)
    assert result.tokens == want[: len(result.tokens)]
    assert len(result.tokens) == NEW_TOKENS or result.stop_reason == "eos"
    cache = result.stats.cache
    assert 0 < cache["peak_resident_bytes"] <= cache["budget_bytes"]


def test_cli_runs_a_switch_bundle_from_token_ids(exported: tuple[Path, Any]) -> None:
    """A Switch bundle has no tokenizer here: edgemoe-run --ids runs it, tokens as the Python API's."""
    import subprocess
    import sys

    from edgemoe_ort.runtime import load_model as load_runtime_model

    bundle, _ = exported
    ids = _ids(ENC_LEN, 4)[0].tolist()
    want = load_runtime_model(bundle).generate(ids, max_new_tokens=8).tokens
    cli = [str(Path(sys.executable).parent / "edgemoe-run"), str(bundle), "-n", "8"]
    res = subprocess.run([*cli, "--ids", ",".join(map(str, ids)), "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tokens"] == want
    text = subprocess.run([*cli, "--prompt", "hello"], capture_output=True, text=True)
    assert text.returncode == 2 and "--ids" in text.stderr and "Traceback" not in text.stderr
