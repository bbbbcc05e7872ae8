"""Build and drive the pread fault shim (``faultshim.c``, the control file format is described there).

The shim must be preloaded when a process starts (``LD_PRELOAD``), so the tests run each batch of fault
scenarios in a child process (:func:`run_child`, which runs ``child.py``); inside the child,
:class:`ShimControl` switches the fault plan on and off and reads the shim's counters.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

SOURCE = Path(__file__).with_name("faultshim.c")
CHILD = Path(__file__).with_name("child.py")
CONTROL_ENV = "FAULTSHIM_CONTROL"
KINDS = ("eio", "eintr", "short", "delay", "corrupt_reread")
CFLAGS = ("-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC")


def compiler() -> str | None:
    """The system C compiler (``$CC``, else ``cc`` / ``gcc`` / ``clang``), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build_shim(out_dir: Path) -> Path:
    """Compile ``faultshim.c`` into ``out_dir/faultshim.so`` (warnings are errors) and return its path."""
    cc = compiler()
    if cc is None:
        raise FileNotFoundError("no C compiler (cc, gcc or clang) to build the fault shim")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "faultshim.so"
    cmd = [cc, *CFLAGS, "-o", str(out), str(SOURCE), "-ldl", "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{SOURCE}: build failed ({' '.join(cmd)}):\n{r.stderr}")
    return out


def write_plan(control: Path, plan: str) -> None:
    """Replace the control file atomically (a new inode: the shim sees the change at its next pread)."""
    tmp = control.with_name(control.name + ".tmp")
    tmp.write_text(plan + ("\n" if plan and not plan.endswith("\n") else ""))
    os.replace(tmp, control)


class ShimControl:
    """The shim as seen from inside the preloaded process: its plan and its counters (since the plan)."""

    def __init__(self, control: Path) -> None:
        self.control = control
        lib = ctypes.CDLL(None)
        try:
            self._rules = lib.faultshim_rules
        except AttributeError:
            raise RuntimeError("the fault shim is not preloaded (LD_PRELOAD)") from None
        self._rules.restype = ctypes.c_long
        self._error = lib.faultshim_error
        self._error.restype = ctypes.c_char_p
        self._fired = lib.faultshim_fired
        self._fired.restype = ctypes.c_long
        self._fired.argtypes = [ctypes.c_char_p]
        self._matched = lib.faultshim_matched
        self._matched.restype = ctypes.c_long

    def set_plan(self, plan: str) -> int:
        """Switch to ``plan`` (counters restart) and return its number of rules; a plan the shim cannot
        parse raises ValueError (so a typo never turns into a scenario without faults)."""
        write_plan(self.control, plan)
        n = int(self._rules())
        if n < 0:
            raise ValueError(f"fault plan {plan!r}: {(self._error() or b'').decode()}")
        if plan.strip() and n == 0 and any(w in plan for w in KINDS):
            raise ValueError(f"fault plan {plan!r}: no rule loaded")
        return n

    def clear(self) -> None:
        self.set_plan("")

    def fired(self, kind: str | None = None) -> int:
        return int(self._fired(kind.encode() if kind else None))

    def matched(self) -> int:
        """preads of the faulted file since the plan was set."""
        return int(self._matched())


Expect = Literal["clean", "error", "either"]


@dataclass(frozen=True)
class Scenario:
    """One fault: ``plan`` is on while ``phase`` runs (``generate``: one generate() on the open model;
    ``load``: opening the model; ``chat``: the second turn of a new chat), then cleared and the generation
    runs again (generate(); ``chat``: the same second turn). ``expect`` is what the fault must
    give: the clean tokens, one exception, or either (a fault that may hit a prefetch nobody waits for)."""

    name: str
    plan: str
    expect: Expect
    phase: Literal["generate", "load", "chat"] = "generate"
    note: str = ""


def run_child(
    shim: Path,
    bundle: Path,
    io: str,
    scenarios: list[Scenario],
    workdir: Path,
    *,
    budget: str,
    prompt: str,
    max_new_tokens: int,
    chat_turns: tuple[str, str] | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Run ``scenarios`` in one child process with the shim preloaded; returns ``child.py``'s results
    (``chat_turns``: the two user turns of the ``chat`` scenarios)."""
    workdir.mkdir(parents=True, exist_ok=True)
    control = workdir / "faults.plan"
    write_plan(control, "")
    spec = {
        "bundle": str(bundle), "io": io, "budget": budget, "prompt": prompt, "max_new_tokens": max_new_tokens,
        "control": str(control), "timeout": timeout, "chat_turns": list(chat_turns or ()),
        "scenarios": [asdict(s) for s in scenarios],
    }
    spec_path, out_path = workdir / "spec.json", workdir / "results.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (str(shim), env.get("LD_PRELOAD", "")) if p)
    env[CONTROL_ENV] = str(control)
    tests_dir = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, env.get("PYTHONPATH", "")) if p)
    try:
        r = subprocess.run(
            [sys.executable, str(CHILD), str(spec_path), str(out_path)],
            capture_output=True, text=True, timeout=timeout + 10, env=env,
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise AssertionError(f"fault child ({io}) hung for {timeout + 10:.0f} s:\n{err[-4000:]}") from None
    if r.returncode != 0 or not out_path.is_file():
        raise AssertionError(f"fault child ({io}) exited with {r.returncode}:\n{r.stderr[-4000:]}")
    return json.loads(out_path.read_text())
