"""edgemoe-plan (EdgeMoE's expert-wise bitwidths), plan.json, edgemoe-export --plan, edgemoe-inspect's bits
per expert: the search on synthetic losses, a real plan of a tiny random checkpoint, every refused plan
(before anything is exported: the output folder never appears), and the mixed bundle in ONNX Runtime against
torch on the same dequantized weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgemoe_ort.plan.format import (
    PlanError,
    parse_bits,
    parse_tolerance,
    quantized_dtypes,
    read_plan,
    record_length,
    write_plan,
)
from edgemoe_ort.plan.rank import spearman
from edgemoe_ort.plan.search import search
from edgemoe_ort.quant import BITS, DTYPES

REPO = Path(__file__).resolve().parents[1]


# --- pure parts: command-line values, the search, the rank correlation -------------------------------------


def test_bits_come_from_the_format_table() -> None:
    assert parse_bits("4,8") == ["int8", "int4"] == parse_bits("int4, int8")
    assert parse_bits(None) == quantized_dtypes() == sorted((d for d in DTYPES if BITS[d] < 16),
                                                            key=lambda d: -BITS[d])
    assert parse_bits("32,16,8") == ["fp32", "fp16", "int8"]
    missing = next(b for b in (3, 2, 5, 6) if b not in BITS.values())
    with pytest.raises(ValueError, match=rf"--bits: {missing} is not an expert format of this build; "
                                         r"expected some of 32, 16, 8, 4"):
        parse_bits(f"{missing},8")
    with pytest.raises(ValueError, match="at least two levels"):
        parse_bits("8")


def test_tolerance_values() -> None:
    assert parse_tolerance("1%") == 0.01 and parse_tolerance("0.005") == 0.005 and parse_tolerance(0) == 0
    for bad in ("1", "-1%", "abc", "nan%"):
        with pytest.raises(ValueError, match="--tolerance: expected a percentage like 1%"):
            parse_tolerance(bad)


def _synthetic(n: int, levels: list[str], seed: int = 0) -> tuple[list[tuple[int, int]], Any, Any]:
    """Keys, a measure() whose degradation is additive per expert and level, and the per-expert costs."""
    rng = np.random.default_rng(seed)
    keys = [(i // 4, i % 4) for i in range(n)]
    cost = dict(zip(keys, rng.permutation(np.geomspace(0.0002, 0.02, n)), strict=True))
    step = {d: i for i, d in enumerate(levels)}  # 0 for the reference level

    def measure(dtypes: dict[tuple[int, int], str]) -> float:
        return 10.0 * (1 + sum(cost[k] * step[d] ** 2 for k, d in dtypes.items()))

    return keys, measure, cost


def test_search_finds_the_largest_k_within_the_tolerance() -> None:
    levels = ["int8", "int4"]
    keys, measure, cost = _synthetic(16, levels)
    uniform = {d: measure(dict.fromkeys(keys, d)) for d in levels}
    ranking = sorted(keys, key=lambda k: cost[k])
    tol = 0.02
    res = search(keys, levels, uniform, ranking, tol, measure)
    k = res.levels[0]["k"]
    prefix = np.cumsum([cost[key] for key in ranking])
    assert k == int((prefix <= tol).sum())  # the largest K within (the synthetic loss is monotone)
    assert res.degradation <= tol and math.isclose(res.perplexity, measure(res.dtypes))
    assert [res.dtypes[key] for key in ranking] == ["int4"] * k + ["int8"] * (16 - k)
    assert res.evaluations == len(res.levels[0]["evaluations"]) <= 4  # bisection over 16: log2


def test_search_goes_to_the_next_level_and_stops_at_uniform() -> None:
    levels = ["int8", "int4", "int2"]
    keys, measure, cost = _synthetic(16, levels)
    uniform = {d: measure(dict.fromkeys(keys, d)) for d in levels}
    ranking = sorted(keys, key=lambda k: cost[k])
    prefix = np.concatenate([[0.0], np.cumsum([cost[key] for key in ranking])])
    tol = prefix[10] + 0.9 * (prefix[11] - prefix[10])  # 10 fit at int4, with room for more at int2
    res = search(keys, levels, uniform, ranking, tol, measure)
    assert [lv["dtype"] for lv in res.levels] == ["int4", "int2"]
    k4, k2 = res.levels[0]["k"], res.levels[1]["k"]
    assert k4 == 10
    assert k2 == max(j for j in range(k4 + 1) if prefix[k4] + 3 * prefix[j] <= tol)  # int4 -> int2: 1 -> 4
    assert 0 < k2 < k4 and res.levels[1]["candidates"] == k4
    assert [res.dtypes[key] for key in ranking] == ["int2"] * k2 + ["int4"] * (k4 - k2) + ["int8"] * (16 - k4)
    assert res.degradation <= tol
    # every uniform level within: uniform lowest, nothing ranked or measured
    res = search(keys, levels, uniform, None, 10.0, measure)
    assert set(res.dtypes.values()) == {"int2"} and res.levels == [] and res.evaluations == 0


def test_spearman() -> None:
    a = {(0, i): float(i) for i in range(5)}
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, {k: -v for k, v in a.items()}) == pytest.approx(-1.0)
    assert spearman(a, dict.fromkeys(a, 1.0)) is None


# --- a real plan of a tiny random checkpoint -------------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgemoe_ort.export.testing import VOCAB, save_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.export

BITS_OFFERED = "8,4"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("plan-ckpt") / "mixtral")


def _ids(n: int = 1024, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.int64)


_SAMPLED: dict[Path, np.ndarray] = {}


def _sampled(ckpt: Path) -> np.ndarray:
    """1024 tokens sampled from the checkpoint itself (16 x 64): text on which the unquantized model is the
    true distribution, so quantizing its experts raises the perplexity (a random model on random tokens
    may as well improve)."""
    if ckpt not in _SAMPLED:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        torch.manual_seed(0)
        start = torch.from_numpy(_ids(16, seed=1)).reshape(16, 1)
        with torch.no_grad():
            out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
                                 max_new_tokens=63, min_new_tokens=63, pad_token_id=0)
        _SAMPLED[ckpt] = out.numpy().astype(np.int64).ravel()
    return _SAMPLED[ckpt]


@pytest.fixture(scope="module")
def planned(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, float]:
    """A plan whose tolerance lies between the uniform int8 and int4 models (so K is searched)."""
    from edgemoe_ort.plan.planner import plan_model

    first = plan_model(ckpt, tolerance=0.0, token_ids=_sampled(ckpt), bits=BITS_OFFERED, window=64)
    deg4 = first.search["uniform"][1]["degradation"]
    assert deg4 > 0
    tol = deg4 / 2
    stages: list[str] = []
    p = plan_model(ckpt, tolerance=tol, token_ids=_sampled(ckpt), bits=BITS_OFFERED, window=64,
                   progress=lambda s, d, n: stages.append(s))
    assert list(dict.fromkeys(stages)) == ["load", "uniform", "proxy", "rank", "search"]
    path = write_plan(tmp_path_factory.mktemp("plans") / "plan.json", p)
    return p, path, tol


def test_plan_respects_the_tolerance_on_its_calibration(planned: tuple[Any, Path, float], ckpt: Path) -> None:
    from edgemoe_ort.export.load import load_model
    from edgemoe_ort.plan.evaluate import Calibrator

    p, _, tol = planned
    assert p.reference["dtype"] == "int8" and p.search["high"] == "int8" and p.search["low"] == "int4"
    lv = p.search["levels"][0]
    k, n = lv["k"], lv["candidates"]
    assert n == 8 and p.counts().get("int4", 0) == k and p.result["degradation"] <= tol
    evals = dict(lv["evaluations"])
    ref = p.reference["perplexity"]
    if k:
        assert evals[k] / ref - 1 <= tol
    assert k == n - 1 or evals[k + 1] / ref - 1 > tol  # bisection: K + 1 was measured outside
    ranked = sorted(p.scores, key=lambda key: (p.scores[key]["loss"], key))
    assert {key for key, d in p.dtypes.items() if d == "int4"} == set(ranked[:k])  # the K least important
    assert p.search["proxy_vs_loss"]["spearman"] is not None
    # the plan's perplexity is what the evaluator measures for these dtypes, again
    windows = _sampled(ckpt).reshape(-1, 64)
    cal = Calibrator(load_model(ckpt, stream=False), windows, group_size=64)
    try:
        assert cal.perplexity(p.dtypes) == pytest.approx(p.result["perplexity"], rel=1e-9)
        # the prefix cache: layer 1's experts ranked without recomputing decoder layer 0, the same numbers
        base = cal.uniform("int8")
        assert cal.cache_prefix(base) == pytest.approx(p.reference["perplexity"], rel=1e-12)
        for e in range(2):
            one = {**base, (1, e): "int4"}
            cal.assign(base)
            cached = cal.perplexity(one, from_layer=1)
            assert cal._skippable(1) == 1 and cal._skippable(0) == 0
            assert cached == cal.perplexity(one) == pytest.approx(p.scores[(1, e)]["loss"], rel=1e-12)
        cal.assign({(0, 0): "int4"})
        assert cal._skippable(1) == 0  # an earlier layer differs from the cached base: no skipping
    finally:
        cal.close()
    assert p.result["store_bytes"] == sum(record_length(lay, p.dtypes[(lay.layer, e)], 64)
                                          for lay in p.layers for e in range(lay.num_experts))


def test_proxy_method(ckpt: Path) -> None:
    from edgemoe_ort.plan.planner import plan_model

    stages: list[str] = []
    p = plan_model(ckpt, tolerance=1e-4, token_ids=_sampled(ckpt), bits=BITS_OFFERED, window=64,
                   method="proxy", progress=lambda s, d, n: stages.append(s))
    assert "rank" not in stages and p.method == "proxy"  # no pass per expert
    assert all(set(s) == {"proxy"} for s in p.scores.values()) and len(p.scores) == 8
    assert p.search["proxy_vs_loss"] == {"spearman": None, "low_set_overlap": None}
    ranked = sorted(p.scores, key=lambda key: (p.scores[key]["proxy"], key))
    k = p.counts().get("int4", 0)
    assert {key for key, d in p.dtypes.items() if d == "int4"} == set(ranked[:k])
    assert p.result["degradation"] <= 1e-4


def test_plan_file_round_trip(planned: tuple[Any, Path, float], tmp_path: Path) -> None:
    p, path, _ = planned
    q = read_plan(path)
    assert q.dtypes == p.dtypes and q.digests == p.digests and q.layers == p.layers
    assert q.family == "mixtral" and q.group_size == 64 and q.offered == ["int8", "int4"]
    assert q.config_sha256 == p.config_sha256 and q.scores.keys() == p.scores.keys()
    again = write_plan(tmp_path / "again.json", q)
    assert again.read_text() == path.read_text()


# --- refusals: every bad plan before anything is exported -------------------------------------------------


def _edited(path: Path, tmp_path: Path, edit: Any) -> Path:
    doc = json.loads(path.read_text())
    edit(doc)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(doc))
    return out


def _not_offered() -> str:
    return next(d for d in ("int3", "int2", "int5") if d not in DTYPES)


@pytest.mark.parametrize("case, pattern", [
    ("unknown expert", r"experts\[3\]\.expert: expected an expert 0\.\.3 of layer 0 \(unknown expert\), "
                       r"found 9"),
    ("missing expert", r"experts: expected a record for every expert of every layer \(8\), found none for "
                       r"layer 1 expert 3 \(missing expert"),
    ("not offered", r"layer 0 expert 0: experts\[0\]\.dtype: expected one of fp32, fp16, int8, int4"),
    ("malformed", r"edited\.json: not JSON \(line 1, column 2"),
    ("bad field", r"edited\.json: group_size: expected an integer >= 1, found 'x'"),
    ("version", r"format_version: expected 1 \(the version this edgemoe-ort reads\), found 2"),
])
def test_bad_plan_files_are_refused(case: str, pattern: str, planned: tuple[Any, Path, float], ckpt: Path,
                                    tmp_path: Path) -> None:
    from edgemoe_ort.export import export_model_with_report

    _, path, _ = planned
    if case == "malformed":
        bad = tmp_path / "edited.json"
        bad.write_text("{not json")
    else:
        bad = _edited(path, tmp_path, {
            "unknown expert": lambda d: d["experts"][3].update(expert=9),
            "missing expert": lambda d: d["experts"].pop(),
            "not offered": lambda d: d["experts"][0].update(dtype=_not_offered()),
            "bad field": lambda d: d.update(group_size="x"),
            "version": lambda d: d.update(format_version=2),
        }[case])
    if case == "not offered":
        pattern = pattern.replace("fp32, fp16, int8, int4", ", ".join(DTYPES))
    out = tmp_path / "bundle"
    stages: list[str] = []
    with pytest.raises(PlanError, match=pattern):
        export_model_with_report(ckpt, out, plan=bad, progress=lambda s, d, n: stages.append(s))
    assert not out.exists() and stages == []


def test_a_plan_for_another_model_is_refused(planned: tuple[Any, Path, float], tmp_path: Path) -> None:
    from edgemoe_ort.export import export_model_with_report

    _, path, _ = planned
    other_shape = save_tiny_checkpoint("mixtral", tmp_path / "wider", intermediate_size=64)
    other_family = save_tiny_checkpoint("olmoe", tmp_path / "olmoe")
    other_weights = save_tiny_checkpoint("mixtral", tmp_path / "reseeded", seed=5)
    cases = [
        (other_shape, r"model\.config: the plan was made for another model \(expected the config of .*wider, "
                      r"found another \(intermediate_size: plan 48, model 64\)\)", []),
        (other_family, r"model\.family: the plan was made for another model \(expected 'olmoe'", []),
        # the same config: the weights' fingerprint, as the first expert is read (nothing written yet)
        (other_weights, r"layer 0 expert 0: xxh3: the plan was made for other weights of this model", None),
    ]
    for model, pattern, want_stages in cases:
        out = tmp_path / f"bundle-{model.name}"
        stages: list[str] = []
        with pytest.raises(PlanError, match=pattern):
            export_model_with_report(model, out, plan=path, progress=lambda s, d, n, st=stages: st.append(s))
        assert not out.exists()
        if want_stages is not None:
            assert stages == want_stages  # before the model is loaded
    with pytest.raises(ValueError, match="the plan sets every expert's dtype; leave --bits out"):
        export_model_with_report(other_weights, tmp_path / "b", plan=path, bits=4)
    with pytest.raises(ValueError, match="--group-size: the plan was measured at group size 64"):
        export_model_with_report(other_weights, tmp_path / "b", plan=path, group_size=32)
    assert not (tmp_path / "b").exists()


# --- the mixed bundle: its records are the plan's, it runs, it matches torch --------------------------------


def test_mixed_bundle_matches_the_plan_and_torch(planned: tuple[Any, Path, float], ckpt: Path,
                                                 tmp_path: Path) -> None:
    from test_export_families import _session, ort_logits

    from edgemoe_ort.export import export_model_with_report
    from edgemoe_ort.export.load import load_model
    from edgemoe_ort.plan.evaluate import Calibrator

    p, path, _ = planned
    assert len(set(p.dtypes.values())) == 2  # a mix
    bundles = {}
    for stream in (True, False):
        out = tmp_path / f"mixed-{stream}"
        report = export_model_with_report(ckpt, out, plan=path, stream=stream)
        assert report.plan == path and report.dtypes == p.counts() | {}
        manifest = json.loads((out / "manifest.json").read_text())
        got = {(r["layer"], r["expert"]): r["format"] for r in manifest["experts"]}
        assert {k: f["dtype"] for k, f in got.items()} == p.dtypes
        assert {f["group_size"] for f in got.values()} == {64}
        bundles[stream] = out
    assert (bundles[True] / "experts.bin").read_bytes() == (bundles[False] / "experts.bin").read_bytes()
    assert (bundles[True] / "experts.bin").stat().st_size == p.result["store_bytes"]

    ids = _ids(2 * 12, seed=11).reshape(2, 12)
    cal = Calibrator(load_model(ckpt, stream=False), ids, group_size=64)
    try:
        cal.assign(p.dtypes)
        with torch.no_grad():
            want = cal.patched.model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    finally:
        cal.close()
    got = ort_logits(_session(bundles[True]), ids)
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())

    from test_cli_commands import invoke

    res = invoke("edgemoe-inspect", bundles[True], "--json")
    assert res.returncode == 0, res.stderr
    layers = json.loads(res.stdout)["model"]["layers"]
    assert {(lay["layer"], e): d for lay in layers for e, d in enumerate(lay["expert_dtypes"])} == p.dtypes
    assert [lay["dtypes"] for lay in layers] == p.layer_counts()
    res = invoke("edgemoe-inspect", bundles[True], columns=200)
    assert res.returncode == 0 and "bits per expert" in res.stdout
    row0 = " ".join(str(BITS[p.dtypes[(0, e)]]) for e in range(4))
    assert row0 in res.stdout


# --- the command lines -------------------------------------------------------------------------------------


def _with_tokenizer(ckpt: Path, dst: Path) -> Path:
    """A copy of ``ckpt`` with a character-level tokenizer.json (fits the tiny vocabulary)."""
    from tokenizers import Tokenizer, models

    shutil.copytree(ckpt, dst)
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    Tokenizer(models.BPE(vocab, [], unk_token="<unk>")).save(str(dst / "tokenizer.json"))
    return dst


def test_plan_command(ckpt: Path, tmp_path: Path) -> None:
    from test_cli_commands import assert_one_line_error, invoke
    from test_cli_json import schemas, validate

    model = _with_tokenizer(ckpt, tmp_path / "with-tok")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b", "c", "d"):
        (corpus / f"{name}.py").write_text((REPO / "edgemoe_ort" / "plan" / "search.py").read_text())
    out = tmp_path / "plans" / "p.json"
    res = invoke("edgemoe-plan", model, "--corpus", corpus, "--tolerance", "50%", "-o", out,
                 "--tokens", "600", "--window", "64", "--bits", "8,4", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    schema = schemas()["edgemoe-plan --json"]
    assert validate(doc, schema, schema) == []
    assert doc["plan"] == str(out) and doc["counts"] == {"int4": 8}  # 50%: uniform int4 is within
    assert read_plan(out).calibration["split"] == "train"
    res = invoke("edgemoe-plan", model, "--corpus", corpus, "--tolerance", "1%", "-o", out)
    assert_one_line_error(res, "--output", "exists; add --force")
    for args, msg in ((["--tolerance", "1%", "--bits", "8,5"], "--bits: 5 is not an expert format"),
                      (["--tolerance", "2"], "--tolerance: expected a percentage"),
                      (["--tolerance", "1%", "--method", "guess"], "--method: expected one of loss, proxy")):
        res = invoke("edgemoe-plan", model, "--corpus", corpus, "-o", tmp_path / "x.json", *args)
        assert_one_line_error(res, msg)
    res = invoke("edgemoe-plan", ckpt, "--corpus", corpus, "--tolerance", "1%", "-o", tmp_path / "y.json")
    assert_one_line_error(res, "no tokenizer.json")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()
    # --plan with --bits: one line, nothing written
    res = invoke("edgemoe-export", ckpt, "-o", tmp_path / "bundle", "--plan", out, "--bits", "8")
    assert_one_line_error(res, "leave --bits out")
    bad = tmp_path / "bad.json"
    bad.write_text(out.read_text().replace('"expert": 0, "dtype": "int4"', '"expert": 0, "dtype": "int9"', 1))
    res = invoke("edgemoe-export", ckpt, "-o", tmp_path / "bundle", "--plan", bad)
    assert_one_line_error(res, str(bad), "experts[0].dtype: expected one of", "found 'int9'")
    res = invoke("edgemoe-export", ckpt, "-o", tmp_path / "bundle", "--plan", tmp_path / "nothing.json")
    assert_one_line_error(res, "nothing.json: expected a plan file (edgemoe-plan -o), found nothing")
    assert not (tmp_path / "bundle").exists()


def test_plan_with_twins(planned: tuple[Any, Path, float], ckpt: Path, tmp_path: Path) -> None:
    """--plan with --twin: a twin where the planned format has more bits than the twin's, none elsewhere; a
    twin no planned expert is wider than is refused before anything is written."""
    from edgemoe_ort.bundle import Bundle
    from edgemoe_ort.export import export_model_with_report

    p, path, _ = planned
    b = Bundle.open(export_model_with_report(ckpt, tmp_path / "b", plan=path, twin="int4").bundle)
    wide = {k for k, d in p.dtypes.items() if d == "int8"}
    assert wide and set(b.twins) == wide
    assert {r["format"]["dtype"] for r in b.twins.values()} == {"int4"}
    with pytest.raises(ValueError, match="twin must be one of"):
        export_model_with_report(ckpt, tmp_path / "c", plan=path, twin="int8")
    assert not (tmp_path / "c").exists()
