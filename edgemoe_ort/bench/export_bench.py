"""Exporter memory / time benchmark (issue 13): peak RSS and wall time of ``export_model``, large models.

Two models (``make export-bench``, mk/export-bench.mk):

* ``x8``: Mixtral-8x7B's expert shapes (hidden 4096, intermediate 14336, 8 experts, top-2, GQA 32/8 heads of
  128) with 3 layers and a vocab of 8192: experts 3 * 8 * 3 * 4096 * 14336 = 4.23 G parameters (8.5 GB in
  bf16), dense part 0.19 G parameters (0.77 GB in float32). A random bf16 checkpoint in the layout
  ``save_pretrained`` writes (per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3``, 1 GiB shards), built
  tensor by tensor by :func:`save_random_checkpoint_bf16` (peak: one shard, never the model).
* ``large``: the benchmarks' 1 GiB-store model (edgemoe_ort/bench/large.py; its own checkpoint folder).

``measure`` runs the export in a child under ``/usr/bin/time -v`` and writes one JSON: peak RSS, elapsed
time, the checkpoint's dense bytes in float32 and the issue's goal (dense + 1 GiB for ``large``, dense +
1.5 GiB for ``x8``). Host side (torch + transformers).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgemoe_ort.bench.large import LARGE_CONFIG
from edgemoe_ort.bench.llama_cap import _code_state

#: Mixtral-8x7B's expert shapes (hidden 4096, intermediate 14336, 8 experts), 3 layers, a small vocab
X8_CONFIG: dict[str, Any] = dict(
    LARGE_CONFIG, hidden_size=4096, intermediate_size=14336, num_hidden_layers=3, num_attention_heads=32,
    head_dim=128,
)

#: the issue's goal per preset: peak RSS <= dense float32 bytes + this
GOAL_SLACK = {"x8": int(1.5 * 2**30), "large": 2**30}

GIB = 2**30


def save_random_checkpoint_bf16(
    out: str | Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    shard_bytes: int = 1 << 30,
    std: float = 0.02,
) -> Path:
    """A random Mixtral checkpoint in bf16, written tensor by tensor (RAM: one shard, not the model).

    The keys and shapes are those ``save_pretrained`` writes (transformers' reverse weight conversion run on
    a meta-device model: per-expert ``w1/w2/w3``); weights ~ N(0, std), norms 1. Sharded with an index
    when larger than ``shard_bytes``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.core_model_loading import dot_natural_key, revert_weight_conversion

    out = Path(out)
    cfg = MixtralConfig(**config)
    cfg.dtype = "bfloat16"
    with torch.device("meta"):
        meta = MixtralForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in revert_weight_conversion(meta, meta.state_dict()).items()}
    del meta
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    keys = sorted(shapes, key=dot_natural_key)
    groups: list[list[str]] = [[]]
    size = 0
    for k in keys:
        n = 2 * int(torch.Size(shapes[k]).numel())
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map: dict[str, str] = {}
    total = 0
    for name, group in zip(names, groups, strict=True):
        tensors = {}
        for k in group:
            if re.search(r"norm\.weight$", k):
                t = torch.ones(shapes[k], dtype=torch.bfloat16)
            else:
                t = torch.empty(shapes[k], dtype=torch.bfloat16)
                for row in range(0, t.shape[0], 4096):  # float32 temporaries of at most 4096 rows
                    chunk = t[row : row + 4096]
                    chunk.copy_(torch.randn(chunk.shape, generator=gen) * std)
            tensors[k] = t
            weight_map[k] = name
            total += 2 * t.numel()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def checkpoint_bytes(hf_dir: str | Path) -> dict[str, int]:
    """Parameters of the checkpoint (from its safetensors headers): routed experts, the rest (dense)."""
    from safetensors import safe_open

    counts = {"expert_params": 0, "dense_params": 0}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                n = 1
                for d in h.get_slice(k).get_shape():
                    n *= int(d)
                counts["expert_params" if ".experts." in k else "dense_params"] += n
    return counts


_TIME_FIELDS = {
    "Maximum resident set size (kbytes)": "maxrss_kb",
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "elapsed",
    "User time (seconds)": "user_s",
    "System time (seconds)": "system_s",
    "Exit status": "exit_status",
}


def _parse_time_v(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in _TIME_FIELDS:
            out[_TIME_FIELDS[key]] = value.strip()
    if "elapsed" in out:
        secs = 0.0
        for part in out["elapsed"].split(":"):
            secs = secs * 60 + float(part)
        out["elapsed_s"] = secs
    return out


def measure(
    hf_dir: str | Path, bundle_dir: str | Path, out_json: str | Path, *, preset: str, stream: bool = True,
    bits: int = 4, group_size: int = 64,
) -> dict[str, Any]:
    """Export ``hf_dir`` to ``bundle_dir`` in a child under ``/usr/bin/time -v``; figures also to JSON."""
    cmd = [
        "/usr/bin/time", "-v", sys.executable, "-m", "edgemoe_ort.bench.export_bench", "export",
        str(hf_dir), str(bundle_dir), f"--bits={bits}", f"--group-size={group_size}",
    ]
    if not stream:
        cmd.append("--no-stream")
    load_before = Path("/proc/loadavg").read_text().split()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load_after = Path("/proc/loadavg").read_text().split()[0]
    timing = _parse_time_v(proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"export of {hf_dir} failed (exit {proc.returncode}):\n{tail}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = checkpoint_bytes(hf_dir)
    dense = 4 * counts["dense_params"]
    peak = int(timing["maxrss_kb"]) * 1024
    goal = dense + GOAL_SLACK[preset]
    report = {
        "preset": preset,
        "checkpoint": str(hf_dir),
        "bundle": str(bundle_dir),
        "stream": stream,
        "bits": bits,
        "group_size": group_size,
        "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / GIB, 3),
        "elapsed_s": timing.get("elapsed_s", wall),
        "user_s": float(timing.get("user_s", 0)),
        "system_s": float(timing.get("system_s", 0)),
        "export_seconds": child["seconds"],
        "expert_params": counts["expert_params"],
        "dense_params": counts["dense_params"],
        "dense_fp32_bytes": dense,
        "goal_bytes": goal,
        "goal": f"peak RSS <= dense fp32 + {GOAL_SLACK[preset] / GIB:g} GiB",
        "meets_goal": peak <= goal,
        "loadavg_1min": [float(load_before), float(load_after)],  # the times are noisy when it is high
        "code": _code_state(),  # the commit measured (and the work tree's changes)
    }
    Path(out_json).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _export_child(hf_dir: str, bundle_dir: str, bits: int, group_size: int, stream: bool) -> None:
    from edgemoe_ort.export import export_model_with_report

    report = export_model_with_report(hf_dir, bundle_dir, bits=bits, group_size=group_size, force=True,
                                      stream=stream)
    print(json.dumps({"seconds": report.seconds, "experts": report.experts, "layers": report.layers}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("checkpoint", help="write the random bf16 checkpoint of a preset")
    c.add_argument("hf_dir")
    c.add_argument("--preset", choices=["x8", "large"], default="x8")
    m = sub.add_parser("measure", help="export under /usr/bin/time -v, write the figures as JSON")
    e = sub.add_parser("export", help="(the measured child) export and print the timings")
    for p in (m, e):
        p.add_argument("hf_dir")
        p.add_argument("bundle_dir")
        p.add_argument("--bits", type=int, default=4)
        p.add_argument("--group-size", type=int, default=64)
        p.add_argument("--no-stream", action="store_true")
    m.add_argument("--out", required=True)
    m.add_argument("--preset", choices=sorted(GOAL_SLACK), default="x8")
    a = ap.parse_args(argv)
    if a.cmd == "checkpoint":
        if a.preset == "x8":
            save_random_checkpoint_bf16(a.hf_dir, X8_CONFIG)
        else:
            from edgemoe_ort.bench.large import save_random_checkpoint

            save_random_checkpoint(a.hf_dir)
    elif a.cmd == "export":
        _export_child(a.hf_dir, a.bundle_dir, a.bits, a.group_size, not a.no_stream)
    else:
        r = measure(a.hf_dir, a.bundle_dir, a.out, preset=a.preset, stream=not a.no_stream, bits=a.bits,
                    group_size=a.group_size)
        print(json.dumps({k: r[k] for k in ("preset", "stream", "peak_rss_gib", "elapsed_s", "meets_goal")}))


if __name__ == "__main__":
    main()
