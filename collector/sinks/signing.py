"""The HMAC signature of webhook bodies (alerts and replacement requests).

Every webhook POST carries two headers::

    X-Driftwarden-Timestamp: 1717171717            (Unix seconds when it was signed)
    X-Driftwarden-Signature: sha256=<hex>          HMAC-SHA256(secret, timestamp + "." + body)

The timestamp is inside the HMAC, so a captured request cannot be replayed later with a fresh
timestamp; a receiver refuses timestamps too far from its own clock. ``verify`` is the
reference check, and ``docs/operations.md`` shows it for receivers written elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Final

from collector.sinks.config import Secret
from collector.sinks.errors import SignatureError

SIGNATURE_HEADER: Final = "X-Driftwarden-Signature"
TIMESTAMP_HEADER: Final = "X-Driftwarden-Timestamp"
DEFAULT_TOLERANCE_S: Final = 300.0


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def signed_headers(secret: Secret, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """The JSON content type and the two signature headers for ``body``."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(secret.reveal().encode("utf-8"), timestamp, body),
    }


def verify(
    secret: bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> None:
    """Raise ``SignatureError`` unless ``body`` was signed with ``secret`` recently enough."""
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    given = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit():
        raise SignatureError(f"missing or malformed {TIMESTAMP_HEADER}")
    age_s = (time.time() if now is None else now) - int(timestamp)
    if abs(age_s) > tolerance_s:
        raise SignatureError(f"{TIMESTAMP_HEADER} is {age_s:.0f}s away from now")
    if not hmac.compare_digest(given.encode(), signature(secret, timestamp, body).encode()):
        raise SignatureError(f"{SIGNATURE_HEADER} does not match the body")
