"""The SQLite group commit through the driver (``collector.store.driver``) writes and reads
exactly what the same group through SQLAlchemy does."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from collector.auth import token_hash
from collector.ingest import Ingestor
from collector.metrics import Metrics
from collector.store import SqlStore, driver, open_store
from collector.store.sqlite import SqliteGroupTx
from collector.store.tx import GroupTx
from tests.collector.apptest import make_config
from tests.collector.clock import T0, Clock
from tests.collector.hosts import SimHost, file_drift, login

TOKEN = "driver-test-enroll-token"
TABLES = {
    "hosts": "host_id",
    "host_keys": "host_id, key_id",
    "envelopes": "host_id, key_id, seq",
    "findings": "id",
    "transitions": "id",
    "jobs": "id",
}


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, SqlStore]]:
    """One store whose group commits go through SQLAlchemy, one through the driver, on the
    same clock (a time with microseconds, as real ones have)."""
    clock = Clock()
    clock.now = T0 + timedelta(microseconds=123_456)
    opened: dict[str, SqlStore] = {}
    for name, kind in (("core", GroupTx), ("driver", SqliteGroupTx)):
        store = open_store(f"sqlite:///{tmp_path / name}.db", pool_size=2)
        monkeypatch.setattr(store, "group_tx", kind)
        store.clock = clock
        store.add_enroll_token(token_hash(TOKEN), "driver test", None, None)
        opened[name] = store
    yield opened
    for store in opened.values():
        store.close()


def _dump(store: SqlStore) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a group commit writes, as SQLite holds them."""
    path = store.engine.url.database
    assert path is not None
    with sqlite3.connect(path) as conn:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
            for table, order in TABLES.items()
        }


def test_a_group_through_the_driver_stores_what_sqlalchemy_stores(
    stores: dict[str, SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a few rows per statement, so that every write is cut into several
    monkeypatch.setattr(driver, "MAX_PARAMETERS", 24)
    hosts = [SimHost(f"driver-{n}", pool="web" if n % 2 else None) for n in range(5)]
    requests: list[tuple[str, dict[str, Any]]] = [("enroll", h.enrollment(TOKEN)) for h in hosts]
    requests += [("reports", h.batch(h.agent_start(), h.boot(), h.heartbeat())) for h in hosts]
    drifted, tainted, gapped = hosts[0], hosts[1], hosts[2]
    drift = drifted.finding(file_drift("/etc/passwd"))
    resent = drifted.heartbeat()
    requests += [
        ("reports", drifted.batch(drift, resent)),
        ("reports", drifted.batch(resent, drifted.heartbeat())),  # a duplicate, then news
        ("reports", tainted.batch(tainted.finding(login()))),
        ("reports", gapped.batch(gapped.envelope("heartbeat", {"health": {}}, seq=9))),
        ("reports", hosts[3].batch(*(hosts[3].heartbeat() for _ in range(6)))),
    ]
    answers: dict[str, list[Any]] = {}
    for name, store in stores.items():
        ingest = Ingestor(store, make_config(), Metrics(store))
        try:
            answers[name] = [
                ingest.enroll(body).body if kind == "enroll" else ingest.reports(body)
                for kind, body in requests
            ]
        finally:
            ingest.close()
    assert answers["driver"] == answers["core"]
    core, through_driver = _dump(stores["core"]), _dump(stores["driver"])
    assert {t: len(rows) for t, rows in through_driver.items()} == {
        t: len(rows) for t, rows in core.items()
    }
    assert through_driver == core
    # what the test is about is there: drift and its jobs, a taint, a gap, a duplicate
    states = {h.host_id: stores["driver"].host(h.host_id) for h in hosts}
    assert {h: s.state.value for h, s in states.items() if s is not None} == {
        "driver-0": "drifted",
        "driver-1": "tainted",
        "driver-2": "suspect",
        "driver-3": "clean",
        "driver-4": "clean",
    }
    assert core["jobs"] and core["findings"]
    assert core["hosts"][0][2] == "2030-01-01 00:00:00.123456"  # state_since, as text


def test_a_group_read_through_the_driver_is_what_sqlalchemy_reads(
    stores: dict[str, SqlStore],
) -> None:
    store = stores["driver"]
    hosts = [SimHost(f"read-{n}") for n in range(3)]
    ingest = Ingestor(store, make_config(), Metrics(store))
    try:
        for host in hosts:
            ingest.enroll(host.enrollment(TOKEN))
            ingest.reports(host.batch(host.agent_start(), host.boot(), host.heartbeat()))
    finally:
        ingest.close()
    ids = [h.host_id for h in hosts] + ["not-enrolled"]
    read: dict[str, tuple[Any, ...]] = {}
    for kind in (GroupTx, SqliteGroupTx):
        with store._transaction(kind) as tx:
            assert isinstance(tx, GroupTx)
            tx.lock_hosts(ids)
            read[kind.__name__] = (tx._hosts, tx._tip_rows, tx._tips)
    assert read["SqliteGroupTx"] == read["GroupTx"]
    hosts_read = read["GroupTx"][0]
    assert isinstance(hosts_read, dict) and sorted(hosts_read) == ids[:3]
    assert hosts_read["read-0"]["last_seen_at"].tzinfo is not None


def test_a_time_without_a_zone_is_refused_as_sqlalchemy_refuses_it() -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        driver.time_text(T0.replace(tzinfo=None))
    assert driver.time_text(None) is None
    assert driver.text_time(driver.time_text(T0)) == T0
