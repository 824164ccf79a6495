"""The package manifest: which packages an image holds, how that changes, and which of their
files no longer match the vendor's digests.

The database under ``root`` is read as files (dpkg's ``status``, apk's ``installed``) without
running the package manager; rpm's is read through ``rpm --root`` where ``rpm`` exists. Any
database that cannot be read or parsed raises ``agent.errors.PackageDbError`` naming the file
and line; nothing here lets a malformed database crash the agent. ``docs/packages.md`` is the
reference.

Modules: ``model`` (the records), ``dpkg``, ``rpm``, ``apk`` (the readers), ``image`` (paths
inside the image root), ``verify`` (the digest checker).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from agent.logs import get_logger
from agent.packages import apk, dpkg, dpkg_files, rpm
from agent.packages.image import ImageRoot
from agent.packages.model import (
    Package,
    PackageChange,
    PackageFileMismatch,
    PackageSet,
    UnsettledPackage,
    diff_packages,
)
from agent.packages.verify import verify_digests

__all__ = [
    "Package",
    "PackageChange",
    "PackageFileMismatch",
    "PackageSet",
    "UnsettledPackage",
    "database_paths",
    "detect_manager",
    "diff_packages",
    "read_packages",
    "verify_package_files",
]

log = get_logger(__name__)


def _exists(image: ImageRoot, image_path: str) -> bool:
    try:
        return os.path.lexists(image.host(image.locate(image_path)))
    except OSError:
        return False


def detect_manager(root: Path) -> str:
    """Which package manager's database is under ``root``: dpkg, then apk, then rpm (Debian
    can carry an rpm database beside its own), else "none"."""
    image = ImageRoot(root)
    if _exists(image, dpkg.STATUS):
        return "dpkg"
    if _exists(image, apk.INSTALLED):
        return "apk"
    if rpm.find_db(image) is not None:
        return "rpm"
    return "none"


def read_packages(root: Path) -> PackageSet:
    """Every package present under ``root``; ``PackageDbError`` if its database is damaged."""
    manager = detect_manager(root)
    if manager == "dpkg":
        found = dpkg.read_dpkg(root)
    elif manager == "apk":
        found = apk.read_apk(root)
    elif manager == "rpm":
        found = rpm.read_rpm(root, rpm.find_db(ImageRoot(root)) or rpm.DB_DIRS[-1])
    else:
        found = PackageSet("none", ())
    log.debug("packages_read", manager=manager, packages=len(found.packages))
    return found


def verify_package_files(
    root: Path,
    *,
    include_conffiles: bool = True,
    only: Collection[str] | None = None,
    workers: int = 0,
) -> list[PackageFileMismatch]:
    """Package-owned files whose content is not the vendor's, sorted by path: dpkg's MD5
    digests (as ``debsums -a`` checks them), rpm's file digests (the content part of ``rpm
    -V``), apk's ``Q1`` SHA-1 checksums (as ``apk audit``). ``only`` limits the check to the
    packages named (``name``, or dpkg's ``name:arch`` / rpm's ``name.arch``); ``workers``
    threads hash (0: a default for this machine)."""
    manager = detect_manager(root)
    if manager == "dpkg":
        digests = dpkg_files.file_digests(root, include_conffiles=include_conffiles, only=only)
    elif manager == "rpm":
        db_dir = rpm.find_db(ImageRoot(root)) or rpm.DB_DIRS[-1]
        digests = rpm.file_digests(root, db_dir, include_conffiles=include_conffiles, only=only)
    elif manager == "apk":
        digests = apk.file_digests(root, include_conffiles=include_conffiles, only=only)
    else:
        return []
    return verify_digests(root, digests, workers=workers)


def database_paths(root: Path) -> list[Path]:
    """The host paths whose change means the package set may have changed: files, and
    directories that stand for everything below them. Package managers replace their files by
    rename, so a watcher watches each path's parent directory and matches names."""
    image = ImageRoot(root)
    manager = detect_manager(root)
    if manager == "dpkg":
        wanted = [dpkg.STATUS, dpkg.UPDATES]
    elif manager == "apk":
        wanted = [apk.INSTALLED]
    elif manager == "rpm":
        wanted = [rpm.find_db(image) or rpm.DB_DIRS[-1]]
    else:
        return []
    out: list[Path] = []
    for image_path in wanted:
        try:
            out.append(Path(image.host(image.locate(image_path))))
        except OSError:
            out.append(Path(image.host(image_path)))
    return out
