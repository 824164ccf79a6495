"""A lean HTTP/1.1 client on asyncio streams, for the ingest load generator.

The generator shares the machine's two cores with the collector it measures, so it must cost
little: no client library, one ``Content-Length`` request and response per exchange. By default
every request opens its own connection, as an agent's does when it heartbeats every 30 s (the
server has closed the idle one by then); ``keep_alive`` reuses connections from a pool.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class HttpError(Exception):
    """The exchange failed below HTTP (connection refused or reset, a truncated answer)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


@dataclass
class Client:
    url: str
    keep_alive: bool = False
    _idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)

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
        reader, writer = await self._connection(host, port)
        try:
            writer.write(head + body)
            answer, reusable = await _read_answer(reader)
        except (OSError, RuntimeError, asyncio.IncompleteReadError, ValueError) as exc:
            # RuntimeError: uvloop refuses to write to a pooled connection the server closed
            writer.close()
            raise HttpError(f"{method} {path}: {exc!r}") from exc
        if self.keep_alive and reusable:
            self._idle.append((reader, writer))
        else:
            writer.close()
        return answer

    async def _connection(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        try:
            return await asyncio.open_connection(host, port)
        except OSError as exc:
            raise HttpError(f"connect {host}:{port}: {exc}") from exc

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[Answer, bool]:
    status_line = await reader.readuntil(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    status = int(parts[1])
    length = 0
    reusable = True
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            break
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"connection" and value.strip().lower() == b"close":
            reusable = False
        elif key == b"transfer-encoding":
            raise ValueError("chunked answers are not expected from the collector")
    body = await reader.readexactly(length) if length else b""
    return Answer(status, body), reusable
