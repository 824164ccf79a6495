"""The response's API routes: holds and releases, replacements and the rails' decisions,
pools, and break-glass sessions.

Viewer reads; operator holds, releases and opens break-glass sessions. Every action is in
the rails' audit trail (``decisions``) with the token that did it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from collector import auth
from collector.errors import Refused
from collector.model import ApiToken, Host, JobSpec, Role
from collector.response import breakglass, ledger, rails, sessions
from collector.response.records import HoldKind, ReplacementState, Scope
from collector.response.replace import WANTS_REPLACEMENT
from collector.services import services
from collector.store.tx import SqlTx
from collector.verdicts import REPLACE

router = APIRouter(prefix="/v1")
Viewer = Annotated[ApiToken, Depends(auth.require(Role.VIEWER))]
Operator = Annotated[ApiToken, Depends(auth.require(Role.OPERATOR))]
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LOGIN = r"^[a-z_][a-z0-9_.-]{0,31}\$?$"
PoolName = Annotated[str, Path(pattern=NAME)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reason(_Body):
    reason: str = Field(min_length=1, max_length=2000)


class Announce(_Body):
    reason: str = Field(min_length=1, max_length=2000)
    user: str = Field(pattern=LOGIN)
    ticket: str | None = Field(default=None, max_length=255)
    operator: str = Field(default="", max_length=255)


def _host(tx: SqlTx, host_id: str) -> Host:
    host = tx.lock_host(host_id)
    if host is None:
        raise Refused(404, "unknown_host", f"no host {host_id!r}")
    return host


def host_view(request: Request, host_id: str) -> dict[str, Any]:
    """What the host view adds: its replacement (and what blocks it), holds, break-glass
    sessions and the rails' recent decisions."""
    with ledger.reading(services(request).store) as tx:
        latest = ledger.latest_replacement(tx, host_id)
        return {
            "replacement": latest.to_json() if latest else None,
            "holds": [h.to_json() for h in ledger.open_holds(tx, Scope.HOST, host_id)],
            "breakglass": [s.to_json() for s in sessions.of_host(tx, host_id, lock=False)][-5:],
            "decisions": [d.to_json() for d in ledger.list_decisions(tx, host_id=host_id)][:20],
        }


# --- reads -----------------------------------------------------------------------------------


@router.get("/replacements", tags=["response"])
def list_replacements(
    request: Request,
    _: Viewer,
    state: ReplacementState | None = None,
    pool: str | None = None,
    limit: int = Query(500, ge=1, le=5000),
) -> dict[str, Any]:
    """Replacements, newest first: ``state=blocked`` lists the hosts a rail holds, and why."""
    with ledger.reading(services(request).store) as tx:
        found = ledger.list_replacements(
            tx, state=state.value if state else None, pool=pool, limit=limit
        )
    return {"replacements": [r.to_json() for r in found]}


@router.get("/holds", tags=["response"])
def list_holds(request: Request, _: Viewer, released: bool = False) -> dict[str, Any]:
    """Open holds (operator holds, paused pools, quarantined images); ``released=true`` adds
    the released ones."""
    with ledger.reading(services(request).store) as tx:
        found = ledger.list_holds(tx, open_only=not released)
    return {"holds": [h.to_json() for h in found]}


@router.get("/decisions", tags=["response"])
def list_decisions(
    request: Request,
    _: Viewer,
    host_id: str | None = None,
    pool: str | None = None,
    limit: int = Query(100, ge=1, le=5000),
) -> dict[str, Any]:
    """The rails' audit trail, newest first."""
    with ledger.reading(services(request).store) as tx:
        found = ledger.list_decisions(tx, host_id=host_id, pool=pool, limit=limit)
    return {"decisions": [d.to_json() for d in found]}


@router.get("/pools", tags=["response"])
def list_pools(request: Request, _: Viewer) -> dict[str, Any]:
    """Every configured pool: its rails, replacements in flight, blocked hosts and holds."""
    svc = services(request)
    out = []
    with ledger.reading(svc.store) as tx:
        for pool in svc.config.response.pools.values():
            capacity = pool.desired_capacity
            if pool.desired_capacity_from == "hosts":
                capacity = ledger.live_hosts(tx, pool.name)
            out.append(
                {
                    "name": pool.name,
                    "action": pool.action,
                    "dry_run": pool.dry_run,
                    "desired_capacity": capacity,
                    "desired_capacity_from": pool.desired_capacity_from,
                    "budget": pool.budget,
                    "budget_percent": pool.budget_percent,
                    "budget_limit": (
                        pool.budget_limit(capacity)
                        if pool.desired_capacity_from != "action"
                        else None
                    ),
                    "in_flight": ledger.in_flight(tx, pool.name),
                    "blocked": len(ledger.blocked_hosts(tx, pool.name)),
                    "storm": {"hosts": pool.storm_hosts, "window_s": pool.storm_window_s},
                    "holds": [h.to_json() for h in ledger.open_holds(tx, Scope.POOL, pool.name)],
                }
            )
    return {"pools": out}


# --- holds and releases ----------------------------------------------------------------------


def _hold(request: Request, scope: Scope, target: str, token: ApiToken, why: str) -> Any:
    store = services(request).store
    actor = auth.actor(token)
    with ledger.transaction(store) as tx:
        pool: str | None = None
        if scope is Scope.HOST:
            pool = _host(tx, target).pool
        elif scope is Scope.POOL:
            pool = target
        hold = ledger.add_hold(tx, scope, target, HoldKind.OPERATOR, reason=why, actor=actor)
        if hold is None:
            raise Refused(409, "already_held", f"{scope.value} {target!r} is already held")
        ledger.decide(
            tx,
            "hold",
            why,
            host_id=target if scope is Scope.HOST else None,
            pool=pool,
            actor=actor,
            detail={"scope": scope.value, "target": target, "hold": hold.hold_id},
        )
    return hold.to_json()


def _release(request: Request, scope: Scope, target: str, token: ApiToken, why: str) -> Any:
    store = services(request).store
    actor = auth.actor(token)
    with ledger.transaction(store) as tx:
        host = _host(tx, target) if scope is Scope.HOST else None
        released = ledger.release_holds(tx, scope, target, actor=actor, reason=why)
        retried = host is not None and _retry(tx, host)
        if not released and not retried:
            raise Refused(409, "not_held", f"nothing holds {scope.value} {target!r}")
        for hold in released:
            _resolve_pages(tx, hold.kind, hold.detail, target)
        pool = host.pool if host is not None else target if scope is Scope.POOL else None
        ledger.decide(
            tx,
            "release",
            why,
            host_id=target if scope is Scope.HOST else None,
            pool=pool,
            actor=actor,
            detail={
                "scope": scope.value,
                "target": target,
                "released": [h.hold_id for h in released],
                "retried": retried,
            },
        )
        woken = [target] if scope is Scope.HOST else ledger.blocked_hosts(tx, pool)
        ledger.wake(tx, REPLACE, woken)
    return {
        "scope": scope.value,
        "target": target,
        "released": [h.to_json() for h in released],
        "retried": retried,
    }


def _retry(tx: SqlTx, host: Host) -> bool:
    """After a failed replacement, a release lets the rails take the host again."""
    latest = ledger.latest_replacement(tx, host.host_id)
    if latest is None or latest.state is not ReplacementState.FAILED:
        return False
    if host.state not in WANTS_REPLACEMENT:
        return False
    payload = {"host_id": host.host_id, "pool": host.pool, "cause": latest.cause}
    return tx.enqueue(JobSpec(REPLACE, host.host_id, payload))


def _resolve_pages(tx: SqlTx, kind: HoldKind, detail: Any, target: str) -> None:
    if kind is HoldKind.STORM:
        tx.enqueue(rails.pool_alert("resolve", target, rails.STORM_CAUSE))
    elif kind is HoldKind.QUARANTINE and detail.get("pool"):
        tx.enqueue(rails.pool_alert("resolve", str(detail["pool"]), rails.QUARANTINE_CAUSE))


@router.post("/hosts/{host_id}/hold", tags=["response"], status_code=201)
def hold_host(request: Request, host_id: str, body: Reason, token: Operator) -> Any:
    """Hold a host: it is alerted on but not replaced until released."""
    return _hold(request, Scope.HOST, host_id, token, body.reason)


@router.post("/hosts/{host_id}/release", tags=["response"])
def release_host(request: Request, host_id: str, body: Reason, token: Operator) -> Any:
    """Release a host's holds (or retry its failed replacement)."""
    return _release(request, Scope.HOST, host_id, token, body.reason)


@router.post("/pools/{pool}/hold", tags=["response"], status_code=201)
def hold_pool(request: Request, pool: PoolName, body: Reason, token: Operator) -> Any:
    """Hold a pool: none of its hosts is replaced until released."""
    return _hold(request, Scope.POOL, pool, token, body.reason)


@router.post("/pools/{pool}/release", tags=["response"])
def release_pool(request: Request, pool: PoolName, body: Reason, token: Operator) -> Any:
    """Release a pool's holds; this is also how a storm-paused pool is resumed."""
    return _release(request, Scope.POOL, pool, token, body.reason)


@router.post("/images/{build_id}/hold", tags=["response"], status_code=201)
def hold_image(request: Request, build_id: str, body: Reason, token: Operator) -> Any:
    """Quarantine an image by hand: pools whose newest image it is are not replaced."""
    return _hold(request, Scope.IMAGE, build_id, token, body.reason)


@router.post("/images/{build_id}/release", tags=["response"])
def release_image(request: Request, build_id: str, body: Reason, token: Operator) -> Any:
    """Lift an image's quarantine."""
    return _release(request, Scope.IMAGE, build_id, token, body.reason)


# --- break-glass -----------------------------------------------------------------------------


@router.post("/hosts/{host_id}/breakglass", tags=["response"], status_code=201)
def announce_breakglass(request: Request, host_id: str, body: Announce, token: Operator) -> Any:
    """Announce an SSH session: the login is expected, attributed, and the host's replacement
    waits until the session ends plus the grace period."""
    svc = services(request)
    settings = svc.config.response.breakglass
    with ledger.transaction(svc.store) as tx:
        host = _host(tx, host_id)
        session = breakglass.announce(
            tx,
            host,
            login_user=body.user,
            actor=auth.actor(token),
            operator=body.operator or auth.actor(token),
            reason=body.reason,
            ticket=body.ticket,
            settings=settings,
        )
        replacement = ledger.open_replacement(tx, host_id)
    return {
        **session.to_json(),
        "hostname": host.hostname,
        "grace_s": settings.grace_s,
        "replacement": replacement.state.value if replacement else None,
    }


@router.post("/breakglass/{session_id}/end", tags=["response"])
def end_breakglass(request: Request, session_id: int, token: Operator) -> Any:
    """The session is over: the host's replacement may go after the grace period."""
    with ledger.transaction(services(request).store) as tx:
        session = sessions.session_by_id(tx, session_id)
        if session is None:
            raise Refused(404, "unknown_session", f"no break-glass session {session_id}")
        ended = breakglass.end(tx, session, by="client", actor=auth.actor(token))
    return ended.to_json()
