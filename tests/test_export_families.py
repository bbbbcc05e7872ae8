"""Exporter, decoder-only families: patched torch == HF, bundle in ORT == HF (logits + greedy with KV cache).

Every checkpoint is a tiny random config saved with ``save_pretrained`` and exported from that local folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from edgemoe_ort.export import (  # noqa: E402
    ExportCheckError,
    UnsupportedModelError,
    export_model_with_report,
    load_model,
    patch_model,
)
from edgemoe_ort.export.testing import VOCAB, save_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.export

# (id, model_type, config overrides)
FAMILIES: list[tuple[str, str, dict[str, Any]]] = [
    ("mixtral", "mixtral", {}),
    ("qwen2_moe", "qwen2_moe", {"norm_topk_prob": False}),
    ("qwen2_moe-norm", "qwen2_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", "qwen3_moe", {}),
    ("olmoe", "olmoe", {}),
    ("gpt_oss", "gpt_oss", {}),
    ("granitemoe", "granitemoe", {}),
    ("phimoe", "phimoe", {}),
    ("deepseek_v3", "deepseek_v3", {}),
]
IDS = [f[0] for f in FAMILIES]
#: families beyond the project's priority list: their ORT round trip is marked slow (-m "not slow" skips it)
EXTRA = {"granitemoe", "phimoe", "deepseek_v3"}
BUNDLE_IDS = [pytest.param(f, marks=pytest.mark.slow) if f in EXTRA else f for f in IDS]
PROMPT_LEN = 7
NEW_TOKENS = 32


def _prompt(batch: int = 2, length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {fid: save_tiny_checkpoint(mt, root / fid, seed=3, **ov) for fid, mt, ov in FAMILIES}


_bundles: dict[str, tuple[Path, Any]] = {}


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


def _exported(fid: str, checkpoints: dict[str, Path], bundle_root: Path) -> tuple[Path, Any]:
    """fp32 bundle of family ``fid`` (exported once per test session)."""
    if fid not in _bundles:
        report = export_model_with_report(checkpoints[fid], bundle_root / fid, bits=32)
        _bundles[fid] = (report.bundle, report)
    return _bundles[fid]


def _hf(ckpt: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(ckpt).eval()


# --- (a) the adapter ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fid", IDS)
def test_patched_model_matches_hf(fid: str, checkpoints: dict[str, Path]) -> None:
    ref = _hf(checkpoints[fid])
    loaded = load_model(checkpoints[fid])
    patched = patch_model(loaded.model, loaded.recipe)
    try:
        ids = _prompt(batch=3, length=11)
        with torch.no_grad():
            want = ref(ids).logits
            got = loaded.model(ids).logits
        assert patched.layers, "no MoE layer patched"
        assert [m.spec.layer for m in patched.layers] == list(range(len(patched.layers)))
        diff = (got - want).abs().max().item()
        assert diff <= 1e-5 * want.abs().max().item(), f"{fid}: patched vs HF max abs diff {diff}"
        # the experts module's own parameters are no longer read: replacing them changes nothing
        # (the canonical weights share their memory, so they are swapped for new tensors, not zeroed)
        with torch.no_grad():
            for m in patched.layers:
                module = loaded.model.get_submodule(m.spec.module_path)
                for name, p in list(module.named_parameters(recurse=False)):
                    setattr(module, name, torch.nn.Parameter(torch.full_like(p, float("nan"))))
            again = loaded.model(ids).logits
        assert torch.equal(again, got)
    finally:
        patched.release()


def test_qwen3_dense_layers_are_skipped(checkpoints: dict[str, Path]) -> None:
    loaded = load_model(checkpoints["qwen3_moe"])
    patched = patch_model(loaded.model, loaded.recipe)
    try:
        # mlp_only_layers=[1]: blocks 0 and 2 are MoE, numbered 0 and 1 in the manifest
        assert [m.block_path for m in patched.layers] == ["model.layers.0.mlp", "model.layers.2.mlp"]
        assert [m.spec.layer for m in patched.layers] == [0, 1]
    finally:
        patched.release()


def test_gpt_oss_deinterleaves_gate_up(checkpoints: dict[str, Path]) -> None:
    loaded = load_model(checkpoints["gpt_oss"])
    experts = loaded.model.model.layers[0].mlp.experts
    raw = experts.gate_up_proj.detach().clone()  # [E, H, 2I], columns g0 u0 g1 u1 ...
    raw_bias = experts.gate_up_proj_bias.detach().clone()
    patched = patch_model(loaded.model, loaded.recipe)
    try:
        w = patched.layers[0].weights
        inter = patched.layers[0].spec.intermediate
        assert patched.layers[0].spec.activation == "swiglu_oai"
        assert torch.equal(w.w_in[1, :inter], raw[1, :, 0::2].T)
        assert torch.equal(w.w_in[1, inter:], raw[1, :, 1::2].T)
        assert torch.equal(w.b_in[1], torch.cat([raw_bias[1, 0::2], raw_bias[1, 1::2]]))
    finally:
        patched.release()


def test_unsupported_model_type_is_named(tmp_path: Path) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    cfg.save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "model.safetensors").write_bytes(b"{}")  # never read: the family is refused first
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*supported: .*mixtral.*qwen2_moe"):
        export_model_with_report(tmp_path / "llama", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- (b) the bundle in ONNX Runtime ------------------------------------------------------------------------


def _session(bundle: Path, role: str = "decoder") -> Any:
    ops = pytest.importorskip(
        "edgemoe_ort.runtime.ops", reason="runtime (edgemoe_ort.runtime.ops) not there yet"
    )
    lib = Path(ops.library_path())
    if not lib.is_file():
        pytest.skip(f"op library {lib} not built (make lib)")
    graph = json.loads((bundle / "manifest.json").read_text())["graphs"][role]
    return ops.open_session(bundle / graph, bundle, ops.RuntimeOptions()).session


def _empty_past(sess: Any, batch: int) -> dict[str, np.ndarray]:
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, dim = i.shape
            feeds[i.name] = np.zeros((batch, int(heads), 0, int(dim)), dtype=np.float32)
    return feeds


def ort_logits(sess: Any, ids: np.ndarray) -> np.ndarray:
    b, s = ids.shape
    feeds = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((b, s), dtype=np.int64),
        "position_ids": np.tile(np.arange(s, dtype=np.int64), (b, 1)),
        **_empty_past(sess, b),
    }
    return sess.run(["logits"], feeds)[0]


def ort_greedy(sess: Any, ids: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding with the flat KV cache: prompt in one call, then one token per call."""
    b, s = ids.shape
    past = _empty_past(sess, b)
    out_names = [o.name for o in sess.get_outputs()]
    tokens = ids.astype(np.int64)
    step_ids, pos = tokens, np.tile(np.arange(s, dtype=np.int64), (b, 1))
    generated = []
    for _ in range(steps):
        total = tokens.shape[1]
        feeds = {
            "input_ids": step_ids,
            "attention_mask": np.ones((b, total), dtype=np.int64),
            "position_ids": pos,
            **past,
        }
        outs = dict(zip(out_names, sess.run(out_names, feeds), strict=True))
        nxt = outs["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        generated.append(nxt)
        past = {
            n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")
        }
        tokens = np.concatenate([tokens, nxt], axis=1)
        step_ids, pos = nxt, np.full((b, 1), total, dtype=np.int64)
    return np.concatenate(generated, axis=1)


@pytest.mark.parametrize("fid", BUNDLE_IDS)
def test_bundle_matches_hf(fid: str, checkpoints: dict[str, Path], bundle_root: Path) -> None:
    bundle, report = _exported(fid, checkpoints, bundle_root)
    assert [g.role for g in report.graphs] == ["decoder"]
    assert report.graphs[0].offloaded_nodes == report.layers
    sess = _session(bundle)
    ref = _hf(checkpoints[fid])
    ids = _prompt()
    with torch.no_grad():
        want = ref(ids).logits.numpy()
    got = ort_logits(sess, ids.numpy())
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    print(
        f"{fid}: logits max abs diff {diff:.3g} (max |logit| {scale:.3g}), "
        f"export {report.seconds['total']:.1f}s"
    )
    assert diff <= 1e-4 * scale

    with torch.no_grad():
        hf_tokens = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )[:, PROMPT_LEN:].numpy()
    ort_tokens = ort_greedy(sess, ids.numpy(), NEW_TOKENS)
    assert hf_tokens.shape == (2, NEW_TOKENS)
    np.testing.assert_array_equal(ort_tokens, hf_tokens)


# --- (c) refusing to overwrite, (d) relocatable bundle -----------------------------------------------------


def test_export_twice_is_refused_without_force(checkpoints: dict[str, Path], bundle_root: Path) -> None:
    from edgemoe_ort.bundle import BundleExistsError

    bundle, _ = _exported("mixtral", checkpoints, bundle_root)
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(BundleExistsError, match="force"):
        export_model_with_report(checkpoints["mixtral"], bundle, bits=32)
    assert (bundle / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in bundle.parent.iterdir() if p.name.startswith(".")) == []


def test_force_replaces_with_int4(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "mixtral-int4"
    out.mkdir()
    (out / "stale.txt").write_text("not a bundle")
    with pytest.raises(Exception, match="not an edgemoe bundle; in the way: stale.txt"):  # never replaced
        export_model_with_report(checkpoints["mixtral"], out, force=True)
    (out / "stale.txt").unlink()
    stages: list[tuple[str, int, int]] = []
    report = export_model_with_report(
        checkpoints["mixtral"], out, bits=4, group_size=16, force=True, progress=lambda *a: stages.append(a)
    )
    assert [s for s, done, total in stages if done == total] == ["load", "patch", "trace", "write", "experts"]
    assert ("experts", 8, 8) in stages  # 2 layers x 4 experts
    manifest = json.loads((out / "manifest.json").read_text())
    assert report.dtype == "int4"
    assert {r["format"]["dtype"] for r in manifest["experts"]} == {"int4"}
    assert manifest["model"]["family"] == "mixtral"
    assert manifest["model"]["config"] == json.loads((checkpoints["mixtral"] / "config.json").read_text())
    sess = _session(out)
    ids = _prompt()
    want = _hf(checkpoints["mixtral"])(ids).logits.detach().numpy()
    got = ort_logits(sess, ids.numpy())
    # 4-bit experts: close, not equal
    assert float(np.abs(got - want).max()) <= 0.1 * float(np.abs(want).max())


@pytest.mark.parametrize("fid", ["mixtral", "qwen2_moe"])
def test_copied_bundle_gives_identical_outputs(
    fid: str, checkpoints: dict[str, Path], bundle_root: Path, tmp_path: Path
) -> None:
    bundle, _ = _exported(fid, checkpoints, bundle_root)
    copy = tmp_path / "elsewhere" / "copied"
    shutil.copytree(bundle, copy)
    ids = _prompt(batch=1, seed=7).numpy()  # batch 1: the batch axis is dynamic too
    a = ort_greedy(_session(bundle), ids, 8)
    b = ort_greedy(_session(copy), ids, 8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ort_logits(_session(bundle), ids), ort_logits(_session(copy), ids))


def test_check_catches_experts_left_in_graph(checkpoints: dict[str, Path], bundle_root: Path) -> None:
    """The graph check fails loudly when an expert weight is an initializer (what a naive export does)."""
    import onnx
    from onnx import numpy_helper

    from edgemoe_ort.export.trace import check_graph, plan_graphs

    bundle, _ = _exported("olmoe", checkpoints, bundle_root)
    proto = onnx.load(bundle / "model.onnx")
    loaded = load_model(checkpoints["olmoe"])
    patched = patch_model(loaded.model, loaded.recipe)
    try:
        plan = plan_graphs(patched)[0]
        check_graph(proto, plan)
        leaked = onnx.ModelProto()
        leaked.CopyFrom(proto)
        w = patched.layers[1].weights.w_out[2].numpy().T.copy()  # a transposed copy of one expert
        leaked.graph.initializer.append(numpy_helper.from_array(w, "leaked"))
        with pytest.raises(ExportCheckError, match="layer 1 expert 2 w_out"):
            check_graph(leaked, plan)
        dropped = onnx.ModelProto()
        dropped.CopyFrom(proto)
        keep = [
            n
            for n in dropped.graph.node
            if not (
                n.op_type == "OffloadedExpert" and any(a.name == "layer" and a.i == 0 for a in n.attribute)
            )
        ]
        del dropped.graph.node[:]
        dropped.graph.node.extend(keep)
        with pytest.raises(ExportCheckError, match="exactly one"):
            check_graph(dropped, plan)
    finally:
        patched.release()


# --- (e) cache-aware routing seam --------------------------------------------------------------------------

#: the recipes' [routing] seam per family: CacheAwareTopK's scores attribute, or None (not wired, with why)
ROUTING_SCORES = {
    **dict.fromkeys(["mixtral", "qwen2_moe", "qwen2_moe-norm", "qwen3_moe", "olmoe"], "probs"),
    **dict.fromkeys(["gpt_oss", "granitemoe"], "logits"),
    **dict.fromkeys(["phimoe", "deepseek_v3"], None),
}


@pytest.mark.parametrize("fid", BUNDLE_IDS)
def test_routing_seam_per_family(fid: str, checkpoints: dict[str, Path], bundle_root: Path) -> None:
    import onnx

    bundle, report = _exported(fid, checkpoints, bundle_root)
    routed = report.routing["decoder"]
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "CacheAwareTopK"]
    want = ROUTING_SCORES[fid]
    if want is None:  # the recipe says why not, and the graph keeps its own selection
        assert not nodes and not routed.layers and "not wired" in routed.notes[0], routed.summary()
        return
    assert [w.layer for w in routed.layers if w.wired] == list(range(report.layers)), routed.summary()
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert sorted(a["layer"] for a in attrs) == list(range(report.layers))
    assert {a["scores"].decode() for a in attrs} == {want}
    assert not [n for n in model.graph.node if n.op_type == "TopK"]  # every router's TopK was replaced
