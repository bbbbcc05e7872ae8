"""Known disagreements of the two validators (issue 15, item 7), in one place.

A disagreement is a case one reader accepts and the other refuses at the same stage (tests/fuzz/run.py,
"Differential"). Each entry names the reader that accepts, the stage, and a regular expression searched in the
refusing reader's message. ``tests/test_fuzz_readers.py`` fails on a disagreement no entry matches and prints
those that match; remove an entry when the readers are fixed (``run.py`` lists entries that matched nothing
in ``known_not_seen``). Found by the fuzzer and settled since (commit 2466223): a NUL byte after the JSON
(nlohmann stopped there), a record checksum with a trailing newline (reader.py's ``$``), an integer beyond the
double range in a field nobody reads (native parse error).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Known:
    id: str
    accepted_by: str  # "python" | "native"
    stage: str  # "open" | "verify"
    pattern: str  # re.search()ed in the message of the reader that refuses
    note: str


KNOWN: tuple[Known, ...] = (
    Known(
        "python-only-fields",
        "native",
        "open",
        r": (model|model\.family|model\.config|graphs(\.[^:]*)?|tokenizer): ",
        "load_manifest does not look at model, model.family, model.config, graphs or tokenizer; Bundle.open "
        "checks their types and that the graph files / tokenizer folder are relative paths inside the bundle "
        "that exist (e.g. graphs.decoder = '../model.onnx', tokenizer = 'model.onnx', model deleted)",
    ),
)
