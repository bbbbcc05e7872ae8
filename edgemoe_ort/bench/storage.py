"""Storage side of the benchmarks: an O_DIRECT read-bandwidth probe and the storage profiles "
"(profiles/*.toml)."""

from __future__ import annotations

import mmap
import os
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from edgemoe_ort.resources import data_dir

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["PROFILES_DIR", "list_profiles", "load_profile", "odirect_bandwidth"]

#: the storage profiles: the wheel's copy, else the repository's profiles/ (edgemoe_ort/resources.py)
PROFILES_DIR = data_dir("profiles")
ALIGN = 4096
REQUIRED = ("name", "device", "read_bw_bytes_per_s", "read_latency_us", "ram_bytes", "cores", "sources")


def odirect_bandwidth(
    path: str | Path,
    block_bytes: int,
    *,
    total_bytes: int = 256 << 20,
    repeats: int = 3,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """Read bandwidth of ``path``'s filesystem with O_DIRECT at ``block_bytes`` per read (rounded up to 4096),
    one reader, random aligned offsets (the cache's access pattern). Page cache bypassed: this is the device.
    With ``threads > 1`` the same is also measured with that many concurrent readers (the store's I/O pool);
    ``bytes_per_s`` is the better of the two medians (the device's bandwidth for the roofline).
    Returns ``{"bytes_per_s", "runs": [...], "block_bytes", "latency_us": median 4 KiB read,
    "direct": bool}``. Falls back to buffered reads + FADV_DONTNEED (``direct: False``) if O_DIRECT is
    refused.
    """
    path = Path(path)
    size = path.stat().st_size
    block = max(ALIGN, (int(block_bytes) + ALIGN - 1) // ALIGN * ALIGN)
    if size < block:
        block = size // ALIGN * ALIGN
    nblocks = max(1, size // block)
    direct = True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        fd, direct = os.open(path, os.O_RDONLY), False
    buf = mmap.mmap(-1, block)  # page-aligned anonymous buffer (O_DIRECT needs aligned memory)
    small = mmap.mmap(-1, ALIGN)
    rng = random.Random(seed)
    try:
        if direct:
            try:
                os.preadv(fd, [small], 0)
            except OSError:
                os.close(fd)
                fd, direct = os.open(path, os.O_RDONLY), False

        def read_at(b: mmap.mmap, n: int, off: int) -> None:
            done = 0
            mv = memoryview(b)
            while done < n:
                r = os.preadv(fd, [mv[done:n]], off + done)
                if r <= 0:
                    raise OSError(f"{path}: short read at {off + done}")
                done += r
            if not direct:
                os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)

        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        runs = []
        count = max(1, min(nblocks, total_bytes // block))
        for _ in range(repeats):
            offs = [rng.randrange(nblocks) * block for _ in range(count)]
            t0 = time.perf_counter()
            for off in offs:
                read_at(buf, block, off)
            runs.append(count * block / (time.perf_counter() - t0))
        # the same with `threads` concurrent readers (the store's I/O pool): devices serve more at depth
        par_runs = []
        if threads > 1:
            bufs = [mmap.mmap(-1, block) for _ in range(threads)]
            try:
                for _ in range(repeats):
                    offs = [rng.randrange(nblocks) * block for _ in range(count)]
                    chunks = [offs[i::threads] for i in range(threads)]

                    def worker(i: int, chunks: list[list[int]] = chunks) -> None:
                        for off in chunks[i]:
                            read_at(bufs[i], block, off)

                    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
                    t0 = time.perf_counter()
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join()
                    par_runs.append(count * block / (time.perf_counter() - t0))
            finally:
                for b in bufs:
                    b.close()
        lats = []
        for _ in range(64):
            off = rng.randrange(size // ALIGN) * ALIGN
            t0 = time.perf_counter()
            read_at(small, ALIGN, off)
            lats.append((time.perf_counter() - t0) * 1e6)
    finally:
        os.close(fd)
        buf.close()
        small.close()
    return {
        "bytes_per_s": max(statistics.median(runs), statistics.median(par_runs) if par_runs else 0.0),
        "qd1_bytes_per_s": statistics.median(runs),
        "parallel_bytes_per_s": statistics.median(par_runs) if par_runs else None,
        "threads": threads,
        "runs": runs,
        "parallel_runs": par_runs,
        "block_bytes": block,
        "latency_us": statistics.median(lats),
        "direct": direct,
        "file": str(path),
    }


def list_profiles(directory: str | Path | None = None) -> list[str]:
    d = Path(directory) if directory else PROFILES_DIR
    return sorted(p.stem for p in d.glob("*.toml"))


def load_profile(name_or_path: str | Path, directory: str | Path | None = None) -> dict[str, Any]:
    """A storage profile: ``profiles/<name>.toml`` or a path. Checks the required fields (see REQUIRED)."""
    p = Path(name_or_path)
    if not p.suffix:
        p = (Path(directory) if directory else PROFILES_DIR) / f"{name_or_path}.toml"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p}: no such storage profile (known: {', '.join(list_profiles(directory)) or 'none'})"
        )
    with open(p, "rb") as f:
        prof = tomllib.load(f)
    missing = [k for k in REQUIRED if k not in prof]
    if missing:
        raise ValueError(f"{p}: missing {', '.join(missing)}")
    if not isinstance(prof["sources"], list) or not prof["sources"]:
        raise ValueError(f"{p}: sources: expected a non-empty list")
    for k in ("read_bw_bytes_per_s", "read_latency_us", "ram_bytes", "cores"):
        v = prof[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{p}: {k}: expected a positive number, found {v!r}")
    prof["path"] = str(p)
    return prof
