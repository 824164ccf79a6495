"""``SqlTx``: one transaction over the shared schema, used by both backends."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Connection,
    Insert,
    Table,
    bindparam,
    func,
    select,
    update,
)

from agent import wire
from collector.model import (
    EnrollToken,
    Finding,
    Host,
    HostState,
    Image,
    Job,
    JobSpec,
    JobState,
    Transition,
)
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
_ENQUEUE: dict[str, Any] = {}  # the job insert, by dialect name

# A group commit's statements, built once: SQLAlchemy then finds each compiled form in its
# cache without building and hashing a new statement for every group.
_IDS: BindParameter[list[str]] = bindparam("ids", expanding=True)
_GROUP_HOSTS = select(hosts).where(hosts.c.host_id.in_(_IDS)).order_by(hosts.c.host_id)
_GROUP_HOSTS_LOCKED = _GROUP_HOSTS.with_for_update()
_GROUP_TIPS = select(host_keys).where(host_keys.c.host_id.in_(_IDS))
_APPEND = {table: table.insert() for table in (envelopes, findings, transitions)}
_UPDATE_HOST = update(hosts).where(hosts.c.host_id == bindparam("b_host"))
_UPDATE_TIP = (
    update(host_keys)
    .where(host_keys.c.host_id == bindparam("b_host"), host_keys.c.key_id == bindparam("b_key"))
    .values(last_seq=bindparam("b_seq"), last_digest=bindparam("b_digest"))
)

# A group's chain tips are written back whole, as upserts executed many: with RETURNING,
# SQLAlchemy sends them as one multi-row INSERT ... ON CONFLICT DO UPDATE per thousand rows
# ("insertmanyvalues") instead of one UPDATE per tip (a tip row is four columns). Host rows are
# two dozen columns of which a report changes a few: they get an UPDATE of those, executed
# many. Built once per dialect and set of changed columns.
_UPSERTS: dict[tuple[str, str, tuple[str, ...]], Any] = {}


def _upsert(insert: InsertFactory, dialect: str, table: Table, changed: tuple[str, ...]) -> Any:
    key = (dialect, table.name, changed)
    statement = _UPSERTS.get(key)
    if statement is None:
        new = insert(table)
        primary = [c for c in table.primary_key.columns]
        statement = new.on_conflict_do_update(  # type: ignore[attr-defined]
            index_elements=primary,
            set_={c: new.excluded[c] for c in changed},  # type: ignore[attr-defined]
        ).returning(*primary)
        _UPSERTS[key] = statement
    return statement


class SqlTx:
    """The unit of work: the backend's connection inside ``BEGIN`` … ``COMMIT``."""

    def __init__(
        self, conn: Connection, now: datetime, insert: InsertFactory, *, row_locks: bool = True
    ) -> None:
        self.conn = conn
        self.now = now
        self._insert = insert
        self._row_locks = row_locks

    def lock_host(self, host_id: str) -> Host | None:
        """The host's row, locked until commit (PostgreSQL ``FOR UPDATE``; SQLite holds the
        database's one write lock already)."""
        row = self.conn.execute(
            select(hosts).where(hosts.c.host_id == host_id).with_for_update()
        ).first()
        return rows.host(row) if row else None

    def lock_hosts(self, host_ids: Sequence[str]) -> None:
        """Lock these hosts' rows in one statement, in host id order: transactions locking
        overlapping sets of hosts (replicas' group commits) then never deadlock on them. A
        backend without row locks (SQLite: one write lock for the database) skips it."""
        if host_ids and self._row_locks:
            self.conn.execute(
                select(hosts.c.host_id)
                .where(hosts.c.host_id.in_(sorted(host_ids)))
                .order_by(hosts.c.host_id)
                .with_for_update()
            ).all()

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
        self.conn.execute(envelopes.insert(), _envelope_row(host_id, key_id, envelope, self.now))

    def add_findings(self, found: Sequence[Finding]) -> None:
        if found:
            self.conn.execute(findings.insert(), [_finding_row(f) for f in found])

    def add_transition(self, transition: Transition) -> None:
        """Append to the audit trail and move the host, in this transaction."""
        self.conn.execute(transitions.insert(), _transition_row(transition))
        self._move(transition)

    def _move(self, transition: Transition) -> None:
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
        # rowcount is not reliable after ON CONFLICT: a returned id says it was inserted
        return self.conn.execute(self._enqueue(), self._job_row(job)).first() is not None

    # --- jobs ---------------------------------------------------------------------------------

    def claim_jobs(self, kind: str, worker: str, *, limit: int, lease_s: float) -> list[Job]:
        """Take up to ``limit`` due jobs of ``kind`` (or whose lease ran out) for ``worker``;
        PostgreSQL skips the rows another transaction has locked (another replica's claim)."""
        j = jobs.c
        due = ((j.state == JobState.PENDING.value) & (j.next_attempt_at <= self.now)) | (
            (j.state == JobState.RUNNING.value) & (j.lease_until < self.now)
        )
        ids = list(
            self.conn.execute(
                select(j.id)
                .where(j.kind == kind, due)
                .order_by(j.next_attempt_at, j.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        if not ids:
            return []
        self.conn.execute(
            update(jobs)
            .where(j.id.in_(ids))
            .values(
                state=JobState.RUNNING.value,
                claimed_by=worker,
                lease_until=self.now + timedelta(seconds=lease_s),
                attempts=j.attempts + 1,
                updated_at=self.now,
            )
        )
        claimed = self.conn.execute(select(jobs).where(j.id.in_(ids)).order_by(j.id))
        return [rows.job(r) for r in claimed]

    def complete_job(self, job_id: int, worker: str) -> bool:
        return self._finish_job(job_id, worker, state=JobState.DONE.value, lease_until=None)

    def fail_job(self, job_id: int, worker: str, error: str, *, retry_at: datetime | None) -> bool:
        """Record a failed attempt: pending again at ``retry_at``, or dead when None."""
        if retry_at is None:
            return self._finish_job(job_id, worker, state=JobState.DEAD.value, last_error=error)
        return self._pending_again(job_id, worker, retry_at, last_error=error)

    def reschedule_job(self, job_id: int, worker: str, run_at: datetime) -> bool:
        """Put a periodic job back to sleep until ``run_at`` (its attempts start again)."""
        return self._pending_again(job_id, worker, run_at, attempts=0)

    def _pending_again(self, job_id: int, worker: str, at: datetime, **values: Any) -> bool:
        return self._finish_job(
            job_id,
            worker,
            state=JobState.PENDING.value,
            next_attempt_at=at,
            lease_until=None,
            **values,
        )

    def _finish_job(self, job_id: int, worker: str, **values: Any) -> bool:
        """End the attempt ``worker`` holds; False if the job is no longer its own (its lease
        ran out and another worker took it)."""
        j = jobs.c
        result = self.conn.execute(
            update(jobs)
            .where(j.id == job_id, j.claimed_by == worker, j.state == JobState.RUNNING.value)
            .values(updated_at=self.now, **values)
        )
        return bool(result.rowcount)

    def savepoint(self) -> AbstractContextManager[object]:
        """A nested transaction: what is done inside it is undone if it raises, and the
        enclosing transaction goes on."""
        return self.conn.begin_nested()

    def _enqueue(self) -> Any:
        """The job insert (a duplicate open job is skipped), for one row or executed many."""
        statement = _ENQUEUE.get(self.conn.dialect.name)
        if statement is None:  # built once per dialect: SQLAlchemy then reuses its compiled form
            statement = (
                self._insert(jobs)
                .on_conflict_do_nothing()  # type: ignore[attr-defined]
                .returning(jobs.c.id)
            )
            _ENQUEUE[self.conn.dialect.name] = statement
        return statement

    def _job_row(self, job: JobSpec) -> dict[str, Any]:
        return {
            "kind": job.kind,
            "dedup_key": job.dedup_key,
            "payload": dict(job.payload),
            "state": JobState.PENDING.value,
            "attempts": 0,
            "next_attempt_at": job.run_at or self.now,
            "created_at": self.now,
            "updated_at": self.now,
        }

    def image(self, build_id: str) -> Image | None:
        row = self.conn.execute(select(images).where(images.c.build_id == build_id)).first()
        return rows.image(row) if row else None

    def _live_token(self, token_hash: str) -> tuple[ColumnElement[bool], ...]:
        t = enroll_tokens.c
        return (
            t.token_hash == token_hash,
            t.revoked_at.is_(None),
            (t.expires_at.is_(None)) | (t.expires_at > self.now),
            (t.uses_left.is_(None)) | (t.uses_left > 0),
        )

    def live_enroll_token(self, token_hash: str) -> EnrollToken | None:
        """The enrollment token, if it is live (known, not expired, used up or revoked); no
        use is spent."""
        query = select(enroll_tokens).where(*self._live_token(token_hash))
        row = self.conn.execute(query).first()
        return rows.enroll_token(row) if row else None

    def use_enroll_token(self, token_hash: str) -> bool:
        """Spend one use of a live enrollment token; False if unknown, expired, used up or
        revoked."""
        t = enroll_tokens.c
        result = self.conn.execute(
            update(enroll_tokens)
            .where(*self._live_token(token_hash))
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


def _envelope_row(
    host_id: str, key_id: str, envelope: wire.Envelope, received_at: datetime
) -> dict[str, Any]:
    return {
        "host_id": host_id,
        "key_id": key_id,
        "seq": envelope.seq,
        "digest": envelope.digest,
        "kind": envelope.kind,
        "boot_id": envelope.boot_id,
        "time": envelope.time,
        "received_at": received_at,
        "body": dict(envelope.body),
    }


def _finding_row(f: Finding) -> dict[str, Any]:
    return {
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


def _transition_row(t: Transition) -> dict[str, Any]:
    return {
        "host_id": t.host_id,
        "from_state": t.from_state.value if t.from_state else None,
        "to_state": t.to_state.value,
        "cause": t.cause,
        "actor": t.actor,
        "at": t.at,
        "evidence": dict(t.evidence),
    }


class GroupTx(SqlTx):
    """The transaction of a group commit: many units of work, one commit.

    The group's host rows and chain tips are read (and locked) once, up front; the rows units
    append (envelopes, findings, the audit trail) and the host and tip updates they make are
    kept here and written by ``flush`` in a few multi-row statements just before the commit.
    Reads through this object see those writes; SQL sent straight to ``conn`` does not, so
    only ``Tx`` methods may touch the hosts, host_keys, envelopes, findings, transitions and
    jobs tables in it. Enrollment tokens and new hosts are written at once.

    A job is written by ``flush`` too (one statement for the group's jobs), so ``enqueue``
    cannot say whether one with the same kind and dedup key was still open: it answers True,
    and the duplicate is skipped when written. Nothing in an ingest asks.
    """

    def __init__(
        self, conn: Connection, now: datetime, insert: InsertFactory, *, row_locks: bool = True
    ) -> None:
        super().__init__(conn, now, insert, row_locks=row_locks)
        self._hosts: dict[str, dict[str, Any]] = {}  # host rows as they now are
        self._host_updates: dict[str, dict[str, Any]] = {}
        self._tips: dict[tuple[str, str], wire.ChainState] = {}
        self._tip_rows: dict[tuple[str, str], dict[str, Any]] = {}  # host_keys rows as read
        self._tips_read: set[str] = set()  # hosts whose every tip is in _tips
        self._tip_updates: set[tuple[str, str]] = set()
        self._digests: dict[tuple[str, str, int], str] = {}
        self._images: dict[str, Image | None] = {}
        self._rows: dict[Table, list[dict[str, Any]]] = {
            envelopes: [],
            findings: [],
            transitions: [],
        }
        self._jobs: list[dict[str, Any]] = []

    def lock_hosts(self, host_ids: Sequence[str]) -> None:
        """Read and lock the group's hosts and their chain tips, two statements in all."""
        wanted = sorted(set(host_ids) - self._hosts.keys())
        if not wanted:
            return
        host_rows, tip_rows = self._read_group(wanted)
        for row in host_rows:
            host_id = row["host_id"]
            self._hosts[host_id] = {**row, **self._host_updates.get(host_id, {})}
        for row in tip_rows:
            host_key = (row["host_id"], row["key_id"])
            self._tip_rows[host_key] = dict(row)
            self._tips[host_key] = wire.ChainState(row["last_seq"], row["last_digest"])
        self._tips_read.update(wanted)

    def _read_group(
        self, host_ids: list[str]
    ) -> tuple[Iterable[Mapping[str, Any]], Iterable[Mapping[str, Any]]]:
        """The host rows (locked, where rows lock) and the chain tips of these hosts."""
        query = _GROUP_HOSTS_LOCKED if self._row_locks else _GROUP_HOSTS
        found = self.conn.execute(query, {"ids": host_ids}).mappings()
        tips = self.conn.execute(_GROUP_TIPS, {"ids": host_ids}).mappings()
        return cast(list[Mapping[str, Any]], found.all()), cast(list[Mapping[str, Any]], tips.all())

    def lock_host(self, host_id: str) -> Host | None:
        if host_id not in self._hosts:
            row = self.conn.execute(
                select(hosts).where(hosts.c.host_id == host_id).with_for_update()
            ).first()
            if row is None:
                return None
            self._hosts[host_id] = {**row._mapping, **self._host_updates.get(host_id, {})}
        return rows.record(Host, self._hosts[host_id])

    def insert_host(self, host_id: str, values: Mapping[str, Any]) -> None:
        super().insert_host(host_id, values)
        self._hosts.pop(host_id, None)

    def update_host(self, host_id: str, values: Mapping[str, Any]) -> None:
        self._host_updates.setdefault(host_id, {}).update(values)
        if host_id in self._hosts:
            self._hosts[host_id].update(values)

    def key_tip(self, host_id: str, key_id: str) -> wire.ChainState | None:
        tip = self._tips.get((host_id, key_id))
        if tip is not None or host_id in self._tips_read:
            return tip
        tip = super().key_tip(host_id, key_id)
        if tip is not None:
            self._tips[(host_id, key_id)] = tip
        return tip

    def add_key(self, host_id: str, key_id: str, public_key: bytes) -> None:
        super().add_key(host_id, key_id, public_key)
        self._tips_read.discard(host_id)
        self._tips.pop((host_id, key_id), None)
        self._tip_rows.pop((host_id, key_id), None)

    def set_tip(self, host_id: str, key_id: str, tip: wire.ChainState) -> None:
        self._tips[(host_id, key_id)] = wire.ChainState(tip.last_seq, tip.last_digest)
        self._tip_updates.add((host_id, key_id))

    def stored_digest(self, host_id: str, key_id: str, seq: int) -> str | None:
        return self._digests.get((host_id, key_id, seq)) or super().stored_digest(
            host_id, key_id, seq
        )

    def add_envelope(self, host_id: str, key_id: str, envelope: wire.Envelope) -> None:
        self._rows[envelopes].append(_envelope_row(host_id, key_id, envelope, self.now))
        self._digests[(host_id, key_id, envelope.seq)] = envelope.digest

    def add_findings(self, found: Sequence[Finding]) -> None:
        self._rows[findings].extend(_finding_row(f) for f in found)

    def add_transition(self, transition: Transition) -> None:
        self._rows[transitions].append(_transition_row(transition))
        self._move(transition)

    def enqueue(self, job: JobSpec) -> bool:
        self._jobs.append(self._job_row(job))
        return True

    def image(self, build_id: str) -> Image | None:
        if build_id not in self._images:
            self._images[build_id] = super().image(build_id)
        return self._images[build_id]

    def flush(self) -> None:
        """Write what the units kept here: one statement per table (per thousand rows)."""
        for table, pending in self._rows.items():
            if pending:
                self._append(table, pending)
                pending.clear()
        self._flush_hosts()
        self._flush_tips()
        if self._jobs:  # one open job per kind and dedup key: a duplicate is skipped
            self._insert_jobs(self._jobs)
            self._jobs.clear()

    def _append(self, table: Table, pending: list[dict[str, Any]]) -> None:
        self.conn.execute(_APPEND[table], pending)

    def _insert_jobs(self, pending: list[dict[str, Any]]) -> None:
        self.conn.execute(self._enqueue(), pending).all()

    def _flush_hosts(self) -> None:
        """One UPDATE executed many per shape of change, of the changed columns only (a
        heartbeat changes a few of a host row's two dozen)."""
        by_columns: dict[tuple[str, ...], list[tuple[str, dict[str, Any]]]] = {}
        for host_id, values in self._host_updates.items():
            by_columns.setdefault(tuple(sorted(values)), []).append((host_id, values))
        for batch in by_columns.values():
            self._update_hosts(batch)
        self._host_updates.clear()

    def _update_hosts(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """Host rows that change the same columns."""
        self.conn.execute(_UPDATE_HOST, [{"b_host": h, **values} for h, values in batch])

    def _flush_tips(self) -> None:
        whole: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        for host_key in sorted(self._tip_updates):
            tip = self._tips[host_key]
            row = self._tip_rows.get(host_key)
            if row is not None:
                row.update(last_seq=tip.last_seq, last_digest=tip.last_digest)
                whole.append(row)
            else:
                h, key = host_key
                others.append(
                    {"b_host": h, "b_key": key, "b_seq": tip.last_seq, "b_digest": tip.last_digest}
                )
        if whole:
            dialect = self.conn.dialect.name
            statement = _upsert(self._insert, dialect, host_keys, ("last_digest", "last_seq"))
            self.conn.execute(statement, whole).all()
        if others:
            self.conn.execute(_UPDATE_TIP, others)
        self._tip_updates.clear()
