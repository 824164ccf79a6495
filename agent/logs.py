"""structlog, configured once by ``main``: JSON lines in production, console on a TTY.

Standard-library loggers (watchdog, urllib3) go through the same processor chain, so every
line the agent writes has the same shape.

Importing structlog costs a short command (``check``) a tenth of its run, so ``configure``
with ``deferred=True`` only records the settings: the modules on the bake and check path
log through ``get_logger``, whose loggers drop an event below the configured level without
importing anything, and import and configure structlog at the first event that passes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_settings: tuple[str, str, bool | None] | None = None  # (service, level, json_lines)
_applied = False
_threshold = logging.NOTSET  # events below this level are dropped before structlog loads


def configure(
    service: str, *, level: str = "info", json_lines: bool | None = None, deferred: bool = False
) -> None:
    """Route structlog and stdlib logging to stderr; bind ``service`` to every event.

    ``deferred``: leave structlog unimported until an event at ``level`` or above is logged
    through ``get_logger`` (for the short commands; the daemon configures at once).
    """
    global _settings, _applied, _threshold
    threshold = logging.getLevelName(level.upper())
    if not isinstance(threshold, int):
        raise ValueError(f"unknown log level {level!r}")
    _settings, _applied, _threshold = (service, level, json_lines), False, threshold
    if not deferred:
        _apply()


def _apply() -> None:
    global _applied  # noqa: PLW0603 (set once the settings are in force)
    if _applied or _settings is None:
        return
    _applied = True
    import structlog

    service, level, json_lines = _settings
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
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
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)


class Logger:
    """A structlog logger made on the first event that passes the configured level."""

    __slots__ = ("_logger", "_name")

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._logger: Any = None

    def _log(self, level: int, method: str, event: str, context: dict[str, Any]) -> None:
        if level < _threshold:
            return
        if self._logger is None:
            _apply()
            import structlog

            name = self._name
            self._logger = structlog.get_logger(name) if name else structlog.get_logger()
        getattr(self._logger, method)(event, **context)

    def debug(self, event: str, **context: Any) -> None:
        self._log(logging.DEBUG, "debug", event, context)

    def info(self, event: str, **context: Any) -> None:
        self._log(logging.INFO, "info", event, context)

    def warning(self, event: str, **context: Any) -> None:
        self._log(logging.WARNING, "warning", event, context)

    def error(self, event: str, **context: Any) -> None:
        self._log(logging.ERROR, "error", event, context)

    def exception(self, event: str, **context: Any) -> None:
        self._log(logging.ERROR, "exception", event, context)


def get_logger(name: str | None = None) -> Logger:
    """A logger for a module on the bake and check path (see the module's docstring)."""
    return Logger(name)


def settings() -> dict[str, Any]:
    """The arguments of the last ``configure`` (empty before it), for a child process of the
    agent to log the same way."""
    if _settings is None:
        return {}
    service, level, json_lines = _settings
    return {"service": service, "level": level, "json_lines": json_lines}
