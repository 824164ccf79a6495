"""What a host may not choose at enrollment, over the real app and a real database: its pool
(the enrollment token's), a new key for a host already enrolled (refused until an operator
allows it), and the targets its replacement acts on."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from collector import auth
from collector.actions import MalformedRequestError, ReplacementRequest
from collector.api import create_app
from collector.config import Config
from collector.model import HostState
from collector.response.replace import instance_id
from collector.store import SqlStore
from collector.verdicts import ALERT, REPLACE
from tests.collector.apptest import assert_error, bearer
from tests.collector.hosts import SimHost


def enroll(client: TestClient, host: SimHost, token: str) -> Any:
    return client.post("/v1/enroll", json=host.enrollment(token))


def send(client: TestClient, host: SimHost, *envelopes: dict[str, Any]) -> Any:
    return client.post("/v1/reports", json=host.batch(*envelopes))


def test_the_pool_is_the_enrollment_tokens_not_the_hosts_claim(
    client: TestClient, store: SqlStore, tokens: dict[str, str]
) -> None:
    token, record = auth.create_enroll_token(store, pool="db", uses=1)
    assert record.pool == "db" and record.to_json()["pool"] == "db"
    sim = SimHost(pool="web")
    assert enroll(client, sim, token).status_code == 201
    stored = store.host(sim.host_id)
    assert stored is not None and stored.pool == "db"
    # the same key again, with any token and any claim: the pool stays
    sim.pool = "payments"
    assert enroll(client, sim, "dwe_unknown").status_code == 200
    assert store.host(sim.host_id).pool == "db"  # type: ignore[union-attr]
    created = client.post(
        "/v1/enroll-tokens", json={"pool": "web-2"}, headers=bearer(tokens["admin"])
    )
    assert created.status_code == 201 and created.json()["pool"] == "web-2"
    for pool, status in (("../x", 422), ("a/../b", 400)):
        bad = client.post("/v1/enroll-tokens", json={"pool": pool}, headers=bearer(tokens["admin"]))
        assert bad.status_code == status, bad.text
    with pytest.raises(ValueError, match="pool"):
        auth.create_enroll_token(store, pool="web pool")


def test_a_new_key_for_a_known_host_is_refused_and_makes_it_suspect(
    client: TestClient, store: SqlStore, enroll_token: str
) -> None:
    sim = SimHost()
    assert enroll(client, sim, enroll_token).status_code == 201
    assert send(client, sim, sim.agent_start(), sim.boot(), sim.heartbeat()).status_code == 200
    before = store.host(sim.host_id)
    assert before is not None and before.state is HostState.CLEAN
    intruder = SimHost(host_id=sim.host_id, pool="db")
    for _ in range(2):  # a retry records nothing new
        details = assert_error(enroll(client, intruder, enroll_token), 409, "key_mismatch")
        assert details == {}
    after = store.host(sim.host_id)
    assert after is not None
    # evidence of tampering: suspect, but the key, pool and facts are not the intruder's
    assert after.state is HostState.SUSPECT and after.state_cause == "key_mismatch"
    assert (after.key_id, after.pool, after.hostname) == (
        before.key_id,
        before.pool,
        before.hostname,
    )
    [move] = [t for t in store.transitions(sim.host_id) if t.cause == "key_mismatch"]
    assert (move.from_state, move.to_state) == (HostState.CLEAN, HostState.SUSPECT)
    [finding] = [f for f in store.findings(sim.host_id) if f.type == "integrity"]
    assert finding.severity == "warning" and finding.detail["reason"] == "key_mismatch"
    assert finding.detail["refused_key_id"] == after.refused_key_id != after.key_id
    [alert] = store.jobs(kind=ALERT)
    assert alert.payload["cause"] == "key_mismatch" and alert.payload["severity"] == "critical"
    assert [j.payload["host_id"] for j in store.jobs(kind=REPLACE)] == [sim.host_id]
    # the real host goes on reporting under its key, and stays suspect
    assert send(client, sim, sim.heartbeat()).json()["last_seq"] == 4
    assert store.host(sim.host_id).state is HostState.SUSPECT  # type: ignore[union-attr]
    # another new key for a host that is suspect already: recorded; its page is the one open
    other = SimHost(host_id=sim.host_id)
    assert_error(enroll(client, other, enroll_token), 409, "key_mismatch")
    assert len([f for f in store.findings(sim.host_id) if f.type == "integrity"]) == 2
    assert len(store.jobs(kind=ALERT)) == 1


def test_a_token_of_another_pool_cannot_make_a_host_suspect(
    client: TestClient, store: SqlStore, enroll_token: str
) -> None:
    """A token leaked from one pool must not condemn another pool's hosts: the attempt is
    recorded and paged (a warning), and the host stays as it was."""
    sim = SimHost()  # pool "web"
    assert enroll(client, sim, enroll_token).status_code == 201
    assert send(client, sim, sim.agent_start(), sim.boot()).status_code == 200
    other_pool, _ = auth.create_enroll_token(store, pool="db")
    assert_error(enroll(client, SimHost(host_id=sim.host_id), other_pool), 409, "key_mismatch")
    host = store.host(sim.host_id)
    assert host is not None and host.state is HostState.CLEAN and host.pool == "web"
    [finding] = [f for f in store.findings(sim.host_id) if f.type == "integrity"]
    assert finding.detail["reason"] == "key_mismatch"
    [alert] = store.jobs(kind=ALERT)
    assert alert.payload["cause"] == "key_mismatch" and alert.payload["severity"] == "warning"
    assert store.jobs(kind=REPLACE) == []


def test_an_operator_allows_a_rekey_and_the_chain_restarts(
    client: TestClient, store: SqlStore, enroll_token: str, tokens: dict[str, str]
) -> None:
    sim = SimHost()
    assert enroll(client, sim, enroll_token).status_code == 201
    assert send(client, sim, sim.agent_start(), sim.heartbeat()).status_code == 200
    rekey = f"/v1/hosts/{sim.host_id}/rekey"
    body = {"reason": "disk replaced, key lost"}
    assert client.post(rekey, json=body, headers=bearer(tokens["viewer"])).status_code == 403
    allowed = client.post(rekey, json=body, headers=bearer(tokens["operator"]))
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["rekey_allowed_by"].endswith(":operator-test")
    sim.new_key()
    sim.pool = "db"
    answer = enroll(client, sim, enroll_token)
    assert answer.status_code == 201
    assert answer.json()["last_seq"] == 0
    stored = store.host(sim.host_id)
    assert stored is not None and stored.pool == "web" and stored.rekey_allowed_by is None
    assert stored.state is HostState.ENROLLED
    causes = [t.cause for t in store.transitions(sim.host_id)]
    assert "rekey_allowed" in causes
    assert send(client, sim, sim.heartbeat()).json()["last_seq"] == 1
    # the permission was for one new key: the next one is refused again
    assert_error(enroll(client, SimHost(host_id=sim.host_id), enroll_token), 409, "key_mismatch")


def test_action_targets_come_from_the_host_id_and_must_be_plain() -> None:
    assert instance_id("i-0bbbbbbbbbbbbbbbb") == "i-0bbbbbbbbbbbbbbbb"
    assert instance_id("fake-1") is None
    fields = {"request_id": "r-1", "host_id": "web-1", "instance_id": None, "reason": "drift"}
    assert ReplacementRequest(**fields, pool="arn:aws:x/web@1+2").pool == "arn:aws:x/web@1+2"
    for pool in ("../other", "a/../b", "-rf", "web]", 'we"b', "a b", "", "x" * 256, "é"):
        with pytest.raises(MalformedRequestError):
            ReplacementRequest(**fields, pool=pool)
    with pytest.raises(MalformedRequestError):
        ReplacementRequest(**{**fields, "instance_id": "i-1;x"}, pool="web")


def test_over_long_values_are_malformed_never_a_database_error(
    client: TestClient, store: SqlStore, enroll_token: str
) -> None:
    long_host = SimHost("h" * 129)
    assert_error(enroll(client, long_host, enroll_token), 400, "malformed")
    sim = SimHost()
    sim.pool = "p" * 129
    assert_error(enroll(client, sim, enroll_token), 400, "malformed")
    sim.pool = "web"
    assert enroll(client, sim, enroll_token).status_code == 201
    start = sim.envelope("agent_start", {"version": "v" * 65, "pid": 1, "previous_stop": "first"})
    details = assert_error(send(client, sim, start), 400, "malformed")
    assert details["seq"] == 1
    assert store.host(sim.host_id).envelopes == 0  # type: ignore[union-attr]


def test_a_host_rekeyed_through_another_process_is_heard_with_its_new_key(
    client: TestClient, config: Config, store: SqlStore, enroll_token: str, tokens: dict[str, str]
) -> None:
    """Worker processes (and replicas) each remember hosts' keys; one that learned the old key
    reads the new one when a report does not verify with it."""
    sim = SimHost()
    with TestClient(create_app(config, store=store)) as other:
        assert enroll(client, sim, enroll_token).status_code == 201
        assert send(client, sim, sim.agent_start()).status_code == 200  # remembers the key
        body = {"reason": "disk replaced, key lost"}
        rekey = f"/v1/hosts/{sim.host_id}/rekey"
        assert other.post(rekey, json=body, headers=bearer(tokens["operator"])).status_code == 200
        sim.new_key()
        assert enroll(other, sim, enroll_token).status_code == 201
        answer = send(client, sim, sim.agent_start(), sim.heartbeat())
        assert answer.status_code == 200, answer.text
        assert answer.json()["last_seq"] == 2
        forged = SimHost(host_id=sim.host_id)  # a third key still fails, after the re-read
        forged.seq, forged.prev = sim.seq, sim.prev
        assert_error(send(client, forged, forged.heartbeat()), 401, "bad_signature")
