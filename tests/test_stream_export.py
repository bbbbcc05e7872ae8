"""Streamed export (export/stream.py) == in-memory export, byte for byte: every family, checkpoint layout.

The streamed path (``export_model``'s default) loads everything but the routed experts, traces with them on
the meta device and reads each expert from the safetensors on its own; ``stream=False`` loads the whole
checkpoint in float32. Both must write the same ``experts.bin`` and ``manifest.json``; the graphs are equal
apart from one node metadata string that names the process-local expert registry (``store<N>``), which
differs between any two exports in one process. Parity with HF of the streamed default is what
tests/test_export_families.py and tests/test_export_switch.py check.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_export_families import FAMILIES as EXPORT_FAMILIES  # noqa: E402

from edgemoe_ort.export import ExportCheckError, export_model_with_report, load_model  # noqa: E402
from edgemoe_ort.export.load import CheckpointLoadError  # noqa: E402
from edgemoe_ort.export.stream import ExpertStream  # noqa: E402
from edgemoe_ort.export.testing import VOCAB, save_tiny_checkpoint, tiny_model  # noqa: E402

pytestmark = pytest.mark.export

# (id, model_type, config overrides): every family the exporter's tests cover
FAMILIES: list[tuple[str, str, dict[str, Any]]] = [
    f for f in EXPORT_FAMILIES if f[0] != "qwen2_moe-norm"  # the same layout as qwen2_moe
] + [("switch_transformers", "switch_transformers", {})]
EXTRA = {"granitemoe", "phimoe", "deepseek_v3"}  # as in test_export_families: their round trip is slow-marked
FAMILY_PARAMS = [pytest.param(*f, marks=pytest.mark.slow) if f[0] in EXTRA else f for f in FAMILIES]


def _strip_store(path: Path) -> bytes:
    """model.onnx without the node metadata that names the process-local registry key (store<N>)."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        for prop in node.metadata_props:
            prop.value = re.sub(r"\bstore\d+\b", "store", prop.value)
    return model.SerializeToString(deterministic=True)


def assert_same_bundle(a: Path, b: Path) -> None:
    """Same files; experts.bin and every other file byte-identical; graphs equal but for the store key."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert (a / "experts.bin").read_bytes() == (b / "experts.bin").read_bytes()
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())
    for name in names:
        if name.endswith(".onnx"):
            assert _strip_store(a / name) == _strip_store(b / name), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


class StreamSpy:
    """Counts the experts read by ExpertStream (so a test knows the export did stream)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[str, int]] = []
        original = ExpertStream.read_expert

        def read_expert(stream: ExpertStream, module_path: str, expert: int) -> Any:
            self.reads.append((module_path, expert))
            return original(stream, module_path, expert)

        monkeypatch.setattr(ExpertStream, "read_expert", read_expert)


def _export_both(
    ckpt: Path, out: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> tuple[Any, Any, list[tuple[str, int]]]:
    spy = StreamSpy(monkeypatch)
    streamed = export_model_with_report(ckpt, out / "streamed", **kw)
    reads = list(spy.reads)
    spy.reads.clear()
    in_memory = export_model_with_report(ckpt, out / "in-memory", stream=False, **kw)
    assert spy.reads == []
    assert_same_bundle(streamed.bundle, in_memory.bundle)
    assert len(reads) == streamed.experts == in_memory.experts
    return streamed, in_memory, reads


@pytest.mark.parametrize(("fid", "model_type", "overrides"), FAMILY_PARAMS)
def test_streamed_equals_in_memory(
    fid: str, model_type: str, overrides: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = save_tiny_checkpoint(model_type, tmp_path / "ckpt", seed=3, **overrides)
    streamed, _, reads = _export_both(ckpt, tmp_path, monkeypatch, bits=4, group_size=16)
    assert reads == sorted(set(reads), key=reads.index)  # every expert read once
    assert streamed.layers >= 1


def _mixtral_layout(ckpt: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_mixtral_checkpoint_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old per-expert layout (w1/w2/w3 per expert: what save_pretrained writes) and the fused layout of
    transformers 5's modules (gate_up_proj / down_proj) stream to the same store as the in-memory export."""
    from transformers import AutoModelForCausalLM

    per_expert = save_tiny_checkpoint("mixtral", tmp_path / "per-expert", seed=4)
    tensors = _mixtral_layout(per_expert)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in tensors
    assert not any("gate_up_proj" in k for k in tensors)
    loaded = load_model(per_expert, stream=True)
    plans = loaded.experts.layers["model.layers.0.mlp.experts"].params
    assert {n: p.mode for n, p in plans.items()} == {"gate_up_proj": "merge", "down_proj": "merge"}

    # rewrite as fused tensors [E, 2I, H] / [E, H, I] under the v5 module names
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    for f in per_expert.iterdir():
        if f.name != "model.safetensors":
            (fused_dir / f.name).write_bytes(f.read_bytes())
    out: dict[str, torch.Tensor] = {}
    n_exp = 4
    for k, v in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.block_sparse_moe\.(.*)", k)
        if m is None:
            out[k] = v
            continue
        i, rest = m.groups()
        if rest.startswith("experts."):
            continue
        out[f"model.layers.{i}.mlp.{rest}"] = v
    for i in range(2):
        ex = f"model.layers.{i}.block_sparse_moe.experts"
        gate_up = [torch.cat([tensors[f"{ex}.{e}.{w}.weight"] for w in ("w1", "w3")]) for e in range(n_exp)]
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [tensors[f"{ex}.{e}.w2.weight"] for e in range(n_exp)]
        )
    save_file(out, str(fused_dir / "model.safetensors"), metadata={"format": "pt"})

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # transformers reads both layouts as the same model
        want = AutoModelForCausalLM.from_pretrained(per_expert).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(fused_dir).eval()(ids).logits
    assert torch.equal(want, got)
    plans = load_model(fused_dir, stream=True).experts.layers["model.layers.0.mlp.experts"].params
    assert {n: p.mode for n, p in plans.items()} == {"gate_up_proj": "slice", "down_proj": "slice"}

    a, _, _ = _export_both(per_expert, tmp_path / "a", monkeypatch, bits=32)
    b, _, _ = _export_both(fused_dir, tmp_path / "b", monkeypatch, bits=32)
    assert (a.bundle / "experts.bin").read_bytes() == (b.bundle / "experts.bin").read_bytes()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint(dtype: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 / fp16 checkpoint: each expert is upcast on its own, to exactly the values of the fp32 load."""
    ckpt = tmp_path / "ckpt"
    model = tiny_model("mixtral", seed=5).to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(ckpt)
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        w1 = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w1.weight")
    assert w1.dtype == getattr(torch, dtype)
    streamed, _, _ = _export_both(ckpt, tmp_path, monkeypatch, bits=32)
    from edgemoe_ort.bundle import Bundle

    w_in = Bundle.open(streamed.bundle).dequantized_expert(1, 2)[0]
    np.testing.assert_array_equal(w_in[: w1.shape[0]], w1.float().numpy())


def test_sharded_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "ckpt"
    tiny_model("qwen2_moe", seed=6).save_pretrained(ckpt, max_shard_size="40KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2, shards
    experts_in = {f for k, f in index["weight_map"].items() if ".mlp.experts." in k}
    assert len(experts_in) > 1  # the experts of the model span several shards
    _export_both(ckpt, tmp_path, monkeypatch, bits=8, group_size=16)


def test_missing_expert_tensor_is_named(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint("mixtral", tmp_path / "ckpt", seed=7)
    tensors = _mixtral_layout(ckpt)
    gone = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    del tensors[gone]
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointLoadError, match=re.escape(f"model.safetensors: no tensor {gone}")):
        export_model_with_report(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_index_naming_a_missing_tensor_is_named(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    tiny_model("mixtral", seed=7).save_pretrained(ckpt, max_shard_size="40KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    key = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    shard = ckpt / index["weight_map"][key]
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != key}
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointLoadError, match=re.escape(f"{shard.name}: has no tensor {key!r}")):
        export_model_with_report(ckpt, tmp_path / "out")


def test_checkpoint_without_safetensors_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = save_tiny_checkpoint("olmoe", tmp_path / "ckpt", seed=8)
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:  # the same tensors as a .bin
        torch.save({k: f.get_tensor(k).clone() for k in f.keys()}, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    loaded = load_model(ckpt, stream=True)
    assert loaded.experts is None and "no model.safetensors" in (loaded.stream_fallback or "")
    spy = StreamSpy(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="edgemoe_ort.export.load"):
        report = export_model_with_report(ckpt, tmp_path / "out", bits=32)
    assert spy.reads == [] and "not streamed" in caplog.text
    ref = export_model_with_report(ckpt, tmp_path / "ref", bits=32, stream=False)
    assert_same_bundle(report.bundle, ref.bundle)


def test_streamed_leak_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A routed-expert weight left in the graph is caught on the streamed path too: one expert's transposed
    copy by check_expert, a whole layer's stack by check_layer (from the sum of the experts' fingerprints)."""
    from onnx import numpy_helper

    import edgemoe_ort.export.api as api
    from edgemoe_ort.export import patch_model, trace

    ckpt = save_tiny_checkpoint("olmoe", tmp_path / "ckpt", seed=9)
    full = load_model(ckpt)  # the in-memory weights, to plant copies of them
    patched = patch_model(full.model, full.recipe)
    try:
        one = patched.layers[1].weights.w_out[2].numpy().T.copy()
        stack = patched.layers[0].weights.w_in.numpy().transpose(2, 0, 1).copy()
    finally:
        patched.release()
    real = trace.export_graphs

    def planting(arrays: list[np.ndarray]) -> Any:
        def export_graphs(p: Any, **kw: Any) -> Any:
            out = real(p, **kw)
            for i, a in enumerate(arrays):
                out[0][1].graph.initializer.append(numpy_helper.from_array(a, f"leaked{i}"))
            return out

        return export_graphs

    monkeypatch.setattr(api, "export_graphs", planting([one]))
    with pytest.raises(ExportCheckError, match="leaked0 is layer 1 expert 2 w_out"):
        export_model_with_report(ckpt, tmp_path / "one")
    monkeypatch.setattr(api, "export_graphs", planting([stack]))
    with pytest.raises(ExportCheckError, match=r"leaked0 is layer 0 w_in \(all experts\)"):
        export_model_with_report(ckpt, tmp_path / "stack")
    assert not (tmp_path / "one").exists() and not (tmp_path / "stack").exists()
    # and the unit: fingerprints are additive and layout-blind
    a = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    assert trace.fingerprint(a) == trace.fingerprint(a.T.copy())
    assert trace.fp_add(trace.fingerprint(a[:2]), trace.fingerprint(a[2:])) == trace.fingerprint(a)
    assert trace.fingerprint(a) != trace.fingerprint(a + np.float32(1e-3))


@pytest.mark.parametrize("model_type", ["mixtral", "switch_transformers"])
def test_weights_freed_as_the_graph_is_serialized(
    model_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed export lets go of the torch weights while the (last) graph is serialized, each storage once
    every initializer reading it is in the proto (export/trace.py, _serialize_freeing): the proto has the
    bytes the plain serialization gives, and the dense weights are never held twice. Tied embeddings: one
    storage read by two parameters; bf16: the float32 weights are the loader's own allocations."""
    from onnxscript import ir

    from edgemoe_ort.export import trace

    overrides = {"tie_word_embeddings": True} if model_type == "mixtral" else {}
    model = tiny_model(model_type, seed=4, **overrides).to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(tmp_path / "ckpt")
    real = trace._serialize_freeing
    seen: list[tuple[int, int, bool]] = []

    def spy(ir_model: Any, module: Any) -> Any:
        tensors = [t for t in (*module.parameters(), *module.buffers()) if not t.is_meta]
        before = sum(t.untyped_storage().nbytes() for t in tensors)
        plain = ir.serde.serialize_model(ir_model).SerializeToString()
        proto = real(ir_model, module)
        after = sum(t.untyped_storage().nbytes() for t in tensors)
        seen.append((before, after, proto.SerializeToString() == plain))
        return proto

    monkeypatch.setattr(trace, "_serialize_freeing", spy)
    _export_both(tmp_path / "ckpt", tmp_path, monkeypatch, bits=8, group_size=16)
    assert len(seen) == 1, seen  # the streamed export's last graph only (Switch: the decoder)
    before, after, same = seen[0]
    assert same
    # what stays: parameters no initializer reads (Switch: the encoder's, in the encoder graph already)
    assert after < (0.5 if model_type == "switch_transformers" else 0.05) * before, seen


_PEAK_CHILD = textwrap.dedent(
    """
    import json, sys
    from edgemoe_ort.export import export_model
    export_model(sys.argv[1], sys.argv[2], bits=8, group_size=64, stream=sys.argv[3] == "1", lookahead=0)
    # VmHWM, not ru_maxrss: Linux carries the parent's maxrss over fork + exec (a big pytest process hid it)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"maxrss_kb": int(hwm.split()[1])}))
    """
)


@pytest.mark.slow
def test_streamed_export_peaks_lower(tmp_path: Path) -> None:
    """Peak RSS of a streamed export, in a fresh process, is well below the in-memory one (bf16 checkpoint
    whose experts are ~200 MB in bf16, 400 MB in float32; the dense part is ~10 MB)."""
    from edgemoe_ort.bench.export_bench import save_random_checkpoint_bf16

    cfg = dict(
        vocab_size=1024, hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=256, tie_word_embeddings=False,
    )
    ckpt = save_random_checkpoint_bf16(tmp_path / "ckpt", cfg)
    peaks = {}
    for stream in ("1", "0"):
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_CHILD, str(ckpt), str(tmp_path / f"b{stream}"), stream],
            capture_output=True, text=True, check=True, timeout=300,
        )
        peaks[stream] = json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024
    print(f"peak RSS MiB: streamed {peaks['1']:.0f}, in memory {peaks['0']:.0f}")
    assert peaks["1"] < peaks["0"] - 250, peaks
    assert (tmp_path / "b1" / "experts.bin").read_bytes() == (tmp_path / "b0" / "experts.bin").read_bytes()
