"""Event sources the daemon's loop polls, each behind the small ``daemon.Source`` seam
(the file guard, rescans and the package watch run on threads of their own:
``agent.watchers``).

- ``LoginSource``: SSH logins from ``agent.logins.LoginWatcher`` (journal, auth logs, utmp),
  each judged by the policy's ``ssh_login`` (``taint``, ``alert`` or ``allow``).

The loop calls ``poll()``; when it returned findings, ``stage(q)`` with the spool number the
report is about to get, then queues them durably, then ``commit()``: a source's position
becomes final only once the report is written, so a crash in between neither repeats nor
loses an event (``agent.logins.state``). Then
``failures()``: integrity findings for what the source could not see (reported as source
``integrity``), each once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import LoginsSection
from agent.logins import LoginWatcher, default_sources
from agent.worker import integrity_finding

_LOGIN_SEVERITY = {"taint": "critical", "alert": "warning", "allow": "info"}
_OPENING = frozenset({"accepted", "session_open"})


class LoginSource:
    name = "ssh"

    def __init__(
        self,
        state_dir: Path,
        config: LoginsSection,
        *,
        ssh_login: str,
        written: Callable[[int], bool] | None = None,
    ) -> None:
        sources = default_sources(
            auth_logs=list(config.auth_logs) or None,
            journal=None if config.journal else False,
            utmp=config.utmp,
        )
        self._watcher = LoginWatcher(state_dir, sources, written=written)
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

    def failures(self) -> list[dict[str, Any]]:
        """Integrity findings for the login sources that started failing since the last
        call: the logins they would have seen may be missing."""
        return [
            integrity_finding(
                "login_source_failed",
                f"the {name} login source failed ({why}): SSH logins it would have seen may "
                "be missing (integrity unknown) until it recovers; the other sources go on",
            )
            for name, why in self._watcher.new_failures()
        ]

    def stage(self, q: int) -> None:
        self._watcher.stage(q)

    def commit(self) -> None:
        self._watcher.commit()

    def close(self) -> None:
        self._watcher.close()
