"""Peak RSS of one mode, in a fresh process: ``python -m edgemoe_ort.bench.rss '<json spec>'``.

Prints one JSON line: ``base_rss_bytes`` (after imports, before the session), ``session_rss_bytes`` (after
the session is created), ``gen_peak_rss_bytes`` (peak during the generation: VmHWM reset via
``/proc/self/clear_refs`` after the session is created, if the kernel allows it, else null) and
``peak_rss_bytes`` (the whole process life, session creation included: VmHWM before the reset and after the
generation; not ru_maxrss, which Linux carries over from the parent across fork + exec).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _status(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    spec = json.loads((argv or sys.argv[1:])[0])
    from edgemoe_ort.bench.runner import Mode, drop_store_cache, make_workload, open_mode
    from edgemoe_ort.bench.storage import load_profile
    from edgemoe_ort.bundle import Bundle

    base = _status("VmRSS")
    bundle = Bundle.open(spec["bundle"])
    prof = load_profile(spec["profile"]) if spec.get("profile") else None
    mode = Mode(spec["mode"], spec.get("budget"))
    wl = make_workload(
        bundle, tokens=int(spec["tokens"]), prompt_ids=spec.get("prompt_ids"), trace=spec.get("trace")
    )
    drop_store_cache(bundle)
    sess = open_mode(
        bundle, mode, io_threads=int(spec["io_threads"]), threads=spec.get("threads"), profile=prof
    )
    session_rss = _status("VmRSS")
    create_peak = _status("VmHWM") or 0
    reset = _reset_hwm()
    if wl.kind == "model":
        wl.reference(sess)  # greedy decode of `tokens` tokens: a generation
    else:
        wl.run(sess, lambda: None)
    gen_peak = _status("VmHWM") or 0
    st = sess.stats()
    print(
        json.dumps(
            {
                "base_rss_bytes": base,
                "session_rss_bytes": session_rss,
                "gen_peak_rss_bytes": gen_peak if reset else None,
                "peak_rss_bytes": max(create_peak, gen_peak),
                "peak_resident_bytes": st.get("peak_resident_bytes"),
                "budget_bytes": st.get("budget_bytes"),
            }
        )
    )


if __name__ == "__main__":
    main()
