"""``kill -9`` of a collector under load loses no acknowledged report (SQLite and
PostgreSQL): clients send batches and record every acknowledgement; the server is killed
mid-stream and restarted on the same database; every acknowledged envelope is there."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from collector import auth
from collector.store import SqlStore
from tests.collector.hosts import SimHost
from tests.collector.servers import Server

pytestmark = pytest.mark.slow
CLIENTS = 4
KILL_AFTER_ACKS = 150


class Sender(threading.Thread):
    """An agent's sending loop: batches of 5 heartbeats, re-sent as-is until answered."""

    def __init__(self, server: Server, host: SimHost, enough: threading.Event) -> None:
        super().__init__(name=f"sender-{host.host_id}")
        self.server = server
        self.host = host
        self.enough = enough
        self.acked: set[int] = set()
        self.pending: dict[str, Any] | None = None
        self.failed = threading.Event()

    def run(self) -> None:
        with requests.Session() as session:
            while not self.failed.is_set():
                if self.pending is None:
                    self.pending = self.host.batch(*(self.host.heartbeat() for _ in range(5)))
                try:
                    answer = session.post(
                        self.server.url + "/v1/reports", json=self.pending, timeout=10
                    )
                except requests.RequestException:
                    self.failed.set()  # the collector is gone: keep the batch, stop
                    return
                assert answer.status_code == 200, answer.text
                self.acked |= {a["seq"] for a in answer.json()["acks"]}
                self.pending = None
                if len(self.acked) >= KILL_AFTER_ACKS // CLIENTS:
                    self.enough.set()

    def resend(self) -> list[str]:
        assert self.pending is not None
        answer = requests.post(self.server.url + "/v1/reports", json=self.pending, timeout=10)
        assert answer.status_code == 200, answer.text
        return [a["status"] for a in answer.json()["acks"]]


def test_kill_9_under_load_loses_no_acknowledged_report(
    store: SqlStore, db_url: str, tmp_path: Path
) -> None:
    token, _ = auth.create_enroll_token(store)
    hosts = [SimHost(f"crash-{n}") for n in range(CLIENTS)]
    server = Server(db_url, tmp_path).start()
    try:
        for host in hosts:
            enrolled = requests.post(server.url + "/v1/enroll", json=host.enrollment(token))
            assert enrolled.status_code == 201
        enough = threading.Event()
        senders = [Sender(server, host, enough) for host in hosts]
        for sender in senders:
            sender.start()
        assert enough.wait(60), "no load reached the collector"
        server.kill()
        for sender in senders:
            sender.join(30)
            assert not sender.is_alive()
        server.start()
        for sender in senders:
            stored = {r.seq for r in store.reports(sender.host.host_id, limit=100_000)}
            assert sender.acked <= stored, sender.host.host_id
            assert sender.acked, "every client had something acknowledged"
            # the batch in flight at the kill: committed (now duplicate) or not (now accepted)
            statuses = sender.resend()
            assert len(set(statuses)) == 1, statuses
            record = store.host(sender.host.host_id)
            assert record is not None
            stored = {r.seq for r in store.reports(sender.host.host_id, limit=100_000)}
            assert stored == set(range(1, sender.host.seq + 1))
            assert record.envelopes == len(stored)
    finally:
        server.stop()
