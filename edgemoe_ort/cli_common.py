"""What every command-line entry point shares: the consoles, ``-h``/``--version``/``-v``/``--quiet``, the
one-line error for user mistakes (naming our flags, never a traceback), output files that are never replaced
without ``--force``, tables printed at full width, byte formatting. (edgemoe_ort/cli.py holds
export/run/inspect, edgemoe_ort/bench/cli.py the benchmark, edgemoe_ort/profile/cli.py the profiler.)"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from typer.core import TyperCommand

#: the click exceptions typer raises (typer >= 0.2x vendors its own click as ``typer._click``)
_UsageError: type[Exception] = typer.BadParameter.__mro__[1]

err = Console(stderr=True, soft_wrap=True)  # piped or narrow, a line is never cut or re-wrapped
out = Console(soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

#: ``-h`` as well as ``--help`` on every command
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}

#: the 1-minute load average above which benchmark figures are marked as measured on a busy machine (the same
#: threshold as ``make bench``, mk/bench.mk)
BUSY_LOAD = 1.5


@dataclass
class _Output:
    verbose: bool = False
    quiet: bool = False


#: how chatty this process's command is (set by :func:`configure_output` from ``-v`` / ``--quiet``)
output = _Output()


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are user mistakes (bad values, missing files, ORT argument errors)."""
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, FileExistsError, PermissionError,
                                         NotADirectoryError, IsADirectoryError]
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        errors += [ort_state.Fail, ort_state.InvalidArgument, ort_state.RuntimeException,
                   ort_state.InvalidGraph, ort_state.NoSuchFile, ort_state.InvalidProtobuf]
    except ImportError:  # pragma: no cover - onnxruntime is a hard dependency
        pass
    return tuple(errors)


# --- our words for the library's: parameter and session-config names -> the flags that set them -----------
#: names that may appear anywhere in a message (they cannot be mistaken for prose)
_FLAG_OF_NAME = {
    "edgemoe.frequencies": "--frequencies",
    "edgemoe.policy_weights": "--policy-weights",
    "edgemoe.pin_experts": "--pin-experts",
    "edgemoe.policy": "--policy",
    "edgemoe.budget": "--budget",
    "edgemoe.io_threads": "--io-threads",
    "edgemoe.io_mode": "--io",
    "edgemoe.predictor": "--predictor",
    "edgemoe.prefetch_depth": "--prefetch-depth",
    "edgemoe.prefetch_threshold": "--prefetch-threshold",
    "edgemoe.profile": "--profile",
    "edgemoe.warm_start": "--warm-start",
    "edgemoe.routing": "--routing",
    "edgemoe.routing_lambda": "--routing-lambda",
    "edgemoe.routing_keep": "--routing-keep",
    "edgemoe.routing_window": "--routing-window",
    "edgemoe.miss_precision": "--miss-precision",
    "edgemoe.thresholds": "--thresholds",
    "miss_precision": "--miss-precision",
    "max_new_tokens": "--max-new-tokens",
    "intra_op_threads": "--threads",
    "io_threads": "--io-threads",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "repetition_penalty": "--repetition-penalty",
    "pin_experts": "--pin-experts",
    "policy_weights": "--policy-weights",
    "prefetch_depth": "--prefetch-depth",
    "prefetch_threshold": "--prefetch-threshold",
    "warm_start": "--warm-start",
    "routing_lambda": "--routing-lambda",
    "routing_keep": "--routing-keep",
    "routing_window": "--routing-window",
    "pass force=True (--force)": "add --force",
    "pass force=True": "add --force",
    "force=True": "--force",
}
_NAMES = "|".join(re.escape(k) for k in sorted(_FLAG_OF_NAME, key=len, reverse=True))
_NAME_RE = re.compile(r"(?<![\w.-])(" + _NAMES + r")(?!\w)")
#: plain words that are a flag only at the start of a message ("budget: expected ...")
_LEADING_FLAGS = ("budget", "policy", "io", "predictor", "temperature", "seed", "frequencies", "profile",
                  "stop", "routing", "thresholds", "twin")
_LEADING_RE = re.compile(r"^(" + "|".join(_LEADING_FLAGS) + r")(?=:| must )")
_ORT_PREFIX = re.compile(r"^(\[ONNXRuntimeError\] : \d+ : \w+ : )?(Exception during initialization: )?")


MissPrecisionOption = Annotated[
    str, typer.Option(help="which copy a cache miss reads: exact (the primary) or dynamic (HOBBIT: the "
                      "low-bit twin for unimportant uses, nothing for the least important; "
                      "docs/op-contract.md)")
]
ThresholdsOption = Annotated[
    str | None, typer.Option(help="dynamic: T1,T2 with 0 <= T1 < T2 <= 1 (e.g. 0.6,0.9)",
                             show_default="from the bundle's profile, else 0.6,0.9")
]


def parse_thresholds(text: str | None) -> tuple[float, float] | None:
    """``--thresholds "0.6,0.9"`` -> ``(0.6, 0.9)``; None stays None. Raises ValueError naming the flag."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        t1, t2 = (float(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        t1 = t2 = None
    if t1 is None or t2 is None or not (0 <= t1 < t2 <= 1):
        raise ValueError(
            f"--thresholds: expected T1,T2 with 0 <= T1 < T2 <= 1 (e.g. 0.6,0.9), found {text!r}"
        )
    return t1, t2


class StageBars:
    """One rich progress bar per stage of a long job, on stderr: call it as the job's
    ``progress(stage, done, total)``; the bars start at the first stage (an error before it is one line,
    with no empty bar above it) and stop when the ``with`` block ends. ``eta`` adds a time-remaining column
    (the exporter's experts stage ticks per expert); ``transient`` erases the bars at the end."""

    def __init__(self, *, eta: bool = False, transient: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns: list[Any] = [TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn()]
        if eta:
            columns += [TextColumn("eta"), TimeRemainingColumn()]
        self._bar = Progress(*columns, console=err, transient=transient, disable=output.quiet)
        self._tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self._tasks:
            self._bar.start()
        if stage not in self._tasks:
            self._tasks[stage] = self._bar.add_task(stage, total=max(total, 1))
        self._bar.update(self._tasks[stage], completed=done, total=max(total, 1))

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tasks:
            self._bar.stop()


def cli_words(message: str) -> str:
    """A library message in the words of the command line: ORT's ``[ONNXRuntimeError] : 6 : ...`` prefix
    dropped, ``max_new_tokens`` -> ``--max-new-tokens``, ``edgemoe.budget`` -> ``--budget``, ``pass
    force=True`` -> ``add --force``."""
    msg = _ORT_PREFIX.sub("", message.strip())
    msg = _NAME_RE.sub(lambda m: _FLAG_OF_NAME[m.group(1)], msg)
    return _LEADING_RE.sub(lambda m: f"--{m.group(1)}", msg)


def one_line(exc: BaseException) -> str:
    """The first line of ``exc`` in CLI words (:func:`cli_words`), or its type name."""
    text = str(exc).strip()
    return cli_words(text.splitlines()[0]) if text else type(exc).__name__


def fail(message: str) -> None:
    """Print one ``error:`` line (markup escaped) to stderr."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def friendly_errors(fn: F) -> F:
    """Run a command: set up the output from its ``verbose``/``quiet`` parameters (:func:`configure_output`);
    user mistakes -> one ``error:`` line in CLI words, exit status 2 (with ``-v`` the traceback too)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            configure_output(verbose=bool(kwargs.get("verbose")), quiet=bool(kwargs.get("quiet")))
            return fn(*args, **kwargs)
        except user_errors() as exc:
            if output.verbose:
                traceback.print_exc()
            fail(one_line(exc))
            raise typer.Exit(code=2) from None
        except OSError as exc:  # a disk or network problem: still one line, naming the file
            if output.verbose:
                traceback.print_exc()
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            fail(f"{where}{exc.strerror or exc}")
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


class OneLineCommand(TyperCommand):
    """A typer command whose usage errors (bad or missing flag values, unknown flags) print one ``error:``
    line naming the flag and exit with status 2, instead of a usage box."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _UsageError as exc:
            name = info_name or self.name or "command"
            fail(f"{exc.format_message()} (see {name} --help)")
            raise typer.Exit(code=2) from None


def command_kwargs(help: str, examples: Sequence[str] = ()) -> dict[str, Any]:
    """``app.command(**command_kwargs(...))``: the description, the examples as the epilog, ``-h``, one-line
    usage errors."""
    epilog = None
    if examples:
        epilog = "[bold]Examples[/]\n\n" + "\n\n".join(f"  {escape(e)}" for e in examples)
    return {"help": help, "epilog": epilog, "cls": OneLineCommand, "context_settings": CONTEXT_SETTINGS}


def version_text(prog: str) -> str:
    """``edgemoe-run 0.1.0 (onnxruntime 1.32.0, Python 3.11.7)``."""
    from importlib.metadata import PackageNotFoundError, version

    from edgemoe_ort import __version__

    try:
        ort = version("onnxruntime")
    except PackageNotFoundError:  # pragma: no cover - a hard dependency
        ort = "not installed"
    py = ".".join(str(v) for v in sys.version_info[:3])
    return f"{prog} {__version__} (onnxruntime {ort}, Python {py})"


def _version_callback(ctx: typer.Context, value: bool) -> None:
    if value:
        print(version_text(ctx.find_root().info_name or "edgemoe"))
        raise typer.Exit()


VersionOption = Annotated[
    bool,
    typer.Option("--version", "-V", callback=_version_callback, is_eager=True,
                 help="print the version and exit"),
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="more: ONNX Runtime's and the library's logs, tracebacks")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="print only results and errors")]


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        label = {"WARNING": "warning", "ERROR": "error", "CRITICAL": "error"}.get(record.levelname, "")
        text = escape(self.format(record))
        err.print(f"[yellow]{label}:[/] {text}" if label else f"[dim]{text}[/]", highlight=False,
                  soft_wrap=True)


def configure_output(*, verbose: bool = False, quiet: bool = False) -> None:
    """``-v``: ONNX Runtime's logs (warnings and up), the library's INFO logs, tracebacks with the errors;
    default: ORT silent (its errors reach the user as ours, not as raw log lines), library warnings;
    ``--quiet``: library errors only (commands also skip progress and statistics lines)."""
    if verbose and quiet:
        raise ValueError("--verbose and --quiet: give one of them")
    output.verbose, output.quiet = verbose, quiet
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        warnings.filterwarnings("ignore")
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(2 if verbose else 4)  # 4 = fatal only
    except ImportError:  # pragma: no cover - a hard dependency
        pass
    log = logging.getLogger("edgemoe_ort")
    if not any(isinstance(h, _Handler) for h in log.handlers):
        log.addHandler(_Handler())
    log.setLevel(logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING)


def info(message: str) -> None:
    """A progress or summary line on stderr (rich markup), unless ``--quiet``."""
    if not output.quiet:
        err.print(message, highlight=False, soft_wrap=True)


def print_table(table: Any, console: Console | None = None) -> None:
    """Print a rich table at its natural width, wider than the terminal if need be: piped or narrow, no value
    is cut to ``resi…``."""
    console = console or out
    width = Measurement.get(console, console.options.update(width=100_000), table).maximum
    before = console.width
    console.width = max(width, before if console.is_terminal else 1)
    try:
        console.print(table, crop=False)
    finally:
        console.width = before


def check_output_file(path: Path | None, flag: str, *, force: bool) -> None:
    """Before any work: ``path`` (an output file of ``flag``) can be written, and replaces nothing without
    ``--force``; its missing parent folders are made now (:func:`make_parents`), so a path that cannot exist
    fails before the run. One line naming the flag and the file otherwise. Write the file with
    :func:`write_output_file`."""
    if path is None:
        return
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path}: is a folder; expected a file name (e.g. {path / 'out'})")
    if (path.exists() or path.is_symlink()) and not force:
        raise FileExistsError(f"{flag} {path}: exists; add --force to replace it")
    parent = path.parent
    while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: {parent} is not writable")
    make_parents(path, flag)


def make_parents(path: Path, flag: str) -> None:
    """Make the missing parent folders of ``path`` (the value of ``flag``); one line naming both if they
    cannot be made."""
    try:
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        kind = PermissionError if isinstance(exc, PermissionError) else FileNotFoundError
        raise kind(f"{flag} {path}: cannot create the folder {exc.filename or path.parent} "
                   f"({exc.strerror or exc})") from None


def write_output_file(path: Path, flag: str, *, force: bool, write: Callable[[Path], object]) -> None:
    """Write the output file ``path`` of ``flag`` (checked by :func:`check_output_file` before the run) with
    ``write(path)``. Without ``force`` the file is first created exclusively (``O_EXCL``), so a file that
    appeared there during the run is never replaced: one line instead. ``write`` may write the file or
    rename another onto it; on an exception the empty file created here is removed again."""
    make_parents(path, flag)
    if not force:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise FileExistsError(f"{flag} {path}: appeared while the command ran; not replaced (add --force "
                                  "to replace it)") from None
    try:
        write(path)
    except BaseException:
        if not force:
            path.unlink(missing_ok=True)
        raise


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - not Unix
        return None


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
