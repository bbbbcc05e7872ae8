"""Real pread faults under a running store (issue 15): EIO, EINTR, short reads, delays and blobs that
read back corrupt, injected by an LD_PRELOAD shim (tests/faults/faultshim.c) into the store's own
descriptor while the public API generates. Each fault gives either the clean tokens (EINTR, short reads,
delays are transparent) or one Python exception naming the store file and ``layer L expert E``
(docs/op-contract.md, "Errors"); with the fault cleared, the next generate() of the same model gives the
clean tokens again.

The shim must be preloaded at process start, so each I/O mode runs its scenarios in one child process
(tests/faults/child.py). ``mmap`` reads are page faults, not preads: the shim cannot reach them (checked).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from faults.shim import KINDS, Scenario, build_shim, compiler, run_child

from edgemoe_ort.runtime import MoEModel, RuntimeOptions

pytestmark = pytest.mark.export  # the session bundle is exported with torch

PROMPT = "def fibonacci(n):"
TOKENS = 24  # ~130 expert reads per generate() at 25 %: every expert is evicted and read again
BUDGET = "25%"
IO_MODES = ("buffered", "direct")
CHAT_TURNS = ("def add(a, b):", "class Stack:")


def records(bundle: Path) -> dict[tuple[int, int], dict[str, Any]]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {(int(r["layer"]), int(r["expert"])): r for r in manifest["experts"]}


def layer_range(recs: dict[tuple[int, int], dict[str, Any]], layer: int) -> str:
    """The plan options ``lo=A hi=B`` covering the blobs of ``layer``."""
    mine = [r for (lay, _), r in recs.items() if lay == layer]
    lo, hi = min(int(r["offset"]) for r in mine), max(int(r["offset"]) + int(r["length"]) for r in mine)
    return f"lo={lo} hi={hi}"


def scenarios(io: str) -> list[Scenario]:
    """The faults, per I/O mode (``{layer1}``, ``{layer2}``: that layer's range, see :func:`layer_range`)."""
    return [
        Scenario("eio", "eio", "error"),
        Scenario("eio_layer2", "eio {layer2}", "error"),
        Scenario("eio_once", "eio every=40 count=1", "either",
                 note="may land on a prefetch nobody waits for"),
        Scenario("eio_amid_slow_reads", "delay ms=4\neio every=25 count=1", "either",
                 note="other reads are in flight when the error surfaces"),
        Scenario("eintr_alternate", "eintr every=2", "clean"),
        Scenario("eintr_burst", "eintr count=12", "clean"),
        Scenario("short_half", "short count=16", "clean"),  # <= 16: below read_fully's limit of stalls
        Scenario("short_unaligned", "short bytes=5000 count=16", "clean"),
        # Every pread returns 1000 bytes: buffered reads progress 1000 bytes at a time; an O_DIRECT read can
        # only go on from a whole block, so it never progresses and fails after 16 short reads in a row.
        Scenario("short_persistent", "short bytes=1000", "clean" if io == "buffered" else "error"),
        Scenario("delay", "delay ms=3 count=40", "clean"),
        Scenario("corrupt_reread", "corrupt_reread", "error"),
        Scenario("corrupt_reread_layer1", "corrupt_reread {layer1}", "error"),
        # Opening the store: O_DIRECT probes the first block with a pread; buffered opens without reading.
        Scenario("eio_at_open", "eio", "error" if io == "direct" else "clean", phase="load"),
        # A chat turn that fails leaves the conversation as it was: the same turn again gives the clean reply.
        Scenario("eio_in_chat", "eio", "error", phase="chat"),
    ]


@pytest.fixture(scope="session")
def faultshim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shim, compiled once per test session with the system compiler."""
    if compiler() is None:
        pytest.skip("no C compiler to build the fault shim")
    return build_shim(tmp_path_factory.mktemp("faultshim"))


@pytest.fixture(scope="module")
def clean_tokens(tiny_bundle: Path) -> list[int]:
    """A fault-free run in this process (no shim): the tokens every scenario must end with."""
    with MoEModel.load(tiny_bundle, RuntimeOptions(budget=BUDGET, io="buffered")) as model:
        return list(model.generate(PROMPT, max_new_tokens=TOKENS).tokens)


@pytest.fixture(scope="module")
def clean_chat(tiny_bundle: Path) -> list[list[int]]:
    """The token ids of both replies of a fault-free chat of :data:`CHAT_TURNS` (no shim)."""
    with MoEModel.load(tiny_bundle, RuntimeOptions(budget=BUDGET, io="buffered")) as model:
        chat = model.chat()
        replies = []
        for turn in CHAT_TURNS:
            for _piece in chat.send(turn, max_new_tokens=TOKENS):
                pass
            assert chat.last_result is not None
            replies.append(list(chat.last_result.tokens))
        return replies


@pytest.fixture(scope="module")
def fault_run(
    faultshim: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], dict[str, Any]]:
    """``fault_run(io)``: every scenario of ``io`` in one child process (run once per module and mode)."""
    cache: dict[str, dict[str, Any]] = {}
    recs = records(tiny_bundle)

    def run(io: str) -> dict[str, Any]:
        if io not in cache:
            work = tmp_path_factory.mktemp(f"faults-{io}")
            ranges = {f"layer{lay}": layer_range(recs, lay) for lay in (1, 2)}
            scs = [replace(s, plan=s.plan.format(**ranges)) for s in scenarios(io)]
            if io == "mmap":
                scs = [Scenario("eio", "eio", "either")]
            res = run_child(faultshim, tiny_bundle, io, scs, work, budget=BUDGET, prompt=PROMPT,
                            max_new_tokens=TOKENS, chat_turns=CHAT_TURNS)
            res["specs"] = {s.name: s for s in scs}
            cache[io] = res
        return cache[io]

    return run


def check_message(msg: str, sc: Scenario, bundle: Path, recs: dict[tuple[int, int], dict[str, Any]]) -> None:
    """The exception names the store once, then ``layer L expert E`` and what failed, in the Errors format
    ``<file>: layer L expert E: <field>: <message> (expected X, found Y)``."""
    store = str(bundle / "experts.bin")
    assert msg.count(store) == 1, msg  # (read errors once named the store twice)
    if sc.phase == "load":
        assert f"{store}: store.file: cannot read the store (O_DIRECT probe of the first block)" in msg, msg
        assert "Input/output error" in msg, msg
        return
    m = re.search(re.escape(store) + r": layer (\d+) expert (\d+): (.*)$", msg, re.S)
    assert m, msg
    layer, expert, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    rec = recs[(layer, expert)]
    off, length = int(rec["offset"]), int(rec["length"])
    if "corrupt_reread" in sc.plan:
        assert rest.startswith(f"xxh3_64 checksum of blob[0:{rec['size']}] at offset {off}: checksum "
                               f"mismatch (the store is corrupt) (expected {rec['checksum']}, found "), msg
        assert re.match(r"[0-9a-f]{16}\)", rest.split("found ", 1)[1]), msg
    elif sc.name == "short_persistent":
        assert rest.startswith("blob bytes: short reads without progress (17 in a row) "
                               f"(expected {length} bytes at offset {off}, found "), msg
    else:
        assert rest.startswith("blob bytes: read failed: Input/output error "
                               f"(expected {length} bytes at offset {off}, found "), msg
    if m_lo := re.search(r"\blo=(\d+) hi=(\d+)", sc.plan):  # the expert named is one the fault covers
        assert int(m_lo.group(1)) <= off < int(m_lo.group(2)), (msg, sc.plan)


SCENARIO_NAMES = [s.name for s in scenarios("direct")]


@pytest.mark.parametrize("io", IO_MODES)
@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_fault(
    fault_run: Callable[[str], dict[str, Any]], clean_tokens: list[int], clean_chat: list[list[int]],
    tiny_bundle: Path, io: str, name: str,
) -> None:
    res = fault_run(io)
    assert res["clean"] == clean_tokens  # the shim with no plan changes nothing
    assert res["matched_clean"] > 0  # ... and it does see the store's preads
    sc: Scenario = res["specs"][name]
    got = res["scenarios"][name]
    want = clean_tokens
    if sc.phase == "chat":
        assert got["first"] == clean_chat[0]  # the turn before the fault
        want = clean_chat[1]
    assert got["rules"] >= 1
    kinds = {w for w in re.findall(r"^\s*(\w+)", sc.plan, re.M) if w in KINDS}
    if not (sc.phase == "load" and io == "buffered"):  # (buffered opens without a pread)
        for kind in kinds:
            assert got["fired"][kind] > 0, (kind, got)  # the fault really happened
    error = got.get("error")
    if sc.expect == "clean" or (sc.expect == "either" and error is None):
        assert error is None, error
        if sc.phase != "load":
            assert got["value"] == want
    else:
        assert error is not None, f"{name}: expected an exception, got the tokens {got.get('value')}"
        check_message(error, sc, tiny_bundle, records(tiny_bundle))
    # With the fault cleared, the same model gives the clean tokens again (a chat: the same turn, the
    # clean reply).
    assert got["after_error"] is None, got["after_error"]
    assert got["after"] == want
    assert got["resident_bytes"] <= got["budget_bytes"]


def test_mmap_reads_do_not_go_through_pread(fault_run: Callable[[str], dict[str, Any]],
                                            clean_tokens: list[int], tiny_bundle: Path) -> None:
    """``io="mmap"`` copies from a mapping: its reads are page faults, which a pread shim cannot see. With
    every pread of the store failing, mmap still generates the clean tokens and the shim counts no pread.
    (Where the mapping cannot be copied safely the store reads mmap blobs with pread, its ``io_note`` says
    so: then the fault must be the usual exception.)"""
    res = fault_run("mmap")
    assert res["clean"] == clean_tokens
    got = res["scenarios"]["eio"]
    assert got["after_error"] is None and got["after"] == clean_tokens
    if res["matched_clean"] == 0:
        assert got.get("error") is None and got["value"] == clean_tokens
        assert got["matched"] == 0 and got["fired"]["eio"] == 0
    else:  # mmap fell back to pread
        assert got.get("error") is not None, got
        check_message(got["error"], Scenario("eio", "eio", "error"), tiny_bundle, records(tiny_bundle))


def test_mmap_faults() -> None:
    pytest.skip("io=mmap: faults are not injected (its reads are page faults / copies from the mapping, not "
                "preads: test_mmap_reads_do_not_go_through_pread checks that the shim does not reach them)")
