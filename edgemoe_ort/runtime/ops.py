"""Python side of the ``OffloadedExpert`` runtime (docs/op-contract.md): find the custom-op library, turn
:class:`RuntimeOptions` into session config entries, open sessions, read the store statistics.

Device-side code: imports neither torch nor transformers.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from edgemoe_ort.bundle.profile import PREDICTORS as _PROFILE_PREDICTORS

__all__ = [
    "ENV_LIB",
    "IO_MODES",
    "POLICIES",
    "PREDICTORS",
    "ROUTING_RULES",
    "MISS_PRECISIONS",
    "ExpertSession",
    "RuntimeOptions",
    "kernel_path",
    "config_keys",
    "config_table_markdown",
    "library_path",
    "policies",
    "make_session_options",
    "open_session",
    "parse_budget",
    "release_free_heap",
    "reset_store_stats",
    "session_config_entries",
    "store_stats",
]

ENV_LIB = "EDGEMOE_CUSTOMOPS_LIB"
LIB_NAME = "libedgemoe_customops.so"
POLICIES = ("lru", "lfu", "edgemoe", "hobbit", "pinned", "none")
#: ``--predictor`` / ``edgemoe.predictor``: the profile's predictor names (the one list, shared with the op
#: library's ``predictor_names()``; tests/test_config_table.py checks they agree), ``none`` and ``auto``
PREDICTORS = ("none", *_PROFILE_PREDICTORS, "auto")
ROUTING_RULES = ("exact", "cache-prior", "max-rank")
MISS_PRECISIONS = ("exact", "dynamic")
MAX_ROUTING_LAMBDA = 100.0
MAX_ROUTING_RANK = 1024
MAX_PREFETCH_DEPTH = 8
IO_MODES = ("direct", "buffered", "mmap")
MAX_IO_THREADS = 256

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}
_BUDGET_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)([a-zA-Z]*|%)$")


def library_path() -> Path:
    """The custom-op library: ``$EDGEMOE_CUSTOMOPS_LIB`` if set, else
    ``edgemoe_ort/_lib/libedgemoe_customops.so`` (built by ``make lib``)."""
    env = os.environ.get(ENV_LIB)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"{ENV_LIB}={env}: no such file (unset it to use the library built by `make lib`)"
            )
        return p.resolve()
    p = Path(__file__).resolve().parent.parent / "_lib" / LIB_NAME
    if not p.is_file():
        raise FileNotFoundError(
            f"{p}: the edgemoe custom-op library is not built; run `make lib` in the repository root "
            f"(or point {ENV_LIB} at a built {LIB_NAME})"
        )
    return p


_lib_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}


def _lib() -> ctypes.CDLL:
    """The library, loaded once per path with ctypes. ORT's dlopen of the same file returns this very instance
    (the dynamic loader shares one copy per file), so its stats registry is the one the sessions write to.
    Loading it here first also keeps it loaded after ORT releases it, so statistics outlive the sessions."""
    path = str(library_path())
    with _lib_lock:
        lib = _libs.get(path)
        if lib is None:
            lib = ctypes.CDLL(path)
            lib.edgemoe_store_stats_json.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64]
            lib.edgemoe_store_stats_json.restype = ctypes.c_int64
            lib.edgemoe_store_reset_stats.argtypes = [ctypes.c_char_p]
            lib.edgemoe_store_reset_stats.restype = None
            lib.edgemoe_kernel_path.argtypes = []
            lib.edgemoe_kernel_path.restype = ctypes.c_char_p
            for fn in (
                lib.edgemoe_config_keys_json,
                lib.edgemoe_policies_json,
                lib.edgemoe_reader_limits_json,
            ):
                fn.argtypes = [ctypes.c_char_p, ctypes.c_int64]
                fn.restype = ctypes.c_int64
            lib.edgemoe_thread_stats_begin.argtypes = [ctypes.c_char_p]
            lib.edgemoe_thread_stats_begin.restype = ctypes.c_int64
            lib.edgemoe_thread_stats_json.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64]
            lib.edgemoe_thread_stats_json.restype = ctypes.c_int64
            lib.edgemoe_thread_stats_end.argtypes = [ctypes.c_char_p]
            lib.edgemoe_thread_stats_end.restype = None
            lib.edgemoe_save_resident.argtypes = [
                ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64
            ]
            lib.edgemoe_save_resident.restype = ctypes.c_int64
            _libs[path] = lib
        return lib


def parse_budget(budget: int | str | None, store_bytes: int, percent_of: int | None = None) -> int:
    """Resident-expert budget in bytes. ``None`` = the whole store; an int = bytes; a string: ``"268435456"``,
    ``"256MB"`` (10^6), ``"256MiB"``/``"256M"`` (2^20), ``"1.5GiB"``, ``"25%"`` (of ``percent_of``, default
    ``store_bytes``; pass a bundle's ``primary_bytes``: a percentage is of the primary experts, twins aside).
    Same grammar as the C++ side (``edgemoe.budget``)."""
    if budget is None:
        return int(store_bytes)
    if percent_of is not None:
        store_bytes = percent_of
    if isinstance(budget, bool):
        raise ValueError(f"budget: expected bytes, a size string or a percentage, found {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget: expected at least 1 byte, found {budget}")
        return budget
    if not isinstance(budget, str):
        raise ValueError(
            f"budget: expected an int, a size string ('256MB', '1GiB') or '25%', found {budget!r}"
        )
    s = "".join(budget.split())
    m = _BUDGET_RE.match(s)
    if not m:
        raise ValueError(f"budget: expected bytes ('268435456'), a size ('256MB', '1GiB') or a percentage "
                         f"of the experts ('25%'), found {budget!r}")
    num, unit = m.group(1), m.group(2).lower()
    x = float(num)
    if unit == "%":
        if not 0 < x <= 100:
            raise ValueError(f"budget: a percentage must be in (0, 100], found {budget!r}")
        val = math.floor(x / 100.0 * store_bytes)
    else:
        if unit not in _UNITS:
            raise ValueError(f"budget: unknown unit {m.group(2)!r} in {budget!r} "
                             f"(expected B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or %)")
        if unit == "" and "." in num:
            raise ValueError(f"budget: a byte count must be an integer, found {budget!r}")
        val = math.floor(x * _UNITS[unit])
    if val < 1:
        of = f" of a {store_bytes}-byte store" if unit == "%" else ""
        raise ValueError(f"budget: {budget!r} is less than 1 byte{of}")
    return int(val)


@dataclass
class RuntimeOptions:
    """How the expert store runs (docs/op-contract.md, "Runtime configuration")."""

    budget: int | str | None = None  # resident expert bytes: 123, "256MB", "1GiB", "25%"; None = all
    policy: str = "lru"  # lru | lfu | edgemoe | hobbit | pinned | none (no cache: every use reads)
    frequencies: str | Path | None = None  # JSON expert frequencies (pinned: required; edgemoe: optional)
    policy_weights: str | None = None  # hobbit: "lru=0.25,lfu=0.25,lhu=0.25,fld=0.25"
    pin_experts: int | None = None  # pinned: how many of the most frequent experts (None: as many as fit)
    mlock: bool = False  # lock expert memory in RAM (mlock); fails the session if RLIMIT_MEMLOCK is too low
    hugepages: bool = False  # madvise(MADV_HUGEPAGE) on expert buffers of >= 2 MiB
    io: str = "direct"  # "direct" (O_DIRECT) | "buffered" (pread + FADV_DONTNEED) | "mmap"
    io_threads: int = 2
    verify_checksums: bool = True
    intra_op_threads: int | None = None  # ORT intra-op pool size (None: ORT's default)
    # Storage emulation (edgemoe.throttle_*): a read takes max(real, latency + bytes / bw); 0 = off.
    throttle_bw: float = 0  # bytes per second, shared by all I/O threads (one device)
    throttle_latency_us: float = 0  # per read
    # Prediction and prefetch (edgemoe.predictor etc.; docs/op-contract.md, "Prediction and prefetch").
    predictor: str = "auto"  # one of PREDICTORS: none | table | gates | token | residual | auto
    profile: str | Path | None = None  # routing profile (None: the bundle's profile.json if present)
    prefetch_depth: int = 1  # layers ahead, when the next layer's predicted experts are resident
    prefetch_threshold: float = 0.3  # prefetch experts predicted with probability >= this
    warm_start: str | Path | None = None  # "profile" or a resident set saved by ExpertSession.save_resident
    # Cache-aware routing (edgemoe.routing etc.; docs/op-contract.md, "CacheAwareTopK").
    routing: str = "exact"  # exact | cache-prior | max-rank
    routing_lambda: float = 0.5  # cache-prior: bias in units of the layer's mean router-logit range
    routing_keep: int = 1  # J, the true top experts always kept (cache-prior and max-rank)
    routing_window: int = 0  # max-rank: M, the true top-M residents may come from (0 = 2 * top_k)
    # Low-bit twins on a miss (edgemoe.miss_precision; docs/op-contract.md, "Miss precision").
    miss_precision: str = "exact"  # exact | dynamic
    thresholds: tuple[float, float] | None = None  # dynamic: (T1, T2); None = from the profile, else 0.6, 0.9

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        parse_budget(self.budget, 1 << 50)  # syntax (a percentage is resolved against the store later)
        # Same ranges as the C++ store (edgemoe.throttle_*): 0 = off.
        throttle_ranges = (("throttle_bw", 1, 1e13, "bytes/s"), ("throttle_latency_us", 0, 1e9, "us"))
        for name, lo, hi, unit in throttle_ranges:
            v = getattr(self, name)
            if (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or not (v == 0 or lo <= v <= hi)
            ):
                raise ValueError(
                    f"{name}: expected 0 (off) or a number in [{lo:g}, {hi:g}] {unit}, found {v!r}"
                )
        if self.policy not in POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, found {self.policy!r}")
        if self.io not in IO_MODES:
            raise ValueError(f"io: expected one of {', '.join(IO_MODES)}, found {self.io!r}")
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or not (
            1 <= self.io_threads <= MAX_IO_THREADS
        ):
            raise ValueError(
                f"io_threads: expected an int in [1, {MAX_IO_THREADS}], found {self.io_threads!r}"
            )
        if self.pin_experts is not None and (
            isinstance(self.pin_experts, bool) or not isinstance(self.pin_experts, int)
            or self.pin_experts < 0
        ):
            raise ValueError(f"pin_experts: expected None or an int >= 0, found {self.pin_experts!r}")
        if self.policy_weights is not None and not isinstance(self.policy_weights, str):
            raise ValueError(
                f"policy_weights: expected a string like 'lru=0.25,lfu=0.25,lhu=0.25,fld=0.25', "
                f"found {self.policy_weights!r}"
            )
        if self.frequencies is not None and not isinstance(self.frequencies, (str, Path)):
            raise ValueError(f"frequencies: expected a path to a JSON file, found {self.frequencies!r}")
        for name in ("mlock", "hugepages"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, found {getattr(self, name)!r}")
        if not isinstance(self.verify_checksums, bool):
            raise ValueError(f"verify_checksums: expected a bool, found {self.verify_checksums!r}")
        if self.predictor not in PREDICTORS:
            raise ValueError(
                f"predictor: expected one of {', '.join(PREDICTORS)}, found {self.predictor!r}"
            )
        if isinstance(self.prefetch_depth, bool) or not isinstance(self.prefetch_depth, int) or not (
            1 <= self.prefetch_depth <= MAX_PREFETCH_DEPTH
        ):
            raise ValueError(
                f"prefetch_depth: expected an int in [1, {MAX_PREFETCH_DEPTH}], found {self.prefetch_depth!r}"
            )
        t = self.prefetch_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t <= 1):
            raise ValueError(f"prefetch_threshold: expected a probability in (0, 1], found {t!r}")
        if self.miss_precision not in MISS_PRECISIONS:
            raise ValueError(
                f"miss_precision: expected one of {', '.join(MISS_PRECISIONS)}, found {self.miss_precision!r}"
            )
        if self.thresholds is not None:
            th = self.thresholds
            ok = (isinstance(th, (tuple, list)) and len(th) == 2
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in th)
                  and 0 <= th[0] < th[1] <= 1)
            if not ok:
                raise ValueError(f"thresholds: expected (T1, T2) with 0 <= T1 < T2 <= 1, found {th!r}")
        if self.routing not in ROUTING_RULES:
            raise ValueError(f"routing: expected one of {', '.join(ROUTING_RULES)}, found {self.routing!r}")
        lam = self.routing_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0 <= lam <= MAX_ROUTING_LAMBDA):
            raise ValueError(
                f"routing_lambda: expected a number in [0, {MAX_ROUTING_LAMBDA:g}], found {lam!r}"
            )
        for name in ("routing_keep", "routing_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not (0 <= v <= MAX_ROUTING_RANK):
                raise ValueError(f"{name}: expected an int in [0, {MAX_ROUTING_RANK}], found {v!r}")
        for name in ("profile", "warm_start"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (str, Path)) or not str(v)):
                raise ValueError(f"{name}: expected None or a path, found {v!r}")
        if self.intra_op_threads is not None and (
            isinstance(self.intra_op_threads, bool) or not isinstance(self.intra_op_threads, int)
            or self.intra_op_threads < 1
        ):
            raise ValueError(
                f"intra_op_threads: expected None or an int >= 1, found {self.intra_op_threads!r}"
            )


def _percent_base(bundle_dir: Path) -> int | None:
    """What a budget in percent is a share of (``Bundle.primary_bytes``, the same rule as the library): the
    bytes of the manifest's primary expert records with twins, ``store.size`` without; None if unreadable
    (the C++ side then reports the problem)."""
    try:
        m = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
        if not any(r.get("variant", 0) for r in m["experts"]):
            size = m["store"]["size"]
            return int(size) if isinstance(size, int) and not isinstance(size, bool) else None
        return sum(int(r["length"]) for r in m["experts"] if r.get("variant", 0) == 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def session_config_entries(bundle_dir: Path, options: RuntimeOptions, store_id: str) -> dict[str, str]:
    """The ``edgemoe.*`` session config entries for ``options`` (every key is one of :func:`config_keys`)."""
    bdir = bundle_dir
    budget = options.budget
    if isinstance(budget, str) and budget.strip().endswith("%"):
        size = _percent_base(bdir)
        if size is not None:
            budget = parse_budget(budget, size)
    entries = {
        "edgemoe.bundle_dir": str(bdir),
        "edgemoe.policy": options.policy,
        "edgemoe.io_mode": options.io,
        "edgemoe.io_threads": str(options.io_threads),
        "edgemoe.verify_checksums": "1" if options.verify_checksums else "0",
        "edgemoe.store_id": store_id,
    }
    if budget is not None:
        entries["edgemoe.budget"] = str(budget)
    if options.frequencies is not None:
        entries["edgemoe.frequencies"] = str(Path(options.frequencies).expanduser().resolve())
    if options.policy_weights is not None:
        entries["edgemoe.policy_weights"] = options.policy_weights
    if options.pin_experts is not None:
        entries["edgemoe.pin_experts"] = str(options.pin_experts)
    if options.mlock:
        entries["edgemoe.mlock"] = "1"
    if options.hugepages:
        entries["edgemoe.hugepages"] = "1"
    if options.throttle_bw:
        entries["edgemoe.throttle_bw"] = repr(float(options.throttle_bw))
    if options.throttle_latency_us:
        entries["edgemoe.throttle_latency_us"] = repr(float(options.throttle_latency_us))
    entries["edgemoe.predictor"] = options.predictor
    entries["edgemoe.prefetch_depth"] = str(options.prefetch_depth)
    entries["edgemoe.prefetch_threshold"] = repr(float(options.prefetch_threshold))
    entries["edgemoe.routing"] = options.routing
    if options.routing != "exact":
        entries["edgemoe.routing_lambda"] = repr(float(options.routing_lambda))
        entries["edgemoe.routing_keep"] = str(options.routing_keep)
        entries["edgemoe.routing_window"] = str(options.routing_window)
    entries["edgemoe.miss_precision"] = options.miss_precision
    if options.thresholds is not None:
        entries["edgemoe.thresholds"] = f"{float(options.thresholds[0])!r},{float(options.thresholds[1])!r}"
    if options.profile is not None:
        entries["edgemoe.profile"] = str(Path(options.profile).expanduser().resolve())
    if options.warm_start is not None:
        ws = str(options.warm_start)
        entries["edgemoe.warm_start"] = ws if ws == "profile" else str(Path(ws).expanduser().resolve())
    return entries


def make_session_options(
    bundle_dir: str | Path, options: RuntimeOptions | None = None
) -> tuple[ort.SessionOptions, str]:
    """SessionOptions with the ``edgemoe.*`` config entries set and the library registered, and the store id
    (unique per call) under which the store publishes its statistics."""
    options = options if options is not None else RuntimeOptions()
    options.validate()
    bdir = Path(bundle_dir).expanduser().resolve()
    if not bdir.is_dir():
        raise FileNotFoundError(f"{bdir}: not a bundle folder (expected a folder, found "
                                f"{'a file' if bdir.exists() else 'nothing'})")
    store_id = f"{bdir}#{uuid.uuid4().hex[:12]}"
    so = ort.SessionOptions()
    if options.intra_op_threads is not None:
        so.intra_op_num_threads = options.intra_op_threads
    entries = session_config_entries(bdir, options, store_id)
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    _lib()  # load (and keep loaded) before ORT does: same instance, stats outlive sessions
    so.register_custom_ops_library(str(library_path()))
    return so, store_id


def store_stats(store_id: str) -> dict[str, Any]:
    """Counters of a store (docs/op-contract.md, "Statistics"); the last values stay readable after the
    store is freed. Raises KeyError for an unknown store id."""
    lib = _lib()
    sid = store_id.encode()
    n = lib.edgemoe_store_stats_json(sid, None, 0)
    while True:
        if n < 0:
            raise KeyError(f"no edgemoe store with id {store_id!r}")
        buf = ctypes.create_string_buffer(n + 1)
        m = lib.edgemoe_store_stats_json(sid, buf, n + 1)
        if m <= n:
            return json.loads(buf.value.decode())
        n = m  # grew in between


def _lib_json(fn: Any) -> Any:
    """Calls one of the library's ``(buf, len) -> n`` JSON functions and parses the result."""
    n = fn(None, 0)
    if n < 0:
        raise RuntimeError(f"{library_path()}: {fn.__name__} failed")
    buf = ctypes.create_string_buffer(n + 1)
    fn(buf, n + 1)
    return json.loads(buf.value.decode())


def config_keys() -> list[dict[str, Any]]:
    """The ``edgemoe.*`` session config keys as the library defines them (one table, in C++:
    customops/src/config.cc): ``[{"key", "default", "doc", "required"}, ...]``."""
    return list(_lib_json(_lib().edgemoe_config_keys_json))


def policies() -> list[dict[str, str]]:
    """The cache policies the library implements: ``[{"name", "doc"}, ...]`` (``POLICIES`` must match)."""
    return list(_lib_json(_lib().edgemoe_policies_json))


def reader_limits() -> dict[str, int]:
    """The bundle readers' limits as the library defines them (customops/include/edgemoe/manifest.h):
    ``{"max_manifest_bytes": ..., ...}``; ``edgemoe_ort.bundle.format.READER_LIMITS`` must equal it."""
    return {d["name"]: int(d["value"]) for d in _lib_json(_lib().edgemoe_reader_limits_json)}


def config_table_markdown() -> str:
    """The table of docs/op-contract.md ("Runtime configuration"), rendered from :func:`config_keys`."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for k in config_keys():
        d = k["default"]
        default = d if (" " in d or d.startswith("(")) else f"`{d}`"
        rows.append(f"| `{k['key']}` | {default} | {k['doc']} |")
    return "\n".join(rows) + "\n"


def release_free_heap() -> None:
    """Give the heap that session creation freed back to the kernel (glibc ``malloc_trim``; a no-op
    elsewhere). Parsing a model leaves tens of MiB of freed heap mapped (54 MiB on the 1 GB bench model),
    which counts against a memory cap as much as live memory; called once after every session is created."""
    global _libc_trim
    if _libc_trim is None:
        try:
            fn = ctypes.CDLL("libc.so.6").malloc_trim
            fn.argtypes = [ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _libc_trim = fn
        except (OSError, AttributeError):
            _libc_trim = False
    if _libc_trim:
        _libc_trim(0)


_libc_trim: Any = None


def reset_store_stats(store_id: str) -> None:
    _lib().edgemoe_store_reset_stats(store_id.encode())


def kernel_path() -> str:
    """The kernel the library dispatches to on this machine: ``avx2``, ``neon`` or ``scalar``."""
    return _lib().edgemoe_kernel_path().decode()


class ExpertSession:
    """An ``InferenceSession`` whose ``OffloadedExpert`` nodes share one expert store (``store_id``)."""

    def __init__(
        self, session: ort.InferenceSession, store_id: str, bundle_dir: Path, options: RuntimeOptions
    ) -> None:
        self.session = session
        self.store_id = store_id
        self.bundle_dir = bundle_dir
        self.options = options

    def run(
        self, output_names: list[str] | None, input_feed: dict[str, Any], run_options: Any = None
    ) -> list[Any]:
        return self.session.run(output_names, input_feed, run_options)

    def io_binding(self) -> Any:
        return self.session.io_binding()

    def run_with_iobinding(self, binding: Any, run_options: Any = None) -> None:
        self.session.run_with_iobinding(binding, run_options)

    def stats(self) -> dict[str, Any]:
        """Counters of the whole store since the session opened (or the last :meth:`reset_stats`)."""
        return store_stats(self.store_id)

    def reset_stats(self) -> None:
        """Zeroes the store-wide counters (not safe while other threads use the session: prefer
        :meth:`begin_call_stats`)."""
        reset_store_stats(self.store_id)

    def begin_call_stats(self) -> None:
        """Start counting this thread's hits, misses, stalls, reads and prefetches on this store (right per
        call while other threads share the session)."""
        if _lib().edgemoe_thread_stats_begin(self.store_id.encode()) < 0:
            raise KeyError(
                f"no edgemoe store with id {self.store_id!r} (the session has no OffloadedExpert node?)"
            )

    def call_stats(self) -> dict[str, Any]:
        """The store's counters with this thread's call counters (since :meth:`begin_call_stats`) in place of
        the store-wide ones: ``hits``, ``misses``, ``stall_s``, ``reads``, ``bytes_read``, ``prefetch``
        {issued, used, hidden, late, wasted, wasted_bytes, dropped, precision, recall}, ``routing``
        {selections, changed, misses_avoided; ``rule`` is the store's} and ``layers``."""
        st = self.stats()
        rule = st.get("routing", {}).get("rule")
        lib, sid = _lib(), self.store_id.encode()
        n = lib.edgemoe_thread_stats_json(sid, None, 0)
        if n < 0:
            return st
        while True:
            buf = ctypes.create_string_buffer(n + 1)
            m = lib.edgemoe_thread_stats_json(sid, buf, n + 1)
            if 0 <= m <= n:
                break
            n = m
        st.update(json.loads(buf.value.decode()))
        if rule is not None and isinstance(st.get("routing"), dict):
            st["routing"]["rule"] = rule
        return st

    def save_resident(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the experts resident now to ``path`` (keyed by the bundle's identity) for
        ``RuntimeOptions(warm_start=path)`` in a later session. Refuses to replace an existing file unless
        ``force``."""
        p = Path(path).expanduser().resolve()
        if p.exists() and not force:
            raise FileExistsError(f"{p}: exists; pass force=True (--force) to replace it")
        err = ctypes.create_string_buffer(1024)
        if _lib().edgemoe_save_resident(self.store_id.encode(), str(p).encode(), err, len(err)) != 0:
            raise OSError(err.value.decode(errors="replace") or f"{p}: could not save the resident set")
        return p

    def get_inputs(self) -> list[Any]:
        return self.session.get_inputs()

    def get_outputs(self) -> list[Any]:
        return self.session.get_outputs()

    def __repr__(self) -> str:
        return f"ExpertSession(store_id={self.store_id!r}, options={self.options!r})"


def open_session(
    model_path: str | Path, bundle_dir: str | Path, options: RuntimeOptions | None = None
) -> ExpertSession:
    """Open ``model_path`` with the experts of ``bundle_dir``. Bundle/store errors (missing or truncated
    store, budget below the largest expert, bad manifest) raise here, naming the file and
    ``layer L expert E``."""
    options = options if options is not None else RuntimeOptions()
    so, store_id = make_session_options(bundle_dir, options)
    mp = Path(model_path)
    if not mp.is_file():
        raise FileNotFoundError(f"{mp}: no such model file")
    sess = ort.InferenceSession(str(mp), so, providers=["CPUExecutionProvider"])
    release_free_heap()
    return ExpertSession(sess, store_id, Path(bundle_dir).expanduser().resolve(), options)
