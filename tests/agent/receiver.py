"""A collector stand-in for the agent's delivery tests: a real HTTP server on 127.0.0.1.

It implements the collector side of docs/protocol.md strictly with ``agent.wire`` (enrollment
verification, envelope signatures, the chain, all-or-nothing batches), so every test that
delivers through it also checks the wire format. It can be stopped and restarted on the same
port, made to fail (5xx), to refuse chosen seqs, to forget a host (404), or to answer as a
proxy in front of it would (a bare HTML page). Like the collector, it refuses a new key for a
known host (409 key_mismatch) until ``allow_rekey`` is set.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent import keys, wire


@dataclass
class HostState:
    public_key: Any
    key_raw: bytes
    chain: wire.ChainState = field(default_factory=wire.ChainState)
    digests: dict[int, str] = field(default_factory=dict)
    envelopes: list[wire.Envelope] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)


class Receiver:
    def __init__(self, *, tokens: tuple[str, ...] = ("tok-1",), tls: ssl.SSLContext | None = None):
        self.tokens = set(tokens)
        self.tls = tls
        self.hosts: dict[str, HostState] = {}
        self.enrollments: list[dict[str, Any]] = []
        self.duplicates = 0
        self.requests = 0
        self.fail_next = 0  # answer this many report requests with 503
        self.refuse: dict[int, tuple[int, str]] = {}  # seq -> (status, code), always refused
        self.bare: list[int] = []  # answer the next report requests with these bare pages
        self.allow_rekey = False
        self.port = 0
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests look at ----------------------------------------------------------------

    def envelopes(self, host_id: str | None = None) -> list[wire.Envelope]:
        with self._cond:
            hosts = [self.hosts[host_id]] if host_id else list(self.hosts.values())
            return [e for h in hosts for e in h.envelopes]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.envelopes()]

    def wait_for(self, predicate: Callable[[Receiver], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"receiver: condition not met in {timeout_s}s")
                self._cond.wait(remaining)

    # --- protocol --------------------------------------------------------------------------

    def enroll(self, obj: Any) -> tuple[int, dict[str, Any]]:
        try:
            host_id, raw, facts = wire.verify_enrollment(obj, keys.public_from_raw)
        except wire.WireError as exc:
            return 400, wire.error_body(exc.code, str(exc))
        if obj["token"] not in self.tokens:
            return 401, wire.error_body("bad_token", "unknown enrollment token")
        with self._cond:
            known = self.hosts.get(host_id)
            if known is not None and known.key_raw == raw:
                status = 200
            elif known is not None and not self.allow_rekey:
                return 409, wire.error_body("key_mismatch", "enrolled under another key")
            else:
                known = HostState(keys.public_from_raw(raw), raw)
                self.hosts[host_id] = known
                status = 201
            self.enrollments.append({"host_id": host_id, "facts": facts, "status": status})
            self._cond.notify_all()
            tip = {"last_seq": known.chain.last_seq, "last_digest": known.chain.last_digest}
        return status, {"host_id": host_id, **tip}

    def bare_page(self) -> int | None:
        """The status of a bare page to answer this report request with, if one is due."""
        with self._cond:
            if not self.bare:
                return None
            self.requests += 1
            self._cond.notify_all()
            return self.bare.pop(0)

    def report(self, obj: Any) -> tuple[int, dict[str, Any]]:
        with self._cond:
            self.requests += 1
            if self.fail_next:
                self.fail_next -= 1
                return 503, wire.error_body("unavailable", "try again")
            host_id = obj.get("host_id") if isinstance(obj, dict) else None
            raw_envelopes = obj.get("envelopes") if isinstance(obj, dict) else None
            if not isinstance(raw_envelopes, list) or not 1 <= len(raw_envelopes) <= 500:
                return 400, wire.error_body("malformed", "envelopes must be a list of 1..500")
            host = self.hosts.get(host_id or "")
            if host is None:
                return 404, wire.error_body("unknown_host", "enroll first")
            chain = wire.ChainState(host.chain.last_seq, host.chain.last_digest)
            accepted: list[wire.Envelope] = []
            acks = []
            gaps = []
            for index, raw in enumerate(raw_envelopes):
                try:
                    env = wire.parse_envelope(raw)
                    if env.host_id != host_id:
                        raise wire.MalformedError("host_id mismatch", seq=env.seq)
                    wire.verify_signature(env, host.public_key)
                    if env.seq in self.refuse:
                        status, code = self.refuse[env.seq]
                        return status, wire.error_body(code, "refused", index=index, seq=env.seq)
                    try:
                        link = chain.link(env, known_digest=host.digests.get(env.seq))
                    except wire.GapError:
                        gaps.append(env.seq)
                        link = wire.Link.NEXT
                except wire.WireError as exc:
                    status = {"malformed": 400, "bad_signature": 401}.get(exc.code, 409)
                    return status, wire.error_body(
                        exc.code, str(exc), index=index, seq=exc.seq, last_seq=chain.last_seq
                    )
                if link is wire.Link.NEXT:
                    chain.advance(env)
                    accepted.append(env)
                    acks.append({"seq": env.seq, "status": "accepted"})
                else:
                    self.duplicates += 1
                    acks.append({"seq": env.seq, "status": "duplicate"})
            host.chain = chain
            host.envelopes.extend(accepted)
            host.digests.update({e.seq: e.digest for e in accepted})
            host.gaps.extend(gaps)
            self._cond.notify_all()
            return 200, {"acks": acks, "last_seq": chain.last_seq, "last_digest": chain.last_digest}


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            try:
                obj = json.loads(self.rfile.read(length))
            except ValueError:
                self._answer(400, wire.error_body("malformed", "not JSON"))
                return
            if self.path == "/v1/enroll":
                self._answer(*receiver.enroll(obj))
            elif self.path == "/v1/reports":
                status = receiver.bare_page()
                if status is None:
                    self._answer(*receiver.report(obj))
                else:
                    self._page(status)
            else:
                self._answer(404, wire.error_body("not_found", self.path))

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _page(self, status: int) -> None:
            data = f"<html><body><h1>{status}</h1>denied by policy</body></html>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler
