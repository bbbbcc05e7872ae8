"""Every command as a user runs it: ``--help``/``-h``, ``--version``/``-V``, and each documented bad input
gives no traceback, exit status 2 and one ``error:`` line naming the flag or file (issue 14); nothing the
user had is replaced or deleted.

Most cases run in this process (typer's CliRunner: no interpreter start-up, no second import of ONNX
Runtime); a few smoke tests run the installed commands in a subprocess. All of them share one exported bundle
(tests/conftest.py).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import edgemoe_ort

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "edgemoe-tiny-mixtral"
COMMANDS = ("edgemoe-export", "edgemoe-run", "edgemoe-inspect", "edgemoe-bench", "edgemoe-profile")

pytestmark = pytest.mark.export  # the session bundle is exported with torch


@dataclass
class Ran:
    """What a command did: its exit status and output (a subprocess, or an in-process run)."""

    returncode: int
    stdout: str
    stderr: str


def cli(cmd: str, *args: object, input: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> Ran:
    """Run the installed command ``cmd`` in a subprocess."""
    full_env = {**os.environ, "COLUMNS": "80", **(env or {})}
    res = subprocess.run([str(BIN / cmd), *map(str, args)], capture_output=True, text=True, input=input,
                         env=full_env, timeout=timeout, cwd=REPO)
    return Ran(res.returncode, res.stdout, res.stderr)


def _apps() -> dict[str, Any]:
    from edgemoe_ort.bench.cli import bench_app
    from edgemoe_ort.cli import export_app, inspect_app, run_app
    from edgemoe_ort.plan.cli import plan_app
    from edgemoe_ort.profile.cli import profile_app

    return {"edgemoe-export": export_app, "edgemoe-run": run_app, "edgemoe-inspect": inspect_app,
            "edgemoe-bench": bench_app, "edgemoe-profile": profile_app, "edgemoe-plan": plan_app}


_invoke_lock = threading.Lock()  # one in-process command at a time: they share sys.stdout and os.environ


def invoke(cmd: str, *args: object, input: str | None = None, offline: bool = True, columns: int = 80) -> Ran:
    """Run command ``cmd`` in this process, as the installed script would (``offline``: as with
    HF_HUB_OFFLINE=1). An exception the command let out shows up as a ``Traceback`` on stderr."""
    import huggingface_hub.constants as hub_constants
    from typer.testing import CliRunner

    with _invoke_lock:
        env, live = dict(os.environ), hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = offline or live
        try:
            res = CliRunner().invoke(_apps()[cmd], [str(a) for a in args], input=input, prog_name=cmd,
                                     env={"COLUMNS": str(columns)})
        finally:
            hub_constants.HF_HUB_OFFLINE = live
            os.environ.clear()
            os.environ.update(env)  # the commands set TRANSFORMERS_VERBOSITY & co. for their process
    stderr = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        stderr += f"Traceback (in process): {res.exception!r}\n"
    return Ran(res.exit_code, res.stdout, stderr)


def assert_one_line_error(res: Ran, *needles: str) -> str:
    """Exit 2, nothing on stdout, no traceback, no raw ANSI escapes (ORT's log), exactly one line on stderr
    (an empty line counts), an ``error:`` line naming every needle. Returns the line."""
    lines = res.stderr.splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout and "\x1b" not in res.stderr, res.stderr
    assert res.stdout == "", res.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --- --help, -h, --version, -V ------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_has_description_examples_and_defaults(cmd: str) -> None:
    long, short = invoke(cmd, "--help", columns=200), invoke(cmd, "-h", columns=200)  # no help line wrapped
    assert long.returncode == 0 and short.returncode == 0, long.stderr + short.stderr
    assert long.stdout == short.stdout
    text = long.stdout
    assert f"Usage: {cmd}" in text and "Examples" in text and f"{cmd} " in text.split("Examples")[1]
    assert "[default:" in text and "--version" in text and "--quiet" in text and "--verbose" in text
    if cmd == "edgemoe-run":
        assert "the whole store" in " ".join(text.split()), "--help must say what --budget defaults to"


def test_version_in_process() -> None:
    for cmd in COMMANDS:
        for flag in ("--version", "-V"):
            res = invoke(cmd, flag)
            assert res.returncode == 0 and res.stderr == "", res.stderr
            assert res.stdout.startswith(f"{cmd} {edgemoe_ort.__version__} (onnxruntime "), res.stdout


def test_package_version_matches_the_installed_metadata() -> None:
    from importlib.metadata import version

    assert edgemoe_ort.__version__ == version("edgemoe-ort")
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", edgemoe_ort.__version__)


# --- bad inputs -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The broken things the bad-input cases point at."""
    root = tmp_path_factory.mktemp("bad-inputs")
    f: dict[str, Path] = {"root": root}
    for name, content in (("garbage", b"this is not an onnx file\n"),
                          ("truncated", (tiny_bundle / "model.onnx").read_bytes()[:5000])):
        d = root / name
        shutil.copytree(tiny_bundle, d, ignore=shutil.ignore_patterns("model.onnx"))
        (d / "model.onnx").write_bytes(content)
        f[name] = d
    (root / "long.txt").write_text("word " * 600, encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "exists.json").write_text("{}")
    (root / "no-config").mkdir()
    (root / "bad-config").mkdir()
    (root / "bad-config" / "config.json").write_text("{not json")
    (root / "bad-config" / "model.safetensors").write_bytes(b"weights")  # so the config is what is wrong
    (root / "no-weights").mkdir()
    shutil.copy(MODEL / "config.json", root / "no-weights")
    f.update(long=root / "long.txt", latin1=root / "latin1.txt", exists=root / "exists.json",
             no_config=root / "no-config", bad_config=root / "bad-config", no_weights=root / "no-weights")
    return f


B = "{bundle}"  # placeholders, filled per case from the fixtures
M = str(MODEL)
CASES: dict[str, tuple[str, list[str], tuple[str, ...]]] = {
    # edgemoe-run
    "run-no-bundle": ("edgemoe-run", ["{root}/nope", "-p", "x"], ("{root}/nope", "not a bundle")),
    "run-no-prompt": ("edgemoe-run", [B], ("--prompt", "--ids", "found none")),
    "run-two-prompts": ("edgemoe-run", [B, "-p", "x", "--ids", "1"], ("--prompt and --ids",)),
    "run-max-new-tokens-0": ("edgemoe-run", [B, "-p", "x", "--max-new-tokens", "0"], ("--max-new-tokens",)),
    "run-max-new-tokens-abc": ("edgemoe-run", [B, "-p", "x", "-n", "abc"], ("--max-new-tokens",)),
    "run-io-threads-0": ("edgemoe-run", [B, "-p", "x", "--io-threads", "0"], ("--io-threads",)),
    "run-threads-0": ("edgemoe-run", [B, "-p", "x", "--threads", "0"], ("--threads",)),
    "run-budget-below-expert": ("edgemoe-run", [B, "-p", "x", "--budget", "1KB"],
                                ("--budget", "largest expert", "163840")),
    "run-budget-garbage": ("edgemoe-run", [B, "-p", "x", "--budget", "lots"], ("--budget", "'lots'", "auto")),
    "run-temperature-nan": ("edgemoe-run", [B, "-p", "x", "--temperature", "nan"], ("--temperature",)),
    "run-seed-negative": ("edgemoe-run", [B, "-p", "x", "--seed", "-1"], ("--seed", "-1")),
    "run-top-k-negative": ("edgemoe-run", [B, "-p", "x", "--top-k", "-1"], ("--top-k",)),
    "run-top-p-0": ("edgemoe-run", [B, "-p", "x", "--top-p", "0"], ("--top-p",)),
    "run-repetition-penalty-0": ("edgemoe-run", [B, "-p", "x", "--repetition-penalty", "0"],
                                 ("--repetition-penalty",)),
    "run-stop-empty": ("edgemoe-run", [B, "-p", "x", "--stop", ""], ("--stop",)),
    "run-prompt-file-missing": ("edgemoe-run", [B, "-f", "{root}/none.txt"], ("--prompt-file", "none.txt")),
    "run-prompt-file-not-utf8": ("edgemoe-run", [B, "--prompt-file", "{latin1}"], ("--prompt-file", "UTF-8")),
    "run-prompt-past-context": ("edgemoe-run", [B, "--prompt-file", "{long}"],
                                ("prompt is 601 tokens", "context is 256 tokens")),
    "run-ids-garbage": ("edgemoe-run", [B, "--ids", "1,two"], ("--ids", "'1,two'")),
    "run-ids-outside-vocab": ("edgemoe-run", [B, "--ids", "1,99999"], ("--ids", "99999", "0..4095")),
    "run-text-without-tokenizer": ("edgemoe-run", ["{idsonly}", "-p", "x"], ("no tokenizer", "--ids")),
    "run-save-resident-exists": ("edgemoe-run", [B, "-p", "x", "--save-resident", "{exists}"],
                                 ("--save-resident", "exists.json", "--force")),
    "run-save-resident-under-a-file": ("edgemoe-run", [B, "-p", "x", "--save-resident", "{exists}/r.json"],
                                       ("--save-resident", "exists.json is a file, not a folder")),
    "run-garbage-onnx": ("edgemoe-run", ["{garbage}", "-p", "x"], ("garbage/model.onnx", "not a valid ONNX")),
    "run-truncated-onnx": ("edgemoe-run", ["{truncated}", "-p", "x"],
                           ("truncated/model.onnx", "not a valid ONNX")),
    "run-policy-unknown": ("edgemoe-run", [B, "-p", "x", "--policy", "fifo"], ("--policy", "'fifo'")),
    "run-unknown-flag": ("edgemoe-run", [B, "-p", "x", "--tempreature", "1"], ("--tempreature",)),
    "run-verbose-and-quiet": ("edgemoe-run", [B, "-p", "x", "-v", "-q"], ("--verbose and --quiet",)),
    # edgemoe-export
    "export-missing-folder": ("edgemoe-export", ["{root}/no/such/model", "-o", "{root}/out"],
                              ("{root}/no/such/model", "no such folder")),
    "export-no-config": ("edgemoe-export", ["{no_config}", "-o", "{root}/out"], ("no-config", "config.json")),
    "export-bad-config": ("edgemoe-export", ["{bad_config}", "-o", "{root}/out"], ("bad-config",)),
    "export-no-weights": ("edgemoe-export", ["{no_weights}", "-o", "{root}/out"],
                          ("no-weights", "no weights in this folder", "*.safetensors")),
    "export-hub-offline": ("edgemoe-export", ["someone/some-moe", "-o", "{root}/out"],
                           ("someone/some-moe", "HF_HUB_OFFLINE", "pass the folder")),
    "export-exists": ("edgemoe-export", [M, "-o", B], ("--output", "exists; add --force to replace it")),
    "export-exists-a-file": ("edgemoe-export", [M, "-o", "{exists}"],
                             ("--output", "exists.json", "refusing to replace a file",
                              "(--force would not replace it)")),
    "export-output-under-a-file": ("edgemoe-export", [M, "-o", "{exists}/sub/b"],
                                   ("--output", "exists.json is not a folder")),
    "export-bits": ("edgemoe-export", [M, "-o", "{root}/o", "--bits", "5"],
                    ("--bits", "5", "expected 32, 16, 8, 4, 3 or 2")),
    "export-missing-output": ("edgemoe-export", [M], ("--output",)),
    # edgemoe-inspect
    "inspect-no-bundle": ("edgemoe-inspect", ["{root}/nope"], ("{root}/nope",)),
    "inspect-garbage-onnx": ("edgemoe-inspect", ["{garbage}"], ("garbage/model.onnx", "not a valid ONNX")),
    "inspect-truncated-onnx": ("edgemoe-inspect", ["{truncated}"], ("truncated/model.onnx",)),
    "inspect-budget-below-expert": ("edgemoe-inspect", [B, "--budget", "1KB"],
                                    ("--budget", "largest expert")),
    "inspect-context-0": ("edgemoe-inspect", [B, "--context", "0"], ("--context",)),
    # edgemoe-bench
    "bench-json-folder": ("edgemoe-bench", [B, "--json", "{root}"], ("--json", "is a folder")),
    "bench-json-exists": ("edgemoe-bench", [B, "--json", "{exists}"], ("--json", "exists.json", "--force")),
    "bench-json-under-a-file": ("edgemoe-bench", [B, "--json", "{exists}/r.json"],
                                ("--json", "exists.json is a file, not a folder")),
    "bench-plot-exists": ("edgemoe-bench", [B, "--plot", "{exists}"], ("--plot", "--force")),
    "bench-budgets": ("edgemoe-bench", [B, "--budgets", "25%,lots"], ("--budgets", "'lots'")),
    "bench-tokens": ("edgemoe-bench", [B, "--tokens", "1"], ("--tokens",)),
    # edgemoe-profile
    "profile-no-corpus": ("edgemoe-profile", [B], ("--corpus",)),
    "profile-corpus-missing": ("edgemoe-profile", [B, "--corpus", "{root}/nope"], ("nope",)),
}
#: one bad input per command, also run as the installed script in a subprocess
SMOKE = ("run-budget-below-expert", "export-no-config", "inspect-garbage-onnx", "bench-json-exists",
         "profile-corpus-missing")


def _fill(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], text)


@pytest.fixture(scope="module")
def values(tiny_bundle: Path, idsonly_bundle: Path, files: dict[str, Path]) -> dict[str, str]:
    return {**{k: str(v) for k, v in files.items()}, "bundle": str(tiny_bundle),
            "idsonly": str(idsonly_bundle)}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case: str, values: dict[str, str]) -> None:
    cmd, args, needles = CASES[case]
    res = invoke(cmd, *[_fill(a, values) for a in args])
    assert_one_line_error(res, *[_fill(n, values) for n in needles])


@pytest.mark.parametrize("bits", [3, 2])
def test_export_low_bits(tmp_path: Path, bits: int) -> None:
    """--bits 3 / 2: every expert in int3 / int2 (packed u3 / u2 weights), and the bundle generates."""
    from edgemoe_ort.bundle import Bundle

    out = tmp_path / f"int{bits}"
    res = invoke("edgemoe-export", MODEL, "-o", out, "--bits", bits, "--group-size", 32, "-q")
    assert res.returncode == 0, res.stderr
    b = Bundle.open(out)
    assert {r["format"]["dtype"] for r in b.manifest["experts"]} == {f"int{bits}"}
    assert {r["tensors"]["w_out"]["dtype"] for r in b.manifest["experts"]} == {f"u{bits}"}
    assert b.summary()["bits"] == {bits: len(b.manifest["experts"])}
    res = invoke("edgemoe-run", out, "-p", "def f(x):", "--max-new-tokens", 4)
    assert res.returncode == 0 and res.stdout.startswith("def f(x):"), res.stderr


def test_export_output_that_cannot_be_made_names_the_flag(tmp_path: Path) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc (a folder where nothing can be created, even by root)")
    res = invoke("edgemoe-export", MODEL, "-o", "/proc/nope/x")
    assert_one_line_error(res, "--output /proc/nope/x: cannot create the folder /proc/nope")


def test_bench_plot_without_matplotlib_says_so_up_front(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgemoe_ort.bench.runner as runner

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(runner, "run_bench", lambda *a, **k: pytest.fail("benchmarked before the check"))
    res = invoke("edgemoe-bench", tiny_bundle, "--plot", tmp_path / "p.png")
    assert_one_line_error(res, "--plot", "matplotlib", "not installed")
    assert not (tmp_path / "p.png").exists()


@pytest.fixture(scope="module")
def smoke_results(values: dict[str, str]) -> dict[str, tuple[Ran, Ran, Ran]]:
    """Per command, as the installed script: ``--help``, ``-V`` and its :data:`SMOKE` bad input."""

    def one(case: str) -> tuple[Ran, Ran, Ran]:
        cmd, args, _ = CASES[case]
        return (cli(cmd, "--help", env={"COLUMNS": "200"}), cli(cmd, "-V"),
                cli(cmd, *[_fill(a, values) for a in args], env={"HF_HUB_OFFLINE": "1"}))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SMOKE, pool.map(one, SMOKE), strict=True))


@pytest.mark.parametrize("case", SMOKE)
def test_installed_command_smoke(case: str, smoke_results: dict[str, Any], values: dict[str, str]) -> None:
    cmd, _, needles = CASES[case]
    help_, version, bad = smoke_results[case]
    assert help_.returncode == 0 and f"Usage: {cmd}" in help_.stdout and "Examples" in help_.stdout
    assert version.returncode == 0 and version.stderr == ""
    assert version.stdout.startswith(f"{cmd} {edgemoe_ort.__version__} (onnxruntime "), version.stdout
    assert_one_line_error(bad, *[_fill(n, values) for n in needles])


def test_smoke_covers_every_command() -> None:
    assert {CASES[c][0] for c in SMOKE} == set(COMMANDS)
    assert {c for c, _, _ in CASES.values()} == set(COMMANDS)


def test_bad_inputs_touch_nothing(files: dict[str, Path], tiny_bundle: Path, values: dict[str, str]) -> None:
    for case in ("export-exists", "export-exists-a-file", "run-save-resident-exists", "bench-json-exists"):
        cmd, args, _ = CASES[case]
        invoke(cmd, *[_fill(a, values) for a in args])
    assert (files["exists"]).read_text() == "{}"
    assert not (files["root"] / "out").exists() and not (files["root"] / "o").exists()
    graphs = json.loads((tiny_bundle / "manifest.json").read_text())["graphs"]  # with the tokenizer graphs
    assert sorted(p.name for p in tiny_bundle.iterdir()) == sorted(
        ["experts.bin", "manifest.json", "tokenizer", *graphs.values()])


# --- the hub check: bounded, honest, and it leaves the process as it was ---------------------------------
@pytest.fixture()
def silent_server() -> Iterator[str]:
    """A local TCP endpoint that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture()
def status_server() -> Iterator[tuple[str, list[int]]]:
    """A local HTTP server answering every request with ``status[0]``."""
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(status[0])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", status
    finally:
        server.shutdown()
        server.server_close()


def test_hub_probe_gives_up_on_a_server_that_never_answers(
    silent_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgemoe_ort.hub import _hub_reachable

    monkeypatch.setenv("HF_ENDPOINT", silent_server)
    t = time.perf_counter()
    assert _hub_reachable(0.5) is False
    assert time.perf_counter() - t < 1.5


def test_hub_probe_bounds_a_stalled_name_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """urlopen's timeout does not cover getaddrinfo: the probe must not wait for the resolver."""
    from edgemoe_ort.hub import _hub_reachable

    release = threading.Event()
    real = socket.getaddrinfo

    def stalled(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", stalled)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.invalid")
    t = time.perf_counter()
    try:
        assert _hub_reachable(0.3) is False
        assert time.perf_counter() - t < 1.0
    finally:
        release.set()


def test_hub_probe_counts_only_the_hubs_answers(
    status_server: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgemoe_ort.hub import _hub_reachable

    url, status = status_server
    monkeypatch.setenv("HF_ENDPOINT", url)
    seen = {}
    for code in (200, 401, 404, 502, 503, 504):
        status[0] = code
        seen[code] = _hub_reachable(2.0)
    assert seen == {200: True, 401: True, 404: True, 502: False, 503: False, 504: False}


def test_hub_id_without_network_fails_in_one_line_quickly(
    silent_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No HF_HUB_OFFLINE and a hub that does not answer: one line after HUB_TIMEOUT_S, not 30 s of retries."""
    import edgemoe_ort.hub as hub

    monkeypatch.setenv("HF_ENDPOINT", silent_server)
    monkeypatch.setattr(hub, "HUB_TIMEOUT_S", 0.5)
    t = time.perf_counter()
    res = invoke("edgemoe-export", "someone/some-moe", "-o", tmp_path / "o", offline=False)
    assert_one_line_error(res, "someone/some-moe", "unreachable: offline?", "hf download")
    assert time.perf_counter() - t < 3


def test_export_asks_the_hub_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """edgemoe-export checks the hub id before torch is imported; the export takes that answer."""
    import edgemoe_ort.export.api as api
    import edgemoe_ort.hub as hub

    asked: list[float | None] = []
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=None: not asked.append(timeout))  # it answers

    def from_pretrained(name: str, *args: Any, **kwargs: Any) -> None:  # stands in for the download
        raise OSError(f"{name} is not a repository on the hub")

    monkeypatch.setattr(api.AutoConfig, "from_pretrained", from_pretrained)
    res = invoke("edgemoe-export", "someone/some-moe", "-o", tmp_path / "o", offline=False)
    assert_one_line_error(res, "someone/some-moe: someone/some-moe is not a repository")
    assert asked == [None]


def test_library_export_is_offline_only_while_it_runs(
    silent_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A cached hub id and no hub: the export reads the cache offline, and the process is online after."""
    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    import edgemoe_ort.export.api as api
    import edgemoe_ort.hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", silent_server)
    monkeypatch.setattr(hub, "HUB_TIMEOUT_S", 0.3)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    source = hub.check_source("someone/some-moe")
    assert source == hub.ModelSource("someone/some-moe", offline=True)
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE is False, "check_source set it"
    during: list[tuple[str | None, bool]] = []

    def export_stub(name: str, out: Path, **kw: Any) -> None:  # stands in for torch: record the state
        during.append((os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE))
        raise ValueError("stop here")

    monkeypatch.setattr(api, "_export", export_stub)
    with pytest.raises(ValueError, match="stop here"):
        api.export_model_with_report(source, tmp_path / "o")
    assert during == [("1", True)]
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE is False


# --- data loss ----------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
            for p in folder.rglob("*")}


def test_export_force_keeps_what_is_not_the_bundles(tmp_path: Path, tiny_bundle: Path) -> None:
    web = tmp_path / "webapp"
    (web / "src").mkdir(parents=True)
    (web / "manifest.json").write_text('{"name": "my app", "icons": []}\n')
    (web / "index.html").write_text("<!doctype html><title>app</title>\n")
    (web / "src" / "main.js").write_bytes(b"console.log('hi')\n\x00\xff")
    notes = tmp_path / "bundle-with-notes"
    shutil.copytree(tiny_bundle, notes)
    (notes / "NOTES.txt").write_text("budget 25% was best on the Pi\n")
    backup = tmp_path / "bundle-with-a-tokenizer-backup"
    shutil.copytree(tiny_bundle, backup)
    (backup / "tokenizer" / "backup").mkdir()
    (backup / "tokenizer" / "backup" / "tokenizer.json").write_bytes(b'{"mine": true}\n')
    empty = tmp_path / "bundle-with-an-empty-folder"
    shutil.copytree(tiny_bundle, empty)
    (empty / "my-empty-dir").mkdir()
    profile = tmp_path / "bundle-with-someone-elses-profile"
    shutil.copytree(tiny_bundle, profile)
    (profile / "profile.json").write_bytes(b'{"format": "edgemoe-profile", "bundle": {"manifest_xxh3": "0"}}')
    cases = ((web, ("not an edgemoe bundle; in the way:", "index.html", "manifest.json", "src/")),
             (notes, ("holds other files", "NOTES.txt")),
             (backup, ("tokenizer/backup/",)),
             (empty, ("my-empty-dir/",)),
             (profile, ("profile.json",)))
    for folder, needles in cases:
        before = _snapshot(folder)
        res = invoke("edgemoe-export", MODEL, "-o", folder, "--force")
        assert_one_line_error(res, f"--output {folder}", *needles)
        assert _snapshot(folder) == before, f"--force changed {folder.name}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f, _ in cases)


#: a writer killed mid-export (no cleanup, like SIGKILL): leaves its temporary folder next to the target
_KILLED_WRITER = """
import os, sys
import numpy as np
from edgemoe_ort.bundle import BundleWriter
w = BundleWriter(sys.argv[1], family="mixtral")
w.add_layer(0, num_experts=2, top_k=1, hidden=4, intermediate=2, gated=False, activation="silu")
w.add_expert(0, 0, np.ones((2, 4)), np.ones((4, 2)), dtype="fp32")
os._exit(0)
"""


def test_export_reports_each_leftover_once(tmp_path: Path) -> None:
    """A killed export's temporary folder is removed, a user's look-alike and a set-aside bundle are kept;
    each is reported once (one sweep per export)."""
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "tiny")], check=True, timeout=120)
    (killed,) = tmp_path.glob(".tiny.tmp-*")
    look_alike = tmp_path / f"{killed.name[:-12]}0123456789ab"  # same dead pid, no writer marker: a user's
    look_alike.mkdir()
    (look_alike / "experts.bin").write_bytes(b"my own experts")
    set_aside = tmp_path / ".tiny.old-0123456789ab"  # an interrupted --force replace: maybe the only copy
    set_aside.mkdir()
    (set_aside / "NOTES.txt").write_text("mine")
    weightless = tmp_path / "weightless"  # a checkpoint whose weights do not load: the writer opens, then
    weightless.mkdir()  # loading fails
    shutil.copy(MODEL / "config.json", weightless)
    (weightless / "model.safetensors").write_bytes(b"not a safetensors file")
    res = invoke("edgemoe-export", weightless, "-o", tmp_path / "tiny")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    text = " ".join(res.stderr.split())
    assert res.returncode == 2 and "weights cannot be loaded (SafetensorError" in text, res.stderr
    assert text.count(f"warning: {killed}: removed") == 1, res.stderr
    assert text.count(f"warning: {look_alike}: the temporary folder of an export, left alone") == 1
    assert text.count(f"warning: {set_aside}: a bundle set aside") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([look_alike.name, set_aside.name,
                                                                 "weightless"])
    assert (look_alike / "experts.bin").read_bytes() == b"my own experts"
    assert (set_aside / "NOTES.txt").read_text() == "mine"


# --- output files: never replaced without --force, even if they appear during the run --------------------
def test_bench_marks_a_busy_machine_and_never_replaces_its_json(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgemoe_ort.bench.cli as bench_cli
    import edgemoe_ort.bench.runner as runner

    out = tmp_path / "results" / "r.json"  # its folder is made
    args = [tiny_bundle, "--budgets", "25%", "--tokens", "3", "--repeats", "1", "--no-rss", "--modes",
            "naive,edgemoe", "--json", out]
    monkeypatch.setattr(bench_cli, "load_average", lambda: 2.0)  # busy, whatever the machine is doing
    res = invoke("edgemoe-bench", *args)
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout
    for word in ("resident", "naive", "edgemoe", "decode tok/s", "ratio to roofline", "BUSY MACHINE"):
        assert word in res.stdout, word
    assert "measured on a busy machine" in res.stderr
    doc = json.loads(out.read_text())
    assert doc["load_average"] == {"before": 2.0, "after": 2.0, "busy": True}
    monkeypatch.setattr(bench_cli, "load_average", lambda: 0.1)
    again = invoke("edgemoe-bench", *args)
    assert_one_line_error(again, "--json", "--force")
    assert json.loads(out.read_text()) == doc, "refused, but the file changed"

    real = runner.run_bench
    late = tmp_path / "late.json"

    def meanwhile(*a: Any, **k: Any) -> Any:  # another program writes the file while the benchmark runs
        result = real(*a, **k)
        late.write_bytes(b"someone else's results\n")
        return result

    monkeypatch.setattr(runner, "run_bench", meanwhile)
    res = invoke("edgemoe-bench", *args[:-1], late)
    assert res.returncode == 2 and "BUSY MACHINE" not in res.stdout, res.stderr
    assert res.stderr.splitlines()[-1] == (f"error: --json {late}: appeared while the command ran; not "
                                           "replaced (add --force to replace it)")
    assert late.read_bytes() == b"someone else's results\n"


def test_run_save_resident_never_replaces_a_file_that_appeared(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgemoe_ort.runtime.generate import MoEModel

    saved = tmp_path / "warm" / "resident.json"  # its folder is made
    res = invoke("edgemoe-run", tiny_bundle, "--ids", "5,6", "-n", "2", "--save-resident", saved, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["saved_resident"] == str(saved) and json.loads(saved.read_text())
    late = tmp_path / "late.json"
    stream = MoEModel.stream

    def meanwhile(self: MoEModel, *a: Any, **k: Any) -> Iterator[str]:
        late.write_bytes(b"mine")
        yield from stream(self, *a, **k)

    monkeypatch.setattr(MoEModel, "stream", meanwhile)
    res = invoke("edgemoe-run", tiny_bundle, "--ids", "5,6", "-n", "2", "--save-resident", late, "--json")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines() == [f"error: --save-resident {late}: appeared while the command ran; not "
                                       "replaced (add --force to replace it)"]
    assert late.read_bytes() == b"mine"
    res = invoke("edgemoe-run", tiny_bundle, "--ids", "5,6", "-n", "2", "--save-resident", late, "--force",
                 "-q")
    assert res.returncode == 0 and json.loads(late.read_text())["experts"], res.stderr


# --- edgemoe-run ----------------------------------------------------------------------------------------
def test_run_stops_at_the_context_and_says_so(tiny_bundle: Path) -> None:
    res = invoke("edgemoe-run", tiny_bundle, "--ids", ",".join(["5"] * 200), "-n", "3000", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["stop_reason"] == "context" and d["context_tokens"] == 256
    assert d["prompt_tokens"] + d["generated_tokens"] == 256
    text = invoke("edgemoe-run", tiny_bundle, "--ids", ",".join(["5"] * 250), "-n", "3000")
    assert text.returncode == 0, text.stderr
    assert "stopped at the model's context: 256 tokens (prompt 250 + 6 generated)" in text.stderr


def test_run_prompt_from_stdin_file_and_ids_agree(tiny_bundle: Path, tmp_path: Path) -> None:
    prompt = "def fibonacci(n):"
    (tmp_path / "p.txt").write_text(prompt)
    runs = [invoke("edgemoe-run", tiny_bundle, "-p", prompt, "-n", "8", "--json"),
            invoke("edgemoe-run", tiny_bundle, "-p", "-", "-n", "8", "--json", input=prompt),
            invoke("edgemoe-run", tiny_bundle, "--prompt-file", tmp_path / "p.txt", "-n", "8", "--json")]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    outs = [json.loads(r.stdout) for r in runs]
    assert outs[0]["tokens"] == outs[1]["tokens"] == outs[2]["tokens"] and len(outs[0]["tokens"]) > 0
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tiny_bundle / "tokenizer" / "tokenizer.json")).encode(
        prompt, add_special_tokens=False).ids
    by_ids = invoke("edgemoe-run", tiny_bundle, "--ids", ",".join(map(str, ids)), "-n", "8", "--json")
    assert json.loads(by_ids.stdout)["tokens"] == outs[0]["tokens"]


def test_run_ids_on_a_bundle_without_tokenizer(idsonly_bundle: Path, tiny_bundle: Path) -> None:
    res = invoke("edgemoe-run", idsonly_bundle, "--ids", "70,71,72", "-n", "5", "--json")
    ref = invoke("edgemoe-run", tiny_bundle, "--ids", "70,71,72", "-n", "5", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["tokens"] == json.loads(ref.stdout)["tokens"] and len(d["tokens"]) >= 1
    assert d["text"] == " ".join(map(str, d["tokens"]))


def test_run_stop_string_and_quiet(tiny_bundle: Path) -> None:
    args = (tiny_bundle, "-p", "def fibonacci(n):", "-n", "24")
    full = json.loads(invoke("edgemoe-run", *args, "--json").stdout)
    assert len(full["text"]) > 4
    stop = full["text"][2:4]
    cut = json.loads(invoke("edgemoe-run", *args, "--stop", stop, "--json").stdout)
    assert cut["stop_reason"] == "stop_string" and cut["text"] == full["text"][: full["text"].index(stop)]
    quiet = invoke("edgemoe-run", *args, "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout == full["text"] + "\n", "--quiet prints the generated text only"


def test_run_prints_the_prompt_only_after_validation(tiny_bundle: Path) -> None:
    res = invoke("edgemoe-run", tiny_bundle, "-p", "hello there", "--top-k", "-3")
    assert "hello there" not in res.stdout
    assert_one_line_error(res, "--top-k")


def test_run_verbose_shows_the_traceback(tiny_bundle: Path) -> None:
    res = invoke("edgemoe-run", tiny_bundle, "-p", "x", "--budget", "1KB", "-v")
    assert res.returncode == 2 and "Traceback" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --budget")


def test_run_budget_auto_says_what_it_chose(tiny_bundle: Path) -> None:
    from edgemoe_ort.cli_common import fmt_bytes

    res = invoke("edgemoe-run", tiny_bundle, "-p", "x", "-n", "2", "--budget", "auto", "--json")
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("--budget auto:"))
    assert "of the experts" in line and "MiB available memory" in line and "dense" in line
    chosen = json.loads(res.stdout)["cache"]["budget_bytes"]
    assert line.startswith(f"--budget auto: {fmt_bytes(chosen)} ("), (chosen, line)


def test_run_ctrl_c_before_generation(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the model loads, or before the first token: one line, exit 130, no traceback."""
    import edgemoe_ort.cli as cli_module
    import edgemoe_ort.runtime as runtime

    def ctrl_c(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(runtime, "load_model", ctrl_c)
        res = invoke("edgemoe-run", tiny_bundle, "-p", "x", "--json")
    assert (res.returncode, res.stdout) == (130, "") and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines() == ["interrupted before generation: nothing generated"]
    monkeypatch.setattr(cli_module.out, "print", ctrl_c)  # Ctrl-C while the prompt is echoed
    res = invoke("edgemoe-run", tiny_bundle, "-p", "x")
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines() == ["interrupted before generation: nothing generated"]


#: edgemoe-run with decode steps slowed to 0.1 s after the 5th, touching $MARK then (so the test knows
#: generation is under way)
_SLOW_STEPS = """
import os, pathlib, signal, sys, time
# as in a terminal: Ctrl-C raises KeyboardInterrupt even if the test's parent runs with SIGINT ignored (a
# background job of a non-interactive shell), which the child would otherwise inherit
signal.signal(signal.SIGINT, signal.default_int_handler)
from edgemoe_ort.runtime.generate import MoEModel
step = MoEModel._step
def slow(self, token, state):
    slow.calls += 1
    if slow.calls == 5:
        pathlib.Path(os.environ["MARK"]).touch()
    if slow.calls >= 5:
        time.sleep(0.1)
    return step(self, token, state)
slow.calls = 0
MoEModel._step = slow
from edgemoe_ort.cli import run_app
sys.argv[0] = "edgemoe-run"
run_app()
"""


@pytest.mark.parametrize("as_json", [False, True])
def test_run_ctrl_c_prints_partial_stats(tiny_bundle: Path, tmp_path: Path, as_json: bool) -> None:
    """Ctrl-C while generating (a real SIGINT): exit 130 with what was generated and measured so far."""
    mark = tmp_path / "generating"
    args = [sys.executable, "-c", _SLOW_STEPS, str(tiny_bundle), "-p", "def fibonacci(n):", "-n", "200"]
    proc = subprocess.Popen(args + (["--json"] if as_json else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "MARK": str(mark)})
    deadline = time.time() + 60
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    if as_json:
        d = json.loads(stdout)
        assert d["stop_reason"] == "interrupted" and 0 < d["generated_tokens"] < 200
        assert d["cache"]["hits"] + d["cache"]["misses"] > 0
    else:
        assert stdout.startswith("def fibonacci(n):") and len(stdout) > len("def fibonacci(n):")
        assert "interrupted after" in stderr and "decode" in stderr and "expert cache:" in stderr


# --- edgemoe-inspect output -----------------------------------------------------------------------------
def test_inspect_shows_the_model_shape(tiny_bundle: Path) -> None:
    res = invoke("edgemoe-inspect", tiny_bundle)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "…" not in text
    for word in ("context_length", "256", "vocab_size", "4096", "MoE layers", "top-k", "intermediate",
                 "group", "160.0 KiB", "Minimum budget"):
        assert word in text, word


def test_library_messages_in_cli_words() -> None:
    from edgemoe_ort.cli_common import cli_words

    assert cli_words("x: exists; pass force=True to replace it") == "x: exists; add --force to replace it"
    assert cli_words("x: a file (force=True would not replace it)") == (
        "x: a file (--force would not replace it)")
    assert cli_words("max_new_tokens: expected an int") == "--max-new-tokens: expected an int"
    assert cli_words("intra_op_threads: bad; io_threads: bad") == "--threads: bad; --io-threads: bad"
    assert cli_words("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: "
                     "m.json: edgemoe.budget: low") == "m.json: --budget: low"
    assert cli_words("budget: expected bytes") == "--budget: expected bytes"
    assert cli_words("the budget is low") == "the budget is low"


def test_export_without_the_exporter_dependencies_is_one_line(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime-only install (pip install edgemoe-ort, no [export] extra) once printed an ImportError
    traceback; it is one line naming the extra."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    res = invoke("edgemoe-export", MODEL, "-o", tmp_path / "out")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "torch not installed" in res.stderr and "pip install 'edgemoe-ort[export]'" in res.stderr
    assert not (tmp_path / "out").exists()
