"""The alert every sink delivers, and the ``AlertSink`` protocol sinks implement.

An alert is about one host, or about a whole pool when many hosts drift the same way (storm
grouping is decided upstream: a pool-level alert has ``host_id`` None and lists the hosts in
``details["hosts"]``). Its ``dedup_key`` is stable per pool, host and cause, so re-sending it,
or sending it again after a restart, updates the same incident instead of opening another.
Resolving keeps the key and sets ``status="resolved"`` and ``ends_at``.

Alerts travel through the durable outbox as JSON: ``to_json()`` / ``Alert.from_json()``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, cast, get_args

from collector.sinks.errors import MalformedAlertError

Status = Literal["firing", "resolved"]
Severity = Literal["info", "warning", "critical"]

STATUSES: Final[tuple[Status, ...]] = get_args(Status)
SEVERITIES: Final[tuple[Severity, ...]] = get_args(Severity)
SEVERITY_RANK: Final = {severity: rank for rank, severity in enumerate(SEVERITIES)}
MAX_DEDUP_KEY_CHARS: Final = 255  # PagerDuty's limit, the tightest of the sinks
POOL_WIDE: Final = "*"


def dedup_key(pool: str, cause: str, host_id: str | None = None) -> str:
    """The stable key of one cause on one host (or on a whole pool when ``host_id`` is None)."""
    key = f"driftwarden/{pool}/{host_id or POOL_WIDE}/{cause}"
    if len(key) <= MAX_DEDUP_KEY_CHARS:
        return key
    return "driftwarden/sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class AlertLink:
    href: str
    text: str


@dataclass(frozen=True, kw_only=True)
class Alert:
    dedup_key: str
    status: Status
    severity: Severity
    summary: str
    host_id: str | None
    pool: str
    cause: str
    details: Mapping[str, Any] = field(default_factory=dict)
    starts_at: datetime
    ends_at: datetime | None = None
    links: tuple[AlertLink, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise MalformedAlertError(f"status = {self.status!r} is not one of {list(STATUSES)}")
        if self.severity not in SEVERITIES:
            raise MalformedAlertError(
                f"severity = {self.severity!r} is not one of {list(SEVERITIES)}"
            )
        for name in ("dedup_key", "summary", "pool", "cause"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise MalformedAlertError(f"{name} = {value!r} is not a non-empty string")
        if self.host_id is not None and (not isinstance(self.host_id, str) or not self.host_id):
            raise MalformedAlertError(f"host_id = {self.host_id!r} is not a non-empty string")
        if len(self.dedup_key) > MAX_DEDUP_KEY_CHARS:
            raise MalformedAlertError(f"dedup_key is longer than {MAX_DEDUP_KEY_CHARS} characters")
        for name in ("starts_at", "ends_at"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise MalformedAlertError(f"{name} = {value!r} is not a timezone-aware datetime")
        try:
            frozen = json.loads(json.dumps(dict(self.details), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise MalformedAlertError(f"details are not JSON data: {exc}") from None
        object.__setattr__(self, "details", MappingProxyType(frozen))
        object.__setattr__(self, "links", tuple(self.links))

    @property
    def pool_wide(self) -> bool:
        return self.host_id is None

    @property
    def subject(self) -> str:
        """What the alert is about, for humans: the host, or ``pool NAME``."""
        return self.host_id if self.host_id is not None else f"pool {self.pool}"

    def resolved(self, at: datetime | None = None) -> Alert:
        """The same alert, resolved at ``at`` (now by default)."""
        return replace(self, status="resolved", ends_at=at or datetime.now(UTC))

    def to_json(self) -> dict[str, Any]:
        return {
            "dedup_key": self.dedup_key,
            "status": self.status,
            "severity": self.severity,
            "summary": self.summary,
            "host_id": self.host_id,
            "pool": self.pool,
            "cause": self.cause,
            "details": dict(self.details),
            "starts_at": self.starts_at.isoformat(),
            "ends_at": self.ends_at.isoformat() if self.ends_at else None,
            "links": [{"href": link.href, "text": link.text} for link in self.links],
        }

    @classmethod
    def from_json(cls, obj: Any) -> Alert:
        """Rebuild an alert stored by ``to_json``; anything else is a ``MalformedAlertError``."""
        if not isinstance(obj, dict):
            raise MalformedAlertError("an alert must be a JSON object")
        expected = set(cls.__dataclass_fields__)
        if set(obj) != expected:
            raise MalformedAlertError(
                f"alert keys {sorted(obj)} differ from the expected {sorted(expected)}"
            )
        try:
            links = tuple(AlertLink(href=str(x["href"]), text=str(x["text"])) for x in obj["links"])
            return cls(
                dedup_key=obj["dedup_key"],
                status=cast(Status, obj["status"]),
                severity=cast(Severity, obj["severity"]),
                summary=obj["summary"],
                host_id=obj["host_id"],
                pool=obj["pool"],
                cause=obj["cause"],
                details=obj["details"],
                starts_at=datetime.fromisoformat(obj["starts_at"]),
                ends_at=datetime.fromisoformat(obj["ends_at"]) if obj["ends_at"] else None,
                links=links,
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise MalformedAlertError(f"alert cannot be read: {exc}") from None


def iso_utc(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, the form every receiver accepts."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AlertSink(Protocol):
    """Something that takes alerts. ``send`` raises ``DeliveryError`` when it could not.

    ``resend_interval_s`` is how often a firing alert must be sent again to stay firing at
    the receiver (Alertmanager), or None when one send is enough.
    """

    name: str
    resend_interval_s: float | None

    def send(self, alert: Alert) -> None: ...
