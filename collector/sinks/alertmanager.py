"""Prometheus Alertmanager: ``POST /api/v2/alerts``.

Labels identify the alert (``alertname``, ``host``, ``pool``, ``cause``, ``severity``, plus
any configured extra labels); annotations carry the summary, the dedup key and the details.
A firing alert is sent with ``endsAt`` a few resend intervals ahead, so it stays firing while
the outbox re-sends it every ``resend_interval_s`` and lapses by itself if the collector goes
away; resolving sends the same labels with ``endsAt`` = the resolution time.

``[[sink]]`` keys: ``url`` (Alertmanager's base URL), ``resend_interval_s`` (60),
``timeout_s`` (10), ``labels`` (extra labels), ``bearer_token`` (optional secret).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from collector.sinks import http
from collector.sinks.alert import Alert, iso_utc
from collector.sinks.config import ConfigTable, Secret

HOST_ALERTNAME: Final = "DriftwardenHostDrift"
POOL_ALERTNAME: Final = "DriftwardenPoolDrift"
ENDS_AFTER_RESENDS: Final = 4  # as Prometheus does: endsAt = now + 4 resend intervals
RESERVED_LABELS: Final = frozenset({"alertname", "host", "pool", "cause", "severity"})


class AlertmanagerSink:
    def __init__(
        self,
        name: str,
        *,
        url: str,
        resend_interval_s: float = 60.0,
        timeout_s: float = 10.0,
        labels: Mapping[str, str] | None = None,
        bearer_token: Secret | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.name = name
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.resend_interval_s: float | None = resend_interval_s
        self.timeout_s = timeout_s
        self.labels = dict(labels or {})
        self._bearer_token = bearer_token
        self._clock = clock

    def __repr__(self) -> str:
        return f"AlertmanagerSink(name={self.name!r}, endpoint={self.endpoint!r})"

    def payload(self, alert: Alert) -> list[dict[str, Any]]:
        """The JSON body: a list holding one postable alert."""
        labels = {
            **self.labels,
            "alertname": POOL_ALERTNAME if alert.pool_wide else HOST_ALERTNAME,
            "pool": alert.pool,
            "cause": alert.cause,
            "severity": alert.severity,
        }
        if alert.host_id is not None:
            labels["host"] = alert.host_id
        now = self._clock()
        if alert.status == "resolved":
            ends_at = max(alert.ends_at or now, alert.starts_at)
        else:
            ends_at = now + timedelta(seconds=ENDS_AFTER_RESENDS * (self.resend_interval_s or 60))
        body: dict[str, Any] = {
            "labels": labels,
            "annotations": {
                "summary": alert.summary,
                "dedup_key": alert.dedup_key,
                "details": json.dumps(dict(alert.details), sort_keys=True),
            },
            "startsAt": iso_utc(alert.starts_at),
            "endsAt": iso_utc(ends_at),
        }
        if alert.links:
            body["generatorURL"] = alert.links[0].href
        return [body]

    def send(self, alert: Alert) -> None:
        headers = {"Content-Type": "application/json"}
        if self._bearer_token is not None:
            headers["Authorization"] = "Bearer " + self._bearer_token.reveal()
        body = json.dumps(self.payload(alert)).encode("utf-8")
        http.deliver(
            self.endpoint, body, headers=headers, timeout_s=self.timeout_s, target=self.name
        )


def from_config(name: str, table: ConfigTable) -> AlertmanagerSink:
    labels = table.str_table("labels")
    clash = RESERVED_LABELS & set(labels)
    if clash:
        raise table.bad("labels", labels, f"free of the reserved labels {sorted(clash)}")
    return AlertmanagerSink(
        name,
        url=table.url("url"),
        resend_interval_s=table.number("resend_interval_s", 60.0, minimum=1.0),
        timeout_s=table.number("timeout_s", 10.0, minimum=0.1),
        labels=labels,
        bearer_token=table.optional_secret("bearer_token"),
    )
