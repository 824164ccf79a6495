"""Enrollment and report ingest over the real app and a real database (SQLite and PostgreSQL):
verification, the chain, duplicates, refusals, and the verdicts reports cause."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent import wire
from collector import auth
from collector.api import create_app
from collector.model import HostState
from collector.store import SqlStore
from tests.collector.apptest import assert_error, make_config
from tests.collector.clock import Clock
from tests.collector.hosts import SimHost, file_drift, login


def enroll(client: TestClient, host: SimHost, token: str) -> dict[str, Any]:
    response = client.post("/v1/enroll", json=host.enrollment(token))
    assert response.status_code in (200, 201), response.text
    body: dict[str, Any] = response.json()
    return body


def send(client: TestClient, host: SimHost, *envelopes: dict[str, Any]) -> Any:
    return client.post("/v1/reports", json=host.batch(*envelopes))


@pytest.fixture
def host(client: TestClient, enroll_token: str) -> SimHost:
    sim = SimHost()
    enroll(client, sim, enroll_token)
    return sim


# --- enrollment --------------------------------------------------------------------------


def test_enroll_is_idempotent_for_the_same_key(
    client: TestClient, store: SqlStore, enroll_token: str
) -> None:
    sim = SimHost()
    first = client.post("/v1/enroll", json=sim.enrollment(enroll_token))
    assert first.status_code == 201
    assert first.json() == {"host_id": sim.host_id, "last_seq": 0, "last_digest": ""}
    send(client, sim, sim.agent_start(), sim.heartbeat())
    again = client.post("/v1/enroll", json=sim.enrollment(enroll_token))
    assert again.status_code == 200
    assert again.json() == {"host_id": sim.host_id, "last_seq": 2, "last_digest": sim.prev}
    stored = store.host(sim.host_id)
    assert stored is not None and stored.state is HostState.ENROLLED
    assert stored.pool == "web" and stored.image_build_id == "img-1"
    [trail] = store.transitions(sim.host_id)
    assert (trail.from_state, trail.to_state, trail.actor) == (None, "enrolled", "enrollment")


def test_enroll_token_rules(client: TestClient, store: SqlStore, clock: Clock) -> None:
    once, _ = auth.create_enroll_token(store, uses=1)
    assert client.post("/v1/enroll", json=SimHost().enrollment(once)).status_code == 201
    assert_error(client.post("/v1/enroll", json=SimHost().enrollment(once)), 401, "bad_token")
    assert_error(client.post("/v1/enroll", json=SimHost().enrollment("dwe_nope")), 401, "bad_token")
    revoked, record = auth.create_enroll_token(store)
    store.revoke_enroll_token(record.token_id)
    assert_error(client.post("/v1/enroll", json=SimHost().enrollment(revoked)), 401, "bad_token")
    expired, _ = auth.create_enroll_token(store, expires_in_s=30)
    clock.advance(31)
    assert_error(client.post("/v1/enroll", json=SimHost().enrollment(expired)), 401, "bad_token")


def test_enroll_refuses_forged_and_malformed(client: TestClient, enroll_token: str) -> None:
    request = SimHost().enrollment(enroll_token)
    forged = {**request, "host_id": "someone-else"}
    assert_error(client.post("/v1/enroll", json=forged), 400, "bad_signature")
    assert_error(client.post("/v1/enroll", json={"token": "x"}), 400, "malformed")
    assert_error(client.post("/v1/enroll", content=b"{nope"), 400, "malformed")
    sim = SimHost()
    no_facts = wire.make_enrollment(
        sim.key, token=enroll_token, host_id=sim.host_id, public_key_raw=sim.public_raw, facts={}
    )
    details = assert_error(client.post("/v1/enroll", json=no_facts), 400, "malformed")
    assert details == {}


# --- reports -----------------------------------------------------------------------------


def test_reports_are_acknowledged_and_judged(
    client: TestClient, store: SqlStore, host: SimHost
) -> None:
    response = send(client, host, host.agent_start(), host.boot(), host.heartbeat())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["acks"] == [{"seq": n, "status": "accepted"} for n in (1, 2, 3)]
    assert (body["last_seq"], body["last_digest"]) == (3, host.prev)
    stored = store.host(host.host_id)
    assert stored is not None and stored.state is HostState.CLEAN and stored.envelopes == 3
    assert stored.health["version"] == "0.1.0" and stored.last_seen_at is not None
    assert [r.seq for r in store.reports(host.host_id)] == [3, 2, 1]


def test_resent_envelopes_are_duplicates_never_counted_twice(
    client: TestClient, store: SqlStore, host: SimHost
) -> None:
    first = [host.agent_start(), host.heartbeat(), host.heartbeat()]
    assert send(client, host, *first).status_code == 200
    again = send(client, host, *first)
    assert again.status_code == 200
    assert [a["status"] for a in again.json()["acks"]] == ["duplicate"] * 3
    mixed = send(client, host, first[2], host.heartbeat())
    assert [a["status"] for a in mixed.json()["acks"]] == ["duplicate", "accepted"]
    assert store.host(host.host_id).envelopes == 4  # type: ignore[union-attr]
    assert len(store.reports(host.host_id)) == 4


def test_replay_is_refused_and_nothing_of_the_batch_is_committed(
    client: TestClient, store: SqlStore, host: SimHost
) -> None:
    send(client, host, host.agent_start(), host.heartbeat())
    tip = host.prev
    good = host.heartbeat()
    replay = host.envelope("heartbeat", {"health": {"forged": True}}, seq=1)
    details = assert_error(send(client, host, good, replay), 409, "replay")
    assert details == {"index": 1, "seq": 1, "last_seq": 2, "last_digest": tip}
    assert [r.seq for r in store.reports(host.host_id)] == [2, 1]


def test_fork_is_refused(client: TestClient, host: SimHost) -> None:
    send(client, host, host.agent_start())
    host.prev = "0" * 64
    details = assert_error(send(client, host, host.heartbeat()), 409, "fork")
    assert details["seq"] == 2 and details["last_seq"] == 1


def test_reordered_batch_is_refused(client: TestClient, store: SqlStore, host: SimHost) -> None:
    one, two, three = host.agent_start(), host.heartbeat(), host.heartbeat()
    details = assert_error(send(client, host, one, three, two), 409, "replay")
    assert details["index"] == 2
    assert store.reports(host.host_id) == []


def test_gap_is_accepted_as_evidence(client: TestClient, store: SqlStore, host: SimHost) -> None:
    send(client, host, host.agent_start(), host.boot())
    response = send(client, host, host.envelope("heartbeat", {"health": {}}, seq=7))
    assert response.json()["acks"] == [{"seq": 7, "status": "accepted"}]
    stored = store.host(host.host_id)
    assert stored is not None and stored.state is HostState.SUSPECT
    assert stored.state_cause == "sequence_gap"
    assert store.transitions(host.host_id)[0].evidence == {"expected": 3, "got": 7}


def test_forged_and_foreign_signatures_are_refused(
    client: TestClient, store: SqlStore, host: SimHost
) -> None:
    good = host.agent_start()
    forged = host.heartbeat()
    forged["body"] = {"health": {"all": "fine"}}
    details = assert_error(send(client, host, good, forged), 401, "bad_signature")
    assert details == {"index": 1, "seq": 2}
    stranger = SimHost(host.host_id)
    assert_error(send(client, stranger, stranger.agent_start()), 401, "bad_signature")
    assert store.reports(host.host_id) == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"host_id": "h"}, "host_id"),
        ({"host_id": "h", "envelopes": []}, "1 to 500"),
        ({"host_id": 1, "envelopes": [{}]}, "string"),
        ([1, 2], "host_id"),
    ],
)
def test_malformed_batches(client: TestClient, body: Any, fragment: str) -> None:
    response = client.post("/v1/reports", json=body)
    assert_error(response, 400, "malformed")
    assert fragment in response.json()["error"]["message"]


def test_malformed_envelopes_name_their_index(client: TestClient, host: SimHost) -> None:
    good = host.agent_start()
    other = SimHost("other-host")
    details = assert_error(send(client, host, good, other.heartbeat()), 400, "malformed")
    assert details["index"] == 1
    bad_body = host.envelope("finding", {"source": "realtime", "findings": "lots"})
    assert assert_error(send(client, host, bad_body), 400, "malformed")["index"] == 0
    too_many = [host.heartbeat() for _ in range(wire.MAX_BATCH_ENVELOPES + 1)]
    assert_error(send(client, host, *too_many), 400, "malformed")
    assert_error(client.post("/v1/reports", content=b"\xff\xfe"), 400, "malformed")


def test_unknown_host_must_enroll(client: TestClient) -> None:
    stranger = SimHost()
    assert_error(send(client, stranger, stranger.agent_start()), 404, "unknown_host")


def test_oversized_body_is_refused_before_parsing(client: TestClient, host: SimHost) -> None:
    limit = 4 * 1024 * 1024
    big = b'{"host_id": "' + b"x" * limit + b'"}'
    assert_error(client.post("/v1/reports", content=big), 413, "too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'{"host_id": "'
        for _ in range(5):
            yield b"x" * (1024 * 1024)

    assert_error(client.post("/v1/reports", content=chunks()), 413, "too_large")
    assert_error(client.post("/v1/tokens", content=chunks()), 413, "too_large")  # any route
    assert_error(client.post("/v1/enroll", content=big), 413, "too_large")
    metrics = client.app.state.services.metrics.render().decode()  # type: ignore[attr-defined]
    assert 'driftwarden_reports_refused_total{reason="too_large"} 4.0' in metrics


# --- verdicts from reports ---------------------------------------------------------------


def test_drift_login_and_unclean_restart(
    client: TestClient, store: SqlStore, host: SimHost
) -> None:
    send(client, host, host.agent_start(), host.boot())
    send(client, host, host.finding(file_drift("/etc/passwd")))
    drifted = store.host(host.host_id)
    assert drifted is not None and drifted.state is HostState.DRIFTED
    [why] = [t for t in store.transitions(host.host_id) if t.to_state is HostState.DRIFTED]
    assert why.evidence["findings"] == [
        {"type": "file", "path": "/etc/passwd", "severity": "critical"}
    ]
    assert [f.path for f in store.findings(host.host_id)] == ["/etc/passwd"]
    send(client, host, host.finding(login(), source="ssh"))
    assert store.host(host.host_id).state is HostState.TAINTED  # type: ignore[union-attr]
    send(client, host, host.agent_start(previous_stop="unclean"))
    suspect = store.host(host.host_id)
    assert suspect is not None and suspect.state is HostState.SUSPECT
    assert suspect.state_cause == "unclean_stop"
    alerts = {j.dedup_key for j in store.jobs(kind="alert")}
    assert alerts == {
        f"firing:{host.host_id}:drift",
        f"firing:{host.host_id}:login",
        f"firing:{host.host_id}:unclean_stop",
    }
    assert [j.dedup_key for j in store.jobs(kind="replace")] == [host.host_id]


def test_allowed_login_and_info_findings_do_not_taint(
    client: TestClient, store: SqlStore, host: SimHost
) -> None:
    send(client, host, host.agent_start(), host.boot())
    info = {"type": "file", "drift": False, "severity": "info", "path": "/var/log/x"}
    send(client, host, host.finding(login("allow"), info))
    assert store.host(host.host_id).state is HostState.CLEAN  # type: ignore[union-attr]
    assert store.jobs(kind="alert") == []


def test_boot_with_drift_is_drifted_from_its_first_second(
    client: TestClient, store: SqlStore, host: SimHost
) -> None:
    send(client, host, host.agent_start(), host.boot(findings=[file_drift("/usr/bin/ls")]))
    assert store.host(host.host_id).state is HostState.DRIFTED  # type: ignore[union-attr]


@pytest.fixture
def strict_client(store: SqlStore, tmp_path: Any) -> Iterator[TestClient]:
    config = make_config()
    config = config.replace(images=type(config.images)(require_registered=True))
    with TestClient(create_app(config, store=store), raise_server_exceptions=False) as c:
        yield c


def test_images_must_be_registered_and_match(
    strict_client: TestClient, store: SqlStore, enroll_token: str
) -> None:
    from collector.model import Image

    store.put_image(
        Image("img-1", SimHost().root, "ed25519:00", "sha256:00", "2024", store.clock(), {})
    )
    good, unregistered, swapped = SimHost(), SimHost(build_id="img-x"), SimHost()
    measured = SimHost()
    for sim in (good, unregistered, swapped, measured):
        enroll(strict_client, sim, enroll_token)
    send(strict_client, good, good.agent_start(), good.boot())
    send(strict_client, unregistered, unregistered.agent_start(), unregistered.boot())
    send(strict_client, swapped, swapped.agent_start(), swapped.boot(baseline_root="cd" * 32))
    send(strict_client, measured, measured.agent_start(), measured.boot(measured_root="ef" * 32))
    states = {h: store.host(h.host_id) for h in (good, unregistered, swapped, measured)}
    assert (states[good].state, states[good].state_cause) == (  # type: ignore[union-attr]
        HostState.CLEAN,
        "boot_clean",
    )
    assert states[unregistered].state_cause == "image_unregistered"  # type: ignore[union-attr]
    assert states[swapped].state_cause == "baseline_mismatch"  # type: ignore[union-attr]
    assert states[measured].state_cause == "measurement_mismatch"  # type: ignore[union-attr]
    assert states[measured].state is HostState.DRIFTED  # type: ignore[union-attr]


def test_a_stored_report_body_round_trips(
    client: TestClient, store: SqlStore, host: SimHost
) -> None:
    start = host.agent_start()
    send(client, host, start)
    [report] = store.reports(host.host_id)
    assert json.loads(json.dumps(dict(report.body))) == start["body"]
    assert report.digest == wire.parse_envelope(start).digest
