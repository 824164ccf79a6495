"""dpkg's package database, read as files: ``status``, with the journal of ``updates/``
applied. dpkg itself is never run. (The files each package owns, and their digests, are
``dpkg_files``.)

A package counts as present when its files are on disk: ``installed`` (also with triggers
pending or awaited), and the half-done states ``half-installed``, ``unpacked`` and
``half-configured`` (or any state flagged ``reinstreq``), which are reported as unsettled.
``not-installed`` and ``config-files`` (removed, configuration left) are absent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.errors import PackageDbError
from agent.logs import get_logger
from agent.packages.dbfile import db_lines, read_db_file
from agent.packages.image import ImageRoot, normalize
from agent.packages.model import Package, PackageSet, UnsettledPackage

STATUS: Final = "/var/lib/dpkg/status"
UPDATES: Final = "/var/lib/dpkg/updates"

_WANTS: Final = frozenset({"unknown", "install", "hold", "deinstall", "purge"})
_FLAGS: Final = frozenset({"ok", "reinstreq", "hold", "hold-reinstreq"})
_SETTLED: Final = frozenset({"installed", "triggers-awaited", "triggers-pending"})
_UNSETTLED: Final = frozenset({"half-installed", "unpacked", "half-configured"})
_ABSENT: Final = frozenset({"not-installed", "config-files"})
_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9.+-]+")
_ARCH_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]*")
_FIELD_RE: Final = re.compile(r"([^\s:#-][^\s:]*):(.*)")
_HEX32_RE: Final = re.compile(r"[0-9a-fA-F]{32}")
_CONFFILE_FLAGS: Final = frozenset({"obsolete", "remove-on-upgrade"})

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Field:
    line: int
    value: str  # continuation lines joined by "\n", each without its leading space


@dataclass(frozen=True, slots=True)
class Record:
    """One present package as dpkg records it."""

    package: Package
    state: str | None  # None when settled
    multi_arch_same: bool
    conffiles: tuple[tuple[str, str], ...]  # (image path, md5 hex) of live conffiles

    @property
    def label(self) -> str:
        """dpkg's own name for it: ``name:arch`` only for ``Multi-Arch: same``."""
        p = self.package
        return f"{p.name}:{p.arch}" if self.multi_arch_same else p.name


def parse_stanzas(data: bytes, path: str) -> Iterator[tuple[int, dict[str, _Field]]]:
    """The deb822 stanzas of a control file: (first line number, lower-cased fields)."""
    fields: dict[str, _Field] = {}
    start = 0
    current = ""
    for number, line in enumerate(db_lines(data, path), start=1):
        if not line.strip():
            if fields:
                yield start, fields
            fields, current = {}, ""
            continue
        if line[0] in " \t":
            if not current:
                raise PackageDbError(f"line {number}: continuation line outside a field", path=path)
            old = fields[current]
            fields[current] = _Field(old.line, old.value + "\n" + line[1:])
            continue
        match = _FIELD_RE.fullmatch(line)
        if match is None:
            raise PackageDbError(
                f"line {number}: expected 'Field: value', got {line[:60]!r}", path=path
            )
        current = match.group(1).lower()
        if current in fields:
            raise PackageDbError(f"line {number}: field {match.group(1)!r} given twice", path=path)
        if not fields:
            start = number
        fields[current] = _Field(number, match.group(2).strip())
    if fields:
        yield start, fields


def _required(fields: dict[str, _Field], name: str, start: int, path: str) -> _Field:
    found = fields.get(name.lower())
    if found is None or not found.value:
        raise PackageDbError(f"line {start}: stanza has no {name} field", path=path)
    return found


def _record(
    start: int, fields: dict[str, _Field], path: str
) -> tuple[tuple[str, str], Record | None]:
    """The stanza's key and its record, or ``None`` when the package is absent."""
    name = _required(fields, "Package", start, path)
    if not _NAME_RE.fullmatch(name.value):
        raise PackageDbError(f"line {name.line}: invalid package name {name.value!r}", path=path)
    arch_field = fields.get("architecture", _Field(start, ""))
    arch = arch_field.value
    if arch and not _ARCH_RE.fullmatch(arch):
        raise PackageDbError(f"line {arch_field.line}: invalid architecture {arch!r}", path=path)
    status = _required(fields, "Status", start, path)
    words = status.value.split()
    if (
        len(words) != 3
        or words[0] not in _WANTS
        or words[1] not in _FLAGS
        or words[2] not in _SETTLED | _UNSETTLED | _ABSENT
    ):
        raise PackageDbError(
            f"line {status.line}: invalid Status {status.value!r} (want, flag, state)", path=path
        )
    key = (name.value, arch)
    _, flag, state = words
    if state in _ABSENT:
        return key, None
    version = _required(fields, "Version", start, path).value
    unsettled = state if state in _UNSETTLED else ("reinstreq" if "reinstreq" in flag else None)
    multi_arch = fields.get("multi-arch")
    return key, Record(
        Package(name.value, version, arch),
        unsettled,
        multi_arch is not None and multi_arch.value == "same",
        _conffiles(fields.get("conffiles"), path),
    )


def _conffiles(found: _Field | None, path: str) -> tuple[tuple[str, str], ...]:
    """Live conffiles of a ``Conffiles`` field, one per line:
    `` /etc/x.conf <md5>[ obsolete][ remove-on-upgrade]`` (the path may hold spaces).
    Obsolete ones are no longer shipped; ``newconffile`` ones are unpacked but not configured
    yet: neither has a digest to check."""
    if found is None:
        return ()
    out: list[tuple[str, str]] = []
    for offset, line in enumerate(found.value.split("\n")):
        text, obsolete = line.strip(), False
        while (last := text.rpartition(" "))[0] and last[2] in _CONFFILE_FLAGS:
            obsolete |= last[2] == "obsolete"
            text = last[0].rstrip()
        if not text or obsolete:
            continue
        raw_path, _, digest = text.rpartition(" ")
        image_path = normalize(raw_path.rstrip())
        if image_path is None or not (digest == "newconffile" or _HEX32_RE.fullmatch(digest)):
            raise PackageDbError(
                f"line {found.line + offset}: invalid Conffiles entry {line.strip()[:80]!r}",
                path=path,
            )
        if digest != "newconffile":
            out.append((image_path, digest.lower()))
    return tuple(out)


def read_records(root: Path) -> list[Record]:
    """Present packages: ``status`` with the pending journal files of ``updates/`` applied in
    order, as dpkg itself reads its database."""
    image = ImageRoot(root)
    sources: list[tuple[str, bytes]] = [(STATUS, read_db_file(image, STATUS) or b"")]
    try:
        journal = sorted(
            (int(n), n) for n in os.listdir(image.host(image.resolve_dir(UPDATES))) if n.isdigit()
        )
    except OSError:
        journal = []
    for _, entry in journal:
        name = f"{UPDATES}/{entry}"
        data = read_db_file(image, name, missing_ok=True)
        if data is not None:
            sources.append((name, data))
    records: dict[tuple[str, str], Record | None] = {}
    for name, data in sources:
        seen: set[tuple[str, str]] = set()
        for start, fields in parse_stanzas(data, name):
            key, record = _record(start, fields, name)
            if key in seen:
                raise PackageDbError(
                    f"line {start}: package {key[0]}:{key[1]} given twice", path=name
                )
            seen.add(key)
            records[key] = record
    return [r for r in records.values() if r is not None]


def read_dpkg(root: Path) -> PackageSet:
    records = read_records(root)
    unsettled = [
        UnsettledPackage(r.package.name, r.package.arch, r.state) for r in records if r.state
    ]
    for item in unsettled:
        log.warning("package_unsettled", package=item.name, arch=item.arch, state=item.state)
    return PackageSet.build("dpkg", (r.package for r in records), unsettled)
