"""How the harness runs driftwarden: the code in this worktree, installed as its package has it.

By default the worktree is installed as the agent's Debian package installs it
(``packaging/debian/build-deb.sh``): into a virtual environment on ``/usr/bin/python3``, made in
the work directory and made again when the code changes (``packaged_venv``), and every command
is its console script ``driftwarden-agent``. The interpreter that runs the harness may be
another build of CPython, and how CPython was built changes a bake's time by a fifth; and an
editable install's import hook adds some 20 ms to every start (``-X importtime``). With
``--python`` the harness runs ``[PYTHON, "-m", "agent", ...]`` with ``PYTHONPATH`` set to the
repository root instead (the checkout byte-compiled first, as an installed package is).
Manifests are signed with a pipeline key made once per work directory, and checks verify them
with its public key, as an image pipeline and a booting host would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Final

from bench import interpreter
from bench.measure import BenchError, Command

POLICY: Final = Path(__file__).resolve().parent / "policy.toml"

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


def packaged_venv(repo: Path, workdir: Path) -> Path:
    """The agent as its Debian package installs it, in ``workdir`` (``bench.interpreter``): its
    installed copy is what runs, so it is installed again whenever ``agent/`` changes."""
    return interpreter.packaged_venv(repo, workdir / "agent-venv", "agent", sources=("agent",))


class Agent:
    """driftwarden's agent as the harness runs it: installed in ``venv`` (``packaged_venv``)
    and run through its console script, or, without one, from the checkout with ``python``
    (default: the harness's own interpreter)."""

    def __init__(
        self, repo: Path, workdir: Path, *, venv: Path | None = None, python: Path | None = None
    ) -> None:
        self.repo = repo
        self.workdir = workdir
        self.venv = venv
        self.key = workdir / "pipeline.key"
        self.env = dict(os.environ)
        if venv is not None:
            self.python = str(venv / "bin" / "python")
            self.env.pop("PYTHONPATH", None)
        else:
            self.python = str(python or sys.executable)
            self.env["PYTHONPATH"] = str(repo) + os.pathsep + self.env.get("PYTHONPATH", "")

    def argv(self, *args: str | os.PathLike[str]) -> tuple[str, ...]:
        if self.venv is not None:
            command = str(self.venv / "bin" / "driftwarden-agent")
            return (command, *(os.fspath(a) for a in args))
        return (self.python, "-m", "agent", *(os.fspath(a) for a in args))

    def _code(self, code: str, *args: str) -> tuple[str, ...]:
        """Python code run with the agent's interpreter and packages (installed: never the
        checkout, whatever the current directory: ``-P``)."""
        return (self.python, *(("-P",) if self.venv is not None else ()), "-c", code, *args)

    def compile(self) -> None:
        """Byte-compile the checkout, as installing the package does: with
        ``PYTHONDONTWRITEBYTECODE`` set, every run would otherwise compile the agent again.
        (An installed agent was compiled by pip.)"""
        if self.venv is not None:
            return
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
            self._code(_VERIFY, os.fspath(root)),
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
        described = interpreter.describe(self.python)
        native = subprocess.run(
            self._code("import agent._native"),
            env=self.env,
            capture_output=True,
            check=False,
        )
        measured = "with" if native.returncode == 0 else "WITHOUT"
        how = "installed in a virtual environment" if self.venv else "from the checkout"
        return f"{described}, {how}, {measured} the C measurement (agent/_native.c)"
