"""The interpreter driftwarden is measured on: the one its packages run it on.

The Debian packages (``packaging/debian/build-deb.sh``) install driftwarden into a virtual
environment on ``/usr/bin/python3``; the container image runs the official ``python:3.11``
build. Both are CPython built with profile-guided optimisation. The interpreter that runs a
benchmark may be another build: one without it ran a bake a fifth slower (the collector's CPU
per request hardly moved: its time is mostly in C). So the benchmarks make a virtual
environment on ``/usr/bin/python3`` and measure driftwarden there, unless told to use another
interpreter (``--python``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Final

from bench.measure import BenchError

SYSTEM_PYTHON: Final = Path("/usr/bin/python3")


def packaged_venv(repo: Path, venv: Path, extras: str, *, sources: tuple[str, ...] = ()) -> Path:
    """A virtual environment on ``/usr/bin/python3`` at ``venv`` with ``repo[extras]`` installed
    into it (not editable, as the package has it), made again whenever ``pyproject.toml`` or a
    file under the ``sources`` directories of ``repo`` changes (the ones whose installed copy is
    what runs)."""
    digest = hashlib.sha256((repo / "pyproject.toml").read_bytes())
    for top in sources:
        for path in sorted((repo / top).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".c", ".pyi", ".toml"):
                digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    stamp = venv / ".driftwarden-installed"
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        return venv
    if not SYSTEM_PYTHON.exists():
        raise BenchError(f"{SYSTEM_PYTHON} is missing: pass --python to choose an interpreter")
    for argv in (
        [str(SYSTEM_PYTHON), "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{repo}[{extras}]"],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv[:4])} failed: {done.stderr.strip()[-2000:]}")
    stamp.write_text(digest.hexdigest())
    return venv


def describe(python: str) -> str:
    """``python``'s version and the interpreter it is (a virtual environment's base)."""
    code = "import platform, sys; print(platform.python_version(), sys._base_executable)"
    done = subprocess.run([python, "-P", "-c", code], capture_output=True, text=True, check=False)
    version, _, base = done.stdout.strip().partition(" ")
    return f"{version} ({base})" if version else f"unknown ({python})"


def _running_in(venv: Path) -> bool:
    return Path(sys.prefix).resolve() == venv.resolve()


def python_option(parser: argparse.ArgumentParser) -> None:
    """``--python``: the collector benchmarks' choice of interpreter (``run_packaged``)."""
    parser.add_argument(
        "--python",
        choices=["packaged", "current"],
        default="packaged",
        help="run on /usr/bin/python3 as the packages do (default), or on this interpreter",
    )


def run_packaged(repo: Path, script: Path, argv: list[str]) -> None:
    """Start ``script`` again with ``argv`` in the collector benchmarks' environment
    (``bench/out/packaged-venv``: the agent's and the collector's dependencies on
    ``/usr/bin/python3``), unless this process runs in it already."""
    venv = packaged_venv(repo, repo / "bench" / "out" / "packaged-venv", "agent,collector")
    if not _running_in(venv):
        python = str(venv / "bin" / "python")
        os.execv(python, [python, str(script), *argv])
