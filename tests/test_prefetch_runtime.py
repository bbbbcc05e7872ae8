"""Prediction and prefetch through the real runtime on the default model: exact outputs with every predictor,
the budget with prefetching, per-call statistics with threads, warm start, and the CLI flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgemoe_ort.runtime import RuntimeOptions, load_model

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "edgemoe-tiny-mixtral"
PROMPT = "def read_lines(path):\n    with open(path) as f:\n"
TOKENS = 12


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model exported with the prefetch wiring, profiled on a slice of its corpus."""
    from edgemoe_ort.export import export_model
    from edgemoe_ort.profile import profile_bundle, write_profile

    sys.path.insert(0, str(REPO))
    from models.eval_default import list_corpus_files, stdlib_root

    out = export_model(DEFAULT_MODEL, tmp_path_factory.mktemp("prefetch") / "int4", bits=4)
    root = stdlib_root()
    files = [root / rel for rel in list_corpus_files(root)[:60]]
    doc = profile_bundle(out, files, tokens=20_000, budgets=("25%",))
    write_profile(out, doc)
    return Path(out)


def _generate(bundle: Path, **opts: Any) -> tuple[list[int], dict[str, Any]]:
    model = load_model(bundle, RuntimeOptions(**opts))
    res = model.generate(PROMPT, max_new_tokens=TOKENS)
    return res.tokens, res.stats.cache


def _logits(bundle: Path, **opts: Any) -> np.ndarray:
    model = load_model(bundle, RuntimeOptions(**opts))
    ids = model.encode(PROMPT)
    logits, _ = model._start(ids)  # noqa: SLF001 - the prefill logits, bit for bit
    return np.asarray(logits)


def test_graph_is_wired(bundle: Path) -> None:
    import onnx

    g = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node if n.domain == "edgemoe"]
    assert ops.count("TokenPrefetch") == 1 and ops.count("OffloadedExpert") == 4
    assert ops.count("ResidualPrefetch") == 3  # layers 1..3: the stream leaving the layer before
    experts = [n for n in g.node if n.op_type == "OffloadedExpert"]
    assert [len(n.input) > 3 and bool(n.input[3]) for n in experts] == [True, True, True, False]


@pytest.mark.parametrize("budget,policy", [("25%", "lru"), ("50%", "hobbit"), (None, "lru")])
def test_exact_with_every_predictor(bundle: Path, budget: str | None, policy: str) -> None:
    ref_tokens, _ = _generate(bundle, predictor="none", budget=budget, policy=policy)
    ref_logits = _logits(bundle, predictor="none", budget=budget, policy=policy)
    for predictor in ("table", "gates", "token", "residual", "auto"):
        tokens, cache = _generate(bundle, predictor=predictor, budget=budget, policy=policy)
        assert tokens == ref_tokens, predictor
        assert np.array_equal(_logits(bundle, predictor=predictor, budget=budget, policy=policy), ref_logits)
        assert cache["peak_resident_bytes"] <= cache["budget_bytes"]
        assert cache["peak_arena_bytes"] <= cache["budget_bytes"]


def test_prefetch_statistics(bundle: Path) -> None:
    _, none = _generate(bundle, predictor="none", budget="25%")
    assert none["prefetch"]["issued"] == 0
    _, auto = _generate(bundle, predictor="auto", budget="25%")
    p = auto["prefetch"]
    assert p["issued"] > 0 and 0 < p["used"] <= p["issued"]
    assert 0.0 < p["precision"] <= 1.0 and 0.0 < p["recall"] <= 1.0
    assert p["hidden"] <= p["used"]
    layers = auto["layers"]
    assert len(layers) == 4
    for key in ("hits", "misses", "reads", "bytes_read"):
        assert sum(lay[key] for lay in layers) == auto[key], key
    assert sum(lay["prefetch"]["issued"] for lay in layers) == p["issued"]
    # acquires do not depend on the cache: the same per layer with and without prefetching
    assert [lay["hits"] + lay["misses"] for lay in layers] == [
        lay["hits"] + lay["misses"] for lay in none["layers"]
    ]
    # layer 0 can only be predicted at token start (the token table)
    assert layers[0]["prefetch"]["issued"] > 0
    # residual: the ResidualPrefetch nodes predict layers 1..3, never layer 0
    _, res = _generate(bundle, predictor="residual", budget="25%")
    assert res["prefetch"]["issued"] > 0 and res["layers"][0]["prefetch"]["issued"] == 0, res["prefetch"]


def test_call_stats_per_thread(bundle: Path) -> None:
    model = load_model(bundle, RuntimeOptions(budget="50%"))
    alone = model.generate(PROMPT, max_new_tokens=TOKENS).stats.cache
    want = alone["hits"] + alone["misses"]
    got: list[int] = []

    def work() -> None:
        c = model.generate(PROMPT, max_new_tokens=TOKENS).stats.cache
        got.append(c["hits"] + c["misses"])

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want, want]  # each call counts its own acquires, not the other thread's


def test_warm_start(bundle: Path, tmp_path: Path) -> None:
    _, cold = _generate(bundle, budget="50%")
    model = load_model(bundle, RuntimeOptions(budget="50%", warm_start="profile"))
    warm = model.generate(PROMPT, max_new_tokens=TOKENS).stats.cache
    # the call reads less itself: what the warm start brought in (even if still queued) is not its read
    assert warm["reads"] < cold["reads"]
    bystander = tmp_path / "resident.json.tmp"  # once the library's fixed temporary name: it was overwritten
    bystander.write_text("mine")
    saved = model.session.save_resident(tmp_path / "resident.json")
    assert json.loads(saved.read_text())["experts"]
    assert bystander.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "resident.json",
        "resident.json.tmp",
    ]  # nothing else left behind
    mask = os.umask(0o022)
    os.umask(mask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would have created it
    with pytest.raises(FileExistsError, match="force"):
        model.session.save_resident(saved)
    _, restored = _generate(bundle, budget="50%", warm_start=saved)
    assert restored["reads"] < cold["reads"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "edgemoe-run"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def test_cli_flags(bundle: Path, tmp_path: Path) -> None:
    bad = _cli(str(bundle), "--prompt", "x", "--predictor", "magic")
    assert bad.returncode != 0 and "--predictor" in bad.stderr and "Traceback" not in bad.stderr
    keep = tmp_path / "resident.json"
    keep.write_text("mine")
    clash = _cli(str(bundle), "--prompt", "x", "--save-resident", str(keep))
    assert clash.returncode != 0 and "--force" in clash.stderr and keep.read_text() == "mine"
    ok = _cli(
        str(bundle),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "4",
        "--budget",
        "25%",
        "--stats",
        "--save-resident",
        str(tmp_path / "new.json"),
    )
    assert ok.returncode == 0, ok.stderr
    assert "precision" in ok.stderr and "pf_issued" in ok.stderr and (tmp_path / "new.json").is_file()
    other = tmp_path / "other.json"
    doc = json.loads((tmp_path / "new.json").read_text())
    doc["manifest_xxh3"] = "0" * 16
    other.write_text(json.dumps(doc))
    refused = _cli(str(bundle), "--prompt", "x", "--warm-start", str(other))
    assert (
        refused.returncode != 0 and "another bundle" in refused.stderr and "Traceback" not in refused.stderr
    )


def test_wire_bundle_upgrades_an_unwired_bundle(tmp_path: Path) -> None:
    """An old (3-input) bundle is wired in place: same tokens, prefetching on, weights file untouched."""
    import hashlib

    from edgemoe_ort.bundle.wiring import wire_bundle
    from edgemoe_ort.export import export_model

    old = Path(export_model(DEFAULT_MODEL, tmp_path / "old", bits=4, lookahead=0))
    data = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in old.iterdir()
        if p.is_file() and p.suffix != ".onnx"
    }
    ref_tokens, ref = _generate(old, budget="25%")
    assert ref["prefetch"]["issued"] == 0  # no stacked gates, no profile: auto has nothing to go on
    reports = wire_bundle(old)
    assert reports["decoder"].changed and reports["decoder"].token_ids == "input_ids"
    tokens, cache = _generate(old, budget="25%")
    assert tokens == ref_tokens and cache["prefetch"]["issued"] > 0
    assert not wire_bundle(old)["decoder"].changed  # idempotent
    after = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in old.iterdir()
        if p.is_file() and p.suffix != ".onnx"
    }
    assert after == data
