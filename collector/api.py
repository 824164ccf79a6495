"""The HTTP API (FastAPI on uvicorn): agent ingest, SRE reads and actions, health, metrics.

Every refusal — ours, FastAPI's validation, Starlette's 404 and 405, a database outage, an
internal error — is answered in the one error envelope ``wire.error_body`` (a test checks every
error response). The OpenAPI description is served at ``/openapi.json`` (viewer token).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from agent import wire
from collector import auth, intake, silence, sre
from collector.answers import error_response, exception_response
from collector.bodylimit import BodyLimit
from collector.config import Config
from collector.errors import Refused, StoreError
from collector.groupcommit import GROUP_WINDOW_S
from collector.handlers import default_registry
from collector.ingest import Ingestor
from collector.jobs import Registry, Worker, WorkerThread
from collector.metrics import CONTENT_TYPE, Metrics
from collector.model import Role
from collector.response import routes as response_routes
from collector.services import Services, services
from collector.store import SqlStore, open_store

log = structlog.get_logger(__name__)

VERSION: Final = "0.1.0"
WEB_PAGE: Final = Path(__file__).resolve().parent / "web" / "index.html"

_ENVELOPE_SCHEMA: Final = {
    "type": "object",
    "description": "a signed envelope (agent.wire.make_envelope); see docs/protocol.md",
}
_REPORTS_BODY: Final = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["host_id", "envelopes"],
                    "properties": {
                        "host_id": {"type": "string"},
                        "envelopes": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": wire.MAX_BATCH_ENVELOPES,
                            "items": _ENVELOPE_SCHEMA,
                        },
                    },
                }
            }
        },
    }
}
_ENROLL_BODY: Final = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "agent.wire.make_enrollment: token, host_id, public_key, "
                    "facts, time, sig",
                }
            }
        },
    }
}


def _install_error_handlers(app: FastAPI) -> None:
    async def answer(request: Request, exc: Exception) -> Response:
        return exception_response(exc, request.url.path)

    for kind in (Refused, StarletteHTTPException, RequestValidationError, StoreError, Exception):
        app.add_exception_handler(kind, answer)


class CollectorApp(FastAPI):
    """The application. Agent reports skip the middleware stack and router (each layer costs
    every request something, and reports are nearly all of them): ``intake`` answers them."""

    intake: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.intake is not None and intake.is_report(scope):
            scope["app"] = self
            await self.intake(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(
    config: Config, *, store: SqlStore | None = None, registry: Registry | None = None
) -> CollectorApp:
    """The application. With ``store`` the caller owns it; else it is opened (and migrated)
    at start and closed at shutdown. Job workers run when ``[server] workers`` is true."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = store is None
        opened = store or open_store(config.database.url, pool_size=config.database.pool_size)
        metrics = Metrics(opened)
        # SQLite's group commit runs on the event loop (see collector.groupcommit); on
        # PostgreSQL every statement is a round trip, which the loop must not wait on: there
        # the writer is a thread, and the loop goes on while it waits for the server
        loop = asyncio.get_running_loop() if opened.backend == "sqlite" else None
        ingestor = Ingestor(opened, config, metrics, loop=loop, group_window_s=GROUP_WINDOW_S)
        app.state.services = Services(config, opened, metrics, ingestor)
        worker: WorkerThread | None = None
        try:
            if config.server.workers:
                silence.schedule(opened)
                jobs = registry or default_registry(opened, config)
                worker = WorkerThread(
                    Worker(opened, jobs, config.jobs, yield_to=ingestor.committer.wait_idle)
                )
                worker.start()
            log.info("collector_started", backend=opened.backend, config=config.source)
            yield
        finally:
            # the writer finishes first: on SQLite the job worker may be waiting for a write
            # turn the event loop's writer holds, which only the loop can let go
            if worker is not None:
                worker.signal_stop()
            ingestor.close()
            if worker is not None:
                worker.stop()
            if own:
                opened.close()
            log.info("collector_stopped")

    app = CollectorApp(
        title="driftwarden collector",
        version=VERSION,
        description="Drift reports in, fleet verdicts out. See docs/api.md.",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    _install_error_handlers(app)

    def too_large() -> None:
        app.state.services.metrics.rejected("too_large")

    limit = config.server.max_body_bytes
    app.add_middleware(BodyLimit, limit=limit, refused=too_large)
    app.intake = BodyLimit(intake.answer_reports, limit=limit, refused=too_large)
    _public_routes(app)
    _agent_routes(app)
    app.include_router(sre.router)
    app.include_router(response_routes.router)

    @app.get("/openapi.json", tags=["meta"], dependencies=[Depends(auth.require(Role.VIEWER))])
    def openapi() -> dict[str, Any]:
        return app.openapi()

    return app


def _public_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["meta"], response_model=None)
    def readyz(request: Request) -> dict[str, Any] | Response:
        """Readiness: the database answers and its schema is current."""
        store = services(request).store
        try:
            current, head = store.schema_revision()
        except StoreError as exc:  # the detail (host, port, user) is for the log only
            log.warning("readiness_failed", error=str(exc))
            return error_response(503, "not_ready", "database unavailable")
        if current != head:
            return error_response(503, "not_ready", f"schema at {current}, expected {head}")
        return {"status": "ready", "backend": store.backend, "schema": current}

    @app.get("/metrics", tags=["meta"], dependencies=[Depends(auth.metrics_guard)])
    def metrics(request: Request) -> Response:
        """Prometheus metrics (viewer token unless ``[server] metrics_public``)."""
        return Response(services(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", tags=["meta"], response_class=HTMLResponse)
    def web_page() -> HTMLResponse:
        """The fleet page. It holds no data: it asks for a token and reads the API."""
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))


def _agent_routes(app: FastAPI) -> None:
    @app.post("/v1/enroll", tags=["agent"], openapi_extra=_ENROLL_BODY, status_code=201)
    async def enroll(request: Request) -> JSONResponse:
        """Register a host's key with an enrollment token (idempotent for the same key)."""
        svc = services(request)
        body = intake.decode(await request.body(), svc.metrics)
        pending = await run_in_threadpool(svc.ingestor.submit_enroll, body)
        result = await asyncio.wrap_future(pending)
        return JSONResponse(result.body, result.status)

    @app.post("/v1/reports", tags=["agent"], openapi_extra=_REPORTS_BODY)
    async def reports(request: Request) -> JSONResponse:
        """A batch of signed envelopes; answered only after it is committed.

        Served by ``collector.intake`` ahead of the framework; declared here for the OpenAPI
        description, with the same handling."""
        return JSONResponse(await intake.receive_reports(services(request), await request.body()))
