"""The incidents table: one row per alert the response raised (dedup key, cause, version, which
sinks have it), read and written inside the caller's transaction (see ``ledger``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Row, select, update

from collector.response.records import Incident
from collector.store import rows
from collector.store.schema import incidents
from collector.store.tx import SqlTx


def _incident(row: Row[Any]) -> Incident:
    return rows.record(Incident, row)


def incident(tx: SqlTx, dedup_key: str) -> Incident | None:
    row = tx.conn.execute(
        select(incidents).where(incidents.c.dedup_key == dedup_key).with_for_update()
    ).first()
    return _incident(row) if row else None


def firing_incidents(tx: SqlTx, host_id: str) -> list[Incident]:
    i = incidents.c
    query = select(incidents).where(i.host_id == host_id, i.status == "firing").with_for_update()
    return [_incident(row) for row in tx.conn.execute(query)]


def put_incident(
    tx: SqlTx,
    *,
    dedup_key: str,
    host_id: str | None,
    pool: str | None,
    cause: str,
    status: str,
    alert: Mapping[str, Any],
    bump: bool = True,
) -> int:
    """Insert or update the incident; return its version (raised by one when ``bump``)."""
    known = incident(tx, dedup_key)
    if known is None:
        tx.conn.execute(
            incidents.insert().values(
                dedup_key=dedup_key,
                host_id=host_id,
                pool=pool,
                cause=cause,
                status=status,
                version=1,
                alert=dict(alert),
                sent={},
                opened_at=tx.now,
                updated_at=tx.now,
            )
        )
        return 1
    version = known.version + 1 if bump else known.version
    tx.conn.execute(
        update(incidents)
        .where(incidents.c.dedup_key == dedup_key)
        .values(status=status, version=version, alert=dict(alert), updated_at=tx.now)
    )
    return version


def mark_sent(tx: SqlTx, dedup_key: str, sink: str, *, version: int, fired: bool) -> int | None:
    """Record what ``sink`` took; return the incident's version now (None if gone)."""
    known = incident(tx, dedup_key)
    if known is None:
        return None
    before = known.sent.get(sink) or {}
    sent = {**known.sent, sink: {"version": version, "fired": fired or bool(before.get("fired"))}}
    tx.conn.execute(update(incidents).where(incidents.c.dedup_key == dedup_key).values(sent=sent))
    return known.version


def incident_version(tx: SqlTx, dedup_key: str) -> int | None:
    version: int | None = tx.conn.execute(
        select(incidents.c.version).where(incidents.c.dedup_key == dedup_key)
    ).scalar()
    return version
