"""Alerts through the durable outbox: a real Alertmanager sees a drifted host's alert, re-sent
while firing and resolved when the host is replaced; a PagerDuty receiver that answers 429
and 500 before 202 gets the alert through retries scheduled on the job (never a held worker);
a final refusal buries the job; rate limits defer; a repeat opens no second incident; a
resolution is never overtaken by a firing re-send."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from collector import silence
from collector.model import JobSpec, JobState, Role
from collector.response import incidents, ledger
from collector.store import SqlStore
from tests.collector.alertmanager_proc import Alertmanager
from tests.collector.clock import Clock
from tests.collector.fleet import Fleet, recording_action, replaced_by
from tests.collector.loopback import Answer, LoopbackReceiver

ROUTING_KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def receiver() -> Iterator[LoopbackReceiver]:
    with LoopbackReceiver(Answer(202, b'{"status":"success"}')) as server:
        yield server


def pagerduty(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "pagerduty", "name": "pd", "routing_key": ROUTING_KEY, "url": url, **extra}


def events(receiver: LoopbackReceiver) -> list[tuple[str, str]]:
    return [(r.json()["event_action"], r.json()["dedup_key"]) for r in receiver.requests]


# --- Alertmanager, the real one ---------------------------------------------------------------


def test_alertmanager_sees_the_drift_and_its_resolution_after_replacement(
    sqlite_store: SqlStore, tmp_path: Path
) -> None:
    if not Alertmanager.available():
        pytest.skip("prometheus-alertmanager is not installed")
    out = tmp_path / "replaced"
    (tmp_path / "am").mkdir()
    with Alertmanager(tmp_path / "am") as am:
        fleet = Fleet(
            sqlite_store,
            {
                "sink": [
                    {"type": "alertmanager", "name": "am", "url": am.url, "resend_interval_s": 60}
                ],
                "action": [recording_action(out)],
                "pool": [{"name": "web", "action": "recorder", "budget": 1}],
                "response": {"verify_after_s": 0.2, "gone_after_s": 0.2},
            },
        )
        try:
            fleet.enroll("web-1", "web-2")
            fleet.drift("web-1", "/etc/shadow")
            fleet.run()
            [held] = am.alerts()
            assert held["labels"] == {
                "alertname": "DriftwardenHostDrift",
                "host": "web-1",
                "pool": "web",
                "cause": "drift",
                "severity": "critical",
            }
            assert held["annotations"]["dedup_key"] == "driftwarden/web/web-1/drift"
            assert "/etc/shadow" in held["annotations"]["summary"]
            [deliver] = sqlite_store.jobs(kind="deliver")
            assert deliver.state is JobState.PENDING  # to be re-sent while firing
            assert deliver.next_attempt_at > sqlite_store.clock() + timedelta(seconds=50)
            assert replaced_by(out) == {"web-1": 1}

            deadline = time.monotonic() + 30
            while fleet.host("web-1").state.value != "replaced":  # it stopped reporting
                assert time.monotonic() < deadline, fleet.replacements()
                fleet.heartbeat("web-2")
                fleet.run()
                threading.Event().wait(0.05)
            fleet.run()
            assert am.alerts() == []  # resolved
            [deliver] = sqlite_store.jobs(kind="deliver")
            assert deliver.state is JobState.DONE  # no more re-sends once resolved
        finally:
            fleet.close()


# --- PagerDuty through the outbox -------------------------------------------------------------


def test_pagerduty_429_then_500_then_202_is_retried_through_the_job(
    store: SqlStore, clock: Clock, receiver: LoopbackReceiver
) -> None:
    receiver.answer(Answer(429, b"slow down", (("Retry-After", "120"),)), Answer(500, b"oops"))
    fleet = Fleet(store, {"sink": [pagerduty(receiver.url + "/v2/enqueue")]})
    try:
        fleet.enroll("web-1")
        fleet.drift("web-1", "/usr/bin/sudo")
        with capture_logs() as logs:
            fleet.run()
        [job] = store.jobs(kind="deliver")
        assert job.state is JobState.PENDING and job.attempts == 1
        assert job.next_attempt_at >= clock.now + timedelta(seconds=120)  # Retry-After honoured
        failed = [e for e in logs if e["event"] == "alert_delivery_failed"]
        assert failed[0]["retryable"] is True and failed[0]["retry_after_s"] == 120
        assert fleet.run() == 0  # nothing due: no worker waits on it
        clock.advance(121)
        fleet.run()
        [job] = store.jobs(kind="deliver")
        assert (job.state, job.attempts) == (JobState.PENDING, 2)
        assert "HTTP 500" in (job.last_error or "")
        clock.advance(3600)
        fleet.run()
        [job] = store.jobs(kind="deliver")
        assert job.state is JobState.DONE
        assert events(receiver) == [("trigger", "driftwarden/web/web-1/drift")] * 3
        body = receiver.requests[-1].json()
        assert body["routing_key"] == ROUTING_KEY and body["payload"]["severity"] == "critical"

        with fleet.client() as client:  # the host leaves the fleet: its incident resolves
            answer = client.post(
                "/v1/hosts/web-1/retire",
                json={"reason": "decommissioned"},
                headers=fleet.token(Role.OPERATOR, "op"),
            )
            assert answer.status_code == 200, answer.text
        fleet.run()
        assert events(receiver)[-1] == ("resolve", "driftwarden/web/web-1/drift")
        assert len(receiver.requests) == 4
    finally:
        fleet.close()


def test_a_final_refusal_buries_the_delivery_at_once(
    sqlite_store: SqlStore, receiver: LoopbackReceiver
) -> None:
    receiver.answer(Answer(400, b'{"status":"invalid event"}'))
    fleet = Fleet(sqlite_store, {"sink": [pagerduty(receiver.url)]})
    try:
        fleet.enroll("web-1")
        fleet.drift("web-1")
        fleet.run()
        [job] = sqlite_store.jobs(kind="deliver")
        assert (job.state, job.attempts) == (JobState.DEAD, 1)
        assert len(receiver.requests) == 1
    finally:
        fleet.close()


def test_a_rate_limited_sink_defers_instead_of_waiting(
    store: SqlStore, clock: Clock, receiver: LoopbackReceiver
) -> None:
    sink = pagerduty(receiver.url, rate_limit_per_minute=1, rate_limit_burst=2)
    fleet = Fleet(store, {"sink": [sink]})
    try:
        hosts = [f"web-{n}" for n in range(5)]
        fleet.enroll(*hosts)
        for n, host_id in enumerate(hosts):
            fleet.drift(host_id, f"/etc/x{n}")
        fleet.run()
        assert len(receiver.requests) == 2  # the burst
        waiting = store.jobs(kind="deliver", state="pending")
        assert len(waiting) == 3
        assert all(j.next_attempt_at > clock.now for j in waiting)
        assert {j.last_error for j in waiting} == {None}  # deferred, not failed
    finally:
        fleet.close()


def test_a_repeat_never_opens_a_second_incident(
    sqlite_store: SqlStore, receiver: LoopbackReceiver
) -> None:
    fleet = Fleet(sqlite_store, {"sink": [pagerduty(receiver.url)]})
    try:
        fleet.enroll("web-1")
        fleet.drift("web-1")
        fleet.run()
        [first] = sqlite_store.jobs(kind="alert")
        sqlite_store.enqueue(JobSpec("alert", first.dedup_key, first.payload))  # sent again
        fleet.run()
        assert len(sqlite_store.jobs(kind="alert")) == 2
        assert len(sqlite_store.jobs(kind="deliver")) == 1
        assert events(receiver) == [("trigger", "driftwarden/web/web-1/drift")]
        with ledger.transaction(sqlite_store) as tx:
            [incident] = incidents.firing_incidents(tx, "web-1")
        assert incident.version == 1
    finally:
        fleet.close()


def test_a_resolution_is_sent_at_once_and_never_overtaken_by_a_resend(
    store: SqlStore, clock: Clock, receiver: LoopbackReceiver
) -> None:
    sink = {"type": "alertmanager", "name": "am", "url": receiver.url, "resend_interval_s": 600}
    fleet = Fleet(store, {"sink": [sink]})
    try:
        fleet.enroll("web-1")
        fleet.drift("web-1")
        fleet.run()
        [job] = store.jobs(kind="deliver")
        assert job.next_attempt_at == clock.now + timedelta(seconds=600)
        clock.advance(10)
        with fleet.client() as client:
            client.post(
                "/v1/hosts/web-1/retire",
                json={"reason": "gone"},
                headers=fleet.token(Role.OPERATOR, "op"),
            )
        fleet.run()  # the re-send waiting for 600 s is woken and sends the resolution
        sent = [r.json()[0] for r in receiver.requests]
        assert len(sent) == 2
        assert sent[1]["endsAt"].startswith("2030-01-01T00:00:10")
        [job] = store.jobs(kind="deliver")
        assert job.state is JobState.DONE
        clock.advance(3600)
        fleet.run()
        assert len(receiver.requests) == 2
    finally:
        fleet.close()


def test_silence_pages_a_warning_and_resolves_when_the_host_reports(
    store: SqlStore, clock: Clock, receiver: LoopbackReceiver
) -> None:
    fleet = Fleet(store, {"sink": [pagerduty(receiver.url)]})
    try:
        fleet.enroll("web-1", *(f"web-{n}" for n in range(2, 12)))
        clock.advance(60)
        fleet.heartbeat(*(f"web-{n}" for n in range(2, 12)))
        clock.advance(60)
        assert silence.sweep(store, fleet.config.verdicts).silenced == ["web-1"]
        fleet.run()
        fleet.heartbeat("web-1")
        fleet.run()
        sent = [r.json() for r in receiver.requests]
        assert [(e["event_action"], e["dedup_key"]) for e in sent] == [
            ("trigger", "driftwarden/web/web-1/silent"),
            ("resolve", "driftwarden/web/web-1/silent"),
        ]
        assert sent[0]["payload"]["severity"] == "warning"
    finally:
        fleet.close()
