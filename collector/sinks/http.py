"""One HTTP POST to a receiver, and what its answer means for retrying.

Redirects are not followed (a signed body is never re-sent to a place nobody configured), and
no error message or chained traceback carries the URL, which for Slack is itself the secret.

A receiver's answer decides: 2xx delivered; 408, 425, 429 and 5xx retryable, honouring
``Retry-After`` (seconds or an HTTP date); any other status is final.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

import requests

from collector.sinks.errors import DeliveryError

RETRYABLE_STATUSES: Final = frozenset({408, 425, 429})
MAX_ERROR_TEXT: Final = 200
USER_AGENT: Final = "driftwarden-collector"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    text: str


def post(
    url: str, body: bytes, *, headers: Mapping[str, str], timeout_s: float, target: str
) -> Reply:
    """POST ``body``; a connection failure or timeout is a retryable ``DeliveryError``."""
    try:
        response = requests.post(
            url,
            data=body,
            headers={"User-Agent": USER_AGENT, **headers},
            timeout=timeout_s,
            allow_redirects=False,
        )
    except requests.Timeout:
        raise DeliveryError(f"{target}: no answer within {timeout_s:g}s", retryable=True) from None
    except requests.RequestException as exc:
        raise DeliveryError(
            f"{target}: cannot connect ({type(exc).__name__})", retryable=True
        ) from None
    with response:
        return Reply(response.status_code, dict(response.headers), response.text)


def deliver(
    url: str, body: bytes, *, headers: Mapping[str, str], timeout_s: float, target: str
) -> Reply:
    """POST ``body`` and raise the ``DeliveryError`` any answer but 2xx means."""
    reply = post(url, body, headers=headers, timeout_s=timeout_s, target=target)
    check(reply, target=target)
    return reply


def check(reply: Reply, *, target: str) -> None:
    """Raise the ``DeliveryError`` that a non-2xx answer means; return on 2xx."""
    if 200 <= reply.status < 300:
        return
    retryable = reply.status in RETRYABLE_STATUSES or reply.status >= 500
    text = " ".join(reply.text.split())[:MAX_ERROR_TEXT]
    raise DeliveryError(
        f"{target}: HTTP {reply.status}" + (f": {text}" if text else ""),
        retryable=retryable,
        retry_after_s=retry_after_s(reply.headers.get("Retry-After")) if retryable else None,
        status=reply.status,
    )


def retry_after_s(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delay-seconds or an HTTP date; None if unusable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
