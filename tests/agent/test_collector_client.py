"""The agent's HTTP client against real servers on loopback: keep-alive, connections the
collector drops, timeouts, TLS with a CA of the test's own, and proxies from the environment."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import CollectorSection
from agent.errors import CollectorError
from agent.sender import CollectorClient, Reply
from tests.agent.loopback_http import ForwardingProxy, Http11, tls_material

ENVIRONMENT = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)
OK = (200, {"ok": True})


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy and no CA override from the machine running the tests."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def make_client() -> Iterator[Callable[..., CollectorClient]]:
    """``make_client(url, **collector_settings)``; every client made is closed at the end."""
    made: list[CollectorClient] = []

    def make(url: str, **settings: Any) -> CollectorClient:
        made.append(CollectorClient(CollectorSection(url=url, **settings)))
        return made[-1]

    yield make
    for client in made:
        client.close()


def _post(client: CollectorClient, n: int) -> tuple[int, object]:
    reply: Reply = client.post("/v1/reports", {"n": n})
    return reply.status, reply.body


def _numbers(server: Http11) -> list[int]:
    return [json.loads(s.body)["n"] for s in server.seen if s.body]


# --- keep-alive and dropped connections --------------------------------------------------------


def test_the_client_keeps_one_connection_alive(make_client: Callable[..., CollectorClient]) -> None:
    with Http11() as server:
        client = make_client(server.url + "/base")
        replies = [_post(client, n) for n in range(3)]
    assert replies == [OK] * 3
    assert [s.path for s in server.seen] == ["/base/v1/reports"] * 3
    assert len(set(server.ports())) == 1


def test_one_tls_connection_is_kept_alive(
    tmp_path: Path, make_client: Callable[..., CollectorClient]
) -> None:
    context, ca = tls_material(tmp_path)
    with Http11(tls=context) as server:
        client = make_client(server.url, ca_bundle=ca)
        replies = [_post(client, n) for n in range(3)]
    assert replies == [OK] * 3
    assert len(set(server.ports())) == 1


def test_a_connection_the_collector_closed_while_idle_is_opened_again_at_once(
    make_client: Callable[..., CollectorClient],
) -> None:
    with Http11(close_after_answer=True) as server:
        client = make_client(server.url)
        first = _post(client, 1)
        server.wait_closed(server.ports()[0])
        second = _post(client, 2)
    assert (first, second) == (OK, OK)
    assert _numbers(server) == [1, 2]
    assert len(set(server.ports())) == 2


@pytest.mark.parametrize(
    ("scheme", "tunnel", "reset"),
    [
        ("http", False, False),
        ("http", False, True),
        ("https", False, False),
        ("https", True, False),
    ],
    ids=["http", "http-reset", "https", "https-via-proxy"],
)
def test_a_connection_dropped_as_the_report_arrives_is_tried_once_more(
    tmp_path: Path,
    make_client: Callable[..., CollectorClient],
    monkeypatch: pytest.MonkeyPatch,
    scheme: str,
    *,
    tunnel: bool,
    reset: bool,
) -> None:
    """The collector closes a kept-alive connection just as the next report reaches it: the
    client cannot have seen the close before sending, and gets no answer (an end of stream,
    or a reset when the request was left unread). The report goes again, at once, on a new
    connection; no error reaches the sender, so it does not back off."""
    context, ca = tls_material(tmp_path)
    tls = context if scheme == "https" else None
    with Http11(tls=tls, drop=frozenset({2}), reset=reset) as server, ForwardingProxy() as proxy:
        if tunnel:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        client = make_client(server.url, ca_bundle=ca)
        replies = [_post(client, n) for n in (1, 2, 3)]
    assert replies == [OK] * 3
    ports = server.ports()
    assert len(ports) == 4  # the dropped request, then the same report again
    assert ports[0] == ports[1] != ports[2] == ports[3]
    assert _numbers(server) == ([1, 2, 3] if reset else [1, 2, 2, 3])
    assert len(proxy.seen) == (2 if tunnel else 0)


def test_a_connection_dropped_twice_is_an_error_after_one_more_try(
    make_client: Callable[..., CollectorClient],
) -> None:
    with Http11(drop=frozenset({2, 3})) as server:
        client = make_client(server.url)
        assert _post(client, 1) == OK
        with pytest.raises(CollectorError, match="ConnectionError"):
            _post(client, 2)
        assert _numbers(server) == [1, 2, 2]  # tried twice, not more
        assert _post(client, 3) == OK  # and the client goes on
    assert _numbers(server) == [1, 2, 2, 3]


@pytest.mark.parametrize("status", [503, 429, 413])
def test_an_answer_is_returned_at_once_whatever_its_retry_after(
    make_client: Callable[..., CollectorClient], status: int
) -> None:
    """The sender decides what to do with an answer and how long to wait (its backoff is
    bounded and ends at stop); the client neither retries it nor sleeps on ``Retry-After``."""
    with Http11(status={1: status}) as server:
        client = make_client(server.url)
        reply = client.post("/v1/reports", {"n": 1})
        assert _post(client, 2) == OK
    assert (reply.status, reply.body["error"]["code"]) == (status, "unavailable")
    assert _numbers(server) == [1, 2]


def test_a_redirect_is_an_answer_not_followed(make_client: Callable[..., CollectorClient]) -> None:
    with Http11(status={1: 307}) as server:
        client = make_client(server.url)
        assert client.post("/v1/reports", {"n": 1}).status == 307
    assert _numbers(server) == [1]


# --- timeouts ----------------------------------------------------------------------------------


def test_a_read_timeout_is_an_error_and_not_tried_again(
    make_client: Callable[..., CollectorClient],
) -> None:
    """The collector may still be working on it: ``read_timeout_s`` bounds the whole wait."""
    with Http11(hang=frozenset({1})) as server:
        client = make_client(server.url, read_timeout_s=0.3)
        with pytest.raises(CollectorError, match="ReadTimeout"):
            _post(client, 1)
        assert _numbers(server) == [1]
        assert _post(client, 2) == OK  # a new connection for the next one
    assert _numbers(server) == [1, 2]


def test_a_connect_timeout_is_an_error(make_client: Callable[..., CollectorClient]) -> None:
    """A listener whose accept queue is full drops new connection attempts (as a host behind
    a firewall that drops them does): the connect times out."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())  # the queue holds one: it is full now
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        client = make_client(url, connect_timeout_s=0.2)
        with pytest.raises(CollectorError, match="ConnectTimeout"):
            _post(client, 1)


def test_a_refused_connection_is_an_error(make_client: Callable[..., CollectorClient]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening
        client = make_client(url)
        with pytest.raises(CollectorError, match="ConnectionError") as caught:
            _post(client, 1)
    assert caught.value.path == url + "/v1/reports"


# --- TLS ---------------------------------------------------------------------------------------


def test_tls_is_verified_against_the_configured_ca_bundle(
    tmp_path: Path, make_client: Callable[..., CollectorClient]
) -> None:
    context, ca = tls_material(tmp_path)
    with Http11(tls=context) as server:
        trusting = make_client(server.url, ca_bundle=ca)
        assert _post(trusting, 1) == OK
        default = make_client(server.url)  # the system's CAs
        with pytest.raises(CollectorError, match="SSLError"):
            _post(default, 2)
    assert _numbers(server) == [1]


def test_a_configured_ca_bundle_is_the_only_trust(
    tmp_path: Path, make_client: Callable[..., CollectorClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    context, ca = tls_material(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_ca = tls_material(other)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the system store would trust it
    with Http11(tls=context) as server:
        client = make_client(server.url, ca_bundle=other_ca)
        with pytest.raises(CollectorError, match="SSLError"):
            _post(client, 1)
    assert server.seen == []


def test_without_a_ca_bundle_the_system_store_decides(
    tmp_path: Path, make_client: Callable[..., CollectorClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system's CAs as OpenSSL finds them (``SSL_CERT_FILE`` here), not a bundle of the
    HTTP library's own."""
    context, ca = tls_material(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    with Http11(tls=context) as server:
        client = make_client(server.url)
        assert _post(client, 1) == OK


# --- proxies -----------------------------------------------------------------------------------


def test_https_goes_through_the_proxy_in_https_proxy(
    tmp_path: Path, make_client: Callable[..., CollectorClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    context, ca = tls_material(tmp_path)
    with Http11(tls=context) as server, ForwardingProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        client = make_client(server.url, ca_bundle=ca)
        replies = [_post(client, n) for n in (1, 2)]
    assert replies == [OK] * 2
    assert proxy.seen == [f"CONNECT 127.0.0.1:{server.port}"]  # one tunnel, kept alive
    assert _numbers(server) == [1, 2]
    assert len(set(server.ports())) == 1


def test_http_goes_through_the_proxy_in_http_proxy(
    make_client: Callable[..., CollectorClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    with Http11() as server, ForwardingProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        client = make_client(server.url + "/base")
        replies = [_post(client, n) for n in (1, 2)]
    assert replies == [OK] * 2
    assert proxy.seen == [f"POST {server.url}/base/v1/reports"] * 2
    assert [s.path for s in server.seen] == ["/base/v1/reports"] * 2
    assert _numbers(server) == [1, 2]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_no_proxy_bypasses_the_proxy(
    tmp_path: Path,
    make_client: Callable[..., CollectorClient],
    monkeypatch: pytest.MonkeyPatch,
    scheme: str,
) -> None:
    context, ca = tls_material(tmp_path)
    with Http11(tls=context if scheme == "https" else None) as server, ForwardingProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        client = make_client(server.url, ca_bundle=ca)
        assert _post(client, 1) == OK
    assert proxy.seen == []
    assert _numbers(server) == [1]


def test_a_proxy_is_used_for_a_name_only_it_resolves_unless_no_proxy_names_it(
    make_client: Callable[..., CollectorClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collector's name is the proxy's to resolve (a stand-in answers for it here); once
    ``no_proxy`` names it, the client goes direct, and fails: the name does not resolve."""
    collector = "http://collector.invalid:8080"
    with Http11() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        client = make_client(collector)
        assert _post(client, 1) == OK
        assert [s.path for s in proxy.seen] == [collector + "/v1/reports"]

        monkeypatch.setenv("no_proxy", "collector.invalid")
        direct = make_client(collector, connect_timeout_s=1.0)
        with pytest.raises(CollectorError, match=r"collector\.invalid"):
            _post(direct, 2)
    assert len(proxy.seen) == 1
