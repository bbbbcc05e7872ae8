"""The KV cache held once (edgemoe_ort.runtime.kvcache): steps through the ring give the logits and cache of
plain ``session.run`` bit for bit, the graph check, a state passed on once, a chat interrupted inside a
step. Synthetic graphs first (no torch), then the default model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemoe_ort.runtime.generate import GenerationError
from edgemoe_ort.runtime.kvcache import KVRunner, KVState, kv_layout, layer_groups

LAYERS, HEADS, DIM, VOCAB = 3, 2, 4, 5


def _graph(path: Path, kind: str) -> list[tuple[str, int, int]]:
    """A decoder of ``LAYERS`` layers with the runtime's I/O names: layer ``j``'s new keys depend on layer
    ``j - 1``'s presents (``kind="ordered"``), on the input only (``"concat"``), or the presents are the pasts
    (``"identity"``). The logits depend on every present (a cache written wrongly changes them)."""
    past = [f"past_key_values.{j}.{kv}" for j in range(LAYERS) for kv in ("key", "value")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, HEADS, "past", DIM]) for n in past]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", VOCAB])]
    outputs += [helper.make_tensor_value_info(n.replace("past_key_values.", "present."), TensorProto.FLOAT,
                                              [1, HEADS, "total", DIM]) for n in past]
    inits = [numpy_helper.from_array(np.array([0, 3], np.int64), "axes03"),
             numpy_helper.from_array(np.array([1, HEADS, 1, DIM], np.int64), "kvshape"),
             numpy_helper.from_array(np.arange(HEADS * DIM, dtype=np.float32).reshape(1, HEADS, 1, DIM) / 7,
                                     "w"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array([1, 1, VOCAB], np.int64), "lshape")]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["ids_f", "axes03"], ["ids_4d"]),  # [1, 1, S, 1]
             helper.make_node("Mul", ["ids_4d", "w"], ["new_0"])]  # [1, H, S, D]
    total = None
    for j in range(LAYERS):
        k, v = f"present.{j}.key", f"present.{j}.value"
        if kind == "identity":
            nodes += [helper.make_node("Identity", [f"past_key_values.{j}.key"], [k]),
                      helper.make_node("Identity", [f"past_key_values.{j}.value"], [v])]
        else:
            nodes += [helper.make_node("Concat", [f"past_key_values.{j}.key", f"new_{j}"], [k], axis=2),
                      helper.make_node("Neg", [f"new_{j}"], [f"neg_{j}"]),
                      helper.make_node("Concat", [f"past_key_values.{j}.value", f"neg_{j}"], [v], axis=2)]
        nodes += [helper.make_node("ReduceSum", [k], [f"sk_{j}"], keepdims=0),
                  helper.make_node("ReduceSum", [v], [f"sv_{j}"], keepdims=0),
                  helper.make_node("Mul", [k, k], [f"kk_{j}"]),
                  helper.make_node("ReduceSum", [f"kk_{j}"], [f"sq_{j}"], keepdims=0),
                  helper.make_node("Add", [f"sk_{j}", f"sq_{j}"], [f"s1_{j}"]),
                  helper.make_node("Sub", [f"s1_{j}", f"sv_{j}"], [f"s_{j}"])]
        prev = f"s_{j}" if kind == "ordered" else "ids_sum"
        if j == 0:
            nodes.append(helper.make_node("ReduceSum", ["ids_f"], ["ids_sum"], keepdims=0))
        nodes += [helper.make_node("Sin", [prev], [f"g_{j}"]),
                  helper.make_node("Add", [f"new_{j}", f"g_{j}"], [f"new_{j + 1}"])]
        term = f"s_{j}"
        if total is None:
            total = term
        else:
            nodes.append(helper.make_node("Add", [total, term], [f"t_{j}"]))
            total = f"t_{j}"
    nodes += [helper.make_node("Unsqueeze", ["ids_f", "axis2"], ["ids_3d"]),
              helper.make_node("Add", ["ids_3d", total], ["l0"]),
              helper.make_node("Expand", ["l0", "lshape"], ["logits"])]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return [(n, HEADS, DIM) for n in past]


def _plain_chain(sess: ort.InferenceSession, steps: list[list[int]]) -> tuple[list[np.ndarray], dict]:
    past = {i.name: np.zeros((1, HEADS, 0, DIM), np.float32) for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")}
    names = [o.name for o in sess.get_outputs()]
    logits = []
    for ids in steps:
        outs = sess.run(None, {"input_ids": np.asarray([ids], np.int64), **past})
        named = dict(zip(names, outs, strict=True))
        logits.append(named["logits"])
        past = {n: named[n.replace("past_key_values.", "present.")] for n in past}
    return logits, past


def _ring_chain(runner: KVRunner, steps: list[list[int]]) -> tuple[list[np.ndarray], KVState]:
    past: dict | KVState | None = None
    logits = []
    for ids in steps:
        out, past = runner.run({"input_ids": np.asarray([ids], np.int64)}, past)
        logits.append(out["logits"])
    return logits, past  # type: ignore[return-value]


STEPS = [[3, 1, 4]] + [[t % 7] for t in range(1, 40)] + [[2, 7]] + [[t % 5] for t in range(12)]


@pytest.mark.parametrize(("kind", "capacity"), [("ordered", 256), ("ordered", 4), ("concat", 256),
                                                ("concat", 3)])
def test_ring_steps_equal_session_run(tmp_path: Path, kind: str, capacity: int) -> None:
    specs = _graph(tmp_path / "g.onnx", kind)
    groups = layer_groups(specs)
    assert kv_layout(tmp_path / "g.onnx", groups) == kind
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    want, want_past = _plain_chain(sess, STEPS)
    runner = KVRunner(sess, specs, [o.name for o in sess.get_outputs()], ordered=kind == "ordered",
                      capacity=capacity)
    got, state = _ring_chain(runner, STEPS)
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    assert state.length == sum(len(s) for s in STEPS)
    assert all(np.array_equal(want_past[n], state[n]) for n in want_past)
    # the ring: a region per layer plus one spare (ordered), or a spare per layer
    assert len(state._ring.free) == (1 if kind == "ordered" else LAYERS)
    assert len(set(state._where)) == LAYERS
    if capacity < state.length:
        assert state._ring.capacity >= state.length  # moved to larger rings on the way


def test_kv_layout_of_other_graphs(tmp_path: Path) -> None:
    specs = _graph(tmp_path / "id.onnx", "identity")
    assert kv_layout(tmp_path / "id.onnx", layer_groups(specs)) is None  # present is not a Concat of past
    (tmp_path / "bad.onnx").write_bytes(b"\x3a\x05junk")
    assert kv_layout(tmp_path / "bad.onnx", layer_groups(specs)) is None
    assert kv_layout(tmp_path / "missing.onnx", layer_groups(specs)) is None


def test_a_state_is_passed_on_once(tmp_path: Path) -> None:
    specs = _graph(tmp_path / "g.onnx", "ordered")
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    runner = KVRunner(sess, specs, [o.name for o in sess.get_outputs()], ordered=True, capacity=64)
    _, s1 = _ring_chain(runner, STEPS[:5])
    _, s2 = runner.run({"input_ids": np.asarray([[1]], np.int64)}, s1)
    assert not s1.valid and s2.valid
    with pytest.raises(GenerationError, match="already passed to forward"):
        runner.run({"input_ids": np.asarray([[1]], np.int64)}, s1)
    with pytest.raises(GenerationError, match="already passed to forward"):
        s1["past_key_values.0.key"]
    with pytest.raises(ValueError):  # read-only views of the ring
        s2["past_key_values.0.key"][...] = 0
    kept = s2.copy()  # a dict: passed on any number of times
    a, _ = runner.run({"input_ids": np.asarray([[2]], np.int64)}, kept)
    b, _ = runner.run({"input_ids": np.asarray([[2]], np.int64)}, kept)
    c, _ = runner.run({"input_ids": np.asarray([[2]], np.int64)}, s2)
    assert np.array_equal(a["logits"], b["logits"]) and np.array_equal(a["logits"], c["logits"])


def test_interleaved_sequences_keep_their_own_cache(tmp_path: Path) -> None:
    specs = _graph(tmp_path / "g.onnx", "ordered")
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    runner = KVRunner(sess, specs, [o.name for o in sess.get_outputs()], ordered=True, capacity=64)
    want, _ = _plain_chain(sess, STEPS[:20])
    a: KVState | None = None
    b: KVState | None = None
    for i, ids in enumerate(STEPS[:20]):
        oa, a = runner.run({"input_ids": np.asarray([ids], np.int64)}, a)
        ob, b = runner.run({"input_ids": np.asarray([ids], np.int64)}, b)
        assert np.array_equal(oa["logits"], want[i]) and np.array_equal(ob["logits"], want[i])


# --- the default model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> object:
    from edgemoe_ort.runtime import MoEModel, RuntimeOptions

    with MoEModel.load(tiny_bundle, RuntimeOptions(budget="50%")) as m:
        yield m


@pytest.mark.export
def test_model_steps_equal_session_run(model: object) -> None:
    assert model._kv is not None and model._kv.ordered  # the exported graph passes the check
    prompt = model.encode("def fibonacci(n):")

    def chain(kv: object) -> tuple[list[np.ndarray], object]:
        model._kv = kv
        logits, past = model.forward(np.asarray([prompt], np.int64))
        out = [logits]
        for i in range(30):
            ids = [int(np.argmax(logits[0, -1]))] + ([5, 6] if i == 10 else [])
            logits, past = model.forward(np.asarray([ids], np.int64), past)
            out.append(logits)
        return out, past

    kv = model._kv
    try:
        want, want_past = chain(None)
        got, past = chain(kv)
    finally:
        model._kv = kv
    assert isinstance(past, KVState) and not isinstance(want_past, KVState)
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    assert all(np.array_equal(want_past[n], past[n]) for n in want_past)


@pytest.mark.export
def test_chat_interrupted_inside_a_step_feeds_the_conversation_again(
    model: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = model.chat()
    "".join(chat.send("def fib(n):", max_new_tokens=4))
    run = KVRunner.run
    calls = {"n": 0}

    def interrupted(self: KVRunner, feeds: dict, past: object) -> object:
        result = run(self, feeds, past)  # the cache is rewritten, then the interrupt arrives
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(KVRunner, "run", interrupted)
    before = [*chat.tokens, *chat.pending]
    turn = model.encode("    return")
    with pytest.raises(KeyboardInterrupt):
        for _ in chat.send("    return", max_new_tokens=8):
            pass
    monkeypatch.undo()
    r = chat.last_result
    assert r.stop_reason == "interrupted" and len(r.tokens) == 2
    assert chat.tokens == [] and chat.pending == [*before, *turn, *r.tokens]  # fed again by the next turn
    "".join(chat.send("\n", max_new_tokens=3))
    whole = model.generate([*before, *turn, *r.tokens, *model.encode("\n")], max_new_tokens=3)
    assert chat.last_result.tokens == whole.tokens
