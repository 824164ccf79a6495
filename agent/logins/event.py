"""One SSH login event, as every source reports it and as it goes on the wire."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

Event = Literal[
    "accepted", "failed", "invalid_user", "session_open", "session_close", "disconnected"
]
Source = Literal["journal", "authlog", "utmp"]

EVENTS: Final = frozenset(
    {"accepted", "failed", "invalid_user", "session_open", "session_close", "disconnected"}
)
FAILURES: Final = frozenset({"failed", "invalid_user"})
MAX_RAW_CHARS: Final = 1024


@dataclass(frozen=True)
class Login:
    """What one log line (or one utmp record) says about an SSH login.

    ``at`` is ISO-8601 UTC. ``pid`` is the sshd process that logged the line (for utmp, the
    session's process). ``unlogged`` marks a utmp session that no log line accounts for.
    ``repeated`` is how many identical lines the syslog daemon folded into this one.
    """

    event: Event
    user: str
    at: str
    source: Source
    method: str | None = None
    source_ip: str | None = None
    source_port: int | None = None
    key_type: str | None = None
    fingerprint: str | None = None
    key_id: str | None = None
    cert_serial: int | None = None
    ca_fingerprint: str | None = None
    pid: int | None = None
    tty: str | None = None
    session_id: str | None = None
    unlogged: bool = False
    repeated: int = 1
    raw: str = ""

    @property
    def is_failure(self) -> bool:
        """A failed or invalid-user attempt: counted, never drift."""
        return self.event in FAILURES

    @property
    def peer(self) -> tuple[str | None, int | None]:
        return self.source_ip, self.source_port

    def with_context(self, **fields: Any) -> Login:
        """This event with the missing fields filled in (never overwriting what it has)."""
        missing = {k: v for k, v in fields.items() if getattr(self, k) is None and v is not None}
        return replace(self, **missing) if missing else self

    def to_wire(self) -> dict[str, Any]:
        """The finding body documented in ``docs/logins.md``."""
        body = asdict(self)
        body["raw"] = self.raw[:MAX_RAW_CHARS]
        return {"type": "login", **body}


def iso_utc(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_iso() -> str:
    return iso_utc(datetime.now(UTC))
