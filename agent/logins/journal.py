"""Read sshd's and systemd-logind's entries from the systemd journal.

One long-running ``journalctl -o json --follow --no-tail`` child, matched on
``SYSLOG_IDENTIFIER`` ``sshd``, ``sshd-session`` (OpenSSH >= 9.8) and ``systemd-logind``, read
without blocking. The cursor of the last entry read is the source's position: a restart
continues with ``--after-cursor``; the first start reads the current boot. When journalctl
exits (no journal on this machine, a bad cursor), it is logged with its stderr and started
again after ``restart_backoff_s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import structlog

from agent.logins.event import Login, now_iso
from agent.logins.parse import SSHD_PROGRAMS, LineParser, journal_time

IDENTIFIERS: Final = (*sorted(SSHD_PROGRAMS), "systemd-logind")
MAX_LINE_BYTES: Final = 1 << 20
_STOP_TIMEOUT_S: Final = 5.0

log = structlog.get_logger("agent.logins")


def _text(value: Any) -> str | None:
    """A journal field as JSON shows it: a string, or a list of byte values when not UTF-8."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value).decode("utf-8", "replace")
    return None


def _int(value: Any) -> int | None:
    text = _text(value)
    return int(text) if text is not None and text.isdigit() else None


class JournalSource:
    """A login source following the journal through ``journalctl``. Not thread-safe."""

    name = "journal"

    def __init__(
        self,
        *,
        journalctl: str = "journalctl",
        extra_args: Sequence[str] = (),
        since_boot: bool = True,
        restart_backoff_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._journalctl = journalctl
        self._extra_args = tuple(extra_args)
        self._since_boot = since_boot
        self._backoff_s = restart_backoff_s
        self._clock = clock
        self._parser = LineParser("journal")
        self._cursor: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending = b""
        self._next_start = 0.0
        self._run_entries = 0
        self.entries_read = 0
        # Why it cannot follow the journal: set when journalctl cannot be started or ends in
        # error before reading anything; cleared once a run reads an entry. (A journalctl that
        # ends after reading is started again after the cursor: nothing is missed.)
        self.failure: str | None = None

    def restore(self, position: Mapping[str, Any]) -> None:
        cursor = position.get("cursor")
        self._cursor = cursor if isinstance(cursor, str) and cursor else None

    def position(self) -> dict[str, Any]:
        return {"cursor": self._cursor} if self._cursor else {}

    def command(self) -> list[str]:
        cmd = [self._journalctl, "-o", "json", "--follow", "--no-tail", "--no-pager"]
        if self._cursor:
            cmd += ["--after-cursor", self._cursor]
        elif self._since_boot:
            cmd.append("--boot")
        cmd += self._extra_args
        cmd += [f"SYSLOG_IDENTIFIER={ident}" for ident in IDENTIFIERS]
        return cmd

    def poll(self) -> list[Login]:
        if self._proc is None and not self._start():
            return []
        assert self._proc is not None and self._proc.stdout is not None
        chunks: list[bytes] = []
        eof = False
        while True:
            try:
                chunk = os.read(self._proc.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        logins = self._parse(b"".join(chunks))
        if self._run_entries:
            self.failure = None
        if eof:
            self._reap()
        return logins

    def _parse(self, data: bytes) -> list[Login]:
        *lines, self._pending = (self._pending + data).split(b"\n")
        if len(self._pending) > MAX_LINE_BYTES:
            log.warning("journal_entry_too_long", size_bytes=len(self._pending))
            self._pending = b""
        logins: list[Login] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("journal_entry_malformed", line=line[:200].decode("utf-8", "replace"))
                continue
            if not isinstance(entry, dict):
                continue
            login = self.parse_entry(entry)
            if login is not None:
                logins.append(login)
        return logins

    def parse_entry(self, entry: Mapping[str, Any]) -> Login | None:
        """One journal entry (``journalctl -o json``), advancing the cursor past it."""
        cursor = _text(entry.get("__CURSOR"))
        if cursor:
            self._cursor = cursor
        self.entries_read += 1
        self._run_entries += 1
        program = _text(entry.get("SYSLOG_IDENTIFIER"))
        message = _text(entry.get("MESSAGE"))
        if program is None or message is None:
            return None
        pid = _int(entry.get("SYSLOG_PID")) or _int(entry.get("_PID"))
        return self._parser.parse(
            program=program,
            pid=pid,
            message=message,
            at=journal_time(_text(entry.get("__REALTIME_TIMESTAMP"))) or now_iso(),
            raw=f"{program}[{pid}]: {message}" if pid else f"{program}: {message}",
            leader=_int(entry.get("LEADER")),
        )

    def _start(self) -> bool:
        if self._clock() < self._next_start:
            return False
        cmd = self.command()
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            log.warning("journal_unavailable", command=cmd[0], error=str(exc))
            self.failure = f"journalctl cannot be started: {exc}"
            self._next_start = self._clock() + self._backoff_s
            return False
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._run_entries = 0
        log.info("journal_following", after_cursor=self._cursor is not None)
        return True

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _, stderr = proc.communicate(timeout=_STOP_TIMEOUT_S)
        self._pending = b""
        self._next_start = self._clock() + self._backoff_s
        log.warning(
            "journal_exited",
            returncode=proc.returncode,
            stderr=stderr[-500:].decode("utf-8", "replace").strip(),
        )
        if proc.returncode and not self._run_entries:
            text = stderr[-200:].decode("utf-8", "replace").strip()
            self.failure = f"journalctl exited with status {proc.returncode}: {text}"
        if proc.returncode and self._cursor and not self._run_entries:
            # A cursor journalctl cannot seek to (journal vacuumed, machine reinstalled):
            # read the boot again rather than nothing at all.
            log.warning("journal_cursor_rejected", cursor=self._cursor)
            self._cursor = None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.communicate(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
