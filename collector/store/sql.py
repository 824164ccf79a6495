"""``SqlStore``: the store over the shared SQLAlchemy Core schema.

The backends (``sqlite``, ``postgres``) differ only in how they connect, how a write
transaction begins, and how the schema migration is serialised; every query is here. Locking
reads use ``FOR UPDATE`` (``SKIP LOCKED`` for job claims and the silence sweep), which
SQLAlchemy renders on PostgreSQL and leaves out on SQLite, where a write transaction
(``BEGIN IMMEDIATE``) already holds the database's single write lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

import structlog
from sqlalchemy import Connection, Engine, Insert, Table, func, select, text, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from collector.errors import StoreError
from collector.model import (
    ApiToken,
    EnrollToken,
    Finding,
    FleetEvent,
    Host,
    HostState,
    Image,
    Job,
    JobSpec,
    Report,
    Transition,
)
from collector.store import migrate, rows
from collector.store.schema import (
    api_tokens,
    enroll_tokens,
    envelopes,
    findings,
    fleet_events,
    hosts,
    images,
    jobs,
    transitions,
)
from collector.store.tx import GroupTx, SqlTx

log = structlog.get_logger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


class SqlStore:
    backend: ClassVar[str]
    row_locks: ClassVar[bool] = True  # False where a write transaction locks the database
    group_tx: ClassVar[type[GroupTx]] = GroupTx  # the transaction of a group commit

    def __init__(self, engine: Engine, *, display_url: str) -> None:
        self.engine = engine
        self.display_url = display_url
        self.clock: Callable[[], datetime] = utc_now

    def insert(self, table: Table) -> Insert:
        """The dialect's INSERT (which has ``on_conflict_do_nothing``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.display_url}>"

    # --- transactions ------------------------------------------------------------------------

    @contextmanager
    def _connect(self, *, write: bool) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                conn.execution_options(driftwarden_write=write)
                with conn.begin():
                    yield conn
        except DBAPIError as exc:
            raise StoreError(f"database error: {exc.orig or exc}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {exc}") from exc

    # A backend whose writers take turns before they begin (SQLite) holds that turn between
    # ``lock_writer`` (or a ``try_lock_writer`` that said True) and ``unlock_writer``; any thread
    # may let it go. Elsewhere (PostgreSQL: row locks, taken inside) they do nothing.
    def try_lock_writer(self) -> bool:
        return True

    def lock_writer(self) -> None:
        """Wait for the writer's turn."""

    def unlock_writer(self) -> None:
        """Let the writer's turn go."""

    @contextmanager
    def _transaction(self, kind: type[SqlTx] = SqlTx, *, locked: bool = False) -> Iterator[SqlTx]:
        """A write transaction; ``locked``: the caller holds the writer's turn already."""
        with self._connect(write=True) as conn:
            yield kind(conn, self.clock(), self.insert, row_locks=self.row_locks)

    def transaction(self) -> AbstractContextManager[SqlTx]:
        return self._transaction()

    @contextmanager
    def _group_transaction(self, *, locked: bool = False) -> Iterator[GroupTx]:
        with self._transaction(self.group_tx, locked=locked) as tx:
            assert isinstance(tx, GroupTx)
            yield tx
            tx.flush()

    def group_transaction(self, *, locked: bool = False) -> AbstractContextManager[GroupTx]:
        """A transaction for many units of work at once (a group commit): what they write is
        kept and written in a few statements just before the commit (``GroupTx``).
        ``locked``: the caller holds the writer's turn (``lock_writer``) already."""
        return self._group_transaction(locked=locked)

    @contextmanager
    def _read_transaction(self) -> Iterator[SqlTx]:
        with self._connect(write=False) as conn:
            self._read_only(conn, True)
            try:
                yield SqlTx(conn, self.clock(), self.insert, row_locks=False)
            finally:
                self._read_only(conn, False)

    def _read_only(self, conn: Connection, on: bool) -> None:
        """Refuse writes in this transaction (PostgreSQL: for its whole length; the backend
        undoes it at its end)."""
        if on:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    def read_transaction(self) -> AbstractContextManager[SqlTx]:
        """A transaction that only reads, and refuses to write: it takes no writer's turn, so
        an SRE's read never waits behind the ingest's writes (SQLite's WAL lets readers go on
        beside the one writer). Its reads take no row locks (``FOR UPDATE``): a view must not
        ask for them. On SQLite it reads one snapshot; on PostgreSQL (read committed) each
        statement sees what was committed when it began."""
        return self._read_transaction()

    def read(self) -> AbstractContextManager[Connection]:
        """A connection for reads that need no write lock (metrics gauges, reports)."""
        return self._connect(write=False)

    def _migration_lock(self, conn: Connection) -> None:
        """Serialise concurrent migrations (several replicas starting at once)."""

    def migrate(self) -> None:
        with self._connect(write=True) as conn:
            self._migration_lock(conn)
            before = migrate.current(conn)
            migrate.upgrade(conn)
            after = migrate.current(conn)
        if before != after:
            log.info("schema_migrated", backend=self.backend, before=before, after=after)

    def schema_revision(self) -> tuple[str | None, str]:
        with self.read() as conn:
            return migrate.current(conn), migrate.head()

    def ping(self) -> None:
        with self.read() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()

    # --- reads -------------------------------------------------------------------------------

    def host(self, host_id: str) -> Host | None:
        with self.read() as conn:
            row = conn.execute(select(hosts).where(hosts.c.host_id == host_id)).first()
        return rows.host(row) if row else None

    def current_keys(
        self, *, host_id: str | None = None, limit: int | None = None
    ) -> dict[str, tuple[str, bytes]]:
        """Hosts' enrolled keys, ``{host_id: (key_id, raw public key)}``: one host's, or up to
        ``limit`` of the fleet's."""
        query = select(hosts.c.host_id, hosts.c.key_id, hosts.c.public_key).limit(limit)
        if host_id is not None:
            query = query.where(hosts.c.host_id == host_id)
        with self.read() as conn:
            return {r.host_id: (r.key_id, r.public_key) for r in conn.execute(query)}

    def hosts(self, *, state: HostState | None = None, image: str | None = None) -> list[Host]:
        query = select(hosts).order_by(hosts.c.host_id)
        if state is not None:
            query = query.where(hosts.c.state == state.value)
        if image is not None:
            query = query.where(hosts.c.image_build_id == image)
        with self.read() as conn:
            return [rows.host(r) for r in conn.execute(query)]

    def transitions(self, host_id: str, *, limit: int = 100) -> list[Transition]:
        query = (
            select(transitions)
            .where(transitions.c.host_id == host_id)
            .order_by(transitions.c.id.desc())
            .limit(limit)
        )
        with self.read() as conn:
            return [rows.transition(r) for r in conn.execute(query)]

    def findings(self, host_id: str, *, limit: int = 100) -> list[Finding]:
        query = (
            select(findings)
            .where(findings.c.host_id == host_id)
            .order_by(findings.c.id.desc())
            .limit(limit)
        )
        with self.read() as conn:
            return [rows.finding(r) for r in conn.execute(query)]

    def reports(self, host_id: str, *, limit: int = 100) -> list[Report]:
        query = (
            select(envelopes)
            .where(envelopes.c.host_id == host_id)
            .order_by(envelopes.c.received_at.desc(), envelopes.c.seq.desc())
            .limit(limit)
        )
        with self.read() as conn:
            return [rows.report(r) for r in conn.execute(query)]

    def drift_paths(self, host_ids: Sequence[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {h: set() for h in host_ids}
        if not host_ids:
            return out
        query = (
            select(findings.c.host_id, findings.c.path)
            .where(
                findings.c.host_id.in_(list(host_ids)),
                findings.c.drift.is_(True),
                findings.c.path.is_not(None),
            )
            .distinct()
        )
        with self.read() as conn:
            for host_id, path in conn.execute(query):
                out[host_id].add(path)
        return out

    def state_counts(self) -> dict[str, int]:
        query = select(hosts.c.state, func.count()).group_by(hosts.c.state)
        with self.read() as conn:
            return {state: int(count) for state, count in conn.execute(query)}

    def group_counts(self) -> list[tuple[str | None, str | None, str, int]]:
        """Host counts by (pool, image build id, state)."""
        c = hosts.c
        query = select(c.pool, c.image_build_id, c.state, func.count()).group_by(
            c.pool, c.image_build_id, c.state
        )
        with self.read() as conn:
            return [(pool, image, state, int(n)) for pool, image, state, n in conn.execute(query)]

    def fleet_events(self, *, open_only: bool = False) -> list[FleetEvent]:
        query = select(fleet_events).order_by(fleet_events.c.id.desc()).limit(100)
        if open_only:
            query = query.where(fleet_events.c.closed_at.is_(None))
        with self.read() as conn:
            return [rows.fleet_event(r) for r in conn.execute(query)]

    # --- images ------------------------------------------------------------------------------

    def images(self) -> list[Image]:
        with self.read() as conn:
            return [rows.image(r) for r in conn.execute(select(images).order_by(images.c.build_id))]

    def put_image(self, image: Image) -> Image:
        """Register an image unless its build id is known; return what is stored."""
        with self._transaction() as tx:
            tx.conn.execute(
                self.insert(images)
                .values(
                    build_id=image.build_id,
                    root=image.root,
                    key_id=image.key_id,
                    policy_digest=image.policy_digest,
                    created=image.created,
                    registered_at=tx.now,
                    statement=dict(image.statement),
                )
                .on_conflict_do_nothing()  # type: ignore[attr-defined]
            )
            stored = tx.image(image.build_id)
        assert stored is not None
        return stored

    # --- tokens ------------------------------------------------------------------------------

    def add_api_token(self, name: str, role: str, token_hash: str) -> ApiToken:
        with self._transaction() as tx:
            token_id = tx.conn.execute(
                api_tokens.insert()
                .values(name=name, role=role, token_hash=token_hash, created_at=tx.now)
                .returning(api_tokens.c.id)
            ).scalar_one()
            row = tx.conn.execute(select(api_tokens).where(api_tokens.c.id == token_id)).one()
        return rows.api_token(row)

    def api_token(self, token_hash: str) -> ApiToken | None:
        query = select(api_tokens).where(
            api_tokens.c.token_hash == token_hash, api_tokens.c.revoked_at.is_(None)
        )
        with self.read() as conn:
            row = conn.execute(query).first()
        return rows.api_token(row) if row else None

    def api_tokens(self) -> list[ApiToken]:
        with self.read() as conn:
            return [rows.api_token(r) for r in conn.execute(select(api_tokens).order_by("id"))]

    def revoke_api_token(self, token_id: int) -> bool:
        return self._revoke(api_tokens, token_id)

    def add_enroll_token(
        self,
        token_hash: str,
        note: str,
        expires_at: datetime | None,
        uses: int | None,
        pool: str | None = None,
    ) -> EnrollToken:
        with self._transaction() as tx:
            token_id = tx.conn.execute(
                enroll_tokens.insert()
                .values(
                    token_hash=token_hash,
                    note=note,
                    created_at=tx.now,
                    expires_at=expires_at,
                    uses_left=uses,
                    uses=0,
                    pool=pool,
                )
                .returning(enroll_tokens.c.id)
            ).scalar_one()
            row = tx.conn.execute(select(enroll_tokens).where(enroll_tokens.c.id == token_id)).one()
        return rows.enroll_token(row)

    def enroll_tokens(self) -> list[EnrollToken]:
        with self.read() as conn:
            query = select(enroll_tokens).order_by("id")
            return [rows.enroll_token(r) for r in conn.execute(query)]

    def revoke_enroll_token(self, token_id: int) -> bool:
        return self._revoke(enroll_tokens, token_id)

    def _revoke(self, table: Any, token_id: int) -> bool:
        with self._transaction() as tx:
            result = tx.conn.execute(
                update(table)
                .where(table.c.id == token_id, table.c.revoked_at.is_(None))
                .values(revoked_at=tx.now)
            )
        return bool(result.rowcount)

    # --- jobs --------------------------------------------------------------------------------

    def enqueue(self, job: JobSpec) -> bool:
        with self._transaction() as tx:
            return tx.enqueue(job)

    def claim(self, kind: str, worker: str, *, limit: int, lease_s: float = 60.0) -> list[Job]:
        """Take up to ``limit`` due jobs of ``kind`` (or whose lease ran out) for ``worker``."""
        with self._transaction() as tx:
            return tx.claim_jobs(kind, worker, limit=limit, lease_s=lease_s)

    def complete(self, job_id: int, worker: str) -> bool:
        with self._transaction() as tx:
            return tx.complete_job(job_id, worker)

    def fail(self, job_id: int, worker: str, error: str, *, retry_at: datetime | None) -> bool:
        """Record a failed attempt: pending again at ``retry_at``, or dead when None."""
        with self._transaction() as tx:
            return tx.fail_job(job_id, worker, error, retry_at=retry_at)

    def reschedule(self, job_id: int, worker: str, run_at: datetime) -> bool:
        """Put a periodic job back to sleep until ``run_at`` (its attempts start again)."""
        with self._transaction() as tx:
            return tx.reschedule_job(job_id, worker, run_at)

    def jobs(self, *, kind: str | None = None, state: str | None = None) -> list[Job]:
        query = select(jobs).order_by(jobs.c.id)
        if kind is not None:
            query = query.where(jobs.c.kind == kind)
        if state is not None:
            query = query.where(jobs.c.state == state)
        with self.read() as conn:
            return [rows.job(r) for r in conn.execute(query)]

    def job_counts(self) -> dict[tuple[str, str], int]:
        query = select(jobs.c.kind, jobs.c.state, func.count()).group_by(jobs.c.kind, jobs.c.state)
        with self.read() as conn:
            return {(kind, state): int(n) for kind, state, n in conn.execute(query)}
