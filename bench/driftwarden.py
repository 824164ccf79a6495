"""How the harness runs driftwarden: ``python -m agent`` from this checkout.

Every command is ``[PYTHON, "-m", "agent", ...]`` with ``PYTHONPATH`` set to the repository
root, so the figures are those of the code in this worktree (byte-compiled first, as an
installed package is). PYTHON is, by default, the interpreter the agent's Debian package runs
on (``packaging/debian/build-deb.sh``: a virtual environment on ``/usr/bin/python3``), made once
in the work directory with the agent's dependencies and its C measurement (``packaged_python``);
the interpreter that runs the harness may be another build of Python, and how CPython was
built changes a bake's time by a fifth. Manifests are signed with a pipeline key made once per
work directory, and checks verify them with its public key, as an image pipeline and a
booting host would.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Final

from bench.measure import BenchError, Command

POLICY: Final = Path(__file__).resolve().parent / "policy.toml"
SYSTEM_PYTHON: Final = Path("/usr/bin/python3")  # what the agent's package runs on

# What debsums -s checks: package-owned files other than conffiles, reported when they differ.
_VERIFY: Final = """\
import sys
from pathlib import Path
from agent.packages import verify_package_files
mismatches = verify_package_files(Path(sys.argv[1]), include_conffiles=False)
for m in mismatches:
    print(f"{m.package}: {m.path}")
sys.exit(2 if mismatches else 0)
"""


def packaged_python(repo: Path, workdir: Path) -> Path:
    """The agent's interpreter as its Debian package has it: a virtual environment on
    ``/usr/bin/python3`` with the agent installed from ``repo`` (editable: its C measurement
    is built in the checkout), made in ``workdir`` and made again when ``pyproject.toml`` or
    ``agent/_native.c`` changes."""
    venv = workdir / "agent-venv"
    python = venv / "bin" / "python"
    sources = hashlib.sha256()
    for name in ("pyproject.toml", "agent/_native.c"):
        sources.update((repo / name).read_bytes())
    stamp = venv / ".driftwarden-installed"
    if python.exists() and stamp.exists() and stamp.read_text() == sources.hexdigest():
        return python
    if not SYSTEM_PYTHON.exists():
        raise BenchError(f"{SYSTEM_PYTHON} is missing: pass --python to choose an interpreter")
    for argv in (
        [str(SYSTEM_PYTHON), "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "-e", f"{repo}[agent]"],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv[:4])} failed: {done.stderr.strip()[-2000:]}")
    stamp.write_text(sources.hexdigest())
    return python


class Agent:
    def __init__(self, repo: Path, workdir: Path, python: Path | None = None) -> None:
        self.repo = repo
        self.workdir = workdir
        self.python = str(python or sys.executable)
        self.key = workdir / "pipeline.key"
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(repo) + os.pathsep + self.env.get("PYTHONPATH", "")

    def argv(self, *args: str | os.PathLike[str]) -> tuple[str, ...]:
        return (self.python, "-m", "agent", *(os.fspath(a) for a in args))

    def compile(self) -> None:
        """Byte-compile the checkout, as installing the package does: with
        ``PYTHONDONTWRITEBYTECODE`` set, every run would otherwise compile the agent again."""
        done = subprocess.run(
            [self.python, "-m", "compileall", "-q", str(self.repo / "agent")],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"compileall failed: {(done.stdout + done.stderr).strip()}")

    def keygen(self) -> None:
        if self.key.exists():
            return
        done = subprocess.run(
            self.argv("keygen", "--out", self.key),
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"driftwarden-agent keygen failed: {done.stderr.strip()}")

    def manifest(self, slug: str) -> Path:
        return self.workdir / f"{slug}.dwm"

    def bake(self, root: Path, slug: str, *, policy: Path = POLICY) -> Command:
        return Command(
            "driftwarden bake",
            self.argv(
                "bake",
                "--root",
                root,
                "--policy",
                policy,
                "--out",
                self.manifest(slug),
                "--key",
                self.key,
                "--build-id",
                f"bench-{slug}",
            ),
            env=self.env,
        )

    def check(self, root: Path, slug: str, *, full: bool) -> Command:
        extra = ("--full",) if full else ()
        return Command(
            "driftwarden check --full" if full else "driftwarden check",
            self.argv(
                "check",
                "--root",
                root,
                "--baseline",
                self.manifest(slug),
                "--pubkey",
                f"{self.key}.pub",
                *extra,
            ),
            env=self.env,
        )

    def verify_packages(self, root: Path) -> Command:
        return Command(
            "driftwarden verify_package_files",
            (self.python, "-c", _VERIFY, os.fspath(root)),
            env=self.env,
            ok_exit=frozenset({0, 2}),
        )

    def version(self) -> str:
        done = subprocess.run(
            ["git", "-C", str(self.repo), "describe", "--always", "--dirty", "--tags"],
            capture_output=True,
            text=True,
            check=False,
        )
        commit = done.stdout.strip() or "unknown commit"
        project = tomllib.loads((self.repo / "pyproject.toml").read_text())["project"]
        return f"{project['version']} at {commit}"

    def interpreter(self) -> str:
        """The agent's Python: its version and where it lives (what ``facts`` shows)."""
        done = subprocess.run(
            [
                self.python,
                "-c",
                "import platform, sys; print(platform.python_version(), sys._base_executable)",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        version, _, base = done.stdout.strip().partition(" ")
        native = subprocess.run(
            [self.python, "-c", "import agent._native"],
            env=self.env,
            capture_output=True,
            check=False,
        )
        measured = "with" if native.returncode == 0 else "WITHOUT"
        return f"{version} ({base}), {measured} the C measurement (agent/_native.c)"
