"""Agent reports in: ``POST /v1/reports`` answered ahead of the web framework.

Reports are nearly all of the collector's requests (every host, every heartbeat interval, a new
connection each time), so the application (``collector.api.CollectorApp``) hands them to a
plain ASGI endpoint before its middleware stack and router: ``answer_reports`` reads the body
(its size bounded by ``BodyLimit``, which stands in front of it too), decodes it, hands it to
the ``Ingestor`` and sends the acknowledgements once the group commit has written them. FastAPI
also declares the route (for the OpenAPI description), with the same ``receive_reports``.

A small body — a heartbeat, a finding — is parsed and its signatures checked right on the event
loop: that costs less than handing it to a thread. A larger one is checked in the thread pool,
so a batch of hundreds of envelopes never holds up the other connections.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from collector.answers import exception_response
from collector.errors import Refused
from collector.metrics import Metrics
from collector.services import Services

PATH: Final = "/v1/reports"
INLINE_BYTES: Final = 16 * 1024  # bodies up to this size are checked on the event loop


def decode(raw: bytes, metrics: Metrics) -> Any:
    """A request body as JSON; 400 ``malformed`` if it is not."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        metrics.rejected("malformed")
        raise Refused(400, "malformed", f"body is not JSON: {exc}") from exc


async def receive_reports(svc: Services, raw: bytes) -> dict[str, Any]:
    """The acknowledgements of a batch, after its commit (or the refusal, raised)."""
    body = decode(raw, svc.metrics)
    with svc.metrics.ingest_seconds.time():
        if len(raw) <= INLINE_BYTES:
            pending = svc.ingestor.submit_reports(body)
        else:
            pending = await run_in_threadpool(svc.ingestor.submit_reports, body)
        result: dict[str, Any] = await asyncio.wrap_future(pending)
    return result


def is_report(scope: Scope) -> bool:
    return bool(scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST")


async def answer_reports(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI endpoint of ``POST /v1/reports``; every error is answered in the envelope."""
    svc: Services = scope["app"].state.services
    try:
        answer = await receive_reports(svc, await _body(receive))
    except ClientDisconnect:  # the agent is gone before it sent the batch: nothing to do
        return
    except Exception as exc:
        await exception_response(exc, PATH)(scope, receive, send)
        return
    body = _dumps(answer)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive) -> bytes:
    """The request body (``BodyLimit`` has bounded its size); what starlette's ``Request.body``
    does, without building a request and a response object for every report."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _dumps(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
