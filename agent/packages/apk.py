"""apk's database, read as a file: ``/lib/apk/db/installed``.

Stanzas separated by blank lines, one ``X:value`` per line; ``P`` is the name, ``V`` the
version, ``A`` the architecture. The per-file lines (``F``, ``R``, ``Z``, …) are not read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from agent.errors import PackageDbError
from agent.packages.dbfile import db_lines, read_db_file
from agent.packages.image import ImageRoot
from agent.packages.model import Package, PackageSet

INSTALLED: Final = "/lib/apk/db/installed"
_LINE_RE: Final = re.compile(r"([A-Za-z]):(.*)")


def read_apk(root: Path) -> PackageSet:
    data = read_db_file(ImageRoot(root), INSTALLED) or b""
    lines = db_lines(data, INSTALLED)
    packages: dict[tuple[str, str], Package] = {}
    fields: dict[str, str] = {}
    start = 0
    for number, line in enumerate([*lines, ""], start=1):
        if not line.strip():
            if fields:
                _add(packages, fields, start)
            fields = {}
            continue
        match = _LINE_RE.fullmatch(line)
        if match is None:
            raise PackageDbError(
                f"line {number}: expected 'X:value', got {line[:60]!r}", path=INSTALLED
            )
        if not fields:
            start = number
        fields.setdefault(match.group(1), match.group(2))
    return PackageSet.build("apk", packages.values())


def _add(packages: dict[tuple[str, str], Package], fields: dict[str, str], start: int) -> None:
    name, version = fields.get("P", ""), fields.get("V", "")
    if not name or not version:
        raise PackageDbError(f"line {start}: package stanza without P: or V:", path=INSTALLED)
    package = Package(name, version, fields.get("A", ""))
    if package.key in packages:
        raise PackageDbError(f"line {start}: package {name} given twice", path=INSTALLED)
    packages[package.key] = package
