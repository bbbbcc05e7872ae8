"""Where the package's data files are: the storage profiles (``profiles/*.toml``) and the per-family export
recipes (``export/*.toml``).

A wheel carries copies of both inside the package, ``edgemoe_ort/_data/profiles`` and
``edgemoe_ort/_data/recipes`` (CMake's install rules in ``customops/CMakeLists.txt``); a source checkout
(or an editable install, ``make venv``) has them at the top of the repository. :func:`data_dir` takes the
installed copy first, else the repository's folder. The op library itself is found by
:func:`edgemoe_ort.runtime.ops.library_path`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RESOURCES", "data_dir", "find_data_dir", "repo_root"]

PACKAGE_DIR = Path(__file__).resolve().parent
#: resource name -> folder at the top of the repository (in the wheel: ``edgemoe_ort/_data/<name>``)
RESOURCES = {"profiles": "profiles", "recipes": "export"}


def repo_root() -> Path | None:
    """The source checkout this package runs from (the folder holding ``pyproject.toml`` and ``customops/``
    beside ``edgemoe_ort/``), or None for an installed package."""
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "customops").is_dir():
        return root
    return None


def data_dir(name: str) -> Path:
    """The folder of resource ``name`` (a key of :data:`RESOURCES`): ``edgemoe_ort/_data/<name>`` if the
    package was installed from a wheel, else the repository's folder. The path is returned even when it does
    not exist (for a message); :func:`find_data_dir` checks."""
    if name not in RESOURCES:
        raise KeyError(f"unknown resource {name!r} (known: {', '.join(RESOURCES)})")
    installed = PACKAGE_DIR / "_data" / name
    if installed.is_dir():
        return installed
    root = repo_root()
    return (root / RESOURCES[name]) if root is not None else installed


def find_data_dir(name: str) -> Path:
    """:func:`data_dir`, which must exist: FileNotFoundError naming both places looked in otherwise."""
    d = data_dir(name)
    if not d.is_dir():
        raise FileNotFoundError(
            f"{name}: neither {PACKAGE_DIR / '_data' / name} (an installed wheel) nor "
            f"{PACKAGE_DIR.parent / RESOURCES[name]} (a source checkout) exists; reinstall edgemoe-ort"
        )
    return d
