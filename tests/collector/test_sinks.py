"""Alert sinks against real receivers: a real Alertmanager process, and loopback HTTP servers
that check the PagerDuty, Slack and webhook payloads against the documented formats."""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from collector.sinks import (
    SINKS,
    Alert,
    AlertLink,
    Backoff,
    DeliveryError,
    DeliveryInterrupted,
    MalformedAlertError,
    RateLimiter,
    SignatureError,
    SinkConfigError,
    build_sink,
    build_sinks,
    dedup_key,
    deliver_with_retries,
    signing,
)
from collector.sinks.alertmanager import AlertmanagerSink
from collector.sinks.config import ConfigTable, Secret
from collector.sinks.http import retry_after_s
from collector.sinks.pagerduty import PagerDutySink
from collector.sinks.slack import SlackSink
from collector.sinks.webhook import WebhookSink
from tests.collector.alertmanager_proc import Alertmanager, free_port
from tests.collector.loopback import Answer, LoopbackReceiver

STARTED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
FAST = Backoff(initial_s=0.01, max_s=0.05)
ROUTING_KEY = "R0UT1NGKEY0123456789abcdefabcdef"
SLACK_TOKEN = "T000/B000/XXXXSECRETXXXX"


def host_alert(**overrides: Any) -> Alert:
    fields: dict[str, Any] = {
        "dedup_key": dedup_key("web", "file_drift", "web-17"),
        "status": "firing",
        "severity": "critical",
        "summary": "web-17 drifted: /usr/bin/sudo changed",
        "host_id": "web-17",
        "pool": "web",
        "cause": "file_drift",
        "details": {"paths": ["/usr/bin/sudo"], "image": "build-42"},
        "starts_at": STARTED,
        "links": (AlertLink("https://dw.example/hosts/web-17", "host"),),
    }
    fields.update(overrides)
    return Alert(**fields)


def pool_alert() -> Alert:
    return Alert(
        dedup_key=dedup_key("web", "file_drift"),
        status="firing",
        severity="critical",
        summary="12 hosts in pool web drifted the same way",
        host_id=None,
        pool="web",
        cause="file_drift",
        details={"hosts": [f"web-{n}" for n in range(12)]},
        starts_at=STARTED,
    )


@pytest.fixture
def receiver() -> Iterator[LoopbackReceiver]:
    with LoopbackReceiver() as server:
        yield server


# --- the alert record -------------------------------------------------------------------------


def test_dedup_key_is_stable_per_pool_host_and_cause() -> None:
    assert dedup_key("web", "file_drift", "web-17") == dedup_key("web", "file_drift", "web-17")
    assert dedup_key("web", "file_drift", "web-17") != dedup_key("web", "ssh_login", "web-17")
    assert dedup_key("web", "file_drift") == "driftwarden/web/*/file_drift"
    long_key = dedup_key("p" * 300, "cause", "h")
    assert len(long_key) <= 255 and long_key == dedup_key("p" * 300, "cause", "h")


def test_alert_round_trips_through_json_and_resolves_with_the_same_key() -> None:
    alert = host_alert()
    stored = json.loads(json.dumps(alert.to_json()))
    assert Alert.from_json(stored) == alert
    resolved = alert.resolved(STARTED + timedelta(hours=1))
    assert resolved.dedup_key == alert.dedup_key
    assert (resolved.status, resolved.ends_at) == ("resolved", STARTED + timedelta(hours=1))
    assert Alert.from_json(json.loads(json.dumps(resolved.to_json()))) == resolved


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"status": "open"}, "status = 'open'"),
        ({"severity": "page"}, "severity = 'page'"),
        ({"summary": ""}, "summary = ''"),
        ({"starts_at": datetime(2024, 1, 1)}, "timezone-aware"),
        ({"details": {"x": float("nan")}}, "details are not JSON"),
        ({"details": {"x": object()}}, "details are not JSON"),
    ],
)
def test_an_alert_of_the_wrong_shape_is_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedAlertError, match=message):
        host_alert(**overrides)


def test_a_stored_alert_of_the_wrong_shape_is_refused() -> None:
    stored = host_alert().to_json()
    with pytest.raises(MalformedAlertError, match="differ from the expected"):
        Alert.from_json({**stored, "extra": 1})
    with pytest.raises(MalformedAlertError, match="cannot be read"):
        Alert.from_json({**stored, "starts_at": "yesterday"})


def test_alert_details_cannot_be_changed_after_the_fact() -> None:
    details = {"paths": ["/etc/passwd"]}
    alert = host_alert(details=details)
    details["paths"].append("/etc/shadow")
    assert alert.details["paths"] == ["/etc/passwd"]
    with pytest.raises(TypeError):
        alert.details["x"] = 1  # type: ignore[index]


# --- Alertmanager (the real one) --------------------------------------------------------------


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    if not Alertmanager.available():
        pytest.skip("prometheus-alertmanager is not installed")
    with Alertmanager(tmp_path) as am:
        yield am


def test_alertmanager_shows_a_firing_alert_and_then_its_resolution(
    alertmanager: Alertmanager,
) -> None:
    sink = AlertmanagerSink("am", url=alertmanager.url, resend_interval_s=60)
    now = datetime.now(UTC)
    alert = host_alert(starts_at=now - timedelta(minutes=1))
    sink.send(alert)
    sink.send(alert)  # the re-send while firing updates the same alert

    held = alertmanager.alerts()
    assert len(held) == 1
    labels = held[0]["labels"]
    assert labels == {
        "alertname": "DriftwardenHostDrift",
        "host": "web-17",
        "pool": "web",
        "cause": "file_drift",
        "severity": "critical",
    }
    assert held[0]["annotations"]["summary"] == alert.summary
    assert held[0]["annotations"]["dedup_key"] == alert.dedup_key
    assert json.loads(held[0]["annotations"]["details"]) == dict(alert.details)
    assert held[0]["generatorURL"] == "https://dw.example/hosts/web-17"
    assert held[0]["status"]["state"] in ("active", "unprocessed")
    ends_at = datetime.fromisoformat(held[0]["endsAt"].replace("Z", "+00:00"))
    assert ends_at > now + timedelta(minutes=3)  # kept firing for several resend intervals

    sink.send(alert.resolved(datetime.now(UTC)))
    assert alertmanager.alerts() == []


def test_alertmanager_takes_a_pool_wide_alert(alertmanager: Alertmanager) -> None:
    sink = AlertmanagerSink("am", url=alertmanager.url, labels={"team": "sre"})
    sink.send(pool_alert())
    (held,) = alertmanager.alerts()
    assert held["labels"]["alertname"] == "DriftwardenPoolDrift"
    assert held["labels"]["team"] == "sre"
    assert "host" not in held["labels"]
    assert len(json.loads(held["annotations"]["details"])["hosts"]) == 12


def test_alertmanager_refusing_a_bad_alert_is_final(alertmanager: Alertmanager) -> None:
    sink = AlertmanagerSink("am", url=alertmanager.url, labels={"bad label": "x"})
    with pytest.raises(DeliveryError) as caught:
        sink.send(host_alert())
    assert caught.value.status == 400 and not caught.value.retryable


# --- PagerDuty --------------------------------------------------------------------------------


def pagerduty(receiver: LoopbackReceiver, **kwargs: Any) -> PagerDutySink:
    return PagerDutySink(
        "oncall", routing_key=Secret(ROUTING_KEY), url=receiver.url + "/v2/enqueue", **kwargs
    )


ACCEPTED = Answer(202, b'{"status":"success","message":"Event processed"}')


def test_pagerduty_trigger_and_resolve_follow_events_v2(receiver: LoopbackReceiver) -> None:
    receiver.answer(ACCEPTED, ACCEPTED)
    sink = pagerduty(receiver, severity_map={"warning": "error"})
    alert = host_alert()
    sink.send(alert)
    sink.send(alert.resolved(STARTED + timedelta(hours=1)))
    trigger, resolve = (r.json() for r in receiver.wait_for(2))
    assert receiver.requests[0].path == "/v2/enqueue"
    assert receiver.requests[0].headers["Content-Type"] == "application/json"
    assert trigger["routing_key"] == ROUTING_KEY
    assert trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == alert.dedup_key
    payload = trigger["payload"]
    assert {k: payload[k] for k in ("summary", "source", "severity", "group", "class")} == {
        "summary": alert.summary,
        "source": "web-17",
        "severity": "critical",
        "group": "web",
        "class": "file_drift",
    }
    assert payload["timestamp"] == "2024-05-01T12:00:00.000000Z"
    assert payload["custom_details"]["paths"] == ["/usr/bin/sudo"]
    assert trigger["links"] == [{"href": "https://dw.example/hosts/web-17", "text": "host"}]
    assert resolve == {
        "routing_key": ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": alert.dedup_key,
    }


def test_pagerduty_severity_mapping(receiver: LoopbackReceiver) -> None:
    sink = pagerduty(receiver, severity_map={"warning": "error"})
    for severity in ("info", "warning", "critical"):
        sink.send(host_alert(severity=severity))
    assert [r.json()["payload"]["severity"] for r in receiver.wait_for(3)] == [
        "info",
        "error",
        "critical",
    ]


def test_pagerduty_429_then_500_then_202_is_delivered_honouring_retry_after(
    receiver: LoopbackReceiver,
) -> None:
    receiver.answer(
        Answer(429, b'{"status":"throttled"}', (("Retry-After", "1"),)),
        Answer(500, b"oops"),
        ACCEPTED,
    )
    sink = pagerduty(receiver)
    with capture_logs() as logs:
        attempts = deliver_with_retries(sink, host_alert(), attempts=5, backoff=FAST)
    assert attempts == 3
    first, second, third = receiver.wait_for(3)
    assert first.body == second.body == third.body
    assert second.at - first.at >= 1.0  # Retry-After: 1 was honoured
    retries = [e for e in logs if e["event"] == "alert_delivery_retry"]
    assert [e["retry_after_s"] for e in retries] == [1.0, None]
    assert retries[0]["delay_s"] >= 1.0
    assert [e["event"] for e in logs][-1] == "alert_delivered"
    assert ROUTING_KEY not in repr(logs)


def test_pagerduty_400_is_final_and_not_retried(receiver: LoopbackReceiver) -> None:
    receiver.answer(Answer(400, b'{"status":"invalid event","message":"Event object is invalid"}'))
    with pytest.raises(DeliveryError, match=r"HTTP 400: .*invalid") as caught:
        deliver_with_retries(pagerduty(receiver), host_alert(), attempts=5, backoff=FAST)
    assert not caught.value.retryable
    assert len(receiver.requests) == 1


def test_retries_stop_after_the_given_attempts(receiver: LoopbackReceiver) -> None:
    receiver.default = Answer(503)
    with pytest.raises(DeliveryError) as caught:
        deliver_with_retries(pagerduty(receiver), host_alert(), attempts=3, backoff=FAST)
    assert caught.value.retryable and caught.value.status == 503
    assert len(receiver.requests) == 3


def test_waiting_between_attempts_is_interrupted_by_stop(receiver: LoopbackReceiver) -> None:
    receiver.default = Answer(503, headers=(("Retry-After", "3600"),))
    stop = threading.Event()
    raised: list[BaseException] = []

    def deliver() -> None:
        try:
            deliver_with_retries(pagerduty(receiver), host_alert(), attempts=5, stop=stop)
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=deliver)
    worker.start()
    receiver.wait_for(1)
    stop.set()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], DeliveryInterrupted)
    assert raised[0].retryable
    assert len(receiver.requests) == 1


def test_a_long_retry_after_is_handed_back_instead_of_waited(receiver: LoopbackReceiver) -> None:
    receiver.answer(Answer(429, headers=(("Retry-After", "900"),)))
    with pytest.raises(DeliveryError) as caught:
        deliver_with_retries(
            pagerduty(receiver), host_alert(), attempts=5, backoff=FAST, max_delay_s=60
        )
    assert caught.value.retryable and caught.value.retry_after_s == 900.0
    assert len(receiver.requests) == 1


def test_an_unreachable_receiver_is_retryable_and_the_error_names_no_url() -> None:
    sink = SlackSink("chat", url=Secret(f"http://127.0.0.1:{free_port()}/services/{SLACK_TOKEN}"))
    with pytest.raises(DeliveryError) as caught:
        sink.send(host_alert())
    assert caught.value.retryable
    assert "chat: cannot connect" in str(caught.value)
    assert SLACK_TOKEN not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# --- Slack ------------------------------------------------------------------------------------


def test_slack_message_has_text_and_blocks(receiver: LoopbackReceiver) -> None:
    sink = SlackSink("chat", url=Secret(receiver.url + "/services/" + SLACK_TOKEN))
    sink.send(host_alert(summary="web-17 drifted: <script> & more"))
    sink.send(host_alert().resolved(STARTED + timedelta(hours=1)))
    sink.send(pool_alert())
    storm = pool_alert()
    sink.send(replace(storm, details={**storm.details, "host_count": 5000}))
    firing, resolved, pool, big = (r.json() for r in receiver.wait_for(4))
    assert receiver.requests[0].path == "/services/" + SLACK_TOKEN
    assert firing["text"].startswith(":rotating_light: CRITICAL: web-17 drifted")
    assert firing["blocks"][0] == {
        "type": "section",
        "text": {
            "type": "mrkdwn",
            "text": "*:rotating_light: CRITICAL: web-17 drifted: &lt;script&gt; &amp; more*",
        },
    }
    fields = [f["text"] for f in firing["blocks"][1]["fields"]]
    assert fields == ["*Host*\nweb-17", "*Pool*\nweb", "*Cause*\nfile_drift", "*Status*\nfiring"]
    assert {"type": "mrkdwn", "text": "<https://dw.example/hosts/web-17|host>"} in [
        b.get("text") for b in firing["blocks"]
    ]
    assert firing["blocks"][-1]["type"] == "context"
    assert resolved["text"].startswith(":white_check_mark: RESOLVED:")
    assert any("*Hosts (12)*" in b.get("text", {}).get("text", "") for b in pool["blocks"])
    # a storm names its first hosts and counts the rest (collector.response.rails.LISTED_HOSTS)
    [hosts] = [
        b["text"]["text"] for b in big["blocks"] if "*Hosts" in b.get("text", {}).get("text", "")
    ]
    assert hosts.startswith("*Hosts (5000)*\nweb-0, web-1") and hosts.endswith(
        "web-11 and 4988 more"
    )
    assert SLACK_TOKEN not in repr(sink)


def test_slack_revoked_hook_is_final_and_retry_after_is_read(receiver: LoopbackReceiver) -> None:
    sink = SlackSink("chat", url=Secret(receiver.url + "/services/" + SLACK_TOKEN))
    receiver.answer(Answer(429, b"rate_limited", (("Retry-After", "7"),)), Answer(404, b"no_team"))
    with pytest.raises(DeliveryError) as throttled:
        sink.send(host_alert())
    assert throttled.value.retryable and throttled.value.retry_after_s == 7.0
    with pytest.raises(DeliveryError, match="HTTP 404: no_team") as revoked:
        sink.send(host_alert())
    assert not revoked.value.retryable
    assert SLACK_TOKEN not in str(revoked.value)


# --- generic webhook --------------------------------------------------------------------------


def test_webhook_body_is_signed_over_timestamp_and_body(receiver: LoopbackReceiver) -> None:
    sink = WebhookSink("hook", url=receiver.url + "/alerts", secret=Secret("s3cr3t"))
    alert = host_alert()
    sink.send(alert)
    (request,) = receiver.wait_for(1)
    assert request.json() == {"version": 1, "event": "alert", "alert": alert.to_json()}
    assert request.headers["X-Driftwarden-Event"] == "alert"
    assert request.headers["X-Driftwarden-Signature"].startswith("sha256=")
    signing.verify(b"s3cr3t", request.headers, request.body)  # the documented check passes

    with pytest.raises(SignatureError, match="does not match"):
        signing.verify(b"s3cr3t", request.headers, request.body.replace(b"web-17", b"web-18"))
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify(b"other", request.headers, request.body)
    later = int(request.headers["X-Driftwarden-Timestamp"]) + 3600
    with pytest.raises(SignatureError, match="away from now"):
        signing.verify(b"s3cr3t", request.headers, request.body, now=later)
    forged = {**request.headers, "X-Driftwarden-Timestamp": str(later)}
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify(b"s3cr3t", forged, request.body, now=later)
    with pytest.raises(SignatureError, match="missing or malformed"):
        signing.verify(b"s3cr3t", {}, request.body)


def test_webhook_retryable_and_final_answers(receiver: LoopbackReceiver) -> None:
    sink = WebhookSink("hook", url=receiver.url, secret=Secret("k"))
    receiver.answer(
        Answer(502),
        Answer(422, b"unknown field"),
        Answer(302, headers=(("Location", "http://elsewhere/"),)),
    )
    outcomes = []
    for _ in range(3):
        with pytest.raises(DeliveryError) as caught:
            sink.send(host_alert())
        outcomes.append((caught.value.status, caught.value.retryable))
    assert outcomes == [(502, True), (422, False), (302, False)]  # redirects are not followed
    assert len(receiver.requests) == 3


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("5", 5.0), ("0", 0.0), ("Wed, 01 May 2024 12:00:30 GMT", 30.0), ("soon", None), ("", None)],
)
def test_retry_after_in_seconds_or_as_a_date(header: str, seconds: float | None) -> None:
    assert retry_after_s(header, now=STARTED) == seconds


# --- backoff and rate limit -------------------------------------------------------------------


def test_backoff_grows_to_its_cap_with_jitter_below_the_base() -> None:
    backoff = Backoff(initial_s=1, max_s=8, multiplier=2, jitter=0.5)
    rng = random.Random(7)
    for attempt, base in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        delays = [backoff.delay_s(attempt, rng) for _ in range(50)]
        assert all(base * 0.5 <= d <= base for d in delays)
        assert len(set(delays)) > 1
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=2)


def test_rate_limiter_allows_a_burst_then_the_rate() -> None:
    now = [100.0]
    limiter = RateLimiter(per_minute=6, burst=2, clock=lambda: now[0])
    assert limiter.reserve() == 0 and limiter.reserve() == 0
    assert limiter.reserve() == pytest.approx(10.0)
    now[0] += 10.0
    assert limiter.reserve() == 0
    assert limiter.reserve() == pytest.approx(10.0)
    stop = threading.Event()
    stop.set()
    assert limiter.acquire(stop) is False


def test_rate_limited_delivery_waits_for_a_token(receiver: LoopbackReceiver) -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=1, clock=lambda: now[0])
    sink = pagerduty(receiver)
    deliver_with_retries(sink, host_alert(), attempts=1, limiter=limiter)
    stop = threading.Event()
    stop.set()  # no token, and shutting down: the second send never happens
    with pytest.raises(DeliveryInterrupted):
        deliver_with_retries(sink, host_alert(), attempts=1, limiter=limiter, stop=stop)
    assert len(receiver.requests) == 1


# --- the registry and [[sink]] tables ---------------------------------------------------------


def test_built_in_sinks_are_registered() -> None:
    assert SINKS.known() == ("alertmanager", "pagerduty", "slack", "webhook")


def test_sinks_are_built_from_their_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "pd.key"
    key_file.write_text(ROUTING_KEY + "\n")
    monkeypatch.setenv("DW_SLACK_URL", "https://hooks.slack.example/services/" + SLACK_TOKEN)
    with capture_logs() as logs:
        sinks = build_sinks(
            [
                {"type": "alertmanager", "name": "am", "url": "http://127.0.0.1:9093"},
                {
                    "type": "pagerduty",
                    "name": "oncall",
                    "routing_key_file": str(key_file),
                    "min_severity": "warning",
                    "rate_limit_per_minute": 30,
                    "rate_limit_burst": 5,
                },
                {"type": "slack", "name": "chat", "url_env": "DW_SLACK_URL"},
                {"type": "webhook", "name": "hook", "url": "https://x.example", "secret": "k"},
            ],
            source="collector.toml",
        )
    assert [(s.name, s.type) for s in sinks] == [
        ("am", "alertmanager"),
        ("oncall", "pagerduty"),
        ("chat", "slack"),
        ("hook", "webhook"),
    ]
    oncall = sinks[1]
    assert isinstance(oncall.sink, PagerDutySink)
    assert oncall.sink.payload(host_alert())["routing_key"] == ROUTING_KEY
    assert oncall.limiter is not None and oncall.limiter.burst == 5
    assert oncall.wants(host_alert(severity="critical"))
    assert not oncall.wants(host_alert(severity="info"))
    assert sinks[0].sink.resend_interval_s == 60 and sinks[1].sink.resend_interval_s is None
    shown = repr(sinks) + repr(logs)
    assert ROUTING_KEY not in shown and SLACK_TOKEN not in shown and "'k'" not in shown


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"type": "opsgenie", "name": "x"},
            "type = 'opsgenie' is unknown; known: "
            "\\['alertmanager', 'pagerduty', 'slack', 'webhook'\\]",
        ),
        ({"type": "alertmanager"}, "#1 missing 'name'"),
        ({"type": "alertmanager", "name": "a b"}, "name = 'a b' is not a name"),
        (
            {"type": "alertmanager", "name": "am", "url": "ftp://x"},
            "\\[\\[sink\\]\\] 'am' url = 'ftp://x' is not an http\\(s\\) URL",
        ),
        (
            {"type": "alertmanager", "name": "am", "url": "http://x", "timeout_s": "ten"},
            "timeout_s = 'ten' is not a number",
        ),
        (
            {"type": "alertmanager", "name": "am", "url": "http://x", "colour": "red"},
            "unknown key\\(s\\) \\['colour'\\]",
        ),
        (
            {"type": "alertmanager", "name": "am", "url": "http://x", "labels": {"pool": "x"}},
            "reserved labels",
        ),
        ({"type": "pagerduty", "name": "pd"}, "needs exactly one of 'routing_key'"),
        (
            {"type": "pagerduty", "name": "pd", "routing_key": "k", "routing_key_env": "K"},
            "needs exactly one of",
        ),
        (
            {
                "type": "pagerduty",
                "name": "pd",
                "routing_key": "k",
                "severity_map": {"warning": "sev2"},
            },
            "severity_map.warning = 'sev2' is not one of",
        ),
        (
            {"type": "pagerduty", "name": "pd", "routing_key_env": "DW_UNSET_VARIABLE"},
            "environment variable is unset",
        ),
        (
            {"type": "pagerduty", "name": "pd", "routing_key_file": "/nonexistent/pd"},
            "cannot be read: No such file",
        ),
        ({"type": "slack", "name": "s", "url": "not a url"}, "the secret is not an http"),
        (
            {
                "type": "webhook",
                "name": "w",
                "url": "http://x",
                "secret": "k",
                "min_severity": "high",
            },
            "min_severity = 'high' is not one of",
        ),
        (
            {
                "type": "webhook",
                "name": "w",
                "url": "http://x",
                "secret": "k",
                "rate_limit_per_minute": 0,
            },
            "rate_limit_per_minute = 0 is not a number >= 0.001",
        ),
    ],
)
def test_a_bad_sink_table_names_the_key_and_value(table: dict[str, Any], message: str) -> None:
    with pytest.raises(SinkConfigError, match=message) as caught:
        build_sink(table, source="collector.toml")
    assert str(caught.value).startswith("collector.toml: [[sink]]")


def test_a_bad_secret_is_never_quoted() -> None:
    with pytest.raises(SinkConfigError) as caught:
        build_sink({"type": "slack", "name": "s", "url": "hooks.slack.com/" + SLACK_TOKEN})
    assert SLACK_TOKEN not in str(caught.value)


def test_two_sinks_with_one_name_are_refused() -> None:
    table = {"type": "webhook", "name": "w", "url": "http://x", "secret": "k"}
    with pytest.raises(SinkConfigError, match="two \\[\\[sink\\]\\] tables are named 'w'"):
        build_sinks([table, table])


MINIMAL_SINKS = {
    "alertmanager": {"url": "http://127.0.0.1:9093"},
    "pagerduty": {"routing_key": "k"},
    "slack": {"url": "http://127.0.0.1/hook"},
    "webhook": {"url": "http://127.0.0.1/hook", "secret": "k"},
}


def documented_keys(repo: Path) -> set[str]:
    return set(re.findall(r"`([a-z_]+)`", (repo / "docs" / "operations.md").read_text()))


def keys_read(table: ConfigTable) -> set[str]:
    return {k for k in table.keys_read if not k.endswith(("_file", "_env"))}


@pytest.mark.parametrize("type_name", SINKS.known())
def test_every_sink_key_is_documented(repo: Path, type_name: str) -> None:
    table = SINKS.table({"type": type_name, "name": "x", **MINIMAL_SINKS[type_name]})
    build_sink({"type": type_name, "name": "x", **MINIMAL_SINKS[type_name]})  # the common keys
    SINKS.build(table)
    common = {"min_severity", "rate_limit_per_minute", "rate_limit_burst"}
    missing = (keys_read(table) | common) - documented_keys(repo)
    assert not missing, f"docs/operations.md does not document {sorted(missing)}"


def test_a_sink_type_registers_through_the_same_registry() -> None:
    class Printer:
        resend_interval_s: float | None = None

        def __init__(self, name: str) -> None:
            self.name = name

        def send(self, alert: Alert) -> None:
            pass

    SINKS.register("printer", lambda name, table: Printer(name))
    try:
        assert build_sink({"type": "printer", "name": "p"}).sink.name == "p"
        with pytest.raises(ValueError, match="already registered"):
            SINKS.register("printer", lambda name, table: Printer(name))
    finally:
        SINKS._factories.pop("printer")
