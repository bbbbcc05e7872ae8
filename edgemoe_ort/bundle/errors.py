"""Bundle errors: every message names the file, the field / expert, and expected vs found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_UNSET: Any = object()
#: each part of a message (field, expected, found, ...) is clipped to this many characters, as the C++
#: reader's error_message does (kMaxMessagePart): a 100 MB field never makes a 100 MB message
MAX_MESSAGE_PART = 512


def _clip(value: Any) -> str:
    s = str(value)
    if len(s) <= MAX_MESSAGE_PART:
        return s
    half = (MAX_MESSAGE_PART - 5) // 2
    return f"{s[:half]} ... {s[-half:]}"


class BundleError(ValueError):
    """A bundle is malformed, incomplete, or cannot be written.

    The message reads ``<file>: layer L expert E: <field>: expected <x>, found <y>`` (parts that do not apply
    are left out). The parts are also available as attributes.
    """

    def __init__(
        self,
        file: str | Path,
        message: str = "",
        *,
        field: str | None = None,
        layer: int | None = None,
        expert: int | None = None,
        expected: Any = _UNSET,
        found: Any = _UNSET,
    ) -> None:
        self.file = str(file)
        self.field = field
        self.layer = layer
        self.expert = expert
        self.expected = None if expected is _UNSET else expected
        self.found = None if found is _UNSET else found
        parts = [self.file]
        if layer is not None and expert is not None:
            parts.append(f"layer {layer} expert {expert}")
        elif layer is not None:
            parts.append(f"layer {layer}")
        if field:
            parts.append(_clip(field))
        tail = _clip(message)
        if expected is not _UNSET or found is not _UNSET:
            ef = []
            if expected is not _UNSET:
                ef.append(f"expected {_clip(expected)}")
            if found is not _UNSET:
                ef.append(f"found {_clip(found)}")
            tail = f"{tail} ({', '.join(ef)})" if message else ", ".join(ef)
        if tail:
            parts.append(tail)
        super().__init__(": ".join(parts))


class BundleExistsError(BundleError, FileExistsError):
    """The target of a :class:`BundleWriter` exists and ``force`` was not given."""
