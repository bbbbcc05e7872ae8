"""A short seeded run of the reader fuzzer (tests/fuzz; issue 15): ~400 mutated bundles through the Python
reader, the ONNX Runtime C-host path and the native driver. No crash, no hang, no exception other than each
reader's own, no case blowing up memory, and the two validators agree except for the disagreements
tests/fuzz/known.py lists (printed). `make fuzz` runs the same for 100k cases, with the ASan/UBSan driver."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz import mutate  # noqa: E402
from fuzz import run as fuzz_run  # noqa: E402

CASES = 500
SEED = 20260  # fixed: the run is the same every time


def _readers() -> tuple[str, ...]:
    missing = [str(p) for p in (fuzz_run.LIB, fuzz_run.DRIVER) if not p.is_file()]
    if missing:
        pytest.skip(f"not built: {', '.join(missing)} (make lib)")
    return ("python", "ort", "native")


def test_cases_are_reproducible(tmp_path: Path) -> None:
    bases = mutate.build_bases(tmp_path / "bases")
    shared = mutate.shared_dir(tmp_path, bases)
    for i in range(40):
        a = mutate.materialize(mutate.case_spec(7, i), bases, tmp_path / "a", shared)
        b = mutate.materialize(mutate.case_spec(7, i), bases, tmp_path / "b", shared)
        assert a.notes == b.notes
        ma, mb = a.dir / mutate.MANIFEST, b.dir / mutate.MANIFEST
        if ma.is_file() and not ma.is_symlink() and ma.stat().st_size < (1 << 24):
            assert ma.read_bytes() == mb.read_bytes(), (i, a.notes)
        assert mutate.case_spec(7, i) == mutate.case_spec(7, i)


def test_worker_harness_reports_crash_hang_and_protocol(tmp_path: Path) -> None:
    """The harness itself: a worker killed by a signal is a crash, one that does not answer a hang, one that
    prints garbage a protocol error; each is restarted for the next case."""
    script = tmp_path / "w.py"
    script.write_text(
        "import os, sys, time, signal\n"
        "for line in sys.stdin:\n"
        "    c = line.strip()\n"
        "    if c == 'segv': os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    elif c == 'hang': time.sleep(60)\n"
        "    elif c == 'junk': print('not json', flush=True)\n"
        "    else: print('{\"ok\": true}', flush=True)\n"
    )
    w = fuzz_run.Worker("t", [sys.executable, str(script)], {}, 1.5, 100, tmp_path)
    assert w.ask("fine") == {"ok": True}
    r = w.ask("segv")
    assert r["status"] == "crash" and r["signal"] == "SIGSEGV"
    assert w.ask("fine") == {"ok": True}
    assert w.ask("hang")["status"] == "hang"
    assert w.ask("junk")["status"] == "protocol"
    assert w.ask("fine") == {"ok": True}
    assert w.starts == 3
    w.stop()


def test_fuzz_readers_short_run(tmp_path: Path) -> None:
    readers = _readers()
    cfg = fuzz_run.Config(seed=SEED, jobs=2, readers=readers)
    rep = fuzz_run.fuzz(CASES, cfg, out=tmp_path / "report.json", work=tmp_path, minimize=8)
    print(fuzz_run.summary(rep))
    for r in readers:
        c = rep["readers"][r]
        assert c["cases"] == CASES, (r, c)
        for bad in ("crash", "hang", "exit", "protocol", "unexpected", "memory", "bad_message"):
            assert c.get(bad, 0) == 0, (
                f"{r}: {c.get(bad)} {bad}: "
                + json.dumps([f for f in rep["findings"] if f["reader"] == r][:3], indent=1)[:6000]
            )
    assert not rep["findings"], json.dumps(rep["findings"][:3], indent=1)[:6000]
    # a run that exercises the readers: some cases are accepted and run, most are refused
    assert rep["readers"]["python"].get("ok", 0) > CASES // 20
    assert rep["readers"]["ort"].get("ok", 0) > CASES // 20
    known = [d for d in rep["disagreements"] if d["known"]]
    if known:
        print("known disagreements (tests/fuzz/known.py):")
        for d in known:
            notes = d["example"].get("minimized", {}).get("notes") or d["example"]["notes"]
            print(
                f"  {d['known']}: {d['stage']}, {d['accepted_by']} accepts, x{d['count']}, e.g. case "
                f"{d['example']['case']}: {notes}"
            )
    unknown = [d for d in rep["disagreements"] if not d["known"]]
    assert not unknown, (
        "validators disagree (not in tests/fuzz/known.py):\n"
        + json.dumps(
            [
                {k: d[k] for k in ("stage", "accepted_by", "signature", "count")} | {"example": d["example"]}
                for d in unknown[:5]
            ],
            indent=1,
            ensure_ascii=True,
        )[:12000]
    )
