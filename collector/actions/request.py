"""A replacement request, its outcome, and the ``ReplacementAction`` protocol.

``request_id`` is the idempotency key: the same request carried out twice (a worker killed
after acting, before recording) must not replace twice, so every action checks first and
answers ``already`` when the host is already on its way out. ``dry_run`` decides nothing:
the action says what it would do (``would_replace``) and touches nothing.

Every value an action receives (and a command may put into its argv) matches ``SAFE_VALUE``
(no leading dash, no spaces, quotes, brackets or control characters, no ``.``/``..`` path
segment); anything else is refused before an action sees it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, get_args, runtime_checkable

import structlog

from collector.actions.errors import MalformedRequestError

log = structlog.get_logger(__name__)

OutcomeStatus = Literal["done", "already", "failed", "would_replace"]
OUTCOME_STATUSES: Final[tuple[OutcomeStatus, ...]] = get_args(OutcomeStatus)
Check = Literal["gone", "leaving", "stayed", "unknown"]
SAFE_VALUE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}")
TARGETS: Final = ("request_id", "host_id", "pool")


def safe_value(name: str, value: object) -> str:
    """``value`` if it is a string matching ``SAFE_VALUE`` with no ``.`` or ``..`` path
    segment; otherwise MalformedRequestError."""
    if not isinstance(value, str) or not SAFE_VALUE.fullmatch(value):
        raise MalformedRequestError(
            f"{name} = {value!r} is refused: an action target must match {SAFE_VALUE.pattern}"
        )
    if {".", ".."} & set(value.split("/")):
        raise MalformedRequestError(f"{name} = {value!r} is refused: a '.' or '..' segment")
    return value


@dataclass(frozen=True, kw_only=True)
class ReplacementRequest:
    request_id: str
    host_id: str
    instance_id: str | None
    pool: str
    reason: str
    dry_run: bool = False

    def __post_init__(self) -> None:
        for name in TARGETS:
            safe_value(name, getattr(self, name))
        if self.instance_id is not None:
            safe_value("instance_id", self.instance_id)
        if not isinstance(self.reason, str) or not isinstance(self.dry_run, bool):
            raise MalformedRequestError("reason must be a string and dry_run true or false")

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "host_id": self.host_id,
            "instance_id": self.instance_id,
            "pool": self.pool,
            "reason": self.reason,
            "dry_run": self.dry_run,
        }

    @classmethod
    def from_json(cls, obj: Any) -> ReplacementRequest:
        expected = set(cls.__dataclass_fields__)
        if not isinstance(obj, dict) or set(obj) != expected:
            raise MalformedRequestError(f"a replacement request has exactly {sorted(expected)}")
        return cls(**obj)


@dataclass(frozen=True)
class ActionOutcome:
    """What an action did. ``facts`` are recorded on the host (exit code, output tail, ids)."""

    status: OutcomeStatus
    detail: str
    retryable: bool = False
    facts: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in OUTCOME_STATUSES:
            raise ValueError(f"status = {self.status!r} is not one of {list(OUTCOME_STATUSES)}")
        if self.retryable and self.status != "failed":
            raise ValueError("only a failed outcome can be retryable")
        object.__setattr__(self, "facts", MappingProxyType(dict(self.facts)))

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "detail": self.detail,
            "retryable": self.retryable,
            "facts": dict(self.facts),
        }


def failed(detail: str, *, retryable: bool, **facts: Any) -> ActionOutcome:
    return ActionOutcome("failed", detail, retryable=retryable, facts=facts)


def logged(
    action: str, request: ReplacementRequest, outcome: ActionOutcome, **context: Any
) -> ActionOutcome:
    """Log ``replacement_action`` for ``outcome`` and return it."""
    log.info(
        "replacement_action",
        action=action,
        request_id=request.request_id,
        host_id=request.host_id,
        dry_run=request.dry_run,
        status=outcome.status,
        detail=outcome.detail,
        **context,
    )
    return outcome


class ReplacementAction(Protocol):
    """Something that replaces a host; ``replace`` never raises for a failed replacement.
    ``timeout_s`` bounds one ``replace`` call (the outbox leases the replacement that long)."""

    name: str
    timeout_s: float

    def replace(self, request: ReplacementRequest) -> ActionOutcome: ...

    def close(self) -> None: ...


@runtime_checkable
class Verifier(Protocol):
    """An action that can tell, some time after acting, whether the host went away:
    ``gone``, ``leaving`` (on its way out), ``stayed`` (the request had no effect: ask again)
    or ``unknown``. Actions without it are judged by whether the host still reports."""

    def check(self, request: ReplacementRequest) -> Check: ...


@runtime_checkable
class CapacityReader(Protocol):
    """An action that can read its pool's desired capacity (for ``budget_percent``)."""

    @property
    def reads_capacity(self) -> bool: ...

    def desired_capacity(self) -> int: ...
