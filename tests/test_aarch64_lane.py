"""aarch64 lane (`make test-aarch64`): runs under qemu-aarch64 with the cross-built library.

- the library dispatches to the NEON kernels;
- the default model's bundles give the same greedy tokens as on x86 and logits within 1e-3 (relative to the
  largest logit), at int4 and fp32. The x86 side (scripts/aarch64/make_reference.py) wrote its results to
  $EDGEMOE_AARCH64_REFS/<name>.npz, each naming its bundle.

Skipped anywhere else (x86 CI runs it through the lane).
"""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REFS = os.environ.get("EDGEMOE_AARCH64_REFS")

pytestmark = pytest.mark.skipif(
    platform.machine() != "aarch64", reason="aarch64 only: runs under qemu in `make test-aarch64`"
)


def _reference_module():  # noqa: ANN202 - a module
    path = REPO / "scripts" / "aarch64" / "make_reference.py"
    spec = importlib.util.spec_from_file_location("make_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_files() -> list[Path]:
    if not REFS:
        return []
    return sorted(Path(REFS).glob("*.npz"))


def test_kernel_path_is_neon() -> None:
    from edgemoe_ort.runtime import kernel_path, library_path

    forced = os.environ.get("EDGEMOE_KERNEL")
    assert kernel_path() == (forced or "neon"), f"{library_path()} dispatches to {kernel_path()!r}"


def test_references_present() -> None:
    if not REFS:
        pytest.skip("EDGEMOE_AARCH64_REFS not set (the lane sets it)")
    names = {p.stem for p in _reference_files()}
    assert {"int4", "fp32"} <= names, f"{REFS}: expected int4.npz and fp32.npz from x86, found {names}"


@pytest.mark.parametrize("ref_path", _reference_files(), ids=lambda p: p.stem)
def test_default_model_matches_x86(ref_path: Path) -> None:
    from edgemoe_ort.runtime import kernel_path

    ref = np.load(ref_path)
    bundle = Path(str(ref["bundle"]))
    ours = _reference_module().run(bundle, str(ref["prompt"]), max_new_tokens=len(ref["tokens"]))
    assert str(ours["kernel"]) == kernel_path()
    np.testing.assert_array_equal(ours["prompt_ids"], ref["prompt_ids"], err_msg="tokenizer differs")
    assert ours["tokens"].tolist() == ref["tokens"].tolist(), (
        f"{bundle.name}: greedy tokens differ between x86 ({ref['kernel']}) and aarch64 ({ours['kernel']})"
    )
    a, b = ours["logits"], ref["logits"]
    assert a.shape == b.shape
    rel = float(np.abs(a - b).max() / np.abs(b).max())
    print(f"{ref_path.stem}: {len(ours['tokens'])} tokens equal, logits max rel diff {rel:.2e}")
    assert rel <= 1e-3, f"{bundle.name}: logits differ by {rel:.3g} relative (tolerance 1e-3)"
