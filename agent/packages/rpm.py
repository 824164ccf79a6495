"""rpm's database, read through ``rpm --root ROOT --dbpath DIR -qa`` where ``rpm`` exists.

rpm keeps several versions of an install-only package (kernels) side by side under one name
and architecture; such a package is one record whose version lists them all, sorted and joined
by ", ", so that installing or removing one of them shows as a change of that package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

from agent.errors import PackageDbError
from agent.packages.image import ImageRoot, NotRegularError
from agent.packages.model import Package, PackageSet

DB_DIRS: Final = ("/usr/lib/sysimage/rpm", "/var/lib/rpm")
_DB_FILES: Final = ("rpmdb.sqlite", "Packages", "Packages.db")
_QUERY_FORMAT: Final = r"%{NAME}\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\t%{ARCH}\n"
_TIMEOUT_S: Final = 120.0


def find_db(image: ImageRoot) -> str | None:
    """The image path of the rpm database directory, if the image has one."""
    for directory in DB_DIRS:
        for name in _DB_FILES:
            try:
                os.close(image.open_regular(f"{directory}/{name}", follow=True))
            except (OSError, NotRegularError):
                continue
            return directory
    return None


def read_rpm(root: Path, db_dir: str) -> PackageSet:
    rpm = shutil.which("rpm")
    if rpm is None:
        raise PackageDbError(
            "an rpm database is here but the rpm program is not installed; install rpm to read it",
            path=root / db_dir.lstrip("/"),
        )
    command = [rpm, "--root", os.fspath(root), "--dbpath", db_dir, "-qa", "--qf", _QUERY_FORMAT]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            timeout=_TIMEOUT_S,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackageDbError(f"rpm query failed: {exc}", path=root / db_dir.lstrip("/")) from exc
    if done.returncode != 0:
        first = done.stderr.decode("utf-8", "replace").strip().splitlines()[:1]
        raise PackageDbError(
            f"rpm query exited {done.returncode}: {first[0] if first else 'no message'}",
            path=root / db_dir.lstrip("/"),
        )
    versions: dict[tuple[str, str], list[str]] = {}
    lines = done.stdout.decode("utf-8", "surrogateescape").splitlines()
    for number, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if len(fields) != 3 or not fields[0] or not fields[1]:
            raise PackageDbError(
                f"rpm output line {number}: {line[:80]!r} is not name, version, arch"
            )
        name, version, arch = fields
        versions.setdefault((name, "" if arch == "(none)" else arch), []).append(version)
    return PackageSet.build(
        "rpm", (Package(name, ", ".join(sorted(v)), arch) for (name, arch), v in versions.items())
    )
