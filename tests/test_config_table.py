"""One definition of the ``edgemoe.*`` config keys and the policies: the library's tables, which the Python
options, the CLI and docs/op-contract.md must agree with."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemoe_ort.bundle.testing import make_synthetic_bundle
from edgemoe_ort.runtime import ops

DOC = Path(__file__).resolve().parents[1] / "docs" / "op-contract.md"


def test_docs_table_is_the_librarys() -> None:
    assert ops.config_table_markdown() in DOC.read_text(encoding="utf-8")


def test_python_policies_are_the_librarys() -> None:
    assert tuple(p["name"] for p in ops.policies()) == ops.POLICIES


def test_every_entry_python_sets_is_a_library_key(tmp_path: Path) -> None:
    b = make_synthetic_bundle(tmp_path / "b", num_layers=1, num_experts=2, top_k=1)
    freq = tmp_path / "f.json"
    freq.write_text('{"expert_frequency": [[1, 2]]}')
    options = ops.RuntimeOptions(
        budget="50%", policy="pinned", frequencies=freq, policy_weights="lru=0.5", pin_experts=0, mlock=False,
        hugepages=True, io="buffered", io_threads=3, verify_checksums=False, throttle_bw=1e9,
        throttle_latency_us=5,
    )
    entries = ops.session_config_entries(b.path, options, "id")
    keys = {k["key"] for k in ops.config_keys()}
    assert set(entries) <= keys
    wanted = {"edgemoe.policy", "edgemoe.frequencies", "edgemoe.pin_experts", "edgemoe.hugepages"}
    assert wanted <= set(entries)
    ops.open_session(b.graph_path(), b.path, options)  # and the library accepts them all


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("policy", "fifo", "policy: expected one of lru, lfu, edgemoe, hobbit, pinned, none"),
        ("pin_experts", -1, "pin_experts"),
        ("policy_weights", 3, "policy_weights"),
        ("mlock", "yes", "mlock"),
    ],
)
def test_bad_options_name_the_field(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ops.RuntimeOptions(**{field: value})


def test_bad_values_the_library_checks(tmp_path: Path) -> None:
    b = make_synthetic_bundle(tmp_path / "b", num_layers=1, num_experts=2, top_k=1)
    with pytest.raises(Exception, match="edgemoe.policy_weights"):
        ops.open_session(b.graph_path(), b.path, ops.RuntimeOptions(policy="hobbit", policy_weights="lru=7"))
    with pytest.raises(Exception, match="needs expert frequencies"):
        ops.open_session(b.graph_path(), b.path, ops.RuntimeOptions(policy="pinned"))


def test_python_predictors_are_the_librarys(tmp_path: Path) -> None:
    """The library's predictor names (edgemoe.predictor; profile.h predictor_names) are ops.PREDICTORS."""
    import onnxruntime as ort

    b = make_synthetic_bundle(tmp_path / "b", num_layers=1, num_experts=2, top_k=1)
    so = ort.SessionOptions()
    so.add_session_config_entry("edgemoe.bundle_dir", str(b.path))
    so.add_session_config_entry("edgemoe.predictor", "bogus")
    with pytest.raises(Exception) as err:
        so.register_custom_ops_library(str(ops.library_path()))
    names = ", ".join(ops.PREDICTORS[:-1]) + f" or {ops.PREDICTORS[-1]}"
    assert f"edgemoe.predictor: expected {names}, found 'bogus'" in str(err.value)
    doc = next(k["doc"] for k in ops.config_keys() if k["key"] == "edgemoe.predictor")
    assert all(f"`{p}`" in doc for p in ops.PREDICTORS)
