"""The child process of the fault tests: ``python child.py SPEC.json RESULTS.json``, run with the fault shim
preloaded (:func:`faults.shim.run_child`). Opens the bundle through the public API (``MoEModel``) and, per
scenario, turns the fault plan on, runs the phase (one generate(), opening the model, or the second turn
of a chat), records what came out (the tokens, or the exception) and the shim's counters, clears the plan
and runs the phase's generation again (generate(); for a chat, the same turn on the same conversation).
"""

from __future__ import annotations

import faulthandler
import json
import sys
import time
from pathlib import Path
from typing import Any


def outcome_of(fn: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:  # what a user gets: the type and the message
        return {"error": str(exc), "error_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "seconds": time.perf_counter() - t0}
    return {"value": value, "seconds": time.perf_counter() - t0}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    # A hang shows where every thread is, then the child exits (the parent reports stderr).
    faulthandler.dump_traceback_later(float(spec["timeout"]), exit=True)

    from edgemoe_ort.runtime import MoEModel, RuntimeOptions
    from faults.shim import KINDS, ShimControl

    shim = ShimControl(Path(spec["control"]))
    options = RuntimeOptions(budget=spec["budget"], io=spec["io"])
    bundle, prompt, n = spec["bundle"], spec["prompt"], int(spec["max_new_tokens"])

    def generate(m: MoEModel) -> list[int]:
        return list(m.generate(prompt, max_new_tokens=n).tokens)

    shim.clear()
    model = MoEModel.load(bundle, options)
    turns = list(spec.get("chat_turns") or [])

    def reply(chat: Any, text: str) -> list[int]:
        for _ in chat.send(text, max_new_tokens=n):
            pass
        return list(chat.last_result.tokens)

    results: dict[str, Any] = {"clean": generate(model), "matched_clean": shim.matched(), "scenarios": {}}
    for sc in spec["scenarios"]:
        chat = model.chat() if sc["phase"] == "chat" else None
        first = reply(chat, turns[0]) if chat is not None else None  # the turn before the fault: clean
        rules = shim.set_plan(sc["plan"])
        if sc["phase"] == "load":
            def load_and_close() -> None:
                MoEModel.load(bundle, options).close()
            got = outcome_of(load_and_close)
        elif chat is not None:
            got = outcome_of(lambda: reply(chat, turns[1]))  # noqa: B023 (called at once)
        else:
            got = outcome_of(lambda: generate(model))  # noqa: B023
        got.update(rules=rules, matched=shim.matched(), fired={k: shim.fired(k) for k in KINDS}, first=first)
        shim.clear()
        if sc["phase"] == "load":
            def reopen() -> list[int]:
                with MoEModel.load(bundle, options) as m:
                    return generate(m)
            after = outcome_of(reopen)
        elif chat is not None:  # the same turn again, on the conversation the failed turn left
            after = outcome_of(lambda: reply(chat, turns[1]))  # noqa: B023
        else:
            after = outcome_of(lambda: generate(model))
        got["after"] = after.get("value")
        got["after_error"] = after.get("error")
        stats = model.session.stats()
        got["resident_bytes"], got["budget_bytes"] = stats["resident_bytes"], stats["budget_bytes"]
        results["scenarios"][sc["name"]] = got
    model.close()
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
