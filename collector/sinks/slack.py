"""Slack incoming webhook: a mirror of the alert for people in a channel, never the record.

The webhook URL carries Slack's token, so it is a secret (``url``, ``url_file`` or
``url_env``) and never appears in a log or an error. The message has a plain ``text`` (used
in notifications) and ``blocks`` (a header line, fields, the links, the dedup key). Slack
answers 200 ``ok``; 400/403/404/410 are final (bad payload, revoked hook, archived channel),
429 and 5xx are retried.

``[[sink]]`` keys: ``url`` (secret), ``timeout_s`` (10).
"""

from __future__ import annotations

import json
from typing import Any, Final

from collector.sinks import http
from collector.sinks.alert import Alert
from collector.sinks.config import ConfigTable, Secret

MAX_TEXT_CHARS: Final = 3000  # Slack's limit for a section's text
ICONS: Final = {
    "critical": ":rotating_light:",
    "warning": ":warning:",
    "info": ":information_source:",
}
RESOLVED_ICON: Final = ":white_check_mark:"


def escape(text: str) -> str:
    """Slack mrkdwn control characters: ``&``, ``<`` and ``>``."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackSink:
    resend_interval_s: float | None = None

    def __init__(self, name: str, *, url: Secret, timeout_s: float = 10.0) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self._url = url

    def __repr__(self) -> str:
        return f"SlackSink(name={self.name!r})"

    def payload(self, alert: Alert) -> dict[str, Any]:
        if alert.status == "resolved":
            headline = f"{RESOLVED_ICON} RESOLVED: {alert.summary}"
        else:
            headline = f"{ICONS[alert.severity]} {alert.severity.upper()}: {alert.summary}"
        fields = [
            ("Host" if alert.host_id else "Pool-wide", alert.subject),
            ("Pool", alert.pool),
            ("Cause", alert.cause),
            ("Status", alert.status),
        ]
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": _mrkdwn(f"*{escape(headline)}*")},
            {
                "type": "section",
                "fields": [_mrkdwn(f"*{label}*\n{escape(value)}") for label, value in fields],
            },
        ]
        hosts = alert.details.get("hosts")
        if alert.pool_wide and isinstance(hosts, list):
            listed = ", ".join(escape(str(h)) for h in hosts)
            count = alert.details.get("host_count")
            more = count - len(hosts) if isinstance(count, int) else 0
            if more > 0:  # the storm's hold names the first hosts and counts the rest
                listed += f" and {more} more"
            total = len(hosts) + max(more, 0)
            blocks.append({"type": "section", "text": _mrkdwn(f"*Hosts ({total})*\n{listed}")})
        if alert.links:
            links = " · ".join(f"<{link.href}|{escape(link.text)}>" for link in alert.links)
            blocks.append({"type": "section", "text": _mrkdwn(links)})
        blocks.append(
            {"type": "context", "elements": [_mrkdwn(f"dedup key `{escape(alert.dedup_key)}`")]}
        )
        return {"text": headline[:MAX_TEXT_CHARS], "blocks": blocks}

    def send(self, alert: Alert) -> None:
        body = json.dumps(self.payload(alert)).encode("utf-8")
        http.deliver(
            self._url.reveal(),
            body,
            headers={"Content-Type": "application/json"},
            timeout_s=self.timeout_s,
            target=self.name,
        )


def _mrkdwn(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": text[:MAX_TEXT_CHARS]}


def from_config(name: str, table: ConfigTable) -> SlackSink:
    return SlackSink(
        name,
        url=table.secret("url", url=True),
        timeout_s=table.number("timeout_s", 10.0, minimum=0.1),
    )
