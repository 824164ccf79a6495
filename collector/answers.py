"""The API's one error envelope (``wire.error_body``): every refusal and error as a response.

Used by FastAPI's exception handlers and by the report intake that answers ahead of them
(``collector.intake``), so both answer the same exception the same way.
"""

from __future__ import annotations

from typing import Any, Final

import structlog
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent import wire
from collector.errors import Refused, StoreError

log = structlog.get_logger(__name__)

_HTTP_CODES: Final = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def error_response(status: int, code: str, message: str, **details: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 and code == "unauthorized" else None
    return JSONResponse(wire.error_body(code, message, **details), status, headers=headers)


def exception_response(exc: Exception, path: str) -> JSONResponse:
    """The answer to ``exc``, raised while serving ``path``."""
    if isinstance(exc, Refused):
        return error_response(exc.status, exc.code, str(exc), **exc.details)
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))
    if isinstance(exc, RequestValidationError):
        errors = [
            {"loc": [str(part) for part in e.get("loc", ())], "msg": e.get("msg", "")}
            for e in exc.errors()
        ]
        return error_response(422, "invalid_request", "the request is not valid", errors=errors)
    if isinstance(exc, StoreError):
        log.error("store_unavailable", path=path, error=str(exc))
        return error_response(503, "unavailable", "the database is unavailable; retry")
    log.exception("internal_error", path=path, exc_info=exc)
    return error_response(500, "internal", "internal error; see the collector's log")
