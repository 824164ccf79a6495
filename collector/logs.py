"""structlog for the collector, configured once by ``main``.

JSON lines in production, console on a TTY. uvicorn's and SQLAlchemy's standard-library loggers
are routed through the same processor chain, so every line has the same shape; uvicorn's own
access log is off (the API logs what it refuses, with reasons).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_CHAIN: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
_QUIET = ("uvicorn.access", "alembic.runtime.migration")


def configure(service: str, *, level: str = "info", json_lines: bool | None = None) -> None:
    """Send every log line to stderr in one shape; ``service`` is on every event, from every
    thread (the job workers too)."""
    json_lines = (not sys.stderr.isatty()) if json_lines is None else json_lines

    def add_service(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        return event

    chain = [*_CHAIN, add_service]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    structlog.configure(
        # an event below the level is dropped first, before anything is spent on it
        processors=[
            structlog.stdlib.filter_by_level,
            *chain,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
