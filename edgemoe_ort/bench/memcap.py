"""Run a command inside a real memory cap (a memory cgroup of its own) and report what it used.

Works with cgroup v1 (the ``memory`` controller mounted on its own: ``memory.limit_in_bytes``,
``memory.max_usage_in_bytes``, ``memory.failcnt``, ``memory.oom_control``) and cgroup v2 (``memory.max``,
``memory.peak``, ``memory.events``), whichever this machine has; root (or a delegated cgroup) is needed.

The group is created under the caller's own memory cgroup when that is writable (so the cap nests inside
whatever limit the caller already runs under), else under the hierarchy's root; its name is unique
(``edgemoe-memcap-<pid>-<random>``), so several runs may be in flight, and it is removed afterwards.

>>> reason = memory_cap_support()          # None: usable
>>> r = run_capped(["edgemoe-run", "b", "--prompt", "x", "--budget", "25%"], 300 << 20, drop_caches=True)
>>> r.returncode, r.oom_killed, r.peak_bytes

The cap charges the page cache as well as anonymous memory; the kernel reclaims page cache under pressure, so
only memory that cannot be reclaimed (heap, no swap) gets a process OOM-killed. ``peak_bytes`` is the
group's peak charge (page cache included, so it often sits near the cap); ``peak_anon_bytes`` samples the
anonymous part, which is what the cap really bounds.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CapResult", "drop_page_cache", "memory_cap_support", "run_capped"]

PREFIX = "edgemoe-memcap"
_SAMPLE_S = 0.02


@dataclass
class CapResult:
    """What a capped run did. ``returncode`` follows the shell convention for a signal: 128 + signal number
    (an OOM kill is SIGKILL: 137)."""

    returncode: int
    oom_killed: bool
    peak_bytes: int | None  # peak charge of the group (v1 max_usage_in_bytes, v2 memory.peak), page cache in
    stdout: str
    stderr: str
    limit_bytes: int = 0
    peak_anon_bytes: int | None = None  # sampled peak of anonymous memory (v1 stat rss, v2 stat anon)
    failcnt: int | None = None  # v1 memory.failcnt; v2 memory.events "max" (times the cap was hit)
    timed_out: bool = False
    cgroup_version: int = 0
    stat: dict[str, int] = field(default_factory=dict)  # memory.stat of the group when the command ended


@dataclass
class _Hierarchy:
    version: int  # 1 or 2
    parent: Path  # the folder new groups are made in


def _mounts() -> list[tuple[str, str, str, str]]:
    """(mount root, mount point, fstype, super options) of every cgroup mount (/proc/self/mountinfo)."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if len(lf) >= 5 and len(rf) >= 3 and rf[0] in ("cgroup", "cgroup2"):
            out.append((lf[3], lf[4].replace("\\040", " "), rf[0], rf[2]))
    return out


def _own_paths() -> dict[str, str]:
    """controller (``memory`` for v1, ``""`` for v2) -> this process's cgroup path (/proc/self/cgroup)."""
    paths: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for ctrl in parts[1].split(","):
            paths[ctrl] = parts[2]
    return paths


def _under(mount_point: str, mount_root: str, cg_path: str) -> Path:
    rel = cg_path
    if mount_root != "/" and (rel == mount_root or rel.startswith(mount_root + "/")):
        rel = rel[len(mount_root):]
    return Path(mount_point) / rel.lstrip("/")


def _writable(p: Path) -> bool:
    return p.is_dir() and os.access(p, os.W_OK)


def _find() -> tuple[_Hierarchy | None, str]:
    """The hierarchy to use, or None and why not."""
    if not Path("/proc/self/cgroup").exists():
        return None, "no /proc/self/cgroup (not Linux, or /proc is not mounted)"
    mounts = _mounts()
    own = _own_paths()
    v1 = [m for m in mounts if m[2] == "cgroup" and "memory" in m[3].split(",")]
    for root, point, _, _ in v1:
        candidates = [_under(point, root, own["memory"])] if "memory" in own else []
        candidates.append(Path(point))
        for c in candidates:
            if _writable(c) and (c / "memory.limit_in_bytes").exists():
                return _Hierarchy(1, c), ""
        return None, f"cgroup v1 memory controller at {point} is not writable (run as root)"
    v2 = [m for m in mounts if m[2] == "cgroup2"]
    reasons = []
    for root, point, _, _ in v2:
        base = Path(point)
        start = _under(point, root, own.get("", "/"))
        chain = [start, *[p for p in start.parents if p == base or base in p.parents]]
        for c in chain:
            try:
                sub = (c / "cgroup.subtree_control").read_text().split()
            except OSError:
                continue
            if "memory" in sub and _writable(c):
                return _Hierarchy(2, c), ""
        try:
            ctrls = (base / "cgroup.controllers").read_text().split()
        except OSError:
            ctrls = []
        reasons.append(
            f"cgroup v2 at {point} has no memory controller"
            if "memory" not in ctrls
            else f"cgroup v2 at {point}: no writable group with memory in cgroup.subtree_control"
        )
    if reasons:
        return None, "; ".join(reasons)
    return None, "no cgroup memory controller is mounted (neither v1 memory nor v2 with memory)"


def _write(p: Path, value: str) -> None:
    with open(p, "w") as f:
        f.write(value)


def _read_int(p: Path) -> int | None:
    try:
        s = p.read_text().strip()
    except OSError:
        return None
    return None if s == "max" else int(s) if s.isdigit() else None


def _read_kv(p: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in p.read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


def _make_group(h: _Hierarchy, limit_bytes: int) -> Path:
    g = h.parent / f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    g.mkdir()
    try:
        if h.version == 1:
            _write(g / "memory.limit_in_bytes", str(limit_bytes))
            if (g / "memory.memsw.limit_in_bytes").exists():  # swap must not hide growth either
                try:
                    _write(g / "memory.memsw.limit_in_bytes", str(limit_bytes))
                except OSError:
                    pass
        else:
            _write(g / "memory.max", str(limit_bytes))
            if (g / "memory.swap.max").exists():
                _write(g / "memory.swap.max", "0")
    except BaseException:
        _remove_group(g)
        raise
    return g


def _remove_group(g: Path, wait_s: float = 10.0) -> None:
    """Remove ``g``; processes still in it were started by us (run_capped) and are killed by pid first."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            pids = [int(x) for x in (g / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            g.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def memory_cap_support() -> str | None:
    """None if :func:`run_capped` can cap memory on this machine, else the reason it cannot (no memory
    controller, not writable, ...). Creates and removes a probe group to be sure."""
    h, why = _find()
    if h is None:
        return why
    try:
        g = _make_group(h, 64 << 20)
    except OSError as exc:
        return f"cannot create a memory cgroup under {h.parent}: {exc}"
    try:
        _remove_group(g)
    except OSError as exc:
        return f"cannot remove the probe cgroup {g}: {exc}"
    return None


def drop_page_cache() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` (root), so a run starts with a cold page cache."""
    os.sync()
    try:
        _write(Path("/proc/sys/vm/drop_caches"), "3")
    except OSError as exc:
        raise PermissionError(
            f"/proc/sys/vm/drop_caches: expected to be writable (root) to drop the page cache, found {exc}"
        ) from None


def _dmesg_oom(pid: int) -> bool:
    """Whether the kernel log reports an OOM kill of ``pid`` (fallback when no counter exists)."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(re.search(rf"(Memory cgroup out of memory|oom-kill).*\b{pid}\b|Killed process {pid}\b", log))


def run_capped(
    cmd: Sequence[str],
    limit_bytes: int,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    drop_caches: bool = False,
    cwd: str | Path | None = None,
) -> CapResult:
    """Run ``cmd`` (argv list; ``env=None`` inherits ours) in a new memory cgroup capped at ``limit_bytes``
    and wait for it (at most ``timeout`` seconds, then it is killed and ``timed_out`` is set). With
    ``drop_caches`` the page cache is dropped first. Raises RuntimeError if the machine cannot cap memory
    (see :func:`memory_cap_support`)."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 1 << 20:
        raise ValueError(f"limit_bytes: expected an int >= 1 MiB, found {limit_bytes!r}")
    if not cmd:
        raise ValueError("cmd: expected a non-empty argv list, found an empty one")
    h, why = _find()
    if h is None:
        raise RuntimeError(f"cannot cap memory here: {why}")
    if drop_caches:
        drop_page_cache()
    g = _make_group(h, limit_bytes)
    try:
        procs = g / "cgroup.procs"
        # The child joins the group before exec: everything the command allocates is charged to it.
        wrapper = ["/bin/sh", "-c", 'echo $$ > "$0" || exit 126; exec "$@"', str(procs), *map(str, cmd)]
        anon_key = "rss" if h.version == 1 else "anon"
        peak_anon, peak_sampled = [0], [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                v = _read_kv(g / "memory.stat").get(anon_key)
                if v is not None and v > peak_anon[0]:
                    peak_anon[0] = v
                cur = _read_int(g / ("memory.usage_in_bytes" if h.version == 1 else "memory.current"))
                if cur is not None and cur > peak_sampled[0]:
                    peak_sampled[0] = cur
                stop.wait(_SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        proc = subprocess.Popen(
            wrapper, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
            env=None if env is None else dict(env), cwd=cwd, start_new_session=True,
        )
        sampler.start()
        timed_out = False
        try:
            out, errs = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the session we started for this command
            except ProcessLookupError:
                pass
            out, errs = proc.communicate()
        stop.set()
        sampler.join()
        rc = proc.returncode
        if rc == 126 and "cgroup.procs" in errs and not out:
            raise RuntimeError(f"{procs}: could not move the command into its memory cgroup: {errs.strip()}")
        rc = 128 - rc if rc < 0 else rc
        stat = _read_kv(g / "memory.stat")
        if h.version == 1:
            peak = _read_int(g / "memory.max_usage_in_bytes")
            failcnt = _read_int(g / "memory.failcnt")
            oc = _read_kv(g / "memory.oom_control")
            if "oom_kill" in oc:
                oom = oc["oom_kill"] > 0
            else:  # kernels before 4.13 have no counter: hit the cap and died of SIGKILL
                oom = rc == 128 + signal.SIGKILL and bool(failcnt) and not timed_out
                oom = oom or (rc == 128 + signal.SIGKILL and _dmesg_oom(proc.pid))
        else:
            peak = _read_int(g / "memory.peak")
            ev = _read_kv(g / "memory.events")
            failcnt = ev.get("max")
            oom = ev.get("oom_kill", 0) > 0
        if peak is None:
            peak = peak_sampled[0] or None
        return CapResult(
            returncode=rc, oom_killed=oom, peak_bytes=peak, stdout=out, stderr=errs, limit_bytes=limit_bytes,
            peak_anon_bytes=peak_anon[0] or None, failcnt=failcnt, timed_out=timed_out,
            cgroup_version=h.version, stat=stat,
        )
    finally:
        _remove_group(g)
