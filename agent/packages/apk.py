"""apk's database, read as a file: ``/lib/apk/db/installed``.

Stanzas separated by blank lines, one ``X:value`` per line; ``P`` is the name, ``V`` the
version, ``A`` the architecture. Files: ``F`` names a directory (relative to the root), each
``R`` a file in the last ``F``, and the ``Z`` after an ``R`` its checksum: ``Q1`` and the
base64 SHA-1 of the content, or of the target's text for a symlink (as ``apk audit`` computes
it). A file without ``Z``, or with a checksum of another kind, has nothing to check against.
apk has no conffile flag; files under ``/etc`` (apk's default protected path) count as
configuration files.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Final

from agent.errors import PackageDbError
from agent.logs import get_logger
from agent.packages.dbfile import db_lines, read_db_file
from agent.packages.image import ImageRoot, normalize
from agent.packages.model import Package, PackageSet
from agent.packages.verify import FileDigest

INSTALLED: Final = "/lib/apk/db/installed"
_LINE_RE: Final = re.compile(r"([A-Za-z]):(.*)")

log = get_logger(__name__)


def _fields(root: Path) -> Iterator[tuple[int, str, str]]:
    """Every ``(line number, key, value)`` of the database; ``(n, "", "")`` ends a stanza."""
    data = read_db_file(ImageRoot(root), INSTALLED) or b""
    for number, line in enumerate([*db_lines(data, INSTALLED), ""], start=1):
        if not line.strip():
            yield number, "", ""
            continue
        match = _LINE_RE.fullmatch(line)
        if match is None:
            raise PackageDbError(
                f"line {number}: expected 'X:value', got {line[:60]!r}", path=INSTALLED
            )
        yield number, match.group(1), match.group(2)


def read_apk(root: Path) -> PackageSet:
    packages: dict[tuple[str, str], Package] = {}
    fields: dict[str, str] = {}
    start = 0
    for number, key, value in _fields(root):
        if not key:
            if fields:
                _add(packages, fields, start)
            fields = {}
            continue
        if not fields:
            start = number
        fields.setdefault(key, value)
    return PackageSet.build("apk", packages.values())


def _add(packages: dict[tuple[str, str], Package], fields: dict[str, str], start: int) -> None:
    name, version = fields.get("P", ""), fields.get("V", "")
    if not name or not version:
        raise PackageDbError(f"line {start}: package stanza without P: or V:", path=INSTALLED)
    package = Package(name, version, fields.get("A", ""))
    if package.key in packages:
        raise PackageDbError(f"line {start}: package {name} given twice", path=INSTALLED)
    packages[package.key] = package


def file_digests(
    root: Path, *, include_conffiles: bool = True, only: Collection[str] | None = None
) -> list[FileDigest]:
    """What the installed packages (``only`` those named) say their files must hash to. A
    file line that would leave the root, or a ``Q1`` checksum that is not base64 of 20 bytes,
    is logged and skipped, so one damaged entry never hides the rest."""
    out: list[FileDigest] = []
    name = directory = ""
    path: str | None = None
    for number, key, value in _fields(root):
        if key == "P":
            name = value
        elif key == "F":
            directory = value
        elif key == "R":
            path = normalize(f"{directory}/{value}") if "/" not in value else None
            if path is None:
                log.warning("package_digest_line_invalid", path=INSTALLED, line=number)
        elif key == "Z" and path is not None:
            digest = _sha1_hex(value)
            conffile = path.startswith("/etc/")
            if digest is None and value.startswith("Q1"):
                log.warning("package_digest_line_invalid", path=INSTALLED, line=number)
            elif (
                digest is not None
                and (only is None or name in only)
                and (include_conffiles or not conffile)
            ):
                out.append(
                    FileDigest(name, path, "sha1", digest, conffile=conffile, link_digest=True)
                )
            path = None
        elif not key:
            name = directory = ""
            path = None
    return out


def _sha1_hex(checksum: str) -> str | None:
    """The hex SHA-1 of a ``Q1`` checksum; ``None`` for another kind or a damaged one."""
    if not checksum.startswith("Q1"):
        return None
    try:
        raw = base64.b64decode(checksum[2:], validate=True)
    except binascii.Error:
        return None
    return raw.hex() if len(raw) == 20 else None
