"""The SQLite backend: one file, WAL, a busy timeout, zero set-up.

Every write transaction is ``BEGIN IMMEDIATE``: it takes the database's one write lock at once
(waiting up to the busy timeout), so two writers never deadlock upgrading a read lock, and a
job claim or an ingest is a single-writer transaction. ``synchronous=FULL``: a commit is on
disk before the API acknowledges it.

Writers queue for that lock in the kernel rather than in SQLite's busy handler, which sleeps
up to 100 ms between tries: a thread waits on the store's lock, a process (the collector's
other workers, ``[server] processes``) on an exclusive ``flock`` of ``PATH-writer``, a file
beside the database; the one holding it is woken the moment the writer before it is done.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import Connection, Engine, Insert, Table, create_engine, event
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.engine import URL

from collector.errors import ConfigError
from collector.store.driver import Driver, DriverTable
from collector.store.schema import envelopes, findings, host_keys, hosts, jobs, transitions
from collector.store.sql import SqlStore
from collector.store.tx import GroupTx, InsertFactory, SqlTx

BUSY_TIMEOUT_MS = 30_000
# The database file is read through a memory map of up to this size. A transaction that follows
# another process's commit finds its page cache invalidated and reads every page it touches
# again; through the map those reads are memory reads, not a ``pread`` each.
MMAP_BYTES = 1 << 30


_TABLES = {t: DriverTable(t) for t in (envelopes, findings, transitions, hosts, host_keys, jobs)}


class SqliteGroupTx(GroupTx):
    """A group commit on SQLite: its host rows and chain tips read, and its rows written,
    through the driver (``collector.store.driver``), the statements a group sends most."""

    def __init__(
        self, conn: Connection, now: datetime, insert: InsertFactory, *, row_locks: bool = True
    ) -> None:
        super().__init__(conn, now, insert, row_locks=row_locks)
        self._driver = Driver(conn)

    def _read_group(
        self, host_ids: list[str]
    ) -> tuple[Iterable[Mapping[str, Any]], Iterable[Mapping[str, Any]]]:
        found = self._driver.select_in(_TABLES[hosts], "host_id", host_ids)
        return found, self._driver.select_in(_TABLES[host_keys], "host_id", host_ids)

    def _append(self, table: Table, pending: list[dict[str, Any]]) -> None:
        self._driver.insert(_TABLES[table], pending)

    def _insert_jobs(self, pending: list[dict[str, Any]]) -> None:
        # no conflict target: the partial unique index of open jobs is the one that can clash
        self._driver.insert(_TABLES[jobs], pending, suffix=" ON CONFLICT DO NOTHING")

    def _update_hosts(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        rows = [{**values, "host_id": host_id} for host_id, values in batch]
        self._driver.update(_TABLES[hosts], rows, where=("host_id",))

    def _flush_tips(self) -> None:
        rows = []
        for host_id, key_id in sorted(self._tip_updates):
            tip = self._tips[(host_id, key_id)]
            rows.append(
                {
                    "last_seq": tip.last_seq,
                    "last_digest": tip.last_digest,
                    "host_id": host_id,
                    "key_id": key_id,
                }
            )
        self._driver.update(_TABLES[host_keys], rows, where=("host_id", "key_id"))
        self._tip_updates.clear()


class SqliteStore(SqlStore):
    """Writers queue on a thread lock, then on the lock file, for SQLite's one write lock;
    the busy timeout still covers a writer that takes neither (an older CLI, ``sqlite3``)."""

    backend: ClassVar[str] = "sqlite"
    row_locks: ClassVar[bool] = False
    group_tx: ClassVar[type[GroupTx]] = SqliteGroupTx

    def __init__(self, engine: Engine, *, display_url: str, lock_path: Path) -> None:
        super().__init__(engine, display_url=display_url)
        self._writer = threading.Lock()
        self._lock_path = lock_path
        self._lock_fd: int | None = None

    @contextmanager
    def _transaction(self, kind: type[SqlTx] = SqlTx, *, locked: bool = False) -> Iterator[SqlTx]:
        if not locked:
            self.lock_writer()
        try:
            with super()._transaction(kind) as tx:
                yield tx
        finally:
            if not locked:
                self.unlock_writer()

    def lock_writer(self) -> None:
        self._writer.acquire()
        try:
            fcntl.flock(self._lock_file(), fcntl.LOCK_EX)
        except BaseException:
            self._writer.release()
            raise

    def try_lock_writer(self) -> bool:
        if not self._writer.acquire(blocking=False):
            return False
        try:
            fcntl.flock(self._lock_file(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._writer.release()
            return False
        except BaseException:
            self._writer.release()
            raise
        return True

    def unlock_writer(self) -> None:
        assert self._lock_fd is not None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            self._writer.release()

    def _lock_file(self) -> int:
        """Opened on first use, in the process that uses it (a forked worker has its own)."""
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._lock_fd

    def close(self) -> None:
        super().close()
        with self._writer:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def insert(self, table: Table) -> Insert:
        return insert(table)

    def _read_only(self, conn: Connection, on: bool) -> None:
        # a setting of the connection, which goes back to the pool: set, then cleared
        conn.exec_driver_sql(f"PRAGMA query_only = {int(on)}")


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver must not begin on its own
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
    finally:
        cursor.close()


def _on_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get("driftwarden_write", True)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def open_store(url: URL, *, pool_size: int) -> SqliteStore:
    if url.drivername not in ("sqlite", "sqlite+pysqlite"):
        raise ConfigError(f"unsupported SQLite driver {url.drivername!r}; use sqlite:///PATH")
    if not url.database or url.database == ":memory:":
        raise ConfigError("the SQLite database must be a file: sqlite:///PATH")
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url.set(drivername="sqlite+pysqlite"),
        connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        pool_size=pool_size,
        max_overflow=pool_size,
    )
    # An INSERT executed with many rows goes out as one multi-row statement (per thousand
    # rows), not one step per row: the driver lets go of the interpreter lock at every step,
    # and a group commit holding the write lock would wait on the event loop each time.
    engine.dialect.use_insertmanyvalues_wo_returning = True
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    return SqliteStore(
        engine,
        display_url=url.render_as_string(hide_password=True),
        lock_path=Path(url.database + "-writer"),
    )
