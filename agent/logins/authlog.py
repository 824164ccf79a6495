"""Tail an auth log file (``/var/log/auth.log``, ``/var/log/secure``) through its rotations.

The position of a file is its device, inode and the offset just past the last complete line,
plus a digest of the bytes before that offset (the *tail*), which tells a reused inode or a
truncated file apart from the file we were reading. Rotation comes in two kinds:

* **rename** (logrotate's default, ``create``): the path now names a new inode. The renamed file
  is drained to its end first — the syslog daemon may still append to it until it reopens —
  and closed once it has not grown for ``rotate_grace_s``; then the new file is read from 0.
* **copytruncate**: the same inode shrinks. The lines between our offset and the truncation
  were copied into a sibling (``auth.log.1``); the sibling whose bytes before our offset match
  our tail is read from our offset, then the truncated file from 0.

A partial last line is held back until its newline arrives (or, in a rotated file, until the
file has stopped growing). After a restart the saved positions are found again by inode among
the path and its uncompressed siblings, so nothing is lost or read twice.

On the first run (no saved position) a file is read from its start, and what it already holds
may predate this boot: an image's auth log keeps the image build's own SSH logins (Packer
connects over SSH). Of the lines that were in the file when it was first opened, those dated
before the current boot (``btime`` in ``/proc/stat``) are read — they still complete the
context of later lines — but not reported. Every line written after that is reported, whatever
its date, and so is every line after a saved position: a login during an earlier boot that the
agent had not yet read is still evidence.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

from agent.errors import advice
from agent.logins.event import Login
from agent.logins.parse import LineParser

DEFAULT_PATHS: Final = (Path("/var/log/auth.log"), Path("/var/log/secure"))
PROC_STAT: Final = Path("/proc/stat")
TAIL_BYTES: Final = 256
CHUNK_BYTES: Final = 1 << 16
MAX_LINE_BYTES: Final = 1 << 16
_COMPRESSED: Final = (".gz", ".xz", ".bz2", ".zst", ".lz4")

log = structlog.get_logger("agent.logins")


@dataclass(eq=False)
class _Tail:
    """One open file being read: where the last complete line ends, and what came before."""

    path: Path
    fd: int
    dev: int
    inode: int
    offset: int = 0
    tail: bytes = b""
    pending: bytes = b""
    grew_at: float = 0.0
    boot_until: int = 0  # lines ending at or before this offset are checked against the boot
    lines: list[tuple[str, bool]] = field(default_factory=list)  # (line, check its date)

    def read(self, now: float) -> None:
        """Append every complete line now in the file to ``lines``."""
        while chunk := os.pread(self.fd, CHUNK_BYTES, self.offset + len(self.pending)):
            self.grew_at = now
            self.pending += chunk
            *complete, self.pending = self.pending.split(b"\n")
            for raw in complete:
                self._take(raw, len(raw) + 1)
            if len(self.pending) > MAX_LINE_BYTES:
                self._take(self.pending, len(self.pending))
                self.pending = b""

    def finish(self) -> None:
        """The file will not grow again: its partial last line is a line."""
        if self.pending:
            self._take(self.pending, len(self.pending))
            self.pending = b""

    def _take(self, raw: bytes, size: int) -> None:
        self.offset += size
        self.tail = (self.tail + raw + b"\n"[: size - len(raw)])[-TAIL_BYTES:]
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.lines.append((text, self.offset <= self.boot_until))

    def position(self) -> dict[str, Any]:
        return {
            "dev": self.dev,
            "inode": self.inode,
            "offset": self.offset,
            "tail_sha256": _digest(self.tail),
            "tail_len": len(self.tail),
        }

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _open(path: Path) -> _Tail | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    return _Tail(path, fd, st.st_dev, st.st_ino)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def boot_time(path: Path = PROC_STAT) -> datetime | None:
    """When this machine booted (``btime`` in ``/proc/stat``); None when it cannot be read."""
    try:
        with path.open(encoding="ascii") as fh:
            for line in fh:
                name, _, value = line.partition(" ")
                if name == "btime":
                    return datetime.fromtimestamp(int(value), UTC)
    except (OSError, UnicodeDecodeError, ValueError, OverflowError) as exc:
        log.warning("boot_time_unreadable", path=str(path), error=str(exc))
        return None
    log.warning("boot_time_unreadable", path=str(path), error="no btime line")
    return None


def _before(at: str, moment: datetime) -> bool:
    try:
        return datetime.fromisoformat(at.replace("Z", "+00:00")) < moment
    except ValueError:
        return False


def _truncated(tail: _Tail) -> bool:
    """Has the file shrunk below what we read, or been rewritten before our offset?"""
    if tail.size() < tail.offset + len(tail.pending):
        return True
    return bool(tail.tail) and not _matches(tail, tail.offset, _digest(tail.tail), len(tail.tail))


def _matches(tail: _Tail, offset: int, digest: str, length: int) -> bool:
    """Do the ``length`` bytes before ``offset`` in this file have the saved digest?"""
    if offset < length:
        return False
    before = os.pread(tail.fd, length, offset - length)
    return len(before) == length and _digest(before) == digest


class AuthLogSource:
    """A login source reading one syslog file and its rotations. Not thread-safe."""

    def __init__(
        self,
        path: Path,
        *,
        from_start: bool = True,
        rotate_grace_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        booted_at: datetime | None = None,
    ) -> None:
        """``booted_at``: the current boot's time (default: read from ``/proc/stat``)."""
        self.path = path
        self.name = f"authlog:{path}"
        self._from_start = from_start
        self._booted_at = booted_at or boot_time()
        self.before_boot = 0  # lines of a first read dated before the boot, not reported
        self._grace_s = rotate_grace_s
        self._clock = clock
        self._parser = LineParser("authlog")
        self._current: _Tail | None = None
        self._draining: list[_Tail] = []
        self._saved: list[Mapping[str, Any]] = []
        self._missing_logged = False
        self.failure: str | None = None  # why it cannot read, while it cannot

    # --- position -----------------------------------------------------------------------

    def restore(self, position: Mapping[str, Any]) -> None:
        files = position.get("files")
        if isinstance(files, list):
            self._saved = [f for f in files if isinstance(f, dict)]

    def position(self) -> dict[str, Any]:
        tails = [*self._draining, *([self._current] if self._current else [])]
        if not tails:
            return {"files": list(self._saved)}
        return {"files": [t.position() for t in tails]}

    # --- reading ------------------------------------------------------------------------

    def poll(self) -> list[Login]:
        try:
            self._follow()
        except OSError as exc:
            log.warning("authlog_unreadable", path=str(self.path), error=advice(exc))
            self.failure = f"{self.path} is unreadable: {advice(exc)}"
            return []
        self.failure = None
        now = self._clock()
        lines: list[tuple[str, bool]] = []
        for tail in self._draining:
            tail.read(now)
        for tail in [t for t in self._draining if now - t.grew_at >= self._grace_s]:
            tail.finish()
            lines += tail.lines
            tail.lines.clear()
            tail.close()
            self._draining.remove(tail)
            log.info("authlog_rotated_drained", path=str(tail.path), inode=tail.inode)
        for tail in self._draining:
            lines += tail.lines
            tail.lines.clear()
        if self._current is not None:
            self._current.read(now)
            lines += self._current.lines
            self._current.lines.clear()
        return self._parse(lines)

    def _parse(self, lines: list[tuple[str, bool]]) -> list[Login]:
        found: list[Login] = []
        skipped = 0
        for line, check_date in lines:
            login = self._parser.parse_line(line)
            if login is None:
                continue
            if check_date and self._booted_at is not None and _before(login.at, self._booted_at):
                skipped += 1
                continue
            found.append(login)
        if skipped:
            self.before_boot += skipped
            log.info(
                "authlog_before_boot_ignored",
                path=str(self.path),
                events=skipped,
                booted_at=self._booted_at.isoformat() if self._booted_at else None,
            )
        return found

    def _follow(self) -> None:
        """Notice a new, rotated or truncated file; restore saved positions on first sight."""
        if self._current is None:
            self._current = _open(self.path)
            if self._current is None:
                if not self._missing_logged:
                    log.info("authlog_missing", path=str(self.path))
                    self._missing_logged = True
                return
            self._missing_logged = False
            self._start(self._current)
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return  # renamed away, the new file not yet created: keep reading the old one
        current = self._current
        if (st.st_dev, st.st_ino) != (current.dev, current.inode):
            log.info("authlog_rotated", path=str(self.path), kind="rename", inode=current.inode)
            current.grew_at = self._clock()
            self._draining.append(current)
            self._current = _open(self.path)
        elif _truncated(current):
            log.info("authlog_rotated", path=str(self.path), kind="truncate", inode=current.inode)
            self._drain_copy(current.offset, _digest(current.tail), len(current.tail))
            current.offset, current.pending, current.tail = 0, b"", b""

    def _start(self, current: _Tail) -> None:
        saved, self._saved = self._saved, []
        if not saved:
            if self._from_start:
                current.boot_until = current.size()  # what is there may predate this boot
            else:
                current.offset = _last_line_end(current)
            return
        by_inode = {(t.dev, t.inode): t for t in self._siblings(exclude=current)}
        by_inode[(current.dev, current.inode)] = current
        found_current = False
        for pos in saved:
            try:
                key = (int(pos["dev"]), int(pos["inode"]))
                offset, length = int(pos["offset"]), int(pos["tail_len"])
                digest = str(pos["tail_sha256"])
            except (KeyError, TypeError, ValueError):
                log.warning("authlog_position_invalid", path=str(self.path), position=pos)
                continue
            tail = by_inode.pop(key, None)
            if tail is not None and (length == 0 or _matches(tail, offset, digest, length)):
                tail.offset = offset
                tail.tail = os.pread(tail.fd, length, offset - length) if length else b""
                if tail is current:
                    found_current = True
                else:
                    tail.grew_at = self._clock()
                    self._draining.append(tail)
            elif tail is current:
                # Truncated (copytruncate) while we were not running.
                log.info("authlog_rotated", path=str(self.path), kind="truncate", inode=key[1])
                self._drain_copy(offset, digest, length)
            else:
                log.warning("authlog_position_lost", path=str(self.path), inode=key[1])
                if tail is not None and tail is not current:
                    tail.close()
        for tail in by_inode.values():
            if tail is not current:
                tail.close()
        if not found_current:
            current.offset = 0

    def _drain_copy(self, offset: int, digest: str, length: int) -> None:
        """Read, from ``offset``, the sibling holding the copy of a truncated file.

        The copy is the sibling whose ``length`` bytes before ``offset`` have ``digest``; when
        nothing had been read yet (``length`` 0) it is the most recently modified sibling.
        """
        siblings = list(self._siblings(exclude=self._current))
        if length:
            found = [s for s in siblings if _matches(s, offset, digest, length)]
        else:
            found = sorted(siblings, key=lambda s: os.fstat(s.fd).st_mtime_ns)[-1:]
        for sibling in siblings:
            if sibling not in found:
                sibling.close()
        if not found:
            log.warning("authlog_copy_not_found", path=str(self.path), offset=offset)
            return
        copy = found[0]
        for extra in found[1:]:
            extra.close()
        copy.offset = offset
        copy.tail = os.pread(copy.fd, length, offset - length) if length else b""
        copy.grew_at = self._clock()
        self._draining.append(copy)
        log.info("authlog_copy_found", path=str(copy.path), offset=offset)

    def _siblings(self, *, exclude: _Tail | None) -> Iterator[_Tail]:
        """Uncompressed rotated copies of the path (``auth.log.1``, ``auth.log-20250101``)."""
        held = {(t.dev, t.inode) for t in self._draining}
        if exclude is not None:
            held.add((exclude.dev, exclude.inode))
        try:
            names = sorted(os.listdir(self.path.parent))
        except OSError:
            return
        for name in names:
            if not name.startswith(self.path.name) or name == self.path.name:
                continue
            if name.endswith(_COMPRESSED):
                continue
            tail = _open(self.path.parent / name)
            if tail is None:
                continue
            if (tail.dev, tail.inode) in held:
                tail.close()
                continue
            yield tail

    def close(self) -> None:
        for tail in [*self._draining, *([self._current] if self._current else [])]:
            tail.close()
        self._draining.clear()
        self._current = None


def _last_line_end(tail: _Tail) -> int:
    size = tail.size()
    start = max(0, size - CHUNK_BYTES)
    block = os.pread(tail.fd, size - start, start)
    newline = block.rfind(b"\n")
    return start + newline + 1 if newline >= 0 else start
