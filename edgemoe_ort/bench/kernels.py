"""Kernel micro-benchmark: one expert FFN, everything resident, identical shapes and bits.

- ``ours``: an ``OffloadedExpert`` node, budget 100 %, cache warmed (no I/O in the timed calls);
- ``qmoe``: ORT's ``com.microsoft.QMoE`` on the same quantized bytes (bench.inmemory conversion);
- ``matmulnbits``: ORT's ``MatMulNBits`` x2 + SwiGLU in plain ONNX ops (the per-matrix MLAS path).

All tokens are routed to expert 0 with weight 1. Sessions run with ``intra_op_num_threads`` threads
(default 1, the kernel-vs-kernel comparison). The three are timed interleaved (A B C A B C ...); each sample
is the median of ``calls`` calls, the result the median of the samples.

:func:`run_format_bench` times ``ours`` alone across the expert formats (:data:`KERNEL_FORMATS`: int8, int4,
int3, int2) at the same shape and group size, interleaved the same way (ORT has no 3-bit QMoE / MatMulNBits,
and int2 bundles are not converted to them here: the ORT comparison stays the int4 one).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgemoe_ort.bench.inmemory import _pack_zeros4, convert_bundle_to_inmemory
from edgemoe_ort.bundle import Bundle
from edgemoe_ort.quant import BITS, QUANTIZED_DTYPES
from edgemoe_ort.runtime.ops import RuntimeOptions, open_session

__all__ = ["KERNEL_FORMATS", "format_bundle_path", "kernel_bundle", "run_format_bench", "run_kernel_bench"]

#: the expert formats of :func:`run_format_bench` (the quantized ones of edgemoe_ort.quant's table)
KERNEL_FORMATS: tuple[str, ...] = QUANTIZED_DTYPES


def kernel_bundle(
    path: str | Path,
    *,
    hidden: int = 4096,
    intermediate: int = 14336,
    dtype: str = "int4",
    group_size: int = 64,
    num_experts: int = 2,
) -> Bundle:
    """A one-layer synthetic bundle at the given shape (reused if it exists with the same shape)."""
    from edgemoe_ort.bundle.testing import make_synthetic_bundle

    path = Path(path)
    try:
        b = Bundle.open(path)
        lay = b.layers[0]
        rec = b.expert_record(0, 0)["format"]
        if (lay["hidden"], lay["intermediate"], lay["num_experts"], rec["dtype"], rec["group_size"]) == (
            hidden,
            intermediate,
            num_experts,
            dtype,
            group_size,
        ):
            return b
    except Exception:  # noqa: BLE001 - missing or different: rebuild
        pass
    return make_synthetic_bundle(
        path,
        num_layers=1,
        num_experts=num_experts,
        top_k=1,
        hidden=hidden,
        intermediate=intermediate,
        dtype=dtype,
        group_size=group_size,
        force=True,
    )


def _matmulnbits_model(bundle: Bundle, bits: int, gs: int) -> onnx.ModelProto:
    lay = bundle.layers[0]
    H, inter = int(lay["hidden"]), int(lay["intermediate"])
    t = bundle.read_expert(0, 0)
    inits = []
    nodes = []

    def mm(name: str, x: str, w: str, out: str, N: int, K: int) -> None:
        q = t[w]
        nb = K // gs
        inits.append(numpy_helper.from_array(q.reshape(N, nb, gs * bits // 8), f"{name}_B"))
        inits.append(numpy_helper.from_array(t[f"{w}.scales"].astype(np.float32).reshape(-1), f"{name}_s"))
        z = t[f"{w}.zeros"]
        zp = _pack_zeros4(z) if bits == 4 else z
        inits.append(numpy_helper.from_array(np.ascontiguousarray(zp).reshape(-1), f"{name}_z"))
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [x, f"{name}_B", f"{name}_s", f"{name}_z"],
                [out],
                domain="com.microsoft",
                K=K,
                N=N,
                bits=bits,
                block_size=gs,
                accuracy_level=0,
            )
        )

    mm("fc1", "X", "w_in", "a", 2 * inter, H)
    inits += [numpy_helper.from_array(np.array([inter, inter], np.int64), "split")]
    nodes += [
        helper.make_node("Split", ["a", "split"], ["g", "u"], axis=-1),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["silu"]),
        helper.make_node("Mul", ["silu", "u"], ["h"]),
    ]
    mm("fc2", "h", "w_out", "Y", H, inter)
    g = helper.make_graph(
        nodes,
        "mmnb_expert",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", H])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", H])],
        inits,
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    m.ir_version = 8
    return m


def run_kernel_bench(
    bundle_dir: str | Path,
    *,
    tokens: tuple[int, ...] = (1, 64),
    threads: int = 1,
    samples: int = 7,
    calls: int = 5,
    log: Any = lambda s: None,
) -> dict[str, Any]:
    bundle = Bundle.open(bundle_dir)
    lay = bundle.layers[0]
    H = int(lay["hidden"])
    fmt = bundle.expert_record(0, 0)["format"]
    bits = BITS[fmt["dtype"]]
    gs = int(fmt["group_size"])
    work = Path(bundle.path).parent / f"{Path(bundle.path).name}.kbench"
    work.mkdir(exist_ok=True)
    conv = convert_bundle_to_inmemory(bundle.path, work / "qmoe.onnx")
    onnx.save_model(
        _matmulnbits_model(bundle, bits, gs),
        str(work / "mmnb.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="mmnb.onnx.data",
        size_threshold=1024,
    )

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    ours = open_session(
        bundle.graph_path(), bundle.path, RuntimeOptions(budget="100%", intra_op_threads=threads)
    )
    qmoe = ort.InferenceSession(conv["model"], so, providers=["CPUExecutionProvider"])
    mmnb = ort.InferenceSession(str(work / "mmnb.onnx"), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {
        "hidden": H,
        "intermediate": int(lay["intermediate"]),
        "bits": bits,
        "group_size": gs,
        "threads": threads,
        "samples": samples,
        "calls": calls,
        "loadavg_start": os.getloadavg(),
        "results": [],
    }
    for T in tokens:
        x = rng.standard_normal((T, H)).astype(np.float32)
        feeds = {
            "X": x,
            "topk_indices_0": np.zeros((T, 1), np.int64),
            "topk_weights_0": np.ones((T, 1), np.float32),
        }
        runners = {
            "ours": lambda f=feeds: ours.run(None, f),
            "qmoe": lambda f=feeds: qmoe.run(None, f),
            "matmulnbits": lambda x=x: mmnb.run(None, {"X": x}),
        }
        y = {k: r()[0] for k, r in runners.items()}  # warm-up (our cache reads expert 0 here)
        err = {k: float(np.abs(y[k] - y["ours"]).max()) for k in ("qmoe", "matmulnbits")}
        times: dict[str, list[float]] = {k: [] for k in runners}
        for s in range(samples):
            order = list(runners) if s % 2 == 0 else list(reversed(runners))
            for k in order:
                ts = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    runners[k]()
                    ts.append(time.perf_counter() - t0)
                times[k].append(statistics.median(ts))
        med = {k: statistics.median(v) for k, v in times.items()}
        st = ours.stats()
        row = {
            "T": T,
            "median_s": med,
            "samples_s": times,
            "max_abs_diff_vs_ours": err,
            "ours_over_qmoe": med["ours"] / med["qmoe"],
            "ours_over_matmulnbits": med["ours"] / med["matmulnbits"],
            "ours_misses": st["misses"],
        }
        out["results"].append(row)
        log(
            f"  T={T}: ours {med['ours'] * 1e3:.2f} ms, QMoE {med['qmoe'] * 1e3:.2f} ms, MatMulNBits "
            f"{med['matmulnbits'] * 1e3:.2f} ms -> ours/QMoE {row['ours_over_qmoe']:.2f}x, "
            f"ours/MatMulNBits {row['ours_over_matmulnbits']:.2f}x"
        )
    out["loadavg_end"] = os.getloadavg()
    return out


def format_bundle_path(kernel_bundle_dir: str | Path, dtype: str) -> Path:
    """Where :func:`run_format_bench` keeps the ``dtype`` bundle: the int4 kernel bundle itself, siblings
    ``<dir>-int8``, ``<dir>-int3``, ... for the other formats."""
    p = Path(kernel_bundle_dir)
    return p if dtype == "int4" else p.with_name(f"{p.name}-{dtype}")


def run_format_bench(
    kernel_bundle_dir: str | Path,
    *,
    dtypes: tuple[str, ...] = KERNEL_FORMATS,
    hidden: int = 4096,
    intermediate: int = 14336,
    group_size: int = 64,
    tokens: tuple[int, ...] = (1, 64),
    threads: int = 1,
    samples: int = 7,
    calls: int = 5,
    log: Any = lambda s: None,
) -> dict[str, Any]:
    """``ours`` (OffloadedExpert, expert cached) per expert format at one shape, formats timed interleaved.

    Returns ``{"hidden", "intermediate", "group_size", "threads", "samples", "calls", "loadavg_start",
    "loadavg_end", "results": [{"dtype", "bits", "T", "median_s", "samples_s", "expert_bytes", "bytes_per_s",
    "over_int4"}]}`` (``expert_bytes``: the expert's blob, weights + scales + zeros; ``bytes_per_s``:
    expert_bytes / median time; the load averages are ``os.getloadavg()`` before and after).
    """
    sessions: dict[str, Any] = {}
    blob_bytes: dict[str, int] = {}
    for dt in dtypes:
        b = kernel_bundle(
            format_bundle_path(kernel_bundle_dir, dt), hidden=hidden, intermediate=intermediate, dtype=dt,
            group_size=group_size,
        )
        blob_bytes[dt] = int(b.expert_record(0, 0)["size"])
        sessions[dt] = open_session(
            b.graph_path(), b.path, RuntimeOptions(budget="100%", intra_op_threads=threads)
        )
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {
        "hidden": hidden,
        "intermediate": intermediate,
        "group_size": group_size,
        "threads": threads,
        "samples": samples,
        "calls": calls,
        "loadavg_start": os.getloadavg(),
        "results": [],
    }
    for T in tokens:
        feeds = {
            "X": rng.standard_normal((T, hidden)).astype(np.float32),
            "topk_indices_0": np.zeros((T, 1), np.int64),
            "topk_weights_0": np.ones((T, 1), np.float32),
        }
        for s in sessions.values():
            s.run(None, feeds)  # warm-up: the cache reads expert 0 here
        times: dict[str, list[float]] = {dt: [] for dt in sessions}
        for k in range(samples):
            for dt in list(sessions) if k % 2 == 0 else list(reversed(sessions)):
                ts = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    sessions[dt].run(None, feeds)
                    ts.append(time.perf_counter() - t0)
                times[dt].append(statistics.median(ts))
        med = {dt: statistics.median(v) for dt, v in times.items()}
        for dt in sessions:
            out["results"].append(
                {
                    "dtype": dt,
                    "bits": BITS[dt],
                    "T": T,
                    "median_s": med[dt],
                    "samples_s": times[dt],
                    "expert_bytes": blob_bytes[dt],
                    "bytes_per_s": blob_bytes[dt] / med[dt],
                    "over_int4": med[dt] / med["int4"] if "int4" in med else None,
                }
            )
        log("  T=" + str(T) + ": " + ", ".join(f"{dt} {med[dt] * 1e3:.2f} ms" for dt in sessions))
    out["loadavg_end"] = os.getloadavg()
    return out
