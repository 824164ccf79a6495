"""PagerDuty Events API v2: trigger and resolve, keyed by the alert's ``dedup_key``.

A trigger with a ``dedup_key`` PagerDuty already has open updates that incident instead of
opening another; a resolve closes it. The routing key (the service's integration key) is a
secret. PagerDuty answers 202 when it took the event, 400 for an event it will never take
(final), 429 when the key is throttled and 5xx when it is unwell (both retried).

``[[sink]]`` keys: ``routing_key`` (secret), ``url`` (default the public endpoint; a test
points it at a loopback receiver), ``source`` ("driftwarden"), ``severity_map`` (our severity
→ PagerDuty's critical/error/warning/info), ``client_url``, ``timeout_s`` (10).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from collector.sinks import http
from collector.sinks.alert import SEVERITIES, Alert, iso_utc
from collector.sinks.config import ConfigTable, Secret

EVENTS_URL: Final = "https://events.pagerduty.com/v2/enqueue"
PD_SEVERITIES: Final = ("critical", "error", "warning", "info")
DEFAULT_SEVERITY_MAP: Final = {"critical": "critical", "warning": "warning", "info": "info"}
MAX_SUMMARY_CHARS: Final = 1024


class PagerDutySink:
    resend_interval_s: float | None = None

    def __init__(
        self,
        name: str,
        *,
        routing_key: Secret,
        url: str = EVENTS_URL,
        source: str = "driftwarden",
        severity_map: Mapping[str, str] | None = None,
        client_url: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.name = name
        self.url = url
        self.source = source
        self.severity_map = {**DEFAULT_SEVERITY_MAP, **(severity_map or {})}
        self.client_url = client_url
        self.timeout_s = timeout_s
        self._routing_key = routing_key

    def __repr__(self) -> str:
        return f"PagerDutySink(name={self.name!r}, url={self.url!r})"

    def payload(self, alert: Alert) -> dict[str, Any]:
        event: dict[str, Any] = {
            "routing_key": self._routing_key.reveal(),
            "dedup_key": alert.dedup_key,
        }
        if alert.status == "resolved":
            event["event_action"] = "resolve"
            return event
        event["event_action"] = "trigger"
        event["client"] = self.source
        if self.client_url:
            event["client_url"] = self.client_url
        event["payload"] = {
            "summary": alert.summary[:MAX_SUMMARY_CHARS],
            "source": alert.host_id or f"pool:{alert.pool}",
            "severity": self.severity_map[alert.severity],
            "timestamp": iso_utc(alert.starts_at),
            "component": alert.host_id or alert.pool,
            "group": alert.pool,
            "class": alert.cause,
            "custom_details": {**alert.details, "pool": alert.pool, "host_id": alert.host_id},
        }
        if alert.links:
            event["links"] = [{"href": link.href, "text": link.text} for link in alert.links]
        return event

    def send(self, alert: Alert) -> None:
        body = json.dumps(self.payload(alert)).encode("utf-8")
        http.deliver(
            self.url,
            body,
            headers={"Content-Type": "application/json"},
            timeout_s=self.timeout_s,
            target=self.name,
        )


def from_config(name: str, table: ConfigTable) -> PagerDutySink:
    severity_map = table.str_table("severity_map")
    for ours, theirs in severity_map.items():
        if ours not in SEVERITIES:
            raise table.bad("severity_map", severity_map, f"keyed by {list(SEVERITIES)}")
        if theirs not in PD_SEVERITIES:
            raise table.bad(f"severity_map.{ours}", theirs, f"one of {list(PD_SEVERITIES)}")
    return PagerDutySink(
        name,
        routing_key=table.secret("routing_key"),
        url=table.url("url", EVENTS_URL),
        source=table.string("source", "driftwarden"),
        severity_map=severity_map,
        client_url=table.optional_url("client_url"),
        timeout_s=table.number("timeout_s", 10.0, minimum=0.1),
    )
