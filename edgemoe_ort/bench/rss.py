"""Peak RSS of one mode, in a fresh process: ``python -m edgemoe_ort.bench.rss '<json spec>'``.

The spec (JSON): ``bundle``, ``mode``, ``budget``, ``policy``, ``predictor``, ``routing`` and ``precision``
(edgemoe modes),
``tokens`` (generation length: prefill + ``tokens - 1`` decode steps), ``prompt_ids``, ``trace``,
``io_threads``, ``threads``, ``profile``, ``policy_options`` (``frequencies`` / ``policy_weights`` /
``pin_experts``), ``inmem_path`` (``inmemory``: the converted graph; default: the cached one next to the
bundle).

Prints one JSON line: ``base_rss_bytes`` (after imports, before the session), ``session_rss_bytes`` (after
the session is created), ``gen_peak_rss_bytes`` (peak during the generation: VmHWM reset via
``/proc/self/clear_refs`` after the session is created, if the kernel allows it, else null),
``peak_rss_bytes`` (the whole process life, session creation included: VmHWM before the reset and after the
generation; not ru_maxrss, which Linux carries over from the parent across fork + exec), ``end_rss_bytes``
(VmRSS after the generation), ``decode_tokens`` (decode steps run), ``hwm_per_step`` (VmHWM after the
prefill and after every decode step: growth with the run length shows there) and the store's
``peak_resident_bytes`` / ``budget_bytes``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _status(field: str) -> int | None:
    """``field`` of /proc/self/status in bytes (VmRSS, VmHWM), or None."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Run the spec given as the first argument (JSON) and print the result (one JSON line)."""
    spec = json.loads((argv or sys.argv[1:])[0])
    from edgemoe_ort.bench.runner import Mode, drop_store_cache, make_workload, open_mode
    from edgemoe_ort.bench.storage import load_profile
    from edgemoe_ort.bundle import Bundle

    base = _status("VmRSS")
    bundle = Bundle.open(spec["bundle"])
    prof = load_profile(spec["profile"]) if spec.get("profile") else None
    mode = Mode(
        spec["mode"], spec.get("budget"), spec.get("policy"), spec.get("predictor"), spec.get("routing"),
        spec.get("precision"),
    )
    wl = make_workload(
        bundle, tokens=int(spec["tokens"]), prompt_ids=spec.get("prompt_ids"), trace=spec.get("trace")
    )
    drop_store_cache(bundle)
    sess = open_mode(
        bundle,
        mode,
        io_threads=int(spec["io_threads"]),
        threads=spec.get("threads"),
        profile=prof,
        policy_options=spec.get("policy_options") or None,
        inmem_path=Path(spec["inmem_path"]) if spec.get("inmem_path") else None,
    )
    session_rss = _status("VmRSS")
    create_peak = _status("VmHWM") or 0
    reset = _reset_hwm()
    hwm: list[int] = []

    stamps: list[float] = []

    def on_step(_: int) -> None:
        stamps.append(time.perf_counter())
        hwm.append(_status("VmHWM") or 0)

    decode_tokens = wl.generate(sess, on_step)  # prefill + `tokens - 1` decode steps
    gen_peak = _status("VmHWM") or 0
    end_rss = _status("VmRSS")
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    rate = (len(stamps) - 1) / span if span > 0 else None
    st = sess.stats()
    print(
        json.dumps(
            {
                "base_rss_bytes": base,
                "session_rss_bytes": session_rss,
                "gen_peak_rss_bytes": gen_peak if reset else None,
                "peak_rss_bytes": max(create_peak, gen_peak),
                "create_peak_rss_bytes": create_peak,
                "end_rss_bytes": end_rss,
                "decode_tokens": decode_tokens,
                "hwm_per_step": hwm if reset else None,
                # steps after the first (the prefill's): the decode rate of this one generation
                "decode_tokens_per_s": rate,
                "peak_resident_bytes": st.get("peak_resident_bytes"),
                "budget_bytes": st.get("budget_bytes"),
            }
        )
    )


if __name__ == "__main__":
    main()
