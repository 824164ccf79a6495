"""Turn OpenSSH's and systemd-logind's log lines into :class:`Login` events.

Three shapes of line reach the parser:

* a syslog file line, ``Nov 26 10:17:01 host sshd[812]: Accepted …`` (traditional) or
  ``2025-11-26T10:17:01.123456+00:00 host sshd[812]: Accepted …`` (RFC 3339);
* a bare message, as ``sshd -E FILE`` writes it (no time, no host, no pid);
* a journal entry, whose fields already separate the program, pid and message.

OpenSSH >= 9.8 logs from ``sshd-session`` instead of ``sshd``; both are read. Lines from
other programs are ignored. A :class:`LineParser` remembers, per sshd pid and per peer
address, who logged in, so the session lines that do not name the address (``pam_unix``,
``systemd-logind``) are completed from the ``Accepted`` line before them.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

from agent.logins.event import Login, Source, iso_utc, now_iso

SSHD_PROGRAMS: Final = frozenset({"sshd", "sshd-session"})
LOGIND_PROGRAM: Final = "systemd-logind"
_CONTEXT_SIZE: Final = 4096
_IDENTITY: Final = (
    "user",
    "pid",
    "method",
    "source_ip",
    "source_port",
    "key_type",
    "fingerprint",
    "key_id",
    "cert_serial",
    "ca_fingerprint",
)

_MONTHS: Final = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_TRADITIONAL: Final = re.compile(
    r"^(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<time>\d\d:\d\d:\d\d) (?P<rest>.*)$"
)
_RFC3339: Final = re.compile(
    r"^(?P<stamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)) (?P<rest>.*)$"
)
_TAG: Final = re.compile(r"^(?P<host>\S+) (?P<prog>[^\s\[:]+)(?:\[(?P<pid>\d+)\])?: (?P<msg>.*)$")

_PEER: Final = r"from (?P<ip>\S+) port (?P<port>\d+)"
_ACCEPTED: Final = re.compile(
    rf"^Accepted (?P<method>\S+) for (?P<user>.*?) {_PEER}(?: ssh\d)?(?:: (?P<key>.*))?$"
)
_FAILED: Final = re.compile(
    rf"^Failed (?P<method>\S+) for (?:invalid user )?(?P<user>.*?) {_PEER}(?: ssh\d)?(?::.*)?$"
)
_INVALID: Final = re.compile(rf"^Invalid user (?P<user>.*?) {_PEER}$")
_KEY: Final = re.compile(
    r"^(?P<type>\S+) (?P<fp>\S+)"
    r"(?: ID (?P<id>\"(?:[^\"\\]|\\.)*\"|.*?) \(serial (?P<serial>\d+)\) CA \S+ (?P<cafp>\S+))?"
    r"(?:, .*)?$"
)
_STARTING: Final = re.compile(rf"^Starting session: .+? for (?P<user>\S+) {_PEER} id (?P<sid>\d+)$")
_STARTING_TTY: Final = re.compile(r"^Starting session: .+? on (?P<tty>\S+) for ")
_CLOSE: Final = re.compile(rf"^Close session: user (?P<user>\S+) {_PEER} id (?P<sid>\d+)$")
_PAM: Final = re.compile(
    r"^pam_unix\((?:sshd|sshd-session):session\): session (?P<what>opened|closed) "
    r"for user (?P<user>[^\s(]+)"
)
_DISCONNECTED: Final = re.compile(
    r"^Disconnected from user (?P<user>\S+) (?P<ip>\S+) port (?P<port>\d+)$"
)
_RECEIVED_DISCONNECT: Final = re.compile(rf"^Received disconnect {_PEER}:\d+: .*$")
_CONNECTION_ENDED: Final = re.compile(
    r"^(?:Connection closed by|Connection reset by|Closing connection to"
    r"|Read error from remote host|Timeout, client not responding from(?: user \S+)?) "
    r"(?P<ip>\S+) port (?P<port>\d+)(?::.*)?$"
)
_REPEATED: Final = re.compile(r"^message repeated (?P<n>\d+) times: \[ ?(?P<msg>.*?) ?\]$")
_NEW_SESSION: Final = re.compile(r"^New session (?P<sid>\S+) of user (?P<user>\S+?)\.?$")
_REMOVED_SESSION: Final = re.compile(r"^Removed session (?P<sid>\S+?)\.?$")


@dataclass(frozen=True)
class SyslogLine:
    """A log line split into its parts; ``program`` is None for a bare ``sshd -E`` line."""

    at: str | None
    program: str | None
    pid: int | None
    message: str


def split_syslog(line: str, *, now: datetime | None = None) -> SyslogLine:
    """Split a syslog file line; a line with no recognisable header is a bare message."""
    rest: str | None = None
    at: str | None = None
    if match := _RFC3339.match(line):
        stamp = match["stamp"].replace("Z", "+00:00")
        try:
            at = iso_utc(datetime.fromisoformat(stamp))
            rest = match["rest"]
        except ValueError:
            rest = None
    elif match := _TRADITIONAL.match(line):
        at = _traditional_time(match["mon"], int(match["day"]), match["time"], now)
        rest = match["rest"] if at is not None else None
    if rest is not None and (tag := _TAG.match(rest)):
        pid = int(tag["pid"]) if tag["pid"] else None
        return SyslogLine(at, tag["prog"], pid, tag["msg"])
    return SyslogLine(None, None, None, line)


def _traditional_time(mon: str, day: int, clock: str, now: datetime | None) -> str | None:
    """Traditional syslog has no year and local time: pick the year that is not in the future."""
    if mon not in _MONTHS:
        return None
    now = now or datetime.now().astimezone()
    hour, minute, second = (int(part) for part in clock.split(":"))
    try:
        moment = now.replace(
            month=_MONTHS[mon], day=day, hour=hour, minute=minute, second=second, microsecond=0
        )
        if (moment - now).days >= 1:
            moment = moment.replace(year=now.year - 1)
    except ValueError:
        return None
    return iso_utc(moment)


def _port(text: str) -> int | None:
    value = int(text)
    return value if 0 <= value <= 65535 else None


def _unquote(text: str | None) -> str | None:
    if text and len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _peer(match: re.Match[str]) -> dict[str, Any]:
    return {"source_ip": match["ip"], "source_port": _port(match["port"])}


def _key(text: str | None) -> dict[str, Any]:
    """``ED25519 SHA256:…`` or, for a certificate, ``… ID key-id (serial N) CA TYPE SHA256:…``."""
    key = _KEY.match(text) if text else None
    if key is None:
        return {}
    return {
        "key_type": key["type"],
        "fingerprint": key["fp"],
        "key_id": _unquote(key["id"]),
        "cert_serial": int(key["serial"]) if key["serial"] else None,
        "ca_fingerprint": key["cafp"],
    }


def parse_sshd(message: str, **base: Any) -> Login | None:
    """One sshd / sshd-session message, or None when it says nothing about a login.

    ``base`` carries ``at``, ``source``, ``pid`` and ``raw`` for the event.
    """
    repeated = 1
    if match := _REPEATED.match(message):
        repeated, message = int(match["n"]), match["msg"]
    if message.endswith("[preauth]"):
        return None
    if match := _ACCEPTED.match(message):
        fields = {**_peer(match), **_key(match["key"])}
        return Login("accepted", match["user"], method=match["method"], **fields, **base)
    if match := _FAILED.match(message):
        fields = {**_peer(match), "method": match["method"], "repeated": repeated}
        return Login("failed", match["user"], **fields, **base)
    if match := _INVALID.match(message):
        return Login("invalid_user", match["user"], **_peer(match), **base)
    if match := _STARTING.match(message):
        tty = _STARTING_TTY.match(message)
        fields = {**_peer(match), "tty": tty["tty"] if tty else None}
        return Login("session_open", match["user"], **fields, **base)
    if match := _CLOSE.match(message):
        return Login("session_close", match["user"], **_peer(match), **base)
    if match := _PAM.match(message):
        if match["what"] == "opened":
            return Login("session_open", match["user"], **base)
        return Login("session_close", match["user"], **base)
    if match := _DISCONNECTED.match(message):
        return Login("disconnected", match["user"], **_peer(match), **base)
    if match := (_RECEIVED_DISCONNECT.match(message) or _CONNECTION_ENDED.match(message)):
        return Login("disconnected", "", **_peer(match), **base)
    return None


def parse_logind(message: str, *, leader: int | None, **base: Any) -> Login | None:
    """systemd-logind's ``New session N of user U.`` / ``Removed session N.``.

    The event's pid is the session leader (the sshd that logged the login), not logind's own.
    """
    base = {**base, "pid": leader}
    if match := _NEW_SESSION.match(message):
        return Login("session_open", match["user"], session_id=match["sid"], **base)
    if match := _REMOVED_SESSION.match(message):
        return Login("session_close", "", session_id=match["sid"], **base)
    return None


class LineParser:
    """Parses one source's lines in order and completes them from earlier lines."""

    def __init__(self, source: Source) -> None:
        self.source: Source = source
        self._by_pid: OrderedDict[int, Login] = OrderedDict()
        self._by_peer: OrderedDict[tuple[str, int], Login] = OrderedDict()
        self._by_session: OrderedDict[str, Login] = OrderedDict()

    def parse_line(self, line: str) -> Login | None:
        """One line of an auth log file (syslog header or bare ``sshd -E`` message)."""
        line = line.rstrip("\r\n")
        parts = split_syslog(line)
        if parts.program is not None and parts.program not in SSHD_PROGRAMS:
            return None
        return self.parse(
            program=parts.program or "sshd",
            pid=parts.pid,
            message=parts.message,
            at=parts.at or now_iso(),
            raw=line,
        )

    def parse(
        self,
        *,
        program: str,
        pid: int | None,
        message: str,
        at: str,
        raw: str,
        leader: int | None = None,
    ) -> Login | None:
        base: dict[str, Any] = {"at": at, "source": self.source, "pid": pid, "raw": raw}
        if program in SSHD_PROGRAMS:
            login = parse_sshd(message, **base)
        elif program == LOGIND_PROGRAM:
            login = parse_logind(message, leader=leader, **base)
        else:
            return None
        return self._complete(login) if login is not None else None

    def _complete(self, login: Login) -> Login | None:
        known = self._recall(login)
        if known is not None:
            context = {name: getattr(known, name) for name in _IDENTITY}
            login = login.with_context(**context)
            if not login.user:
                login = replace(login, user=known.user)
        if login.event == "disconnected" and not login.user:
            return None  # a connection that never logged in (a probe, a failed key exchange)
        if login.event in {"accepted", "session_open"}:
            self._remember(login)
        if login.event == "session_close" and login.session_id is not None:
            self._by_session.pop(login.session_id, None)
        return login

    def _recall(self, login: Login) -> Login | None:
        if login.session_id is not None and login.session_id in self._by_session:
            return self._by_session[login.session_id]
        if login.pid is not None and login.pid in self._by_pid:
            return self._by_pid[login.pid]
        if login.source_ip is not None and login.source_port is not None:
            return self._by_peer.get((login.source_ip, login.source_port))
        return None

    def _remember(self, login: Login) -> None:
        if login.pid is not None:
            _bounded_put(self._by_pid, login.pid, login)
        if login.source_ip is not None and login.source_port is not None:
            _bounded_put(self._by_peer, (login.source_ip, login.source_port), login)
        if login.session_id is not None:
            _bounded_put(self._by_session, login.session_id, login)


def _bounded_put(table: OrderedDict[Any, Login], key: Any, login: Login) -> None:
    table[key] = login
    table.move_to_end(key)
    while len(table) > _CONTEXT_SIZE:
        table.popitem(last=False)


def journal_time(usec: str | None) -> str | None:
    if not usec or not usec.isdigit():
        return None
    return iso_utc(datetime.fromtimestamp(int(usec) / 1_000_000, UTC))
