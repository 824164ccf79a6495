"""How the harness runs driftwarden: ``python -m agent`` from this checkout, nothing installed.

Every command is ``[sys.executable, "-m", "agent", ...]`` with ``PYTHONPATH`` set to the
repository root, so the figures are those of the code in this worktree (byte-compiled first, as
an installed package is). Manifests are signed with a pipeline key made once per work
directory, and checks verify them with its public key, as an image pipeline and a booting host
would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Final

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


class Agent:
    def __init__(self, repo: Path, workdir: Path) -> None:
        self.repo = repo
        self.workdir = workdir
        self.key = workdir / "pipeline.key"
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(repo) + os.pathsep + self.env.get("PYTHONPATH", "")

    def argv(self, *args: str | os.PathLike[str]) -> tuple[str, ...]:
        return (sys.executable, "-m", "agent", *(os.fspath(a) for a in args))

    def compile(self) -> None:
        """Byte-compile the checkout, as installing the package does: with
        ``PYTHONDONTWRITEBYTECODE`` set, every run would otherwise compile the agent again."""
        done = subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(self.repo / "agent")],
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
            (sys.executable, "-c", _VERIFY, os.fspath(root)),
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
