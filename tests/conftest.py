"""Shared fixtures: one bundle of the default model per test session (the CLI suites run against it), and
the default model's corpus."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "edgemoe-tiny-mixtral"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model exported once (int4, the CLI's defaults). Tests must not modify it: copy it."""
    pytest.importorskip("torch")
    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.skip("default model not trained")
    from edgemoe_ort.export import export_model

    return export_model(DEFAULT_MODEL, tmp_path_factory.mktemp("session-bundles") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model exported once at fp32 (experts too): its logits match HF's. Do not modify it."""
    pytest.importorskip("torch")
    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.skip("default model not trained")
    from edgemoe_ort.export import export_model

    return export_model(DEFAULT_MODEL, tmp_path_factory.mktemp("session-bundles-fp32") / "tiny-fp32", bits=32)


@pytest.fixture(scope="session")
def idsonly_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`tiny_bundle` without its tokenizer: a bundle that takes token ids only."""
    dst = tmp_path_factory.mktemp("session-bundles-ids") / "ids-only"
    shutil.copytree(tiny_bundle, dst)
    shutil.rmtree(dst / "tokenizer")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["tokenizer"] = None
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's corpus (models/eval_default.py: the stdlib's library sources), as symlinks."""
    sys.path.insert(0, str(REPO))
    from models.eval_default import list_corpus_files, stdlib_root

    root, out = stdlib_root(), tmp_path_factory.mktemp("stdlib-corpus")
    for rel in list_corpus_files(root):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).symlink_to(root / rel)
    return out
