"""Manifest + store fuzzer of the bundle readers (issue 15): seeded cases through every reader, in workers.

    .venv/bin/python -m tests.fuzz.run --cases 2000 --seed 1 --jobs 2 --out build/fuzz/report.json
    .venv/bin/python -m tests.fuzz.run --cases 100000 --asan --out build/fuzz/report.json     # make fuzz
    .venv/bin/python -m tests.fuzz.run --seed 1 --replay 1234 --replay-dir /tmp/case1234      # one case again

Cases (tests/fuzz/mutate.py) are bundle folders made from ``(seed, index)``, written in batches under a
temporary folder and removed after every reader has seen them (the interesting ones are kept, see below).

Readers, each one or ``--jobs`` worker processes answering one case at a time (the parent sends a case, waits
for its answer up to ``--timeout`` seconds, kills and restarts a worker that hangs or dies; each worker also
writes the id of its current case to a progress file):

- ``python``: ``Bundle.open`` + every record read, verified and dequantized (tests/fuzz/worker.py);
- ``ort``: the C-host path: onnxruntime with the library registered and the default ``edgemoe.*`` entries, a
  session on the case's graph and one forward pass that uses every expert (tests/fuzz/worker.py);
- ``native``: ``build/customops/fuzz_reader`` (release): ``load_manifest``, ``ExpertStore`` (the store opened
  as the engine does), every record acquired = read + xxh3 verified (customops/tests/fuzz_reader.cc);
- ``asan`` (``--asan``): the same driver of the ASan/UBSan build, ``build/asan/fuzz_reader``.

Properties (a violation is a *finding*): no crash (a signal, an ASan/UBSan report, an exit), no hang (the
per-case timeout), no case growing a worker's peak RSS by more than ``--mem-limit-mb`` (address space also
capped: a ``MemoryError`` / ``std::bad_alloc`` is a finding), the Python reader raises only ``BundleError``,
the native one only ``edgemoe::Error``, ORT only its own exceptions, every message valid text (and at most
16 KiB in Python and ORT). If ORT ran a case the native driver refuses, that is a finding too (the same
library). Not findings, counted in ``info``: an ``edgemoe::Error`` quoting invalid UTF-8 (nlohmann's parse
errors do; the library makes every ``OrtStatus`` valid UTF-8, which the ``ort`` reader checks), and ORT
refusing what the driver accepts (``ort_refuses_native_accepts``: the op's checks of the node attributes
against the manifest, e.g. a mutated activation).

Differential (issue 15 item 7): per case the verdicts of ``python`` and ``native`` are compared in two stages:

- ``open``: Python ``Bundle.open`` vs native ``load_manifest`` + the ``ExpertStore`` constructor (which opens
  and checks the store with ``open_blob_source``);
- ``verify`` (when both opened it): Python reading every record with its checksum verified vs native
  acquiring every record (read + checksum verified).

ORT's session adds checks of its own (attributes, budget), so it is not one side of the comparison. A case
that one accepts and the other refuses at a stage is a disagreement (refused at ``open`` by one and at
``verify`` by the other: an ``open`` disagreement, accepted there by the second); it is grouped by a signature
(stage, accepting reader, the refusing reader's message with paths, numbers and quoted values blanked).
The first case of each signature is minimized (mutations dropped while the signature stays) and kept under
``<out>-cases/``; signatures matching tests/fuzz/known.py are ``known``. The report (``--out``) has the counts
per reader, the findings, the disagreements with their minimal examples, the rate and the wall time.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import queue
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from . import mutate
    from .known import KNOWN, Known
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mutate  # type: ignore[no-redef]
    from known import KNOWN, Known  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "worker.py"
LIB = REPO / "edgemoe_ort" / "_lib" / "libedgemoe_customops.so"
DRIVER = REPO / "build" / "customops" / "fuzz_reader"
ASAN_DRIVER = REPO / "build" / "asan" / "fuzz_reader"
READERS = ("python", "ort", "native", "asan")


# --- workers ------------------------------------------------------------------------------------------------
class Worker:
    """One reader process in lockstep: :meth:`ask` sends one case and waits for its answer."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        timeout: float,
        restart_every: int,
        logdir: Path,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.timeout = timeout
        self.restart_every = restart_every
        self.log = logdir / f"{name}.stderr"
        self.progress = logdir / f"{name}.progress"
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = b""
        self.served = 0
        self.starts = 0
        self._log_f: Any = None
        self.exit_reports: list[dict[str, Any]] = []  # non-zero exits of processes stopped for a restart

    def _start(self) -> None:
        self._log_f = open(self.log, "wb")  # noqa: SIM115  (kept for the process's life)
        argv = [a.replace("{progress}", str(self.progress)) for a in self.argv]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_f, env=self.env, cwd=REPO
        )
        self.buf = b""
        self.served = 0
        self.starts += 1

    def _stderr_tail(self, n: int = 6000) -> str:
        try:
            data = self.log.read_bytes()
        except OSError:
            return ""
        return data[-n:].decode("utf-8", "replace")

    def stop(self) -> int | None:
        """Ends the process (stdin closed, then killed if it lingers); its exit status."""
        p, self.proc = self.proc, None
        if p is None:
            return None
        try:
            if p.stdin:
                p.stdin.close()
            rc = p.wait(timeout=30)
        except (subprocess.TimeoutExpired, OSError):
            p.kill()
            rc = p.wait()
        if self._log_f:
            self._log_f.close()
        return rc

    def _kill(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            try:
                p.kill()  # this worker only, by its pid
            except OSError:
                pass
            p.wait()
        if self._log_f:
            self._log_f.close()

    def ask(self, line: str) -> dict[str, Any]:
        if self.proc is not None and self.served >= self.restart_every:
            rc = self.stop()
            if rc not in (0, None):  # e.g. LeakSanitizer's report at exit: the cases before, not this one
                self.exit_reports.append({"status": "exit", "returncode": rc, "stderr": self._stderr_tail()})
        if self.proc is None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.served += 1
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._died()
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self._kill()
                    return {"status": "hang", "timeout_s": self.timeout, "stderr": self._stderr_tail(2000)}
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return self._died()
                self.buf += chunk
        out, self.buf = self.buf.split(b"\n", 1)
        try:
            res = json.loads(out)
        except ValueError:
            return {"status": "protocol", "line": out[:2000].decode("utf-8", "replace")}
        if not isinstance(res, dict):
            return {"status": "protocol", "line": out[:2000].decode("utf-8", "replace")}
        return res

    def _died(self) -> dict[str, Any]:
        p = self.proc
        rc = p.wait() if p is not None else None
        self.proc = None
        if self._log_f:
            self._log_f.close()
        sig = -rc if rc is not None and rc < 0 else None
        return {
            "status": "crash",
            "returncode": rc,
            "signal": signal.Signals(sig).name if sig else None,
            "stderr": self._stderr_tail(),
        }


@dataclass
class Config:
    seed: int = 1
    jobs: int = 1
    timeout: float = 10.0
    mem_limit_mb: int = 256
    readers: tuple[str, ...] = ("python", "ort", "native")
    lib: Path = LIB
    driver: Path = DRIVER
    asan_driver: Path = ASAN_DRIVER


def worker_argv(reader: str, cfg: Config) -> tuple[list[str], dict[str, str], float, int]:
    """argv, environment, per-case timeout and restart period of one reader's workers."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    py = [sys.executable, str(WORKER), "--progress", "{progress}", "--mem-mb", "2048"]
    if reader == "python":
        return py + ["--mode", "python"], env, cfg.timeout, 5000
    if reader == "ort":
        return py + ["--mode", "ort", "--lib", str(cfg.lib)], env, cfg.timeout, 1000
    if reader == "native":
        return (
            ["prlimit", "--as=4294967296", str(cfg.driver), "--progress", "{progress}", "-"],
            env,
            cfg.timeout,
            20000,
        )
    env["ASAN_OPTIONS"] = "detect_leaks=1:max_allocation_size_mb=1024:hard_rss_limit_mb=2048:abort_on_error=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return [str(cfg.asan_driver), "--progress", "{progress}", "-"], env, cfg.timeout * 3, 5000


class Pool:
    """The workers of one reader; :meth:`run` answers a list of requests (in parallel over the workers)."""

    def __init__(self, reader: str, cfg: Config, logdir: Path) -> None:
        self.reader = reader
        argv, env, timeout, every = worker_argv(reader, cfg)
        self.workers = [Worker(f"{reader}{j}", argv, env, timeout, every, logdir) for j in range(cfg.jobs)]

    def line(self, case: mutate.Case, feeds: dict[str, Any]) -> str:
        if self.reader in ("native", "asan"):
            return f"{case.dir}\t{case.spec.io}"
        return json.dumps(dict(case.request(), feeds=feeds))

    def run(self, items: list[tuple[mutate.Case, dict[str, Any]]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in items]
        q: queue.Queue[int] = queue.Queue()
        for i in range(len(items)):
            q.put(i)

        def serve(w: Worker) -> None:
            while True:
                try:
                    i = q.get_nowait()
                except queue.Empty:
                    return
                case, feeds = items[i]
                out[i] = w.ask(self.line(case, feeds))

        threads = [threading.Thread(target=serve, args=(w,), daemon=True) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    def exits(self) -> list[dict[str, Any]]:
        """The non-zero exits of workers stopped for a restart since the last call (each a finding)."""
        out = []
        for w in self.workers:
            out += [dict(x, worker=w.name) for x in w.exit_reports]
            w.exit_reports.clear()
        return out

    def close(self) -> list[dict[str, Any]]:
        """Stops the workers; a non-zero exit (e.g. LeakSanitizer's report at exit) is returned, a finding."""
        bad = self.exits()
        for w in self.workers:
            rc = w.stop()
            if rc not in (0, None):
                bad.append({"status": "exit", "returncode": rc, "stderr": w._stderr_tail(), "worker": w.name})
        return bad

    @property
    def restarts(self) -> int:
        return sum(max(0, w.starts - 1) for w in self.workers)


# --- verdicts -----------------------------------------------------------------------------------------------
CLEAN = {"ok", "reject"}


def status_of(reader: str, r: dict[str, Any]) -> str:
    """ok | reject | crash | hang | exit | protocol | unexpected | memory | bad_message."""
    if reader in ("native", "asan"):
        if "status" in r:
            return str(r["status"])
        if r.get("ok"):
            return "ok"
        return {"error": "reject", "bad_alloc": "memory"}.get(str(r.get("kind")), "unexpected")
    return str(r.get("status", "protocol"))


def verdict(reader: str, r: dict[str, Any]) -> tuple[str, str | None]:
    """(open, verify) of a clean answer: ("ok", "ok"), ("reject", None) or ("ok", "reject")."""
    st = status_of(reader, r)
    if st == "ok":
        return ("ok", "ok")
    stage = str(r.get("stage"))
    if stage in ("open", "manifest", "store"):
        return ("reject", None)
    return ("ok", "reject")


def normalize(msg: str, case_dir: str, shared: str) -> str:
    s = msg.replace(case_dir, "<case>").replace(shared, "<outside>")
    s = re.sub(r"'[^']{0,200}'", "'…'", s)
    s = re.sub(r'"[^"]{0,200}"', '"…"', s)
    s = re.sub(r"\d+", "N", s)
    return s[:240]


@dataclass
class Disagreement:
    stage: str
    accepted_by: str
    signature: str
    known: str | None
    count: int = 0
    first: int = -1
    example: dict[str, Any] = field(default_factory=dict)


def match_known(stage: str, accepted_by: str, message: str) -> Known | None:
    for k in KNOWN:
        if k.stage == stage and k.accepted_by == accepted_by and re.search(k.pattern, message):
            return k
    return None


def compare(
    py: dict[str, Any], nat: dict[str, Any], case_dir: str, shared: str
) -> tuple[str, str, str] | None:
    """(stage, accepted_by, refusing message) if the Python and native verdicts differ, else None."""
    vp, vn = verdict("python", py), verdict("native", nat)
    if vp == vn:
        return None
    stage = "open" if vp[0] != vn[0] else "verify"
    accepted_by = "python" if (vp[0] == "ok" if stage == "open" else vp[1] == "ok") else "native"
    refusing = nat if accepted_by == "python" else py
    return stage, accepted_by, str(refusing.get("error") or "")


# --- the fuzzer ---------------------------------------------------------------------------------------------
class Fuzzer:
    def __init__(self, cfg: Config, work: Path, keep: Path | None) -> None:
        self.cfg = cfg
        self.work = work
        self.keep = keep
        self.bases = mutate.build_bases(work / "bases")
        self.shared = mutate.shared_dir(work, self.bases)
        self.logdir = work / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.pools = {r: Pool(r, cfg, self.logdir) for r in cfg.readers}
        self.counts: dict[str, Counter[str]] = {r: Counter() for r in cfg.readers}
        self.findings: list[dict[str, Any]] = []
        self.finding_counts: Counter[str] = Counter()
        self.disagreements: dict[tuple[str, str, str], Disagreement] = {}
        self.verdicts: Counter[str] = Counter()
        self.ort_vs_native: Counter[str] = Counter()
        self.mutation_counts: Counter[str] = Counter()
        self.info: Counter[str] = Counter()
        self.busy: Counter[str] = Counter()  # per reader: wall seconds its workers took for the batches
        self.ort_only: dict[str, dict[str, Any]] = {}
        self.cases = 0

    # one batch of cases through every reader
    def run_batch(self, indices: list[int]) -> None:
        bdir = self.work / "batch"
        shutil.rmtree(bdir, ignore_errors=True)
        bdir.mkdir()
        cases = [
            mutate.materialize(
                mutate.case_spec(self.cfg.seed, i), self.bases, bdir / f"c{i:07d}", self.shared
            )
            for i in indices
        ]
        items = [(c, self.bases[c.spec.base].feeds) for c in cases]
        results: dict[str, list[dict[str, Any]]] = {}
        threads = []

        def go(r: str) -> None:
            t = time.monotonic()
            results[r] = self.pools[r].run(items)
            self.busy[r] += time.monotonic() - t

        for r in self.cfg.readers:
            t = threading.Thread(target=go, args=(r,), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        for j, c in enumerate(cases):
            self.analyze(c, {r: results[r][j] for r in self.cfg.readers})
        self.cases += len(cases)
        shutil.rmtree(bdir, ignore_errors=True)
        for r, p in self.pools.items():
            for bad in p.exits():
                self.exit_finding(r, bad)

    def exit_finding(self, reader: str, bad: dict[str, Any]) -> None:
        self.finding_counts[f"{reader}:exit"] += 1
        self.findings.append({"kind": "exit", "reader": reader, "case": None, "result": bad})

    def keep_case(self, case: mutate.Case, tag: str) -> str | None:
        if self.keep is None:
            return None
        dst = self.keep / tag
        if dst.exists():
            return str(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(
                case.dir, dst, symlinks=True, ignore_dangling_symlinks=True, copy_function=_copy_special
            )
        except (OSError, shutil.Error):
            pass
        (self.keep / f"{tag}.json").write_text(
            json.dumps({"spec": case.spec.to_json(), "notes": case.notes}, indent=1)
        )
        return str(dst)

    def finding(self, kind: str, reader: str, case: mutate.Case, res: dict[str, Any]) -> None:
        self.finding_counts[f"{reader}:{kind}"] += 1
        if sum(1 for f in self.findings if f["kind"] == kind and f["reader"] == reader) >= 20:
            return
        self.findings.append(
            {
                "kind": kind,
                "reader": reader,
                "case": case.spec.index,
                "spec": case.spec.to_json(),
                "notes": case.notes,
                "result": res,
                "kept": self.keep_case(case, f"finding-{reader}-{kind}-{case.spec.index}"),
            }
        )

    def analyze(self, case: mutate.Case, res: dict[str, dict[str, Any]]) -> None:
        for op in case.spec.ops:
            self.mutation_counts[op.name] += 1
        limit = self.cfg.mem_limit_mb * 1024
        for r, x in res.items():
            st = status_of(r, x)
            self.counts[r][st] += 1
            if st not in CLEAN:
                self.finding(st, r, case, x)
            growth = x.get("rss_growth_kib", x.get("peak_rss_kib", -1))
            if isinstance(growth, int) and growth > limit:
                self.finding("memory", r, case, x)
            if r in ("native", "asan") and x.get("error_utf8") is False:
                # an edgemoe::Error quoting invalid bytes (nlohmann's parse errors do): not a finding, the
                # library makes messages valid UTF-8 where they leave it (the OrtStatus, checked in "ort")
                self.info[f"{r}: error message not UTF-8"] += 1
        clean = {r: status_of(r, x) in CLEAN for r, x in res.items()}
        if "ort" in res and "native" in res and clean["ort"] and clean["native"]:
            o, n = status_of("ort", res["ort"]), verdict("native", res["native"])
            if o == "ok" and n != ("ok", "ok"):
                self.finding(
                    "ort_runs_what_native_refuses", "ort", case, {"ort": res["ort"], "native": res["native"]}
                )
            key = f"ort {o} / native {'ok' if n == ('ok', 'ok') else 'reject'}"
            self.ort_vs_native[key] += 1
            if o != "ok" and n == ("ok", "ok"):  # the op's own checks (attributes vs manifest, budget, ...)
                sig = normalize(str(res["ort"].get("error")), str(case.dir), str(self.shared))
                self.ort_only.setdefault(sig, {"count": 0, "case": case.spec.index, "notes": case.notes})
                self.ort_only[sig]["count"] += 1
        if "python" in res and "native" in res and clean["python"] and clean["native"]:
            vp, vn = verdict("python", res["python"]), verdict("native", res["native"])
            self.verdicts[f"python {vp} / native {vn}"] += 1
            d = compare(res["python"], res["native"], str(case.dir), str(self.shared))
            if d is not None:
                self.disagreement(case, res, d)

    def disagreement(
        self, case: mutate.Case, res: dict[str, dict[str, Any]], d: tuple[str, str, str]
    ) -> None:
        stage, accepted_by, msg = d
        sig = normalize(msg, str(case.dir), str(self.shared))
        key = (stage, accepted_by, sig)
        k = match_known(stage, accepted_by, msg)
        dis = self.disagreements.get(key)
        if dis is None:
            dis = self.disagreements[key] = Disagreement(stage, accepted_by, sig, k.id if k else None)
            dis.first = case.spec.index
            dis.example = {
                "case": case.spec.index,
                "spec": case.spec.to_json(),
                "notes": case.notes,
                "python": res["python"],
                "native": res["native"],
            }
            if "ort" in res:
                dis.example["ort"] = res["ort"]
        dis.count += 1

    # minimization: drop mutations while the signature stays
    def evaluate(self, spec: mutate.CaseSpec, dest: Path) -> tuple[mutate.Case, dict[str, dict[str, Any]]]:
        case = mutate.materialize(spec, self.bases, dest, self.shared)
        feeds = self.bases[spec.base].feeds
        res = {r: self.pools[r].run([(case, feeds)])[0] for r in ("python", "native") if r in self.pools}
        return case, res

    def minimize(self, dis: Disagreement) -> None:
        spec = mutate.case_spec(self.cfg.seed, dis.first)
        dest = self.work / "minimize"
        key = (dis.stage, dis.accepted_by, dis.signature)

        def same(s: mutate.CaseSpec) -> bool:
            case, res = self.evaluate(s, dest)
            if not all(status_of(r, x) in CLEAN for r, x in res.items()) or len(res) < 2:
                return False
            d = compare(res["python"], res["native"], str(case.dir), str(self.shared))
            return d is not None and (d[0], d[1], normalize(d[2], str(case.dir), str(self.shared))) == key

        j = 0
        while j < len(spec.ops) and len(spec.ops) > 1:
            s = spec.without(j)
            if same(s):
                spec = s
            else:
                j += 1
        case, res = self.evaluate(spec, dest)
        base_text = (self.bases[spec.base].path / mutate.MANIFEST).read_bytes()
        diff: list[str] = []
        mf = case.dir / mutate.MANIFEST
        if mf.is_file() and not mf.is_symlink() and mf.stat().st_size < (8 << 20):
            a = _lines(mutate.encode(mutate.dump(self.bases[spec.base].manifest, spec.style)))
            b = _lines(mf.read_bytes())
            diff = [ln[:300] for ln in difflib.unified_diff(a, b, "base", "case", n=0, lineterm="")][:60]
        dis.example["minimized"] = {
            "spec": spec.to_json(),
            "notes": case.notes,
            "manifest_diff": diff,
            "base_manifest_bytes": len(base_text),
            "python": res.get("python"),
            "native": res.get("native"),
            "replay": f".venv/bin/python -m tests.fuzz.run --seed {self.cfg.seed} --replay {dis.first}",
            "kept": self.keep_case(case, f"disagreement-{dis.stage}-{dis.accepted_by}-{dis.first}"),
        }
        shutil.rmtree(dest, ignore_errors=True)

    def check_bases(self) -> None:
        """The base bundles are unchanged (cases hard-link their files: a mutation writing through a link
        would corrupt every later case)."""
        from edgemoe_ort.bundle import Bundle

        for name, b in self.bases.items():
            for f in (mutate.MANIFEST, mutate.STORE, mutate.GRAPH):  # and their copies outside the cases
                if (b.path / f).read_bytes() != (self.shared / name / f).read_bytes():
                    self.finding_counts["harness:base_modified"] += 1
                    self.findings.append(
                        {
                            "kind": "base_modified",
                            "reader": "harness",
                            "case": None,
                            "result": {"base": name, "error": f"outside/{name}/{f} changed"},
                        }
                    )
            try:
                bundle = Bundle.open(b.path)
                for li, lay in enumerate(bundle.layers):
                    for e in range(int(lay["num_experts"])):
                        bundle.read_blob(li, e)
            except Exception as exc:
                self.finding_counts["harness:base_modified"] += 1
                self.findings.append(
                    {
                        "kind": "base_modified",
                        "reader": "harness",
                        "case": None,
                        "result": {"base": name, "error": str(exc)[:2000]},
                    }
                )

    def close(self) -> None:
        for r, p in self.pools.items():
            for bad in p.close():
                self.exit_finding(r, bad)

    def report(self, wall: float) -> dict[str, Any]:
        dis = sorted(self.disagreements.values(), key=lambda d: (d.known is not None, -d.count))
        seen_known = {d.known for d in dis if d.known}
        return {
            "command": " ".join(sys.argv),
            "seed": self.cfg.seed,
            "cases": self.cases,
            "jobs": self.cfg.jobs,
            "readers": {
                r: dict(self.counts[r], cases=sum(self.counts[r].values()), restarts=self.pools[r].restarts)
                for r in self.cfg.readers
            },
            "wall_s": round(wall, 1),
            "reader_busy_s": {r: round(self.busy[r], 1) for r in self.cfg.readers},
            "cases_per_s": round(self.cases / wall, 2) if wall > 0 else None,
            "findings_by_kind": dict(self.finding_counts),
            "findings": self.findings,
            "disagreements": [
                {
                    "stage": d.stage,
                    "accepted_by": d.accepted_by,
                    "signature": d.signature,
                    "known": d.known,
                    "count": d.count,
                    "example": d.example,
                }
                for d in dis
            ],
            "unknown_disagreements": sum(1 for d in dis if d.known is None),
            "known_not_seen": [k.id for k in KNOWN if k.id not in seen_known],
            "verdicts": dict(self.verdicts),
            "ort_vs_native": dict(self.ort_vs_native),
            "ort_refuses_native_accepts": dict(list(self.ort_only.items())[:30]),
            "mutations": dict(self.mutation_counts),
            "info": dict(self.info),
        }


def _lines(b: bytes) -> list[str]:
    return b.decode("utf-8", "backslashreplace").splitlines()


def _copy_special(src: str, dst: str) -> None:
    """copytree's copy function that recreates FIFOs instead of opening them, and keeps huge files sparse."""
    import stat

    st = os.lstat(src)
    if stat.S_ISFIFO(st.st_mode):
        os.mkfifo(dst)
    elif stat.S_ISREG(st.st_mode) and st.st_size > (64 << 20):  # a store extended to a sparse GiB
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fo.write(fi.read(64 << 20))  # (what follows is the zeros of the extension)
            fo.truncate(st.st_size)
    else:
        shutil.copy2(src, dst)


def fuzz(
    cases: int,
    cfg: Config,
    *,
    out: Path | None = None,
    work: Path | None = None,
    batch: int = 250,
    minimize: int = 40,
    progress: bool = False,
) -> dict[str, Any]:
    """Runs ``cases`` cases of ``cfg.seed`` through ``cfg.readers`` and returns the report (also written to
    ``out``, with the kept cases in ``<out>-cases/``)."""
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="edgemoe-fuzz-", dir=work))
    keep = out.with_name(out.stem + "-cases") if out is not None else None
    if keep is not None and keep.exists():
        shutil.rmtree(keep)
    fz = Fuzzer(cfg, tmp, keep)
    interrupted = False
    try:
        for start in range(0, cases, batch):
            try:
                fz.run_batch(list(range(start, min(cases, start + batch))))
            except KeyboardInterrupt:  # SIGINT / SIGTERM: report the batches done so far
                interrupted = True
                break
            if progress:
                el = time.monotonic() - t0
                print(
                    f"[fuzz] {fz.cases}/{cases} cases, {fz.cases / el:.1f}/s, findings "
                    f"{sum(fz.finding_counts.values())}, "
                    f"disagreements {sum(d.count for d in fz.disagreements.values())}"
                    f" ({len(fz.disagreements)} signatures)",
                    file=sys.stderr,
                    flush=True,
                )
        wall = time.monotonic() - t0
        todo = sorted(fz.disagreements.values(), key=lambda d: (d.known is not None, -d.count))[:minimize]
        if "python" in fz.pools and "native" in fz.pools and not interrupted:
            for d in todo:
                fz.minimize(d)
        fz.close()
        fz.check_bases()
        rep = fz.report(wall)
        rep["wall_s_with_minimize"] = round(time.monotonic() - t0, 1)
        rep["interrupted"] = interrupted
    finally:
        for p in fz.pools.values():
            p.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1, ensure_ascii=True) + "\n")
    return rep


def summary(rep: dict[str, Any]) -> str:
    lines = [f"{rep['cases']} cases in {rep['wall_s']} s ({rep['cases_per_s']}/s), seed {rep['seed']}"]
    for r, c in rep["readers"].items():
        lines.append(f"  {r:7s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    lines.append(f"  findings: {rep['findings_by_kind'] or 'none'}")
    for f in rep["findings"][:20]:
        lines.append(f"    {f['reader']} {f['kind']} case {f['case']}: {f.get('notes')}")
    lines.append(
        f"  disagreements: {len(rep['disagreements'])} signatures ({rep['unknown_disagreements']} unknown)"
    )
    for d in rep["disagreements"]:
        m = d["example"].get("minimized", {})
        tag = f"known {d['known']}" if d["known"] else "UNKNOWN"
        lines.append(
            f"    [{tag}] {d['stage']}: {d['accepted_by']} accepts, x{d['count']}: {d['signature'][:160]}"
        )
        lines.append(f"        e.g. case {d['example']['case']}: {m.get('notes', d['example']['notes'])}")
    return "\n".join(lines)


def replay(seed: int, index: int, dest: Path, cfg: Config) -> None:
    work = Path(tempfile.mkdtemp(prefix="edgemoe-fuzz-replay-"))
    bases = mutate.build_bases(work / "bases")
    shared = mutate.shared_dir(work, bases)
    spec = mutate.case_spec(seed, index)
    case = mutate.materialize(spec, bases, dest, shared)
    print(json.dumps({"spec": spec.to_json(), "notes": case.notes, "dir": str(dest)}, indent=1))
    logdir = work / "logs"
    logdir.mkdir()
    for r in cfg.readers:
        p = Pool(r, Config(**{**cfg.__dict__, "jobs": 1}), logdir)
        print(r, json.dumps(p.run([(case, bases[spec.base].feeds)])[0], ensure_ascii=True))
        p.close()
    print(f"(the case stays in {dest}; its symlinks point into {shared})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="worker processes per reader")
    ap.add_argument(
        "--asan", action="store_true", help="also run the ASan/UBSan driver (build/asan/fuzz_reader)"
    )
    ap.add_argument(
        "--readers", default="python,ort,native", help=f"comma-separated, of {', '.join(READERS)}"
    )
    ap.add_argument("--out", type=Path, default=None, help="the JSON report (kept cases in <out>-cases/)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case (x3 under ASan)")
    ap.add_argument(
        "--mem-limit-mb", type=int, default=256, help="peak RSS growth of one case that is a finding"
    )
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the temporary cases go (default: $TMPDIR)"
    )
    ap.add_argument("--replay", type=int, default=None, help="materialize case N of --seed and run it")
    ap.add_argument("--replay-dir", type=Path, default=None)
    ap.add_argument("--lib", type=Path, default=LIB)
    ap.add_argument("--driver", type=Path, default=DRIVER)
    ap.add_argument("--asan-driver", type=Path, default=ASAN_DRIVER)
    a = ap.parse_args(argv)
    readers = tuple(r for r in a.readers.split(",") if r)
    if a.asan and "asan" not in readers:
        readers += ("asan",)
    for r in readers:
        if r not in READERS:
            ap.error(f"--readers: unknown reader {r!r}")
    need = {"ort": a.lib, "native": a.driver, "asan": a.asan_driver}
    for r, p in need.items():
        if r in readers and not p.is_file():
            ap.error(f"reader {r}: {p} not found (make lib / make test-asan)")
    cfg = Config(
        seed=a.seed,
        jobs=a.jobs,
        timeout=a.timeout,
        mem_limit_mb=a.mem_limit_mb,
        readers=readers,
        lib=a.lib,
        driver=a.driver,
        asan_driver=a.asan_driver,
    )
    if a.replay is not None:
        replay(
            a.seed, a.replay, a.replay_dir or Path(tempfile.mkdtemp(prefix=f"edgemoe-case{a.replay}-")), cfg
        )
        return 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID: a report of what ran
    rep = fuzz(a.cases, cfg, out=a.out, work=a.workdir, batch=a.batch, progress=True)
    print(summary(rep))
    bad = {k: v for k, v in rep["findings_by_kind"].items()}
    return 1 if bad or rep["unknown_disagreements"] else 0


if __name__ == "__main__":
    sys.exit(main())
