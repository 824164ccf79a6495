"""utmp, through ``psutil.users()``: the sessions logged in right now.

utmp corroborates the logs: a terminal session that appears here is a ``session_open``, one
that disappears a ``session_close``. utmp names the user, terminal, remote host and session
process but not the remote port, so the port is read from the TCP connection of the sshd
process the session descends from. The sessions already seen are the source's position, so a
restart does not report them again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import psutil
import structlog

from agent.logins.event import Login, iso_utc, now_iso

log = structlog.get_logger("agent.logins")
SessionKey = tuple[str, str, int, int]


def _key(user: Any) -> SessionKey:
    return (user.name, user.terminal or "", int(user.started), user.pid or 0)


def sshd_peer(pid: int | None) -> tuple[str, int] | None:
    """The remote address of the sshd connection that process ``pid`` belongs to."""
    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        for candidate in [process, *process.parents()]:
            if not candidate.name().startswith("sshd"):
                continue
            for conn in candidate.net_connections(kind="tcp"):
                if conn.raddr and conn.status == psutil.CONN_ESTABLISHED:
                    return str(conn.raddr.ip), int(conn.raddr.port)
    except psutil.Error:
        return None
    return None


class UtmpSource:
    """A login source comparing utmp with what it saw at the last poll. Not thread-safe."""

    name = "utmp"

    def __init__(self, *, users: Callable[[], Sequence[Any]] = psutil.users) -> None:
        self._users = users
        self._seen: dict[SessionKey, Login] = {}
        self.failure: str | None = None  # why it cannot read, while it cannot

    def restore(self, position: Mapping[str, Any]) -> None:
        for item in position.get("sessions", []):
            try:
                login = Login(
                    "session_open",
                    str(item["user"]),
                    at=str(item["at"]),
                    source="utmp",
                    source_ip=item.get("source_ip"),
                    source_port=item.get("source_port"),
                    pid=item.get("pid"),
                    tty=item.get("tty"),
                )
                key = (login.user, login.tty or "", int(item["started"]), login.pid or 0)
            except (KeyError, TypeError, ValueError):
                continue
            self._seen[key] = login

    def position(self) -> dict[str, Any]:
        return {
            "sessions": [
                {
                    "user": login.user,
                    "at": login.at,
                    "started": key[2],
                    "source_ip": login.source_ip,
                    "source_port": login.source_port,
                    "pid": login.pid,
                    "tty": login.tty,
                }
                for key, login in self._seen.items()
            ]
        }

    def poll(self) -> list[Login]:
        try:
            current = {_key(user): user for user in self._users()}
        except (OSError, psutil.Error) as exc:
            log.warning("utmp_unreadable", error=str(exc))
            self.failure = f"utmp is unreadable: {exc}"
            return []
        self.failure = None
        logins: list[Login] = []
        for key in [k for k in self._seen if k not in current]:
            opened = self._seen.pop(key)
            logins.append(
                Login(
                    "session_close",
                    opened.user,
                    at=now_iso(),
                    source="utmp",
                    source_ip=opened.source_ip,
                    source_port=opened.source_port,
                    pid=opened.pid,
                    tty=opened.tty,
                    raw=f"utmp: {opened.user} {opened.tty or '-'} logged out",
                )
            )
        for key, user in current.items():
            if key in self._seen:
                continue
            peer = sshd_peer(user.pid)
            host = user.host or None
            login = Login(
                "session_open",
                user.name,
                at=iso_utc(datetime.fromtimestamp(user.started, UTC)),
                source="utmp",
                source_ip=peer[0] if peer else host,
                source_port=peer[1] if peer else None,
                pid=user.pid,
                tty=user.terminal,
                raw=f"utmp: {user.name} {user.terminal or '-'} from {host or '-'} pid {user.pid}",
            )
            self._seen[key] = login
            logins.append(login)
        return logins

    def close(self) -> None:
        """Nothing to release."""
