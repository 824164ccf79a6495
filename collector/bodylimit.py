"""Request bodies over the limit are refused (413 ``too_large``) before anything parses them.

A declared ``Content-Length`` over the limit is answered at once; a body without one (chunked)
is counted as it arrives and refused as soon as it passes the limit, whichever route reads it.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import wire


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body is over the limit of {limit} bytes")


class BodyLimit:
    def __init__(self, app: ASGIApp, *, limit: int, refused: Callable[[], None]) -> None:
        self.app = app
        self.limit = limit
        self.refused = refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            self.refused()
            message = f"the body is {declared} bytes; the limit is {self.limit}"
            response = JSONResponse(wire.error_body("too_large", message), 413)
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    self.refused()
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)
