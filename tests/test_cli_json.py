"""The JSON outputs of edgemoe-run, edgemoe-inspect and edgemoe-bench match their schemas in
docs/json-output.md (real output of each command, in a subprocess)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOC = REPO / "docs" / "json-output.md"

pytestmark = pytest.mark.export  # the session bundle is exported with torch


def schemas() -> dict[str, dict[str, Any]]:
    """``{"edgemoe-run --json": schema, ...}``: the first json block after each ``## `command` `` heading."""
    out = {}
    for m in re.finditer(r"^## `([^`]+)`\n(.*?)```json\n(.*?)```", DOC.read_text(), re.S | re.M):
        out[m.group(1)] = json.loads(m.group(3))
    return out


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def validate(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str = "$") -> list[str]:
    """The JSON Schema subset docs/json-output.md uses: type, enum, required, properties,
    additionalProperties (false), items, minimum, $ref to #/$defs. Returns the violations."""
    errors: list[str] = []
    if "$ref" in schema:
        ref = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            ref = ref[part]
        errors += validate(value, ref, root, path)
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            return errors + [f"{path}: expected {kinds}, found {type(value).__name__} {value!r:.60}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: expected one of {schema['enum']}, found {value!r}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        errors.append(f"{path}: expected >= {schema['minimum']}, found {value}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: undocumented key {k!r}" for k in value if k not in props]
        for k, sub in props.items():
            if k in value:
                errors += validate(value[k], sub, root, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], root, f"{path}[{i}]")
    return errors


def _json(cmd: str, *args: object) -> Any:
    res = subprocess.run([str(BIN / cmd), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _check(doc: Any, name: str) -> None:
    schema = schemas()[name]
    errors = validate(doc, schema, schema)
    assert not errors, "\n".join(errors[:20])


def test_the_doc_has_the_three_schemas() -> None:
    assert set(schemas()) == {
        "edgemoe-run --json", "edgemoe-inspect --json", "edgemoe-bench --json FILE", "edgemoe-eval --json",
        "edgemoe-plan --json",
    }


def test_the_validator_catches_what_it_should() -> None:
    schema = schemas()["edgemoe-run --json"]
    good = {"text": "", "tokens": [1], "stop_reason": "eos", "context_tokens": None, "prompt_tokens": 1,
            "generated_tokens": 1, "prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0, "ttft_s": 0.0,
            "peak_rss_bytes": 1, "cache": {}}
    assert any("missing 'hits'" in e for e in validate(good, schema, schema))
    bad = {**good, "extra": 1, "stop_reason": "tired", "tokens": [-1]}
    del bad["text"]
    errors = validate(bad, schema, schema)
    for want in ("undocumented key 'extra'", "'tired'", "missing 'text'", "$.tokens[0]: expected >= 0"):
        assert any(want in e for e in errors), (want, errors)


def test_run_json_matches_the_schema(tiny_bundle: Path) -> None:
    doc = _json("edgemoe-run", tiny_bundle, "-p", "def fibonacci(n):", "-n", "6", "--budget", "25%",
                "--json")
    _check(doc, "edgemoe-run --json")
    assert doc["stop_reason"] in ("eos", "max_new_tokens") and doc["generated_tokens"] == len(doc["tokens"])
    assert doc["cache"]["routing"]["rule"] == "exact" and doc["cache"]["routing"]["changed"] == 0
    at_context = _json("edgemoe-run", tiny_bundle, "--ids", ",".join(["9"] * 254), "-n", "50", "--json")
    _check(at_context, "edgemoe-run --json")


def test_inspect_json_matches_the_schema(tiny_bundle: Path) -> None:
    doc = _json("edgemoe-inspect", tiny_bundle, "--json")
    _check(doc, "edgemoe-inspect --json")
    m = doc["model"]
    assert m["context_length"] == 256 and m["vocab_size"] == 4096 and m["moe_layers"] == 4
    assert m["layer_groups"] == [{"layers": "0-3", "num_experts": 8, "top_k": 2, "hidden": 256,
                                  "intermediate": 384, "gated": True, "activation": "silu", "dtype": "int4",
                                  "bits": 4, "group_size": 64, "expert_bytes": 163840, "twin": None}]
    assert doc["memory"]["minimum_budget_bytes"] == 163840
    one = _json("edgemoe-inspect", tiny_bundle, "--budget", "25%", "--json")
    _check(one, "edgemoe-inspect --json")
    assert [e["budget"] for e in one["memory"]["estimates"]] == ["25%"]


def test_bench_json_matches_the_schema(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench" / "r.json"
    res = subprocess.run([str(BIN / "edgemoe-bench"), str(tiny_bundle), "--budgets", "25%", "--tokens", "3",
                          "--repeats", "1", "--no-rss", "--modes", "naive,edgemoe", "--json", str(out), "-q"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    _check(doc, "edgemoe-bench --json FILE")
    assert [m["label"] for m in doc["modes"]] == ["resident", "naive", "edgemoe@25%"]
    assert doc["modes"][-1]["routing"] == "exact"


def test_eval_json_matches_the_schema(tiny_bundle: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "text.py"
    corpus.write_text((REPO / "edgemoe_ort" / "eval" / "perplexity.py").read_text())
    doc = _json("edgemoe-eval", tiny_bundle, "--corpus", corpus, "--tokens", "200", "--budget", "25%",
                "--routing", "max-rank", "--json")
    _check(doc, "edgemoe-eval --json")
    assert doc["split"] == "heldout" and doc["options"]["routing"] == "max-rank"
    assert doc["cache"]["routing"]["rule"] == "max-rank"
