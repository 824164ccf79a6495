"""What a chain says about a host beyond its reports, over the real app and a real database:
a correctly signed replay or fork is refused and is itself evidence; a replay of old reports
is not a sign of life."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from collector.model import HostState
from collector.store import SqlStore
from tests.collector.apptest import assert_error
from tests.collector.clock import Clock
from tests.collector.hosts import SimHost, file_drift


def send(client: TestClient, host: SimHost, *envelopes: dict[str, Any]) -> Any:
    return client.post("/v1/reports", json=host.batch(*envelopes))


@pytest.fixture
def host(client: TestClient, enroll_token: str) -> SimHost:
    sim = SimHost()
    assert client.post("/v1/enroll", json=sim.enrollment(enroll_token)).status_code == 201
    return sim


def _drift(sim: SimHost, seq: int) -> dict[str, Any]:
    body = {"source": "realtime", "findings": [file_drift("/usr/bin/sudo")]}
    return sim.envelope("finding", body, seq=seq)


@pytest.mark.parametrize("code", ["replay", "fork"])
def test_a_signed_replay_or_fork_is_refused_and_recorded_as_evidence(
    client: TestClient, store: SqlStore, host: SimHost, code: str
) -> None:
    assert send(client, host, host.agent_start(), *[host.heartbeat() for _ in range(4)]).is_success
    tip = (host.seq, host.prev)
    if code == "replay":
        host.seq, host.prev = 2, "0" * 64  # a restored snapshot: seq 3 again, other content
        conflict = _drift(host, 3)
    else:
        host.prev = "1" * 64  # the next seq, but after another history
        conflict = _drift(host, 6)
    details = assert_error(send(client, host, conflict), 409, code)
    assert (details["last_seq"], details["last_digest"]) == tip
    stored = store.host(host.host_id)
    assert stored is not None and stored.state is HostState.SUSPECT
    assert stored.state_cause == "chain_conflict" and stored.envelopes == 5
    assert not store.findings(host.host_id)  # nothing of the batch
    [line] = [t for t in store.transitions(host.host_id) if t.cause == "chain_conflict"]
    assert line.evidence["code"] == code and line.evidence["seq"] == conflict["seq"]
    assert line.evidence["last_seq"] == 5 and line.evidence["last_digest"] == tip[1]
    assert line.evidence["digest"] and "stored_digest" in line.evidence
    # sent again: refused again, no second line
    assert_error(send(client, host, conflict), 409, code)
    causes = [t.cause for t in store.transitions(host.host_id)]
    assert causes.count("chain_conflict") == 1


def test_a_batch_of_duplicates_only_is_not_a_sign_of_life(
    client: TestClient, store: SqlStore, host: SimHost, clock: Clock
) -> None:
    first = host.batch(host.agent_start(), host.heartbeat())
    assert client.post("/v1/reports", json=first).is_success
    seen = store.host(host.host_id).last_seen_at  # type: ignore[union-attr]
    clock.advance(120)
    again = client.post("/v1/reports", json=first)
    assert [a["status"] for a in again.json()["acks"]] == ["duplicate", "duplicate"]
    assert store.host(host.host_id).last_seen_at == seen  # type: ignore[union-attr]
    assert send(client, host, host.heartbeat()).is_success
    assert store.host(host.host_id).last_seen_at == clock.now  # type: ignore[union-attr]
