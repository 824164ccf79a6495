"""A generic webhook: the alert as JSON, signed with HMAC-SHA256 (see ``signing``).

The body is ``{"version": 1, "event": "alert", "alert": {…}}`` with the alert in the form of
``Alert.to_json``; the headers add ``X-Driftwarden-Event: alert`` and the signature pair.
2xx is delivered; 408/425/429/5xx are retried; anything else is final.

``[[sink]]`` keys: ``url``, ``secret`` (the HMAC key), ``timeout_s`` (10).
"""

from __future__ import annotations

import json
from typing import Any, Final
from urllib.parse import urlsplit

from collector.sinks import http, signing
from collector.sinks.alert import Alert
from collector.sinks.config import ConfigTable, Secret

BODY_VERSION: Final = 1
EVENT_HEADER: Final = "X-Driftwarden-Event"


class WebhookSink:
    resend_interval_s: float | None = None

    def __init__(self, name: str, *, url: str, secret: Secret, timeout_s: float = 10.0) -> None:
        self.name = name
        self.url = url
        self.timeout_s = timeout_s
        self._secret = secret

    def __repr__(self) -> str:
        return f"WebhookSink(name={self.name!r}, host={urlsplit(self.url).hostname!r})"

    def payload(self, alert: Alert) -> dict[str, Any]:
        return {"version": BODY_VERSION, "event": "alert", "alert": alert.to_json()}

    def send(self, alert: Alert) -> None:
        body = json.dumps(self.payload(alert), sort_keys=True).encode("utf-8")
        headers = {**signing.signed_headers(self._secret, body), EVENT_HEADER: "alert"}
        http.deliver(self.url, body, headers=headers, timeout_s=self.timeout_s, target=self.name)


def from_config(name: str, table: ConfigTable) -> WebhookSink:
    return WebhookSink(
        name,
        url=table.url("url"),
        secret=table.secret("secret"),
        timeout_s=table.number("timeout_s", 10.0, minimum=0.1),
    )
