"""Two collector replicas (real processes) on one PostgreSQL, one killed (SIGKILL) while it
delivers an alert and requests a replacement: every alert is still delivered — firing, then
resolved once the host is replaced — and no host is replaced twice (the pipeline receiver
counts the requests it accepted per host; a repeated request id is answered 409)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from collector import auth
from collector.model import JobState
from collector.store import SqlStore, open_store
from tests.collector.conftest import wipe
from tests.collector.hosts import SimHost, file_drift
from tests.collector.loopback import Answer, LoopbackReceiver, Received
from tests.collector.servers import CONFIG, Server
from tests.sshd import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

HOSTS = 16


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[SqlStore]:
    store = open_store(pg_url, pool_size=4)
    wipe(store)
    try:
        yield store
    finally:
        wipe(store)
        store.close()


class Pipeline:
    """A deployment pipeline's replacement hook: takes each request id once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: set[str] = set()
        self.accepted: dict[str, list[str]] = defaultdict(list)

    def __call__(self, request: Received) -> Answer:
        key = request.headers["Idempotency-Key"]
        host = request.json()["request"]["host_id"]
        with self.lock:
            if key in self.keys:
                return Answer(409, b'{"status":"already"}')
            self.keys.add(key)
            self.accepted[host].append(key)
        return Answer(200, b'{"status":"accepted"}')


def config(alerts: str, pipeline: str) -> str:
    return f"""
[jobs]
lease_s = 2
poll_interval_s = 0.05
backoff_base_s = 0.2
backoff_cap_s = 1

[[sink]]
type = "webhook"
name = "pager"
url = "{alerts}/alerts"
secret = "alert-hmac"

[[action]]
type = "webhook"
name = "pipeline"
url = "{pipeline}/replace"
secret = "pipeline-hmac"
timeout_s = 2

[[pool]]
name = "web"
action = "pipeline"
budget = {HOSTS}

[response]
recheck_interval_s = 0.5
verify_after_s = 1
gone_after_s = 0.5
"""


def pid_of(worker: str | None) -> int | None:
    """Workers are named HOSTNAME:PID:RANDOM."""
    return int(worker.split(":")[1]) if worker else None


def test_a_replica_killed_mid_delivery_loses_no_alert_and_replaces_no_host_twice(
    pg_store: SqlStore, pg_url: str, tmp_path: Path
) -> None:
    token, _ = auth.create_enroll_token(pg_store)
    pipeline = Pipeline()
    with (
        LoopbackReceiver(Answer(200, b"ok"), threaded=True) as alerts,
        LoopbackReceiver(responder=pipeline, threaded=True) as hook,
    ):
        alerts.gate.clear()  # deliveries hang until we have killed a replica
        hook.gate.clear()
        extra = config(alerts.url, hook.url)
        a = Server(pg_url, tmp_path, name="a", config=CONFIG + extra)
        b = Server(pg_url, tmp_path, name="b", config=CONFIG + extra)
        with a, b:
            hosts = [SimHost(f"rep-{n:02d}") for n in range(HOSTS)]
            for n, host in enumerate(hosts):
                server = (a, b)[n % 2]
                assert requests.post(server.url + "/v1/enroll", json=host.enrollment(token)).ok
                batch = host.batch(
                    host.agent_start(), host.boot(), host.finding(file_drift(f"/etc/app/conf{n}"))
                )
                assert requests.post(server.url + "/v1/reports", json=batch, timeout=30).ok

            wait_until(  # both replicas' workers are sending: an alert, or a replacement
                lambda: alerts.held >= 1 and alerts.held + hook.held >= 2,
                timeout_s=30,
                what="both replicas to be delivering",
            )
            busy = {
                pid_of(j.claimed_by)
                for j in pg_store.jobs(kind="deliver")
                if j.state is JobState.RUNNING
            }
            victim = a if a.pids() & busy else b
            assert victim.pids() & busy  # it holds a delivery
            victim.kill()  # SIGKILL, holding leases on what it was sending
            alerts.gate.set()
            hook.gate.set()

            def all_resolved() -> bool:
                seen = defaultdict(set)
                for r in alerts.requests:
                    alert = r.json()["alert"]
                    seen[alert["status"]].add(alert["dedup_key"])
                return len(seen["firing"]) == HOSTS and len(seen["resolved"]) == HOSTS

            wait_until(all_resolved, timeout_s=90, what="every alert fired and resolved")
            survivor = b if victim is a else a
            assert survivor.proc is not None and survivor.proc.poll() is None

    keys = {r.json()["alert"]["dedup_key"] for r in alerts.requests}
    assert keys == {f"driftwarden/web/rep-{n:02d}/drift" for n in range(HOSTS)}
    assert {host: len(ids) for host, ids in pipeline.accepted.items()} == {
        f"rep-{n:02d}": 1 for n in range(HOSTS)
    }
    requested = defaultdict(set)
    for r in hook.requests:
        body = r.json()["request"]
        requested[body["host_id"]].add(body["request_id"])
    assert all(len(ids) == 1 for ids in requested.values())  # one request id per host
    assert {h.state.value for h in pg_store.hosts()} == {"replaced"}
