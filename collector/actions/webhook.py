"""A generic webhook that asks a deployment pipeline to replace the host.

POSTs ``{"version": 1, "event": "replacement", "request": {…}}`` (the request in the form of
``ReplacementRequest.to_json``), signed like the alert webhook (``X-Driftwarden-Signature``
over the timestamp and the body), with ``Idempotency-Key: <request_id>`` so the pipeline can
recognise a repeat. The pipeline answers 2xx when it took the request, 2xx with
``{"status": "already"}`` or 409 when it already had it; 408/425/429/5xx and connection
failures are retried, any other answer is final. A dry run sends nothing.

``[[action]]`` keys: ``url``, ``secret`` (the HMAC key), ``timeout_s`` (30).
"""

from __future__ import annotations

import json
from typing import Final
from urllib.parse import urlsplit

from collector.actions.request import ActionOutcome, ReplacementRequest, failed, logged
from collector.sinks import http, signing
from collector.sinks.config import ConfigTable, Secret
from collector.sinks.errors import DeliveryError
from collector.sinks.webhook import BODY_VERSION, EVENT_HEADER

IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
HTTP_CONFLICT: Final = 409


class WebhookAction:
    def __init__(self, name: str, *, url: str, secret: Secret, timeout_s: float = 30.0) -> None:
        self.name = name
        self.url = url
        self.timeout_s = timeout_s
        self._secret = secret

    def __repr__(self) -> str:
        return f"WebhookAction(name={self.name!r}, host={urlsplit(self.url).hostname!r})"

    def close(self) -> None:
        pass

    def replace(self, request: ReplacementRequest) -> ActionOutcome:
        if request.dry_run:
            outcome = ActionOutcome("would_replace", f"would ask {self.name} to replace")
            return logged(self.name, request, outcome)
        body = json.dumps(
            {"version": BODY_VERSION, "event": "replacement", "request": request.to_json()},
            sort_keys=True,
        ).encode("utf-8")
        headers = {
            **signing.signed_headers(self._secret, body),
            EVENT_HEADER: "replacement",
            IDEMPOTENCY_HEADER: request.request_id,
        }
        try:
            reply = http.post(
                self.url, body, headers=headers, timeout_s=self.timeout_s, target=self.name
            )
            facts = {"http_status": reply.status}
            if reply.status == HTTP_CONFLICT or _says_already(reply):
                outcome = ActionOutcome("already", f"{self.name} already has it", facts=facts)
            else:
                http.check(reply, target=self.name)
                outcome = ActionOutcome("done", f"{self.name} took it", facts=facts)
        except DeliveryError as exc:
            outcome = failed(str(exc), retryable=exc.retryable, http_status=exc.status)
        return logged(self.name, request, outcome)


def _says_already(reply: http.Reply) -> bool:
    if not 200 <= reply.status < 300:
        return False
    try:
        answer = json.loads(reply.text)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("status") == "already"


def from_config(name: str, table: ConfigTable) -> WebhookAction:
    return WebhookAction(
        name,
        url=table.url("url"),
        secret=table.secret("secret"),
        timeout_s=table.number("timeout_s", 30.0, minimum=0.1),
    )
