"""Fixtures for the collector: real SQLite files and the real PostgreSQL on 127.0.0.1:5432."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from collector import auth
from collector.api import create_app
from collector.config import Config
from collector.model import Role
from collector.store import SqlStore, open_store
from collector.store.schema import metadata
from tests.collector.apptest import make_config
from tests.collector.clock import Clock

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of its own for this test session, dropped at the end."""
    name = "driftwarden_test_" + secrets.token_hex(6)
    admin = create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        # a store suite that passes without its PostgreSQL half is not a pass
        pytest.fail(
            f"PostgreSQL on 127.0.0.1:5432 is not available ({exc}); scripts/test.sh sets one "
            "up, or leave these tests out with -m 'not postgres'"
        )
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def wipe(store: SqlStore) -> None:
    with store.engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'collector.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    opened = open_store(db_url, pool_size=4)
    wipe(opened)
    try:
        yield opened
    finally:
        wipe(opened)
        opened.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqlStore]:
    opened = open_store(f"sqlite:///{tmp_path / 'collector.db'}", pool_size=4)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def config() -> Config:
    return make_config()


@pytest.fixture
def client(store: SqlStore, config: Config) -> Iterator[TestClient]:
    with TestClient(create_app(config, store=store), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def tokens(store: SqlStore) -> dict[str, str]:
    """One SRE token per role, by role name."""
    return {r.label: auth.create_api_token(store, r, f"{r.label}-test")[0] for r in Role}


@pytest.fixture
def enroll_token(store: SqlStore) -> str:
    return auth.create_enroll_token(store, note="tests")[0]


@pytest.fixture
def clock(store: SqlStore) -> Clock:
    """The store's time, moved by hand (starts at T0)."""
    c = Clock()
    store.clock = c
    return c
