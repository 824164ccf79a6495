"""The collector's records: host states, roles, and the rows the store hands back.

Everything here is a frozen dataclass or an enum, with no behaviour beyond naming things; the
rules live in ``verdicts`` and the storage in ``store``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class HostState(enum.StrEnum):
    """Where a host stands; ``docs/host-states.md`` draws the machine."""

    ENROLLED = "enrolled"
    CLEAN = "clean"
    DRIFTED = "drifted"
    TAINTED = "tainted"
    SILENT = "silent"
    SUSPECT = "suspect"
    REPLACEMENT_REQUESTED = "replacement_requested"
    REPLACING = "replacing"
    REPLACED = "replaced"
    RETIRED = "retired"


GONE_STATES = frozenset({HostState.REPLACED, HostState.RETIRED})


class Role(enum.IntEnum):
    """SRE token roles; a higher role may do everything a lower one may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            known = ", ".join(r.name.lower() for r in cls)
            raise ValueError(f"unknown role {name!r}; known: {known}") from None

    @property
    def label(self) -> str:
        return self.name.lower()


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"


OPEN_JOB_STATES = (JobState.PENDING, JobState.RUNNING)


@dataclass(frozen=True)
class Host:
    host_id: str
    state: HostState
    state_since: datetime
    state_cause: str
    resume_state: HostState | None
    key_id: str
    public_key: bytes = field(repr=False)
    hostname: str
    pool: str | None
    boot_id: str
    agent_version: str
    image_build_id: str | None
    image_root: str | None
    cloud_image_id: str | None
    measured_root: str | None
    enrolled_at: datetime
    last_seen_at: datetime | None
    envelopes: int
    health: Mapping[str, Any]
    rekey_allowed_by: str | None = None  # an operator allowed the next enrollment's new key
    refused_key_id: str | None = None  # the last new key refused (key_mismatch)

    def to_json(self) -> dict[str, Any]:
        return {
            "host_id": self.host_id,
            "state": self.state.value,
            "state_since": iso(self.state_since),
            "state_cause": self.state_cause,
            "key_id": self.key_id,
            "hostname": self.hostname,
            "pool": self.pool,
            "boot_id": self.boot_id,
            "agent_version": self.agent_version,
            "image": {
                "build_id": self.image_build_id,
                "root": self.image_root,
                "cloud_image_id": self.cloud_image_id,
            },
            "measured_root": self.measured_root,
            "enrolled_at": iso(self.enrolled_at),
            "last_seen_at": iso(self.last_seen_at),
            "envelopes": self.envelopes,
            "health": dict(self.health),
            "rekey_allowed_by": self.rekey_allowed_by,
            "refused_key_id": self.refused_key_id,
        }


@dataclass(frozen=True)
class Transition:
    """One line of the audit trail: a host moved from one state to another, and why."""

    host_id: str
    from_state: HostState | None
    to_state: HostState
    cause: str
    actor: str
    at: datetime
    evidence: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "host_id": self.host_id,
            "from": self.from_state.value if self.from_state else None,
            "to": self.to_state.value,
            "cause": self.cause,
            "actor": self.actor,
            "at": iso(self.at),
            "evidence": dict(self.evidence),
        }


@dataclass(frozen=True)
class Finding:
    """One finding as stored: which envelope carried it, and what it says."""

    host_id: str
    seq: int
    source: str
    type: str
    severity: str
    drift: bool
    path: str | None
    at: datetime
    detail: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "source": self.source,
            "type": self.type,
            "severity": self.severity,
            "drift": self.drift,
            "path": self.path,
            "at": iso(self.at),
            "detail": dict(self.detail),
        }


@dataclass(frozen=True)
class Report:
    """A stored envelope, as the events view shows it."""

    host_id: str
    seq: int
    kind: str
    time: str
    received_at: datetime
    digest: str
    body: Mapping[str, Any]


@dataclass(frozen=True)
class JobSpec:
    """A job to enqueue; ``dedup_key`` is unique among the open jobs of one kind."""

    kind: str
    dedup_key: str
    payload: Mapping[str, Any]
    run_at: datetime | None = None


@dataclass(frozen=True)
class Job:
    job_id: int
    kind: str
    dedup_key: str
    payload: Mapping[str, Any]
    state: JobState
    attempts: int
    next_attempt_at: datetime
    claimed_by: str | None
    lease_until: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class ApiToken:
    token_id: int
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.token_id,
            "name": self.name,
            "role": self.role.label,
            "created_at": iso(self.created_at),
            "revoked_at": iso(self.revoked_at),
        }


@dataclass(frozen=True)
class EnrollToken:
    token_id: int
    note: str
    created_at: datetime
    expires_at: datetime | None
    uses_left: int | None
    uses: int
    revoked_at: datetime | None
    pool: str | None = None  # hosts enrolled with it belong to this pool, whatever they claim

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.token_id,
            "note": self.note,
            "pool": self.pool,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "uses_left": self.uses_left,
            "uses": self.uses,
            "revoked_at": iso(self.revoked_at),
        }


@dataclass(frozen=True)
class Image:
    build_id: str
    root: str
    key_id: str
    policy_digest: str
    created: str
    registered_at: datetime
    statement: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "build_id": self.build_id,
            "root": self.root,
            "key_id": self.key_id,
            "policy_digest": self.policy_digest,
            "created": self.created,
            "registered_at": iso(self.registered_at),
        }


@dataclass(frozen=True)
class FleetEvent:
    """Something about the whole fleet rather than one host (many hosts silent at once)."""

    event_id: int
    kind: str
    opened_at: datetime
    closed_at: datetime | None
    detail: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.event_id,
            "kind": self.kind,
            "opened_at": iso(self.opened_at),
            "closed_at": iso(self.closed_at),
            "detail": dict(self.detail),
        }


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None
