"""The PostgreSQL backend (psycopg 3), for fleets served by several collector replicas.

Replicas share nothing but the database: a host's row is locked (``FOR UPDATE``) while its
batch is ingested, so the same report arriving at two replicas is stored once; jobs are claimed
with ``FOR UPDATE SKIP LOCKED``; a transaction-scoped advisory lock serialises schema
migrations when replicas start together.
"""

from __future__ import annotations

from typing import ClassVar

from sqlalchemy import Connection, Insert, Table, create_engine, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import URL

from collector.errors import ConfigError
from collector.store.sql import SqlStore

MIGRATION_LOCK = 0x6477_6D69  # "dwmi"


class PostgresStore(SqlStore):
    backend: ClassVar[str] = "postgresql"

    def insert(self, table: Table) -> Insert:
        return insert(table)

    def _migration_lock(self, conn: Connection) -> None:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})


def open_store(url: URL, *, pool_size: int) -> PostgresStore:
    if url.drivername not in ("postgresql", "postgresql+psycopg", "postgres"):
        raise ConfigError(
            f"unsupported PostgreSQL driver {url.drivername!r}; use postgresql+psycopg://..."
        )
    engine = create_engine(
        url.set(drivername="postgresql+psycopg"),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
    )
    return PostgresStore(engine, display_url=url.render_as_string(hide_password=True))
