"""The wheel (issue 16, item 1): ``pip wheel .`` builds the op library through CMake (scikit-build-core)
and ships it with the storage profiles and the export recipes; installed into a fresh venv without torch, it
runs a bundle from a folder outside the repository (``edgemoe-run``, ``edgemoe-inspect``,
``edgemoe-bench --profile``).

The CMake build folder is ``build/wheel/`` (kept: a second run only rebuilds what changed; ``make wheel``
uses the same) and the ONNX Runtime headers are the ones ``make lib`` fetched, ``build/ort-headers/`` (CMake
runs customops/fetch_ort_headers.sh itself, which fetches them if they are not there). The fresh venv's
dependencies come from the package index (pip's cache makes a rerun fast).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_DIR = REPO / "build" / "wheel"
FETCH_DIR = REPO / "build" / "ort-headers"
PROMPT = "def fibonacci(n):"

pytestmark = [pytest.mark.slow, pytest.mark.export]  # export: the session bundle is exported with torch


def _run(cmd: list[str | Path], *, timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``cmd`` must exit 0; its output is in the assertion message otherwise."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, (
        f"{' '.join(map(str, cmd))}: exit {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    )
    return res


def _clean_env(venv: Path | None = None) -> dict[str, str]:
    """This process's environment without what would lead a command back into the repository (the library
    override, PYTHONPATH, this venv); with ``venv``, its bin/ first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("EDGEMOE_CUSTOMOPS_LIB", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel . --no-deps``: without build isolation when scikit-build-core is installed here (an
    isolated build gets a new environment each time, and scikit-build-core then starts its build folder
    afresh)."""
    out = tmp_path_factory.mktemp("wheelhouse")
    cmd: list[str | Path] = [
        sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "-q", "-w", out,
        f"-Cbuild-dir={BUILD_DIR}", f"-Ccmake.define.EDGEMOE_ORT_FETCH_DIR={FETCH_DIR}",
    ]
    if importlib.util.find_spec("scikit_build_core") is not None:
        cmd.append("--no-build-isolation")
    env = _clean_env()
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    BUILD_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR.parent / "wheel.lock", "w") as lock:  # one build at a time in build/wheel/
        fcntl.flock(lock, fcntl.LOCK_EX)
        _run(cmd, cwd=REPO, env=env, timeout=1800)
    wheels = sorted(out.glob("edgemoe_ort-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) with the wheel and its dependencies installed."""
    d = tmp_path_factory.mktemp("fresh-venv") / "venv"
    _run([sys.executable, "-m", "venv", d], env=_clean_env(), timeout=300)
    _run([d / "bin" / "python", "-m", "pip", "install", "-q", wheel], env=_clean_env(d), timeout=1200)
    return d


@pytest.fixture()
def outside(tmp_path: Path, tiny_bundle: Path) -> tuple[Path, Path]:
    """``(cwd, bundle)``: a folder outside the repository holding a copy of the session bundle."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert not cwd.resolve().is_relative_to(REPO), f"{cwd} is inside the repository"
    return cwd, Path(shutil.copytree(tiny_bundle, cwd / "tiny"))


def test_the_wheel_holds_the_library_profiles_and_recipes(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "edgemoe_ort/_lib/libedgemoe_customops.so" in names
    assert "edgemoe_ort/resources.py" in names and "edgemoe_ort/runtime/ops.py" in names
    profiles = {n.rsplit("/", 1)[1] for n in names if n.startswith("edgemoe_ort/_data/profiles/")}
    assert profiles == {p.name for p in (REPO / "profiles").glob("*.toml")} and "rpi4.toml" in profiles
    recipes = {n.rsplit("/", 1)[1] for n in names if n.startswith("edgemoe_ort/_data/recipes/")}
    assert recipes == {p.name for p in (REPO / "export").glob("*.toml")} and "mixtral.toml" in recipes
    assert not [n for n in names if n.startswith(("tests/", "models/", "customops/", "profiles/", "export/"))]
    requires = [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    heavy = [r for r in runtime if r.startswith(("torch", "transformers", "onnxscript"))]
    assert runtime and not heavy, runtime
    assert any(r.startswith("torch==") and 'extra == "export"' in r for r in requires), requires
    assert not [r for r in requires if r.startswith("optimum")], requires


def test_the_fresh_venv_has_no_torch_and_uses_its_own_copies(venv: Path, tmp_path: Path) -> None:
    py = venv / "bin" / "python"
    res = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True, cwd=tmp_path,
                         env=_clean_env(venv), timeout=120)
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr, res.stderr
    code = (
        "import json, sys\n"
        "import edgemoe_ort, edgemoe_ort.resources as r\n"
        "from edgemoe_ort.runtime.ops import library_path\n"
        "from edgemoe_ort.bench.storage import PROFILES_DIR, list_profiles\n"
        "print(json.dumps({'pkg': edgemoe_ort.__file__, 'version': edgemoe_ort.__version__,\n"
        "  'lib': str(library_path()), 'profiles': str(PROFILES_DIR),\n"
        "  'recipes': str(r.find_data_dir('recipes')),\n"
        "  'repo': r.repo_root() and str(r.repo_root()), 'names': list_profiles(),\n"
        "  'heavy': sorted(m for m in ('torch', 'transformers') if m in sys.modules)}))\n"
    )
    info = json.loads(_run([py, "-c", code], cwd=tmp_path, env=_clean_env(venv), timeout=120).stdout)
    site = venv.resolve()
    for key in ("pkg", "lib", "profiles", "recipes"):
        assert Path(info[key]).resolve().is_relative_to(site), (key, info[key])
    assert info["repo"] is None and info["version"] == "0.1.0" and info["heavy"] == []
    assert {"rpi4", "jetson-emmc", "phone-ufs31", "laptop-nvme"} <= set(info["names"])


def test_the_installed_commands_run_a_bundle_outside_the_repository(
    venv: Path, outside: tuple[Path, Path]
) -> None:
    cwd, bundle = outside
    env, bin_ = _clean_env(venv), venv / "bin"

    cmd: list[str | Path] = [bin_ / "edgemoe-run", bundle, "--prompt", PROMPT, "--max-new-tokens", "8"]
    run = json.loads(_run([*cmd, "--json"], cwd=cwd, env=env, timeout=300).stdout)
    assert run["generated_tokens"] == len(run["tokens"]) > 0
    assert run["stop_reason"] in ("eos", "max_new_tokens")
    # the wheel's library computes what the repository's does (same CMake configuration)
    from edgemoe_ort.runtime import MoEModel

    with MoEModel.load(bundle) as model:
        assert run["tokens"] == model.generate(PROMPT, max_new_tokens=8).tokens

    text = _run(cmd, cwd=cwd, env=env, timeout=300)
    assert text.stdout.startswith(PROMPT + run["text"]) and "expert cache:" in text.stderr

    inspect = _run([bin_ / "edgemoe-inspect", bundle], cwd=cwd, env=env, timeout=300)
    assert "mixtral" in inspect.stdout and "format_version" in inspect.stdout

    out = cwd / "bench" / "rpi4.json"
    _run([bin_ / "edgemoe-bench", bundle, "--profile", "rpi4", "--budgets", "25%", "--modes", "edgemoe",
          "--tokens", "2", "--repeats", "1", "--no-rss", "--json", out, "-q"], cwd=cwd, env=env, timeout=300)
    doc = json.loads(out.read_text())
    assert doc["profile"]["name"] == "rpi4"
    assert Path(doc["profile"]["path"]).resolve().is_relative_to(venv.resolve()), doc["profile"]["path"]
    assert [m["label"] for m in doc["modes"]] == ["resident", "edgemoe@25%"]
