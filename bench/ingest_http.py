"""A lean HTTP/1.1 client on an asyncio protocol, for the ingest load generator.

The generator shares the machine's two cores with the collector it measures, so it must cost
little: no client library and no stream objects, one ``Content-Length`` request and response
per exchange, parsed from the bytes as they arrive (``_Exchange``). By default every request
opens its own connection, as an agent's does when it heartbeats every 30 s (the server has
closed the idle one by then); ``keep_alive`` reuses connections from a pool.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

_HEAD_END = b"\r\n\r\n"


class HttpError(Exception):
    """The exchange failed below HTTP (connection refused or reset, a truncated answer)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


class _Exchange(asyncio.Protocol):
    """One connection: sends a request, and resolves ``answer`` with the response and whether
    the connection may carry another (``send`` again)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[tuple[Answer, bool]] | None = None
        self.closed = False
        self._buffer = bytearray()
        self._head: tuple[int, int, bool] | None = None  # status, body length, reusable

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, request: bytes) -> asyncio.Future[tuple[Answer, bool]]:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self._buffer.clear()
        self._head = None
        self.transport.write(request)
        return self.answer

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            if self._head is None:
                end = self._buffer.find(_HEAD_END)
                if end < 0:
                    return
                self._head = _parse_head(bytes(self._buffer[:end]))
                del self._buffer[: end + len(_HEAD_END)]
            status, length, reusable = self._head
            waiting = self.answer is not None and not self.answer.done()
            if waiting and len(self._buffer) >= length:
                assert self.answer is not None
                self.answer.set_result((Answer(status, bytes(self._buffer[:length])), reusable))
        except ValueError as exc:
            self._fail(HttpError(f"bad answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(HttpError(f"connection lost before the answer: {exc!r}"))

    def _fail(self, error: HttpError) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(error)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
    length, reusable = 0, True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"connection" and value.strip().lower() == b"close":
            reusable = False
        elif key == b"transfer-encoding":
            raise ValueError("chunked answers are not expected from the collector")
    return int(parts[1]), length, reusable


@dataclass
class Client:
    url: str
    keep_alive: bool = False
    _idle: list[_Exchange] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 80

    async def request(
        self, method: str, path: str, body: bytes = b"", *, headers: dict[str, str] | None = None
    ) -> Answer:
        host, port = self.address
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {host}:{port}",
            f"Content-Length: {len(body)}",
            "Connection: " + ("keep-alive" if self.keep_alive else "close"),
        ]
        if body:
            lines.append("Content-Type: application/json")
        lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        exchange = await self._connection(host, port)
        try:
            answer, reusable = await exchange.send(head + body)
        except (OSError, RuntimeError, HttpError) as exc:
            # RuntimeError: uvloop refuses to write to a pooled connection the server closed
            exchange.close()
            raise HttpError(f"{method} {path}: {exc!r}") from exc
        if self.keep_alive and reusable and not exchange.closed:
            self._idle.append(exchange)
        else:
            exchange.close()
        return answer

    async def _connection(self, host: str, port: int) -> _Exchange:
        while self._idle:
            exchange = self._idle.pop()
            if not exchange.closed:
                return exchange
        try:
            _, exchange = await asyncio.get_running_loop().create_connection(_Exchange, host, port)
        except OSError as exc:
            raise HttpError(f"connect {host}:{port}: {exc}") from exc
        return exchange

    def close(self) -> None:
        for exchange in self._idle:
            exchange.close()
        self._idle.clear()
