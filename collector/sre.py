"""The SRE routes: hosts, events, fleet, images, cohorts, operator actions, tokens.

Viewer reads; operator replaces, retires, acknowledges and registers images; admin manages
tokens. Each action is written to the audit trail with the token that did it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from agent import wire
from collector import auth, cohorts, transitions
from collector.actions.request import SAFE_VALUE
from collector.errors import Refused
from collector.keys import load_public_key
from collector.model import ApiToken, Host, HostState, Image, Role, Transition, iso
from collector.response.routes import host_view
from collector.services import services
from collector.verdicts import Observation, Signal

router = APIRouter(prefix="/v1")
Viewer = Annotated[ApiToken, Depends(auth.require(Role.VIEWER))]
log = structlog.get_logger(__name__)
Operator = Annotated[ApiToken, Depends(auth.require(Role.OPERATOR))]
Admin = Annotated[ApiToken, Depends(auth.require(Role.ADMIN))]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reason(_Body):
    reason: str = Field(min_length=1, max_length=2000)


class NewToken(_Body):
    role: Literal["viewer", "operator", "admin"]
    name: str = Field(default="", max_length=255)


class NewEnrollToken(_Body):
    note: str = Field(default="", max_length=255)
    expires_in_s: float | None = Field(default=None, gt=0)
    uses: int | None = Field(default=None, ge=1)
    pool: str | None = Field(default=None, pattern=f"^{SAFE_VALUE.pattern}$")


class ImageStatement(_Body):
    statement: dict[str, Any]


def _host_or_404(request: Request, host_id: str) -> Any:
    host = services(request).store.host(host_id)
    if host is None:
        raise Refused(404, "unknown_host", f"no host {host_id!r}")
    return host


# --- reads -----------------------------------------------------------------------------------


@router.get("/hosts", tags=["hosts"])
def list_hosts(
    request: Request, _: Viewer, state: HostState | None = None, image: str | None = None
) -> dict[str, Any]:
    """Every host, optionally only those in ``state`` or of one image build id."""
    found = services(request).store.hosts(state=state, image=image)
    return {"hosts": [h.to_json() for h in found]}


@router.get("/hosts/{host_id}", tags=["hosts"])
def show_host(request: Request, host_id: str, _: Viewer) -> dict[str, Any]:
    """One host, with its recent findings and its audit trail."""
    store = services(request).store
    host = _host_or_404(request, host_id)
    return {
        **host.to_json(),
        "findings": [f.to_json() for f in store.findings(host_id, limit=50)],
        "transitions": [t.to_json() for t in store.transitions(host_id, limit=50)],
        **host_view(request, host_id),
    }


@router.get("/hosts/{host_id}/events", tags=["hosts"])
def host_events(
    request: Request, host_id: str, _: Viewer, limit: int = Query(100, ge=1, le=1000)
) -> dict[str, Any]:
    """Reports and transitions of one host, newest first."""
    store = services(request).store
    _host_or_404(request, host_id)
    events: list[dict[str, Any]] = [
        {
            "at": iso(r.received_at),
            "type": "report",
            "seq": r.seq,
            "kind": r.kind,
            "time": r.time,
            "body": dict(r.body),
        }
        for r in store.reports(host_id, limit=limit)
    ]
    events += [{"type": "transition", **t.to_json()} for t in store.transitions(host_id)]
    events.sort(key=lambda e: e["at"] or "", reverse=True)
    return {"host_id": host_id, "events": events[:limit]}


@router.get("/fleet", tags=["fleet"])
def fleet(request: Request, _: Viewer) -> dict[str, Any]:
    """A summary: hosts by state, by pool and by image; open fleet events; job queues."""
    store = services(request).store
    states: dict[str, int] = {s.value: 0 for s in HostState}
    pools: dict[str, dict[str, int]] = {}
    by_image: dict[str, int] = {}
    for pool, image, state, n in store.group_counts():
        states[state] = states.get(state, 0) + n
        per_pool = pools.setdefault(pool or "", {})
        per_pool[state] = per_pool.get(state, 0) + n
        by_image[image or ""] = by_image.get(image or "", 0) + n
    registered = {i.build_id for i in store.images()}
    jobs: dict[str, dict[str, int]] = {}
    for (kind, state), n in store.job_counts().items():
        jobs.setdefault(kind, {})[state] = n
    return {
        "hosts": sum(states.values()),
        "states": states,
        "pools": pools,
        "images": [
            {"build_id": b, "hosts": n, "registered": b in registered}
            for b, n in sorted(by_image.items())
        ],
        "fleet_events": [e.to_json() for e in store.fleet_events(open_only=True)],
        "jobs": jobs,
    }


@router.get("/images", tags=["images"])
def list_images(request: Request, _: Viewer) -> dict[str, Any]:
    """Registered images: build id, Merkle root, signing key."""
    return {"images": [i.to_json() for i in services(request).store.images()]}


@router.get("/images/{build_id}/cohort", tags=["images"])
def image_cohort(request: Request, build_id: str, _: Viewer) -> dict[str, Any]:
    """The hosts of one image compared with each other: who is the odd one out, and where."""
    store = services(request).store
    members = store.hosts(image=build_id)
    return cohorts.compare(build_id, members, store.drift_paths([h.host_id for h in members]))


# --- operator actions ------------------------------------------------------------------------


def _act(
    request: Request, host_id: str, signal: Signal, cause: str, token: ApiToken, why: str
) -> Any:
    store = services(request).store
    with store.transaction() as tx:
        host = tx.lock_host(host_id)
        if host is None:
            raise Refused(404, "unknown_host", f"no host {host_id!r}")
        moved = transitions.apply(
            tx, host, Observation(signal, cause, {"reason": why}), actor=auth.actor(token)
        )
        if moved is host:
            raise Refused(
                409,
                "invalid_transition",
                f"a host in state {host.state.value} cannot be {signal.value.replace('_', ' ')}",
                state=host.state.value,
            )
    return moved.to_json()


@router.post("/hosts/{host_id}/replace", tags=["actions"])
def replace_host(request: Request, host_id: str, body: Reason, token: Operator) -> Any:
    """Ask for the host to be replaced (its replacement job applies the safety rails)."""
    return _act(request, host_id, Signal.REPLACEMENT_REQUESTED, "operator", token, body.reason)


@router.post("/hosts/{host_id}/retire", tags=["actions"])
def retire_host(request: Request, host_id: str, body: Reason, token: Operator) -> Any:
    """Take a host out of the fleet for good (its alerts are resolved)."""
    return _act(request, host_id, Signal.RETIRE, "operator", token, body.reason)


def _audit(
    request: Request, host_id: str, cause: str, token: ApiToken, reason: str, **values: Any
) -> Host:
    """Write an audit line that leaves the host's state as it is (and set ``values``)."""
    store = services(request).store
    with store.transaction() as tx:
        host = tx.lock_host(host_id)
        if host is None:
            raise Refused(404, "unknown_host", f"no host {host_id!r}")
        evidence = {"reason": reason, "state_cause": host.state_cause}
        actor = auth.actor(token)
        tx.add_transition(
            Transition(host_id, host.state, host.state, cause, actor, tx.now, evidence)
        )
        if values:
            tx.update_host(host_id, values)
    return host


@router.post("/hosts/{host_id}/acknowledge", tags=["actions"])
def acknowledge_host(request: Request, host_id: str, body: Reason, token: Operator) -> Any:
    """Record that on-call has seen the host's state; written to the audit trail."""
    host = _audit(request, host_id, "acknowledged", token, body.reason)
    return {"host_id": host_id, "state": host.state.value, "acknowledged": True}


@router.post("/hosts/{host_id}/rekey", tags=["actions"])
def rekey_host(request: Request, host_id: str, body: Reason, token: Operator) -> Any:
    """Allow the host's next enrollment with a new key (its chain restarts under it); until
    then a new key is refused (409 key_mismatch). Written to the audit trail."""
    actor = auth.actor(token)
    host = _audit(request, host_id, "rekey_allowed", token, body.reason, rekey_allowed_by=actor)
    log.warning("host_rekey_allowed", host_id=host_id, actor=actor, reason=body.reason)
    return {"host_id": host_id, "state": host.state.value, "rekey_allowed_by": actor}


@router.post("/images", tags=["images"], status_code=201)
def register_image(request: Request, body: ImageStatement, token: Operator) -> dict[str, Any]:
    """Register a baked image from its manifest statement, signed by a pipeline key the
    collector trusts (``[images] pipeline_public_keys``)."""
    svc = services(request)
    try:
        statement = wire.check_statement(body.statement)
    except wire.WireError as exc:
        raise Refused(400, exc.code, str(exc)) from exc
    keys = [load_public_key(Path(p)) for p in svc.config.images.pipeline_public_keys]
    if not keys:
        raise Refused(409, "no_pipeline_key", "no pipeline public key is configured ([images])")
    for key in keys:
        try:
            wire.verify_statement(statement, key)
            break
        except wire.BadSignatureError:
            continue
    else:
        raise Refused(400, "bad_signature", "no configured pipeline key verifies this manifest")
    image = Image(
        build_id=statement["build_id"],
        root=statement["root"],
        key_id=str(statement.get("key_id") or ""),
        policy_digest=statement["policy_digest"],
        created=statement["created"],
        registered_at=svc.store.clock(),
        statement=statement,
    )
    stored = svc.store.put_image(image)
    if stored.root != image.root:
        raise Refused(
            409,
            "image_conflict",
            f"build {image.build_id!r} is registered with another root",
            registered_root=stored.root,
        )
    return stored.to_json()


# --- tokens ----------------------------------------------------------------------------------


@router.get("/tokens", tags=["tokens"])
def list_tokens(request: Request, _: Admin) -> dict[str, Any]:
    """SRE tokens (never their secrets)."""
    return {"tokens": [t.to_json() for t in services(request).store.api_tokens()]}


@router.post("/tokens", tags=["tokens"], status_code=201)
def create_token(request: Request, body: NewToken, _: Admin) -> dict[str, Any]:
    """A new SRE token; its secret is in this answer and nowhere else, ever."""
    secret, record = auth.create_api_token(
        services(request).store, Role.parse(body.role), body.name
    )
    return {**record.to_json(), "token": secret}


@router.delete("/tokens/{token_id}", tags=["tokens"])
def revoke_token(request: Request, token_id: int, _: Admin) -> dict[str, Any]:
    if not services(request).store.revoke_api_token(token_id):
        raise Refused(404, "unknown_token", f"no live token {token_id}")
    return {"id": token_id, "revoked": True}


@router.get("/enroll-tokens", tags=["tokens"])
def list_enroll_tokens(request: Request, _: Admin) -> dict[str, Any]:
    return {"tokens": [t.to_json() for t in services(request).store.enroll_tokens()]}


@router.post("/enroll-tokens", tags=["tokens"], status_code=201)
def create_enroll_token(request: Request, body: NewEnrollToken, _: Admin) -> dict[str, Any]:
    """A new enrollment token (optional expiry and number of uses); shown once."""
    try:
        secret, record = auth.create_enroll_token(
            services(request).store,
            note=body.note,
            expires_in_s=body.expires_in_s,
            uses=body.uses,
            pool=body.pool,
        )
    except ValueError as exc:
        raise Refused(400, "malformed", str(exc)) from exc
    return {**record.to_json(), "token": secret}


@router.delete("/enroll-tokens/{token_id}", tags=["tokens"])
def revoke_enroll_token(request: Request, token_id: int, _: Admin) -> dict[str, Any]:
    if not services(request).store.revoke_enroll_token(token_id):
        raise Refused(404, "unknown_token", f"no live enrollment token {token_id}")
    return {"id": token_id, "revoked": True}
