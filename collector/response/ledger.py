"""The response's tables — replacements, holds, drift marks, decisions and the jobs it wakes —
read and written inside the caller's transaction. Incidents (``incidents``) and break-glass
sessions (``sessions``) have modules of their own.

Every function takes the ``SqlTx`` of the unit of work it belongs to, so that a decision, the
state change it causes and the jobs it queues commit together. Locking reads use ``FOR
UPDATE`` (rendered on PostgreSQL; SQLite's write transaction already holds its one lock).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, Row, Table, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from collector.model import GONE_STATES, HostState, JobState
from collector.response.records import (
    IN_FLIGHT,
    OPEN_REPLACEMENT,
    Decision,
    Hold,
    HoldKind,
    Replacement,
    ReplacementState,
    Scope,
)
from collector.store import SqlStore, Store, rows
from collector.store.schema import (
    decisions,
    drift_marks,
    holds,
    hosts,
    jobs,
    replacements,
)
from collector.store.tx import SqlTx


@contextmanager
def transaction(store: Store) -> Iterator[SqlTx]:
    """The store's transaction, as the SQL unit of work this module needs."""
    assert isinstance(store, SqlStore), "the response needs the SQL store"
    with store.transaction() as tx:
        yield tx


@contextmanager
def reading(store: Store) -> Iterator[SqlTx]:
    """A read-only transaction (``SqlStore.read_transaction``) for the views."""
    assert isinstance(store, SqlStore), "the response needs the SQL store"
    with store.read_transaction() as tx:
        yield tx


def _insert(tx: SqlTx, table: Table) -> Insert:
    """The dialect's INSERT, which has ``on_conflict_do_nothing``."""
    if tx.conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


# --- replacements -----------------------------------------------------------------------------


def _replacement(row: Row[Any]) -> Replacement:
    return rows.record(Replacement, row, id_field="replacement_id")


def open_replacement(tx: SqlTx, host_id: str) -> Replacement | None:
    """The host's one open replacement (blocked, acting or verifying), locked."""
    r = replacements.c
    row = tx.conn.execute(
        select(replacements)
        .where(r.host_id == host_id, r.state.in_([s.value for s in OPEN_REPLACEMENT]))
        .with_for_update()
    ).first()
    return _replacement(row) if row else None


def latest_replacement(tx: SqlTx, host_id: str) -> Replacement | None:
    r = replacements.c
    row = tx.conn.execute(
        select(replacements).where(r.host_id == host_id).order_by(r.id.desc()).limit(1)
    ).first()
    return _replacement(row) if row else None


def insert_replacement(
    tx: SqlTx, *, host_id: str, pool: str | None, action: str | None, cause: str
) -> Replacement:
    """A new open replacement for the host (blocked until the rails let it go); the unique
    index on open replacements refuses a second one for the same host."""
    new_id = tx.conn.execute(
        replacements.insert()
        .values(
            host_id=host_id,
            pool=pool,
            state=ReplacementState.BLOCKED.value,
            request_id="rq-" + uuid.uuid4().hex,
            action=action,
            cause=cause,
            requests=0,
            outcome={},
            created_at=tx.now,
            updated_at=tx.now,
        )
        .returning(replacements.c.id)
    ).scalar_one()
    row = tx.conn.execute(select(replacements).where(replacements.c.id == new_id)).one()
    return _replacement(row)


def update_replacement(tx: SqlTx, replacement_id: int, **values: Any) -> None:
    if "state" in values and isinstance(values["state"], ReplacementState):
        values["state"] = values["state"].value
    tx.conn.execute(
        update(replacements)
        .where(replacements.c.id == replacement_id)
        .values(updated_at=tx.now, **values)
    )


def in_flight(tx: SqlTx, pool: str) -> int:
    """Replacements of ``pool`` acting or waiting to be verified: what the budget counts."""
    r = replacements.c
    count = tx.conn.execute(
        select(func.count())
        .select_from(replacements)
        .where(r.pool == pool, r.state.in_([s.value for s in IN_FLIGHT]))
    ).scalar()
    return int(count or 0)


def blocked_hosts(tx: SqlTx, pool: str | None = None) -> list[str]:
    r = replacements.c
    query = select(r.host_id).where(r.state == ReplacementState.BLOCKED.value)
    if pool is not None:
        query = query.where(r.pool == pool)
    return list(tx.conn.execute(query).scalars())


def list_replacements(
    tx: SqlTx, *, state: str | None = None, pool: str | None = None, limit: int = 500
) -> list[Replacement]:
    r = replacements.c
    query = select(replacements).order_by(r.id.desc()).limit(limit)
    if state is not None:
        query = query.where(r.state == state)
    if pool is not None:
        query = query.where(r.pool == pool)
    return [_replacement(row) for row in tx.conn.execute(query)]


def acted_between(tx: SqlTx, pool: str, start: datetime, end: datetime) -> bool:
    """Whether a replacement of ``pool`` was requested between ``start`` and ``end``: a host
    enrolled soon after is one of the replacements."""
    r = replacements.c
    found = tx.conn.execute(
        select(r.id).where(r.pool == pool, r.acted_at >= start, r.acted_at < end).limit(1)
    ).first()
    return found is not None


def live_hosts(tx: SqlTx, pool: str) -> int:
    """Hosts of ``pool`` that are not replaced or retired."""
    count = tx.conn.execute(
        select(func.count())
        .select_from(hosts)
        .where(hosts.c.pool == pool, hosts.c.state.not_in([s.value for s in GONE_STATES]))
    ).scalar()
    return int(count or 0)


def newest_image(tx: SqlTx, pool: str) -> str | None:
    """The image of the pool's most recently enrolled live host: what replacements run."""
    image: str | None = tx.conn.execute(
        select(hosts.c.image_build_id)
        .where(hosts.c.pool == pool, hosts.c.state.not_in([s.value for s in GONE_STATES]))
        .order_by(hosts.c.enrolled_at.desc())
        .limit(1)
    ).scalar()
    return image


# --- holds ------------------------------------------------------------------------------------


def _hold(row: Row[Any]) -> Hold:
    return rows.record(Hold, row, id_field="hold_id")


def lock_hold(tx: SqlTx, hold_id: int) -> Hold | None:
    """The hold as it is now, its row locked until the transaction ends (for an update made
    from what it holds)."""
    row = tx.conn.execute(select(holds).where(holds.c.id == hold_id).with_for_update()).first()
    return _hold(row) if row is not None else None


def open_holds(tx: SqlTx, scope: Scope, target: str) -> list[Hold]:
    h = holds.c
    query = (
        select(holds)
        .where(h.scope == scope.value, h.target == target, h.released_at.is_(None))
        .order_by(h.id)
    )
    return [_hold(row) for row in tx.conn.execute(query)]


def add_hold(
    tx: SqlTx,
    scope: Scope,
    target: str,
    kind: HoldKind,
    *,
    reason: str,
    actor: str,
    detail: Mapping[str, Any] | None = None,
) -> Hold | None:
    """Place a hold; None when one of that kind is already open on the target."""
    new_id = tx.conn.execute(
        _insert(tx, holds)
        .values(
            scope=scope.value,
            target=target,
            kind=kind.value,
            reason=reason,
            actor=actor,
            created_at=tx.now,
            detail=dict(detail or {}),
        )
        .on_conflict_do_nothing()  # type: ignore[attr-defined]
        .returning(holds.c.id)
    ).scalar()
    if new_id is None:
        return None
    return _hold(tx.conn.execute(select(holds).where(holds.c.id == new_id)).one())


def update_hold_detail(tx: SqlTx, hold_id: int, detail: Mapping[str, Any]) -> None:
    tx.conn.execute(update(holds).where(holds.c.id == hold_id).values(detail=dict(detail)))


def release_holds(tx: SqlTx, scope: Scope, target: str, *, actor: str, reason: str) -> list[Hold]:
    """Release every open hold on the target; return them as they were."""
    released = open_holds(tx, scope, target)
    if released:
        tx.conn.execute(
            update(holds)
            .where(holds.c.id.in_([h.hold_id for h in released]))
            .values(released_at=tx.now, released_by=actor, release_reason=reason)
        )
    return released


def last_release(tx: SqlTx, scope: Scope, target: str, kind: HoldKind) -> datetime | None:
    h = holds.c
    when: datetime | None = tx.conn.execute(
        select(func.max(h.released_at)).where(
            h.scope == scope.value, h.target == target, h.kind == kind.value
        )
    ).scalar()
    return when


def decided_since(tx: SqlTx, host_id: str, decision: str, since: datetime) -> bool:
    """Whether ``decision`` was recorded for ``host_id`` at or after ``since``."""
    d = decisions.c
    query = select(d.id).where(d.host_id == host_id, d.decision == decision, d.at >= since).limit(1)
    return tx.conn.execute(query).first() is not None


def list_holds(tx: SqlTx, *, open_only: bool = True, limit: int = 500) -> list[Hold]:
    query = select(holds).order_by(holds.c.id.desc()).limit(limit)
    if open_only:
        query = query.where(holds.c.released_at.is_(None))
    return [_hold(row) for row in tx.conn.execute(query)]


# --- drift marks (storm breaker, image quarantine) ---------------------------------------------


def mark(
    tx: SqlTx,
    *,
    host_id: str,
    signature: str,
    pool: str | None,
    image: str | None,
    fresh: bool,
) -> None:
    """Remember that ``host_id`` drifted with ``signature`` (once per host and signature)."""
    tx.conn.execute(
        _insert(tx, drift_marks)
        .values(
            host_id=host_id,
            signature=signature,
            pool=pool,
            image=image,
            fresh=fresh,
            at=tx.now,
        )
        .on_conflict_do_nothing()  # type: ignore[attr-defined]
    )


def marked_hosts(
    tx: SqlTx,
    pool: str,
    since: datetime,
    *,
    signature: str | None = None,
    image: str | None = None,
    fresh_only: bool = False,
) -> list[str]:
    """Distinct hosts of ``pool`` marked since ``since`` (with that signature, or fresh hosts
    of that image)."""
    d = drift_marks.c
    query = select(d.host_id).where(d.pool == pool, d.at >= since).distinct()
    if signature is not None:
        query = query.where(d.signature == signature)
    if image is not None:
        query = query.where(d.image == image)
    if fresh_only:
        query = query.where(d.fresh.is_(True))
    return sorted(tx.conn.execute(query).scalars())


# --- decisions --------------------------------------------------------------------------------


def decide(
    tx: SqlTx,
    decision: str,
    reason: str,
    *,
    host_id: str | None = None,
    pool: str | None = None,
    actor: str = "collector",
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Write one line of the rails' audit trail."""
    tx.conn.execute(
        decisions.insert().values(
            at=tx.now,
            host_id=host_id,
            pool=pool,
            decision=decision,
            reason=reason,
            actor=actor,
            detail=dict(detail or {}),
        )
    )


def list_decisions(
    tx: SqlTx, *, host_id: str | None = None, pool: str | None = None, limit: int = 100
) -> list[Decision]:
    d = decisions.c
    query = select(decisions).order_by(d.id.desc()).limit(limit)
    if host_id is not None:
        query = query.where(d.host_id == host_id)
    if pool is not None:
        query = query.where(d.pool == pool)
    out = []
    for row in tx.conn.execute(query):
        m = row._mapping
        out.append(
            Decision(
                decision_id=m["id"],
                at=m["at"],
                host_id=m["host_id"],
                pool=m["pool"],
                decision=m["decision"],
                reason=m["reason"],
                actor=m["actor"],
                detail=dict(m["detail"] or {}),
            )
        )
    return out


# --- jobs -------------------------------------------------------------------------------------


def wake(tx: SqlTx, kind: str, dedup_keys: Sequence[str]) -> int:
    """Make pending jobs of ``kind`` with these keys due now (a hold released, an alert that
    changed while its delivery waited); return how many."""
    if not dedup_keys:
        return 0
    j = jobs.c
    result = tx.conn.execute(
        update(jobs)
        .where(
            j.kind == kind,
            j.dedup_key.in_(list(dedup_keys)),
            j.state == JobState.PENDING.value,
            j.next_attempt_at > tx.now,
        )
        .values(next_attempt_at=tx.now, updated_at=tx.now)
    )
    return int(result.rowcount or 0)


def host_state(tx: SqlTx, host_id: str) -> HostState | None:
    state = tx.conn.execute(select(hosts.c.state).where(hosts.c.host_id == host_id)).scalar()
    return HostState(state) if state else None
