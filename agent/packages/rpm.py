"""rpm's database, read through ``rpm --root ROOT --dbpath DIR -qa`` where ``rpm`` exists.

rpm keeps several versions of an install-only package (kernels) side by side under one name
and architecture; such a package is one record whose version lists them all, sorted and joined
by ", ", so that installing or removing one of them shows as a change of that package.

File digests (what ``rpm -V`` checks for content) come from the same query: each file's digest
in the package's digest algorithm (``FILEDIGESTALGO``; MD5 when a package predates it). Only
files rpm installed are held to a digest: ghost files, files not installed (``--excludedocs``,
``%_netsharedpath``, another colour) and those another package replaced are left out, as
``rpm -V`` leaves them out; directories and symlinks carry no digest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Collection
from pathlib import Path
from typing import Final

from agent.errors import PackageDbError
from agent.packages.image import ImageRoot, NotRegularError
from agent.packages.model import Package, PackageSet
from agent.packages.verify import FileDigest

DB_DIRS: Final = ("/usr/lib/sysimage/rpm", "/var/lib/rpm")
_DB_FILES: Final = ("rpmdb.sqlite", "Packages", "Packages.db")
_QUERY_FORMAT: Final = r"%{NAME}\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\t%{ARCH}\n"
_FILES_FORMAT: Final = (
    r"[%{=NAME}\t%{=ARCH}\t%{=FILEDIGESTALGO}\t%{FILEDIGESTS}\t%{FILEFLAGS}\t%{FILESTATES}"
    r"\t%{FILENAMES}\n]"
)
_TIMEOUT_S: Final = 120.0
# rpm's digest algorithm numbers (OpenPGP hash ids) as hashlib names.
_ALGORITHMS: Final = {
    "(none)": "md5",
    "1": "md5",
    "2": "sha1",
    "8": "sha256",
    "9": "sha384",
    "10": "sha512",
}
_CONFIG: Final = 1 << 0  # RPMFILE_CONFIG
_GHOST: Final = 1 << 6  # RPMFILE_GHOST
_NORMAL: Final = "0"  # RPMFILE_STATE_NORMAL


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


def _query(root: Path, db_dir: str, query_format: str) -> list[str]:
    """The lines ``rpm -qa --qf FORMAT`` prints for the database at ``db_dir``."""
    where = root / db_dir.lstrip("/")
    rpm = shutil.which("rpm")
    if rpm is None:
        raise PackageDbError(
            "an rpm database is here but the rpm program is not installed; install rpm to read it",
            path=where,
        )
    command = [rpm, "--root", os.fspath(root), "--dbpath", db_dir, "-qa", "--qf", query_format]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            timeout=_TIMEOUT_S,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackageDbError(f"rpm query failed: {exc}", path=where) from exc
    if done.returncode != 0:
        first = done.stderr.decode("utf-8", "replace").strip().splitlines()[:1]
        raise PackageDbError(
            f"rpm query exited {done.returncode}: {first[0] if first else 'no message'}",
            path=where,
        )
    return done.stdout.decode("utf-8", "surrogateescape").splitlines()


def read_rpm(root: Path, db_dir: str) -> PackageSet:
    versions: dict[tuple[str, str], list[str]] = {}
    for number, line in enumerate(_query(root, db_dir, _QUERY_FORMAT), start=1):
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


def file_digests(
    root: Path,
    db_dir: str,
    *,
    include_conffiles: bool = True,
    only: Collection[str] | None = None,
) -> list[FileDigest]:
    """What the installed packages (``only`` those named, as ``name`` or ``name.arch``) say
    their files must hash to. rpm refuses control characters in file names, so its output
    splits on tabs and newlines; a line that does not is an error naming it."""
    out: list[FileDigest] = []
    for number, line in enumerate(_query(root, db_dir, _FILES_FORMAT), start=1):
        fields = line.split("\t", 6)
        if len(fields) != 7 or not fields[6].startswith("/"):
            raise PackageDbError(f"rpm file line {number}: {line[:80]!r} is not a file record")
        name, arch, algorithm_id, digest, flags_text, state, path = fields
        label = name if arch == "(none)" else f"{name}.{arch}"
        if only is not None and name not in only and label not in only:
            continue
        if not digest or state != _NORMAL:
            continue  # a directory, a symlink, or a file rpm did not install
        try:
            flags = int(flags_text)
        except ValueError:
            raise PackageDbError(f"rpm file line {number}: flags {flags_text!r}") from None
        conffile = bool(flags & _CONFIG)
        if flags & _GHOST or (conffile and not include_conffiles):
            continue
        algorithm = _ALGORITHMS.get(algorithm_id)
        if algorithm is None:
            raise PackageDbError(
                f"rpm file line {number}: unknown digest algorithm {algorithm_id!r} for {path!r}"
            )
        out.append(FileDigest(label, path, algorithm, digest.lower(), conffile=conffile))
    return out
