"""A loopback HTTP receiver for sink and action tests: records every request and answers
from a script of replies (then a default, or a function of the request). One server thread,
always joined; with ``threaded`` each request has its own thread, all joined at close."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


class LoopbackReceiver:
    def __init__(
        self,
        default: Answer | None = None,
        *,
        responder: Callable[[Received], Answer] | None = None,
        threaded: bool = False,
    ) -> None:
        self.default = default or Answer(200, b"ok")
        self.responder = responder
        self.gate = threading.Event()  # cleared: requests are held (recorded, not answered)
        self.gate.set()
        self.held = 0
        self.script: deque[Answer] = deque()
        self.requests: list[Received] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                received = Received("POST", self.path, dict(self.headers), body, time.monotonic())
                with receiver._changed:
                    receiver.held += 1
                    receiver._changed.notify_all()
                receiver.gate.wait()
                with receiver._changed:
                    receiver.held -= 1
                    receiver.requests.append(received)
                    if receiver.script:
                        answer = receiver.script.popleft()
                    elif receiver.responder is not None:
                        answer = receiver.responder(received)
                    else:
                        answer = receiver.default
                    receiver._changed.notify_all()
                self.send_response(answer.status)
                for name, value in answer.headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle(self) -> None:
                with contextlib.suppress(OSError):  # the client was killed before the answer
                    super().handle()

        if threaded:
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            server.daemon_threads = False
            server.block_on_close = True  # server_close joins every request's thread
            self._server: HTTPServer = server
        else:
            self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def answer(self, *answers: Answer) -> None:
        self.script.extend(answers)

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Received]:
        return self.wait_until(lambda got: len(got) >= count, timeout_s, f"{count} requests")

    def wait_until(
        self, condition: Callable[[list[Received]], bool], timeout_s: float, what: str
    ) -> list[Received]:
        """Wait until ``condition(requests)`` holds; TimeoutError naming ``what`` if not."""
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self.requests), timeout_s):
                raise TimeoutError(f"{len(self.requests)} requests arrived, not {what}")
            return list(self.requests)

    def __enter__(self) -> LoopbackReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
