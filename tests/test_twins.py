"""Low-bit twins (bundle format v2) and the miss-precision rule, end to end: the writer and both readers, the
op in exact and dynamic mode against a numpy reference, budgets, the exporter's --twin and the CLIs' flags."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgemoe_ort.bundle import Bundle, BundleError, BundleWriter
from edgemoe_ort.bundle.testing import chain_feeds, make_synthetic_bundle, reader_errors, reference_expert
from edgemoe_ort.quant import dequantize, quantize
from edgemoe_ort.runtime import ops
from edgemoe_ort.runtime.ops import RuntimeOptions, open_session

E, K, H, INTER = 8, 2, 64, 96
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "edgemoe-tiny-mixtral"


@pytest.fixture(scope="module")
def twin_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("twins") / "b"
    make_synthetic_bundle(p, num_experts=E, top_k=K, hidden=H, intermediate=INTER, dtype="int8", twin="int4",
                          seed=3)
    return p


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("plain") / "b"
    make_synthetic_bundle(p, num_experts=E, top_k=K, hidden=H, intermediate=INTER, dtype="int8", seed=3)
    return p


def test_manifest_v2_records_and_reader(twin_bundle: Path, plain_bundle: Path) -> None:
    m = json.loads((twin_bundle / "manifest.json").read_text())
    assert m["format_version"] == 2
    keys = [(r["layer"], r["expert"], r["variant"]) for r in m["experts"]]
    assert keys[:3] == [(0, 0, 0), (0, 0, 1), (0, 1, 0)]
    plain = json.loads((plain_bundle / "manifest.json").read_text())
    assert plain["format_version"] == 1 and all("variant" not in r for r in plain["experts"])
    b, p = Bundle.open(twin_bundle), Bundle.open(plain_bundle)
    assert len(b.twins) == E and all(r["format"]["dtype"] == "int4" for r in b.twins.values())
    assert b.primary_bytes == p.store_bytes == p.primary_bytes  # the primaries: what a plain bundle stores
    assert b.store_bytes > b.primary_bytes
    s = b.summary()
    assert (s["experts"], s["twins"], s["twin_dtypes"], s["dtypes"]) == (E, E, {"int4": E}, {"int8": E})
    # the twin holds the int4 quantization of the weights whose int8 quantization is the primary
    src = _source_w_in(5)
    w_in_hi, w_in_lo = b.dequantized_expert(0, 5)[0], b.dequantized_expert(0, 5, variant=1)[0]
    assert np.array_equal(w_in_hi, dequantize(quantize(src, "int8", 32)))
    assert np.array_equal(w_in_hi, p.dequantized_expert(0, 5)[0])
    assert np.array_equal(w_in_lo, dequantize(quantize(src, "int4", 32)))
    with pytest.raises(BundleError, match="no such twin"):
        Bundle.open(plain_bundle).expert_record(0, 1, variant=1)


def _source_w_in(expert: int) -> np.ndarray:
    """The float32 ``w_in`` make_synthetic_bundle drew for ``expert`` of layer 0 (seed 3, no biases), drawn
    again in its order."""
    import math

    rng = np.random.default_rng(3)
    for e in range(expert + 1):
        w_in = (rng.standard_normal((2 * INTER, H)) / math.sqrt(H)).astype(np.float32)
        rng.standard_normal((H, INTER))
        if e == expert:
            return w_in
    raise AssertionError


def test_writer_refuses_bad_twins(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w_in = rng.standard_normal((2 * INTER, H)).astype(np.float32)
    w_out = rng.standard_normal((H, INTER)).astype(np.float32)
    cases: list[tuple[Callable[[BundleWriter], None], str]] = [
        (lambda w: w.add_expert(0, 0, w_in, w_out, dtype="int4", variant=1),
         "add the primary before its twin"),
        (lambda w: (w.add_expert(0, 0, w_in, w_out, dtype="int4"),
                    w.add_expert(0, 0, w_in, w_out, dtype="int4", variant=1)),
         "a twin has fewer bits than its primary: twin int4 (4 bits) beside primary int4 (4 bits)"),
        (lambda w: w.add_expert(0, 0, w_in, w_out, dtype="int4", variant=2), "variant"),
        (lambda w: (w.add_expert(0, 0, w_in, w_out, dtype="int8"),
                    w.add_expert(0, 0, w_in, w_out, dtype="int4", variant=1),
                    w.add_expert(0, 0, w_in, w_out, dtype="int4", variant=1)), "twin added twice"),
    ]
    for i, (act, needle) in enumerate(cases):
        target = tmp_path / f"b{i}"
        w = BundleWriter(target, family="synthetic")
        w.add_layer(0, num_experts=1, top_k=1, hidden=H, intermediate=INTER, gated=True, activation="silu")
        with pytest.raises(BundleError) as ei:
            act(w)
        assert needle in str(ei.value)
        assert not target.exists()  # the writer aborted: nothing left behind


def _swap_variants(b: Path) -> None:
    """The int8 primary and the int4 twin of expert 0 trade roles: a twin with more bits than its primary."""
    m = json.loads((b / "manifest.json").read_text())
    m["experts"][0]["variant"], m["experts"][1]["variant"] = 1, 0
    (b / "manifest.json").write_text(json.dumps(m))


def _edit(f: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def run(b: Path) -> None:
        m = json.loads((b / "manifest.json").read_text())
        f(m)
        (b / "manifest.json").write_text(json.dumps(m))

    return run


CASES: list[tuple[str, Callable[[Path], None], str | None]] = [
    ("pristine", lambda b: None, None),
    ("twin_without_variant_field_on_primary", _edit(lambda m: m["experts"][0].pop("variant")), None),
    ("variant_in_v1", _edit(lambda m: m.update(format_version=1)), "no variant in format_version 1"),
    ("variant_2", _edit(lambda m: m["experts"][1].update(variant=2)), "experts[1].variant"),
    ("variant_string", _edit(lambda m: m["experts"][1].update(variant="1")), "experts[1].variant"),
    ("variant_bool", _edit(lambda m: m["experts"][1].update(variant=True)), "experts[1].variant"),
    ("primary_missing", _edit(lambda m: m["experts"].pop(0)), "missing expert record"),
    ("duplicate_twin", _edit(lambda m: m["experts"].append(m["experts"][1])), "duplicate twin record"),
    ("twin_more_bits", _swap_variants, "a twin has fewer bits than its primary: twin int8 (8 bits)"),
    ("twin_overlaps_primary", _edit(lambda m: m["experts"][1].update(offset=m["experts"][0]["offset"])),
     "layer 0 expert 0: offset: blob of the twin overlaps the blob of layer 0 expert 0"),
    ("version_3", _edit(lambda m: m.update(format_version=3)), "expected 1 or 2"),
]


@pytest.mark.parametrize(("name", "mutate", "needle"), CASES, ids=[c[0] for c in CASES])
def test_both_readers_decide_alike_on_twins(
    name: str, mutate: Callable[[Path], None], needle: str | None, twin_bundle: Path, tmp_path: Path
) -> None:
    b = tmp_path / "b"
    shutil.copytree(twin_bundle, b)
    mutate(b)
    py_err, native_err = reader_errors(b)
    assert (py_err is None, native_err is None) == (needle is None, needle is None), f"{py_err}\n{native_err}"
    if needle is not None:
        assert needle in str(py_err) and needle in str(native_err), f"python: {py_err}\nnative: {native_err}"


def _routing(T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens whose second expert is important (w 0.45), unimportant (0.2: s = 0.8, the twin) or negligible
    (0.04: s = 0.96, skipped), in turn; distinct experts per slot so each expert's uses agree."""
    rng = np.random.default_rng(seed)
    idx = np.zeros((T, K), np.int64)
    w = np.zeros((T, K), np.float32)
    for t in range(T):
        idx[t] = [t % 4, 4 + int(rng.integers(0, 4))]
    second = {4: 0.45, 5: 0.2, 6: 0.2, 7: 0.04}
    for t in range(T):
        w[t, 1] = second[int(idx[t, 1])]
        w[t, 0] = 1.0 - w[t, 1]
    return idx, w


def _reference(
    b: Bundle, X: np.ndarray, idx: np.ndarray, w: np.ndarray, variant_of: dict[int, int | None]
) -> Any:
    lay = b.layers[0]
    y = np.zeros(X.shape, np.float64)
    for t in range(X.shape[0]):
        kept = [k for k in range(K) if variant_of[int(idx[t, k])] is not None]
        scale = w[t].sum() / w[t, kept].sum()
        for k in kept:
            e = int(idx[t, k])
            wi, wo, bi, bo = b.dequantized_expert(0, e, variant=variant_of[e] or 0)
            y[t] += float(w[t, k]) * scale * reference_expert(
                X[t:t + 1].astype(np.float64), wi, wo, bi, bo, intermediate=lay["intermediate"], gated=True,
                act="silu")[0]
    return y


def test_exact_ignores_twins_bit_for_bit(twin_bundle: Path, plain_bundle: Path) -> None:
    X = np.random.default_rng(1).standard_normal((16, H)).astype(np.float32)
    idx, w = _routing(16, 2)
    ys = []
    for b in (twin_bundle, plain_bundle):
        sess = open_session(Path(b) / "model.onnx", b, RuntimeOptions(budget="25%"))
        ys.append(sess.run(None, chain_feeds(X, [(idx, w)]))[0])
        st = sess.stats()
        assert st["uses"] == {"high": 32, "low": 0, "skipped": 0}
        assert st["miss_precision"]["mode"] == "exact"
    assert np.array_equal(ys[0], ys[1])


@pytest.mark.parametrize("T", [1, 16])
def test_dynamic_against_the_reference(twin_bundle: Path, T: int) -> None:
    b = Bundle.open(twin_bundle)
    X = np.random.default_rng(4).standard_normal((T, H)).astype(np.float32)
    idx, w = _routing(T, 5)
    options = RuntimeOptions(miss_precision="dynamic", thresholds=(0.6, 0.9))
    sess = open_session(b.graph_path(), b.path, options)
    y = sess.run(None, chain_feeds(X, [(idx, w)]))[0]
    # top-1 experts 0..3 and expert 4 (s = 0.55): primaries; 5, 6 (s = 0.8): twins; 7 (s = 0.96): skipped
    variant_of: dict[int, int | None] = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1, 7: None}
    ref = _reference(b, X, idx, w, variant_of)
    assert float(np.max(np.abs(y - ref)) / np.max(np.abs(ref))) <= 1e-4
    uses = sess.stats()["uses"]
    second = idx[:, 1]
    assert uses == {"high": T + int((second == 4).sum()), "low": int(((second == 5) | (second == 6)).sum()),
                    "skipped": int((second == 7).sum())}
    mp = sess.stats()["miss_precision"]
    assert mp["mode"] == "dynamic" and mp["twins"] == E and abs(mp["t1"] - 0.6) < 1e-6


@pytest.mark.parametrize("where", ["python", "library"])
def test_budget_percent_is_of_the_primaries(
    twin_bundle: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolved by Python (session_config_entries) or, given as "50%" to the library, by the engine."""
    b = Bundle.open(twin_bundle)
    if where == "library":
        monkeypatch.setattr(ops, "_percent_base", lambda _: None)
        entries = ops.session_config_entries(b.path, RuntimeOptions(budget="50%"), "x")
        assert entries["edgemoe.budget"] == "50%"
    sess = open_session(b.graph_path(), b.path, RuntimeOptions(budget="50%", miss_precision="dynamic"))
    X = np.random.default_rng(0).standard_normal((8, H)).astype(np.float32)
    idx, w = _routing(8, 1)
    sess.run(None, chain_feeds(X, [(idx, w)]))
    st = sess.stats()
    assert st["budget_bytes"] == b.primary_bytes // 2
    assert st["peak_resident_bytes"] <= st["budget_bytes"]
    assert ops.parse_budget("50%", b.store_bytes, b.primary_bytes) == b.primary_bytes // 2


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("miss_precision", "fast", "miss_precision: expected one of exact, dynamic"),
    ("thresholds", (0.9, 0.6), "thresholds"),
    ("thresholds", (0.1, 1.5), "thresholds"),
    ("thresholds", "0.6,0.9", "thresholds"),
])
def test_bad_options_are_refused(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RuntimeOptions(**{field: value})


def test_library_refuses_bad_thresholds(twin_bundle: Path) -> None:
    b = Bundle.open(twin_bundle)
    so_entries = ops.session_config_entries(b.path, RuntimeOptions(), "x")
    assert so_entries["edgemoe.miss_precision"] == "exact" and "edgemoe.thresholds" not in so_entries
    import onnxruntime as ort

    so = ort.SessionOptions()
    for k, v in {**so_entries, "edgemoe.thresholds": "0.9,0.1"}.items():
        so.add_session_config_entry(k, v)
    with pytest.raises(Exception, match="edgemoe.thresholds: expected 'T1,T2'"):  # read at registration
        so.register_custom_ops_library(str(ops.library_path()))


# --- the default model: export --twin, run with --miss-precision ---------------------------------------

@pytest.fixture(scope="module")
def default_twins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.skip("default model not trained")
    from edgemoe_ort.export import export_model

    out = tmp_path_factory.mktemp("dtw") / "b"
    return export_model(DEFAULT_MODEL, out, bits=8, twin="int4")


def test_export_twin_and_run(default_twins: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgemoe_ort.cli import inspect_app, run_app

    b = Bundle.open(default_twins)
    assert b.summary()["twins"] == 32 and b.summary()["dtypes"] == {"int8": 32}
    r = CliRunner().invoke(inspect_app, [str(default_twins), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"]["layer_groups"][0]["twin"] == "int4"
    outs = {}
    for mp in ("exact", "dynamic"):
        r = CliRunner().invoke(run_app, [str(default_twins), "--prompt", "def f(x):", "--max-new-tokens", "8",
                                         "--budget", "25%", "--miss-precision", mp, "--thresholds", "0.6,0.9",
                                         "--json"])
        assert r.exit_code == 0, r.output
        outs[mp] = json.loads(r.stdout)
    assert outs["exact"]["cache"]["uses"]["low"] == 0
    dyn = outs["dynamic"]["cache"]["uses"]
    assert dyn["low"] > 0 and dyn["high"] > 0
    r = CliRunner().invoke(run_app, [str(default_twins), "--prompt", "x", "--thresholds", "0.9,0.2"])
    assert r.exit_code == 2 and "--thresholds: expected T1,T2" in r.output


def test_export_refuses_a_bad_twin_before_loading(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgemoe_ort.cli import export_app
    from edgemoe_ort.export.api import check_export_options

    r = CliRunner().invoke(export_app, [str(DEFAULT_MODEL), "-o", str(tmp_path / "o"), "--bits", "8",
                                        "--twin", "int8"])
    assert r.exit_code == 2 and "--twin: expected a format with fewer bits than --bits 8" in r.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="twin must be one of"):
        check_export_options(bits=4, group_size=64, lookahead=3, dense_bits=32, dense_group_size=32,
                             twin="fp16")


def test_sweeps_score_each_setting_in_a_fresh_session(default_twins: Path) -> None:
    from edgemoe_ort.bench import routing, twins

    ids = np.arange(3, 3 + 96, dtype=np.int64) % 4000
    rows = twins.sweep(default_twins, ids, settings=["dynamic:0.5:0.9"], budget="25%")
    assert [r["setting"] for r in rows] == ["exact", "dynamic:0.5:0.9"]
    exact, dyn = rows
    assert exact["ppl_increase"] == 0.0 and exact["uses"]["low"] == 0 and exact["thresholds"] is None
    assert dyn["uses"]["low"] > 0 and dyn["thresholds"] == [0.5, pytest.approx(0.9)]
    assert dyn["bytes_per_token"] < exact["bytes_per_token"] and dyn["fewer_bytes"] > 0
    assert twins.best_setting(rows, max_increase=1.0) is dyn and twins.best_setting(rows, -1.0) is None
    r = routing.sweep(default_twins, ids, settings=["cache-prior:0.5"], budget="25%")
    assert [x["setting"] for x in r] == ["exact", "cache-prior:0.5"] and r[1]["changed"] > 0
    assert r[0]["perplexity"] == exact["perplexity"]  # the same tokens, routing and primaries
