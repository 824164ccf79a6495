"""The response's records: replacements, holds, incidents, break-glass sessions, decisions.

Frozen dataclasses as the ledger reads them from their tables; ``to_json`` is what the API
answers. The rules live in ``rails``, ``replace``, ``alerts`` and ``breakglass``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from collector.model import iso


class ReplacementState(enum.StrEnum):
    """A replacement's life: blocked by a rail, acting (the action runs), verifying (did the
    host go away?), then done, failed, would_replace (a dry run) or cancelled."""

    BLOCKED = "blocked"
    ACTING = "acting"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"
    WOULD_REPLACE = "would_replace"
    CANCELLED = "cancelled"


OPEN_REPLACEMENT: Final = (
    ReplacementState.BLOCKED,
    ReplacementState.ACTING,
    ReplacementState.VERIFYING,
)
IN_FLIGHT: Final = (ReplacementState.ACTING, ReplacementState.VERIFYING)


class Scope(enum.StrEnum):
    HOST = "host"
    POOL = "pool"
    IMAGE = "image"


class HoldKind(enum.StrEnum):
    OPERATOR = "operator"  # an operator held it, with a reason
    STORM = "storm"  # the storm breaker paused the pool
    QUARANTINE = "quarantine"  # fresh hosts of the image drifted again


@dataclass(frozen=True)
class Replacement:
    replacement_id: int
    host_id: str
    pool: str | None
    state: ReplacementState
    request_id: str
    action: str | None
    cause: str
    requests: int
    blocked_by: str | None
    blocked_reason: str | None
    lease_until: datetime | None
    acted_at: datetime | None
    outcome: Mapping[str, Any]
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.replacement_id,
            "host_id": self.host_id,
            "pool": self.pool,
            "state": self.state.value,
            "request_id": self.request_id,
            "action": self.action,
            "cause": self.cause,
            "requests": self.requests,
            "blocked_by": self.blocked_by,
            "blocked_reason": self.blocked_reason,
            "acted_at": iso(self.acted_at),
            "outcome": dict(self.outcome),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True)
class Hold:
    hold_id: int
    scope: Scope
    target: str
    kind: HoldKind
    reason: str
    actor: str
    created_at: datetime
    detail: Mapping[str, Any]
    released_at: datetime | None
    released_by: str | None
    release_reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.hold_id,
            "scope": self.scope.value,
            "target": self.target,
            "kind": self.kind.value,
            "reason": self.reason,
            "actor": self.actor,
            "created_at": iso(self.created_at),
            "detail": dict(self.detail),
            "released_at": iso(self.released_at),
            "released_by": self.released_by,
            "release_reason": self.release_reason,
        }


@dataclass(frozen=True)
class Incident:
    """One alert as the sinks know it, by its dedup key: firing or resolved. ``version``
    grows at each change, so a delivery can tell that what it sent is already stale."""

    dedup_key: str
    host_id: str | None
    pool: str | None
    cause: str
    status: str
    version: int
    alert: Mapping[str, Any]
    sent: Mapping[str, Any]  # by sink: {"version": n, "fired": bool}
    opened_at: datetime
    updated_at: datetime

    def fired_at(self, sink: str) -> bool:
        """Whether ``sink`` has taken this incident's firing alert."""
        return bool((self.sent.get(sink) or {}).get("fired"))


@dataclass(frozen=True)
class Session:
    """A break-glass session: announced by an operator, matched to the login the agent
    reports, ended by the operator's client or the agent's session close."""

    session_id: int
    host_id: str
    login_user: str
    actor: str
    operator: str
    reason: str
    ticket: str | None
    created_at: datetime
    expires_at: datetime
    login_at: datetime | None
    login: Mapping[str, Any]
    ended_at: datetime | None
    ended_by: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.session_id,
            "host_id": self.host_id,
            "user": self.login_user,
            "actor": self.actor,
            "operator": self.operator,
            "reason": self.reason,
            "ticket": self.ticket,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "login_at": iso(self.login_at),
            "login": dict(self.login),
            "ended_at": iso(self.ended_at),
            "ended_by": self.ended_by,
        }


@dataclass(frozen=True)
class Decision:
    """One line of the rails' audit trail: what was decided, about which host or pool, why,
    and who (the collector, or an operator's token)."""

    decision_id: int
    at: datetime
    host_id: str | None
    pool: str | None
    decision: str
    reason: str
    actor: str
    detail: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.decision_id,
            "at": iso(self.at),
            "host_id": self.host_id,
            "pool": self.pool,
            "decision": self.decision,
            "reason": self.reason,
            "actor": self.actor,
            "detail": dict(self.detail),
        }
