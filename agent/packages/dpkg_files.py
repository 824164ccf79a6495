"""The files dpkg says each package owns, and the MD5 digests they must have: what ``debsums``
checks, read without running dpkg.

- ``info/<pkg>.md5sums`` (``<pkg>:<arch>`` for ``Multi-Arch: same``): the shipped digests, in
  ``md5sum`` format (a line starting with ``\\`` has ``\\\\`` and ``\\n`` escapes).
- ``info/<pkg>.list``: the files the package owns now. A file another package took over
  (``Replaces:``) stays in the old package's md5sums but leaves its list, so it is not held
  against the old package.
- ``status``'s ``Conffiles``: the digests of configuration files as installed.
- ``diversions``: a file diverted by another package (or locally, package ``:``) is checked
  where dpkg put it.
- ``path-exclude`` / ``path-include`` in the image's ``/etc/dpkg/dpkg.cfg{,.d/*}``: a file
  dpkg was told not to unpack may be absent (the last matching rule decides, as in dpkg).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Final

from agent.errors import PackageDbError
from agent.logs import get_logger
from agent.packages.dbfile import db_lines, read_db_file
from agent.packages.dpkg import Record, read_records
from agent.packages.image import ImageRoot, NotRegularError, normalize
from agent.packages.verify import FileDigest

DIVERSIONS: Final = "/var/lib/dpkg/diversions"
INFO: Final = "/var/lib/dpkg/info"
CONFIG: Final = "/etc/dpkg/dpkg.cfg"
CONFIG_DIR: Final = "/etc/dpkg/dpkg.cfg.d"
_CONFIG_NAME_RE: Final = re.compile(r"[0-9a-zA-Z_-]+")
_FILTER_RE: Final = re.compile(r"(?:--)?path-(exclude|include)(?:=|\s+)(\S.*)")
_MD5_RE: Final = re.compile(r"(\\?)([0-9a-fA-F]{32}) [ *](.+)")
_UNESCAPE: Final = {"\\": "\\", "n": "\n", "r": "\r"}

log = get_logger(__name__)


def read_diversions(image: ImageRoot) -> dict[str, tuple[str, str]]:
    """``diverted path -> (where it went, diverting package)``; ``":"`` is a local diversion."""
    data = read_db_file(image, DIVERSIONS, missing_ok=True)
    if data is None:
        return {}
    lines = db_lines(data, DIVERSIONS)
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 3:
        raise PackageDbError(
            f"line {len(lines) - len(lines) % 3 + 1}: incomplete diversion (from, to, package)",
            path=DIVERSIONS,
        )
    out: dict[str, tuple[str, str]] = {}
    for index in range(0, len(lines), 3):
        source, target = normalize(lines[index]), normalize(lines[index + 1])
        owner = lines[index + 2]
        if source is None or target is None or not owner:
            raise PackageDbError(f"line {index + 1}: invalid diversion", path=DIVERSIONS)
        out[source] = (target, owner)
    return out


def read_path_filters(image: ImageRoot) -> list[tuple[bool, str]]:
    """``(exclude?, glob)`` in the order dpkg applies them: ``dpkg.cfg.d/*`` sorted, then
    ``dpkg.cfg``."""
    names: list[str] = []
    try:
        listing = os.listdir(image.host(image.resolve_dir(CONFIG_DIR)))
        names = [f"{CONFIG_DIR}/{n}" for n in sorted(listing) if _CONFIG_NAME_RE.fullmatch(n)]
    except OSError:
        pass
    filters: list[tuple[bool, str]] = []
    for name in [*names, CONFIG]:
        try:
            data = read_db_file(image, name, missing_ok=True)
        except PackageDbError as exc:  # a directory or unreadable: dpkg would skip it too
            log.warning("dpkg_config_unreadable", path=name, error=str(exc))
            continue
        for line in (data or b"").decode("utf-8", "surrogateescape").splitlines():
            match = _FILTER_RE.fullmatch(line.strip())
            if match is not None:
                filters.append((match.group(1) == "exclude", match.group(2).strip()))
    return filters


def _excluded(path: str, filters: list[tuple[bool, str]]) -> bool:
    excluded = False
    for exclude, pattern in filters:
        if fnmatchcase(path, pattern):
            excluded = exclude
    return excluded


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m.group(1), m.group(0)), text)


def read_md5sums(data: bytes, path: str) -> Iterator[tuple[str, str]]:
    """``(image path, md5 hex)`` per valid line; a bad line (or one that would leave the root)
    is logged and skipped, so one damaged entry never hides the rest of the package."""
    for number, line in enumerate(data.decode("utf-8", "surrogateescape").split("\n"), 1):
        if not line:
            continue
        match = _MD5_RE.fullmatch(line)
        image_path = None
        if match is not None:
            name = _unescape(match.group(3)) if match.group(1) else match.group(3)
            image_path = normalize(name)
        if match is None or image_path is None:
            log.warning("package_digest_line_invalid", path=path, line=number)
            continue
        yield image_path, match.group(2).lower()


def _info_file(image: ImageRoot, record: Record, suffix: str) -> tuple[str, bytes] | None:
    package = record.package
    for name in (f"{package.name}:{package.arch}", package.name):
        path = f"{INFO}/{name}.{suffix}"
        try:
            return path, image.read_bytes(path)
        except (OSError, NotRegularError):
            continue
    return None


def _owned(listed: tuple[str, bytes] | None) -> set[str] | None:
    if listed is None:
        return None
    return set(listed[1].decode("utf-8", "surrogateescape").split("\n"))  # as dpkg writes them


@dataclass(frozen=True, slots=True)
class _Placement:
    """Where dpkg put a package's file, and whether it may be absent."""

    diversions: dict[str, tuple[str, str]]
    filters: list[tuple[bool, str]]

    def claim(self, record: Record, path: str, digest: str, *, conffile: bool) -> FileDigest:
        diverted = self.diversions.get(path)
        if diverted is not None and diverted[1] != record.package.name:
            placed = diverted[0]
        else:
            placed = path
        optional = _excluded(path, self.filters)
        return FileDigest(record.label, placed, "md5", digest, conffile=conffile, optional=optional)


def file_digests(
    root: Path, *, include_conffiles: bool = True, only: Collection[str] | None = None
) -> list[FileDigest]:
    """What the present packages (``only`` those named, as ``name`` or ``name:arch``) say
    their files must hash to."""
    image = ImageRoot(root)
    placement = _Placement(read_diversions(image), read_path_filters(image))
    out: list[FileDigest] = []
    for record in read_records(root):
        if only is not None and record.package.name not in only and record.label not in only:
            continue
        conffiles = {path for path, _ in record.conffiles}
        owned = _owned(_info_file(image, record, "list"))
        sums = _info_file(image, record, "md5sums")
        if sums is None:
            log.info("package_digests_missing", package=record.label)
        else:
            for path, digest in read_md5sums(sums[1], sums[0]):
                if path not in conffiles and (owned is None or path in owned):
                    out.append(placement.claim(record, path, digest, conffile=False))
        if include_conffiles:
            out.extend(
                placement.claim(record, path, digest, conffile=True)
                for path, digest in record.conffiles
            )
    return out
