"""Reader worker of the fuzzer: runs cases one at a time, in lockstep with tests/fuzz/run.py.

    python tests/fuzz/worker.py --mode python|ort [--lib LIB] [--mem-mb N] [--progress FILE]

Reads one JSON request per line on stdin (``{"id", "dir", "io", "feeds"}``, see ``mutate.Case.request``),
writes one JSON line per request on stdout before reading the next, and rewrites ``--progress`` with the case
id before each case (a crash names its case). Self-contained (run by path, no package import of its own).

``--mode python``: the Python reader. Stage ``open``: ``Bundle.open(dir)``; stage ``verify``: every record
read and dequantized, checksum verified (``Bundle.dequantized_expert``). Property: each returns or raises
``BundleError``; anything else is ``status: "unexpected"``.

``--mode ort``: the C-host path, plain onnxruntime and no edgemoe Python code: SessionOptions with the
``edgemoe.*`` entries the runtime sets by default (written here, not through ``RuntimeOptions``), the library
registered after them (it reads them at registration), an ``InferenceSession`` on the case's ``model.onnx``
(stage ``session``), then one forward pass whose routing uses every expert of every layer (stage ``run``).
Property: success, or an onnxruntime exception whose message is valid text (``status: "bad_message"``
otherwise; any other exception is ``"unexpected"``).

Both modes cap the address space at start (``--mem-mb`` above what the process maps after its imports) and
report each case's peak RSS growth (``rss_growth_kib``: VmHWM after resetting it through
/proc/self/clear_refs, minus the RSS before the case); a ``MemoryError`` is ``status: "memory"``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import traceback
from pathlib import Path
from typing import Any

MAX_MESSAGE = 16384  # a longer message is reported (docs/reliability.md: a message is a few KiB)


def _status_kib(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _message_problem(msg: object) -> str | None:
    if not isinstance(msg, str):
        return f"message is {type(msg).__name__}, not str"
    try:
        msg.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"message is not valid text (lone surrogate at {exc.start})"
    if len(msg) > MAX_MESSAGE:
        return f"message of {len(msg)} characters"
    return None


def _clip(s: str, n: int = 2000) -> str:
    return s if len(s) <= n else s[: n // 2] + " ... " + s[-n // 2 :]


# --- python mode -----------------------------------------------------------------------------------------
def run_python(req: dict[str, Any]) -> dict[str, Any]:
    from edgemoe_ort.bundle import Bundle, BundleError

    stage = "open"
    try:
        b = Bundle.open(req["dir"])
        stage = "verify"
        n = 0
        for li, lay in enumerate(b.layers):
            for e in range(int(lay["num_experts"])):
                b.dequantized_expert(li, e)
                n += 1
        return {"status": "ok", "records": n}
    except BundleError as exc:
        msg = str(exc)
        bad = _message_problem(msg)
        out = {"status": "bad_message" if bad else "reject", "stage": stage, "error": _clip(msg)}
        if bad:
            out["problem"] = bad
        return out
    except MemoryError:
        return {"status": "memory", "stage": stage, "error": "MemoryError"}
    except Exception as exc:  # the finding: anything but BundleError
        return {
            "status": "unexpected",
            "stage": stage,
            "error": _clip(f"{type(exc).__name__}: {exc}"),
            "type": f"{type(exc).__module__}.{type(exc).__name__}",
            "traceback": _clip(traceback.format_exc(), 4000),
        }


# --- ort mode --------------------------------------------------------------------------------------------
_ort: Any = None
_np: Any = None


def config_entries(bundle_dir: str, io: str, store_id: str) -> dict[str, str]:
    """The entries edgemoe_ort.runtime.ops.session_config_entries writes for the default RuntimeOptions."""
    return {
        "edgemoe.bundle_dir": bundle_dir,
        "edgemoe.policy": "lru",
        "edgemoe.io_mode": io,
        "edgemoe.io_threads": "2",
        "edgemoe.verify_checksums": "1",
        "edgemoe.store_id": store_id,
        "edgemoe.predictor": "auto",
        "edgemoe.prefetch_depth": "1",
        "edgemoe.prefetch_threshold": "0.3",
        "edgemoe.routing": "exact",
    }


def make_feeds(sess: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    """Inputs of the make_moe_graph chain: T = the largest num_experts; token t of layer l uses experts
    (t + k) % E_l, k < K: every expert of every layer is read."""
    np = _np
    lays = feeds["layers"]
    T = max(e for e, _ in lays)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for inp in sess.get_inputs():
        name = inp.name
        if name == "X":
            out[name] = rng.standard_normal((T, int(feeds["hidden"]))).astype(np.float32)
        elif name.startswith("topk_indices_"):
            e, k = lays[int(name.rsplit("_", 1)[1])]
            out[name] = ((np.arange(T)[:, None] + np.arange(k)[None, :]) % e).astype(np.int64)
        elif name.startswith("topk_weights_"):
            _, k = lays[int(name.rsplit("_", 1)[1])]
            out[name] = np.full((T, k), 1.0 / k, dtype=np.float32)
        elif name.startswith("next_logits_"):
            shape = [T] + [int(d) for d in inp.shape[1:]]
            out[name] = rng.standard_normal(shape).astype(np.float32)
        elif name == "token_ids":
            out[name] = np.arange(T, dtype=np.int64)
        else:
            raise RuntimeError(f"unknown graph input {name!r}")
    return out


def run_ort(req: dict[str, Any], lib: str) -> dict[str, Any]:
    ort = _ort
    stage = "session"
    d = req["dir"]
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.intra_op_num_threads = 1
        for k, v in config_entries(d, req.get("io", "buffered"), f"fuzz-ort-{os.getpid()}").items():
            so.add_session_config_entry(k, v)
        so.register_custom_ops_library(lib)
        sess = ort.InferenceSession(os.path.join(d, "model.onnx"), so, providers=["CPUExecutionProvider"])
        stage = "run"
        y = sess.run(None, make_feeds(sess, req["feeds"]))
        finite = bool(all(_np.isfinite(a).all() for a in y if a.dtype.kind == "f"))
        del sess
        return {"status": "ok", "finite": finite}
    except MemoryError:
        return {"status": "memory", "stage": stage, "error": "MemoryError"}
    except Exception as exc:
        mod = type(exc).__module__
        try:
            msg: Any = str(exc)
        except Exception as exc2:  # str() itself failed (undecodable bytes)
            msg = None
            bad: str | None = f"str(exception) raised {type(exc2).__name__}"
        else:
            bad = _message_problem(msg)
        if not mod.startswith("onnxruntime"):
            return {
                "status": "unexpected",
                "stage": stage,
                "error": _clip(f"{type(exc).__name__}: {msg}"),
                "type": f"{mod}.{type(exc).__name__}",
                "traceback": _clip(traceback.format_exc(), 4000),
            }
        out = {"status": "bad_message" if bad else "reject", "stage": stage, "error": _clip(str(msg))}
        if bad:
            out["problem"] = bad
        if "bad_alloc" in str(msg):
            out["status"] = "memory"
        return out


def main() -> int:
    global _ort, _np
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("python", "ort"), required=True)
    ap.add_argument("--lib", default="")
    ap.add_argument("--mem-mb", type=int, default=2048)
    ap.add_argument("--progress", default="")
    a = ap.parse_args()
    import numpy

    _np = numpy
    if a.mode == "ort":
        import onnxruntime

        _ort = onnxruntime
        if not a.lib or not Path(a.lib).is_file():
            print(f"worker: --lib {a.lib!r}: not a file", file=sys.stderr)
            return 2
    else:
        import edgemoe_ort.bundle  # noqa: F401  (imports before the limit and the first case)
    vm = _status_kib("VmSize:")
    if a.mem_mb > 0 and vm > 0:
        limit = (vm + a.mem_mb * 1024) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = sys.stdout
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        if a.progress:
            with open(a.progress, "w") as f:
                f.write(f"{req['id']}\n")
        rss0 = _status_kib("VmRSS:")
        _reset_peak()
        res = run_python(req) if a.mode == "python" else run_ort(req, a.lib)
        hwm = _status_kib("VmHWM:")
        res["id"] = req["id"]
        res["rss_growth_kib"] = hwm - rss0 if hwm >= 0 and rss0 >= 0 else -1
        out.write(json.dumps(res, ensure_ascii=True) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
