"""Schema migrations (alembic, ``collector/migrations``), applied in place at start."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

MIGRATIONS: Final = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(conn: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if conn is not None:
        config.attributes["connection"] = conn
    return config


def upgrade(conn: Connection, revision: str = "head") -> None:
    command.upgrade(alembic_config(conn), revision)


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def head() -> str:
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revision is not None
    return revision
