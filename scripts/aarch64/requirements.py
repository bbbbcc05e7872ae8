"""Write the pip requirements of the aarch64 lane's sysroot, pinned to the running (x86 venv) interpreter.

usage: python requirements.py pyproject.toml requirements.txt constraints.txt

requirements.txt: pyproject's [project].dependencies + pytest, each pinned to the version installed here
(so the lane runs the same onnxruntime/numpy/... as x86 CI), or left as specified when not installed.
constraints.txt: every other installed distribution pinned (transitive dependencies, e.g. protobuf).
Files are rewritten only when their content changes.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

import tomllib

LANE_EXTRAS = ["pytest"]  # what the lane needs beyond the runtime itself


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def main(pyproject: str, req_out: str, con_out: str) -> None:
    deps = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"] + LANE_EXTRAS
    installed = {canonical(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}
    own = canonical(tomllib.loads(Path(pyproject).read_text())["project"]["name"])
    reqs, top = [], set()
    for spec in deps:
        name = canonical(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0])
        top.add(name)
        reqs.append(f"{name}=={installed[name]}" if name in installed else spec)
    cons = [f"{n}=={v}" for n, v in sorted(installed.items()) if n not in top and n != own]
    write_if_changed(Path(req_out), "\n".join(reqs) + "\n")
    write_if_changed(Path(con_out), "\n".join(cons) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
