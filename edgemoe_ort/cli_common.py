"""What every command-line entry point shares: the consoles, the one-line error for user mistakes, byte
formatting. (edgemoe_ort/cli.py holds export/run/inspect, edgemoe_ort/bench/cli.py the benchmark.)"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are user mistakes (bad values, missing files, ORT argument errors)."""
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, FileExistsError, PermissionError]
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        errors += [ort_state.Fail, ort_state.InvalidArgument, ort_state.RuntimeException,
                   ort_state.InvalidGraph, ort_state.NoSuchFile]
    except ImportError:  # pragma: no cover - onnxruntime is a hard dependency
        pass
    return tuple(errors)


def friendly_errors(fn: F) -> F:
    """User mistakes -> one ``error:`` line (its first line, markup escaped), exit status 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except user_errors() as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
