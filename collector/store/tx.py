"""``SqlTx``: one transaction over the shared schema, used by both backends."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Insert, Table, func, select, update

from agent import wire
from collector.model import Finding, Host, HostState, Image, JobSpec, JobState, Transition
from collector.store import rows
from collector.store.schema import (
    enroll_tokens,
    envelopes,
    findings,
    fleet_events,
    host_keys,
    hosts,
    images,
    jobs,
    transitions,
)

InsertFactory = Callable[[Table], Insert]


class SqlTx:
    """The unit of work: the backend's connection inside ``BEGIN`` … ``COMMIT``."""

    def __init__(self, conn: Connection, now: datetime, insert: InsertFactory) -> None:
        self.conn = conn
        self.now = now
        self._insert = insert

    def lock_host(self, host_id: str) -> Host | None:
        """The host's row, locked until commit (PostgreSQL ``FOR UPDATE``; SQLite holds the
        database's one write lock already)."""
        row = self.conn.execute(
            select(hosts).where(hosts.c.host_id == host_id).with_for_update()
        ).first()
        return rows.host(row) if row else None

    def insert_host(self, host_id: str, values: Mapping[str, Any]) -> None:
        self.conn.execute(hosts.insert().values(host_id=host_id, **values))

    def update_host(self, host_id: str, values: Mapping[str, Any]) -> None:
        self.conn.execute(update(hosts).where(hosts.c.host_id == host_id).values(**values))

    def key_tip(self, host_id: str, key_id: str) -> wire.ChainState | None:
        row = self.conn.execute(
            select(host_keys.c.last_seq, host_keys.c.last_digest).where(
                host_keys.c.host_id == host_id, host_keys.c.key_id == key_id
            )
        ).first()
        return wire.ChainState(row.last_seq, row.last_digest) if row else None

    def add_key(self, host_id: str, key_id: str, public_key: bytes) -> None:
        self.conn.execute(
            self._insert(host_keys)
            .values(
                host_id=host_id,
                key_id=key_id,
                public_key=public_key,
                enrolled_at=self.now,
                last_seq=0,
                last_digest="",
            )
            .on_conflict_do_nothing()  # type: ignore[attr-defined]
        )

    def set_tip(self, host_id: str, key_id: str, tip: wire.ChainState) -> None:
        self.conn.execute(
            update(host_keys)
            .where(host_keys.c.host_id == host_id, host_keys.c.key_id == key_id)
            .values(last_seq=tip.last_seq, last_digest=tip.last_digest)
        )

    def stored_digest(self, host_id: str, key_id: str, seq: int) -> str | None:
        digest: str | None = self.conn.execute(
            select(envelopes.c.digest).where(
                envelopes.c.host_id == host_id,
                envelopes.c.key_id == key_id,
                envelopes.c.seq == seq,
            )
        ).scalar()
        return digest

    def add_envelope(self, host_id: str, key_id: str, envelope: wire.Envelope) -> None:
        self.conn.execute(
            envelopes.insert().values(
                host_id=host_id,
                key_id=key_id,
                seq=envelope.seq,
                digest=envelope.digest,
                kind=envelope.kind,
                boot_id=envelope.boot_id,
                time=envelope.time,
                received_at=self.now,
                body=dict(envelope.body),
            )
        )

    def add_findings(self, found: Sequence[Finding]) -> None:
        if found:
            self.conn.execute(
                findings.insert(),
                [
                    {
                        "host_id": f.host_id,
                        "seq": f.seq,
                        "source": f.source,
                        "type": f.type,
                        "severity": f.severity,
                        "drift": f.drift,
                        "path": f.path,
                        "at": f.at,
                        "detail": dict(f.detail),
                    }
                    for f in found
                ],
            )

    def add_transition(self, transition: Transition) -> None:
        """Append to the audit trail and move the host, in this transaction."""
        self.conn.execute(
            transitions.insert().values(
                host_id=transition.host_id,
                from_state=transition.from_state.value if transition.from_state else None,
                to_state=transition.to_state.value,
                cause=transition.cause,
                actor=transition.actor,
                at=transition.at,
                evidence=dict(transition.evidence),
            )
        )
        resume = (
            transition.from_state.value
            if transition.to_state is HostState.SILENT and transition.from_state
            else None
        )
        self.update_host(
            transition.host_id,
            {
                "state": transition.to_state.value,
                "state_since": transition.at,
                "state_cause": transition.cause,
                "resume_state": resume,
            },
        )

    def enqueue(self, job: JobSpec) -> bool:
        """Insert a job unless one with the same kind and dedup key is still open."""
        result = self.conn.execute(
            self._insert(jobs)
            .values(
                kind=job.kind,
                dedup_key=job.dedup_key,
                payload=dict(job.payload),
                state=JobState.PENDING.value,
                attempts=0,
                next_attempt_at=job.run_at or self.now,
                created_at=self.now,
                updated_at=self.now,
            )
            .on_conflict_do_nothing()  # type: ignore[attr-defined]
            .returning(jobs.c.id)
        )
        return result.first() is not None  # rowcount is not reliable after ON CONFLICT

    def image(self, build_id: str) -> Image | None:
        row = self.conn.execute(select(images).where(images.c.build_id == build_id)).first()
        return rows.image(row) if row else None

    def use_enroll_token(self, token_hash: str) -> bool:
        """Spend one use of a live enrollment token; False if unknown, expired, used up or
        revoked."""
        t = enroll_tokens.c
        result = self.conn.execute(
            update(enroll_tokens)
            .where(
                t.token_hash == token_hash,
                t.revoked_at.is_(None),
                (t.expires_at.is_(None)) | (t.expires_at > self.now),
                (t.uses_left.is_(None)) | (t.uses_left > 0),
            )
            .values(
                uses=t.uses + 1,
                uses_left=t.uses_left - 1,  # NULL (unlimited) stays NULL
            )
        )
        return bool(result.rowcount)

    def stale_hosts(self, cutoff: datetime, states: Sequence[HostState]) -> list[Host]:
        """Hosts in ``states`` not seen since ``cutoff``, locked; rows another replica holds
        are skipped (it is judging them)."""
        seen = func.coalesce(hosts.c.last_seen_at, hosts.c.enrolled_at)
        query = (
            select(hosts)
            .where(hosts.c.state.in_([s.value for s in states]), seen < cutoff)
            .order_by(hosts.c.host_id)
            .with_for_update(skip_locked=True)
        )
        return [rows.host(r) for r in self.conn.execute(query)]

    def count_hosts(self, states: Sequence[HostState]) -> int:
        count = self.conn.execute(
            select(func.count())
            .select_from(hosts)
            .where(hosts.c.state.in_([s.value for s in states]))
        ).scalar()
        return int(count or 0)

    def open_fleet_event(self, kind: str, detail: Mapping[str, Any]) -> bool:
        result = self.conn.execute(
            self._insert(fleet_events)
            .values(kind=kind, opened_at=self.now, detail=dict(detail))
            .on_conflict_do_nothing()  # type: ignore[attr-defined]
            .returning(fleet_events.c.id)
        )
        return result.first() is not None

    def close_fleet_event(self, kind: str) -> bool:
        result = self.conn.execute(
            update(fleet_events)
            .where(fleet_events.c.kind == kind, fleet_events.c.closed_at.is_(None))
            .values(closed_at=self.now)
        )
        return bool(result.rowcount)
