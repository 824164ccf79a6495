"""The break-glass sessions table, read and written inside the caller's transaction (see
``ledger``); the workflow around it is ``breakglass``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, select, update

from collector.response.records import Session
from collector.store import rows
from collector.store.schema import breakglass
from collector.store.tx import SqlTx


def _session(row: Row[Any]) -> Session:
    return rows.record(Session, row, id_field="session_id")


def add_session(
    tx: SqlTx,
    *,
    host_id: str,
    login_user: str,
    actor: str,
    operator: str,
    reason: str,
    ticket: str | None,
    expires_at: datetime,
) -> Session:
    new_id = tx.conn.execute(
        breakglass.insert()
        .values(
            host_id=host_id,
            login_user=login_user,
            actor=actor,
            operator=operator,
            reason=reason,
            ticket=ticket,
            created_at=tx.now,
            expires_at=expires_at,
            login={},
        )
        .returning(breakglass.c.id)
    ).scalar_one()
    session = session_by_id(tx, new_id)
    assert session is not None
    return session


def session_by_id(tx: SqlTx, session_id: int) -> Session | None:
    row = tx.conn.execute(
        select(breakglass).where(breakglass.c.id == session_id).with_for_update()
    ).first()
    return _session(row) if row else None


def of_host(tx: SqlTx, host_id: str, *, unended: bool = False, lock: bool = True) -> list[Session]:
    """The host's sessions, their rows locked (``lock``) for a transaction that changes them."""
    b = breakglass.c
    query = select(breakglass).where(b.host_id == host_id).order_by(b.id)
    if unended:
        query = query.where(b.ended_at.is_(None))
    if lock:
        query = query.with_for_update()
    return [_session(row) for row in tx.conn.execute(query)]


def update_session(tx: SqlTx, session_id: int, **values: Any) -> None:
    tx.conn.execute(update(breakglass).where(breakglass.c.id == session_id).values(**values))
