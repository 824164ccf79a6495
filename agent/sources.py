"""Event sources the daemon's loop polls, each behind the small ``daemon.Source`` seam.

- ``PackageSource``: re-reads the package database (``agent.packages``) when its files change
  and reports packages installed, removed or changed, judged by the policy's
  ``package_change`` (``drift``, ``alert`` or ``allow``).

- ``LoginSource``: SSH logins from ``agent.logins.LoginWatcher`` (journal, auth logs, utmp),
  each judged by the policy's ``ssh_login`` (``taint``, ``alert`` or ``allow``).

The loop calls ``poll()``, queues what it returns durably, then ``commit()``: a source saves
its position only then, so a crash in between repeats an event rather than losing it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import structlog

from agent.config import LoginsSection
from agent.errors import PackageDbError
from agent.logins import LoginWatcher, default_sources
from agent.packages import PackageSet, database_paths, diff_packages, read_packages

log = structlog.get_logger(__name__)

_VERDICTS = {"drift": (True, "warning"), "alert": (False, "warning"), "allow": (False, "info")}
_LOGIN_SEVERITY = {"taint": "critical", "alert": "warning", "allow": "info"}
_OPENING = frozenset({"accepted", "session_open"})


def _fingerprint(paths: list[Path]) -> tuple[Any, ...]:
    """Changes when any database file or directory (or anything directly in it) changes."""
    out: list[Any] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((str(path), None))
            continue
        out.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        if os.path.isdir(path):
            with os.scandir(path) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    info = entry.stat(follow_symlinks=False)
                    out.append((entry.name, info.st_size, info.st_mtime_ns))
    return tuple(out)


class PackageSource:
    name = "packages"

    def __init__(self, root: Path, *, package_change: str, interval_s: float) -> None:
        self._root = root
        self._drift, self._severity = _VERDICTS[package_change]
        self._interval_s = interval_s
        self._next = time.monotonic() + interval_s
        self._paths = database_paths(root)
        self._seen = _fingerprint(self._paths)
        self._packages = self._read() or PackageSet("none", ())

    def _read(self) -> PackageSet | None:
        try:
            return read_packages(self._root)
        except PackageDbError as exc:  # e.g. read in the middle of an upgrade: try again later
            log.warning("package_db_unreadable", error=str(exc))
            return None

    def poll(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        if now < self._next:
            return []
        self._next = now + self._interval_s
        fingerprint = _fingerprint(self._paths)
        if fingerprint == self._seen:
            return []
        current = self._read()
        if current is None:
            return []
        self._seen = fingerprint
        changes = diff_packages(self._packages, current)
        self._packages = current
        if changes:
            log.warning("packages_changed", count=len(changes))
        return [
            {
                "type": "package",
                "change": c.change,
                "name": c.name,
                "arch": c.arch,
                "before": c.before,
                "after": c.after,
                "drift": self._drift,
                "severity": self._severity,
            }
            for c in changes
        ]

    def commit(self) -> None:
        return

    def close(self) -> None:
        return


class LoginSource:
    name = "ssh"

    def __init__(self, state_dir: Path, config: LoginsSection, *, ssh_login: str) -> None:
        sources = default_sources(
            auth_logs=list(config.auth_logs) or None,
            journal=None if config.journal else False,
            utmp=config.utmp,
        )
        self._watcher = LoginWatcher(state_dir, sources)
        self._verdict = ssh_login

    def poll(self) -> list[dict[str, Any]]:
        out = []
        for login in self._watcher.poll():
            finding = login.to_wire()
            finding["verdict"] = self._verdict
            opening = login.event in _OPENING
            finding["severity"] = _LOGIN_SEVERITY[self._verdict] if opening else "info"
            out.append(finding)
        return out

    def commit(self) -> None:
        self._watcher.commit()

    def close(self) -> None:
        self._watcher.close()
