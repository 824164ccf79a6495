"""Real HTTP plumbing on 127.0.0.1 for the collector client's tests: TLS material from a CA of
the test's own, a small HTTP/1.1 server that notes each request and its connection (and can
drop a connection the way a collector or a load balancer does), and a forwarding proxy
(CONNECT tunnels for https, absolute-form requests for http)."""

from __future__ import annotations

import datetime
import ipaddress
import selectors
import socket
import socketserver
import ssl
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

WAIT_S = 10.0


def tls_material(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, and the CA bundle file."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collector")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "server.pem").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem", directory / "server.key")
    return context, directory / "ca.pem"


@dataclass(frozen=True)
class Seen:
    path: str
    port: int  # the client's port: one per connection
    body: bytes


class Http11:
    """A loopback HTTP/1.1 server answering every POST with ``{"ok": true}``, keeping the
    connection alive. It notes each request (``seen``) and each connection it has closed
    (``closed``, client ports). Misbehaviour on request:

    - ``close_after_answer``: close the connection right after each answer, silently (no
      ``Connection: close``), as a collector whose idle timeout is shorter than the client's;
    - ``drop``: request numbers (1-based) whose connection is closed without an answer, as
      when the collector's idle timeout fires just as the request arrives; with
      ``reset=True`` the body is left unread, so the close is a reset, not an end of stream;
    - ``hang``: request numbers never answered (until the server stops);
    - ``status``: request numbers answered with another status (with ``Retry-After: 30``
      and ``Location: /elsewhere``).
    """

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        close_after_answer: bool = False,
        drop: frozenset[int] = frozenset(),
        reset: bool = False,
        hang: frozenset[int] = frozenset(),
        status: dict[int, int] | None = None,
    ) -> None:
        statuses = status or {}
        self.seen: list[Seen] = []
        self.closed: list[int] = []
        self.tls = tls
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                with outer._cond:
                    number = len(outer.seen) + 1
                    length = int(self.headers["Content-Length"])
                    unread = number in drop and reset
                    body = b"" if unread else self.rfile.read(length)
                    outer.seen.append(Seen(self.path, self.client_address[1], body))
                    outer._cond.notify_all()
                if number in drop:
                    if reset:  # unread data in the socket: the close sends RST
                        linger = struct.pack("ii", 1, 0)
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    self.close_connection = True
                    return
                if number in hang:
                    outer._stopping.wait(WAIT_S * 3)
                    self.close_connection = True
                    return
                answer = b'{"ok": true}'
                if number in statuses:
                    answer = b'{"error": {"code": "unavailable", "message": "later"}}'
                    self.send_response(statuses[number])
                    self.send_header("Retry-After", "30")
                    self.send_header("Location", "/elsewhere")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                if close_after_answer:
                    self.close_connection = True  # silently: no Connection: close

            def log_message(self, *_args: object) -> None:
                return

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                super().process_request_thread(request, client_address)  # then closes it
                with outer._cond:
                    outer.closed.append(client_address[1])
                    outer._cond.notify_all()

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def ports(self) -> list[int]:
        """The connection (client port) of each request, in order."""
        with self._cond:
            return [s.port for s in self.seen]

    def wait_closed(self, port: int) -> None:
        """Until the server has closed the connection from ``port``."""
        with self._cond:
            if not self._cond.wait_for(lambda: port in self.closed, WAIT_S):
                raise AssertionError(f"the server did not close the connection from {port}")

    def __enter__(self) -> Http11:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(WAIT_S)


class ForwardingProxy:
    """An HTTP proxy on loopback: ``CONNECT host:port`` opens a tunnel; an absolute-form
    request (``POST http://host:port/path``) is forwarded in origin form with
    ``Connection: close`` and its answer relayed. ``seen`` lists each request line's method
    and target, in order."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(65536).decode("latin-1")
                headers = []
                while (header := self.rfile.readline(65536)) not in (b"\r\n", b"\n", b""):
                    headers.append(header)
                method, target, _version = line.split()
                with outer._lock:
                    outer.seen.append(f"{method} {target}")
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    with socket.create_connection((host, int(port)), timeout=WAIT_S) as up:
                        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        self.wfile.flush()
                        _pipe(self.connection, up)
                    return
                parts = urlsplit(target)
                length = 0
                forwarded = [f"{method} {parts.path or '/'} HTTP/1.1\r\n".encode("latin-1")]
                for header in headers:
                    name = header.split(b":", 1)[0].strip().lower()
                    if name == b"content-length":
                        length = int(header.split(b":", 1)[1])
                    if name not in (b"connection", b"proxy-connection", b"keep-alive"):
                        forwarded.append(header)
                forwarded.append(b"Connection: close\r\n\r\n")
                body = self.rfile.read(length)
                address = (parts.hostname or "", parts.port or 80)
                with socket.create_connection(address, timeout=WAIT_S) as up:
                    up.sendall(b"".join(forwarded) + body)
                    while chunk := up.recv(65536):
                        self.wfile.write(chunk)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ForwardingProxy:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(WAIT_S)


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side ends."""
    with selectors.DefaultSelector() as selector:
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        while True:
            for key, _ in selector.select(WAIT_S):
                source: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    chunk = source.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                key.data.sendall(chunk)
