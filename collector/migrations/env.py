"""alembic environment: runs on the connection the store hands over (``migrate.upgrade``), or,
for ``alembic -c collector/alembic.ini revision --autogenerate``, on ``DRIFTWARDEN_DB``."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine

from collector.store.schema import metadata


def _run(conn: Connection) -> None:
    context.configure(
        connection=conn,
        target_metadata=metadata,
        render_as_batch=conn.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    conn = context.config.attributes.get("connection")
    if conn is not None:
        _run(conn)
        return
    engine = create_engine(os.environ.get("DRIFTWARDEN_DB", "sqlite:///driftwarden.db"))
    try:
        with engine.begin() as own:
            _run(own)
    finally:
        engine.dispose()


main()
