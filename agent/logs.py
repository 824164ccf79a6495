"""structlog, configured once by ``main``: JSON lines in production, console on a TTY.

Standard-library loggers (watchdog, urllib3) go through the same processor chain, so every
line the agent writes has the same shape.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_settings: dict[str, Any] = {}

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(service: str, *, level: str = "info", json_lines: bool | None = None) -> None:
    """Route structlog and stdlib logging to stderr; bind ``service`` to every event."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    _settings.update(service=service, level=level, json_lines=json_lines)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)


def settings() -> dict[str, Any]:
    """The arguments of the last ``configure`` (empty before it), for a child process of the
    agent to log the same way."""
    return dict(_settings)
