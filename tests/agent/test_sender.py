"""Delivery to a real HTTP receiver on loopback that verifies every envelope with agent.wire."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from agent import wire
from agent.config import CollectorSection, Secret
from agent.reporter import Reporter
from agent.sender import Backoff, CollectorClient, Enrollment, Sender
from agent.spool import Spool
from tests.agent.loopback_http import tls_material
from tests.agent.receiver import Receiver

HOST = "h-1"


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class Agent:
    """A reporter, spool and sender wired as the daemon wires them."""

    def __init__(self, state: Path, url: str, **overrides: object) -> None:
        self.key = Ed25519PrivateKey.generate()
        settings: dict[str, object] = {
            "url": url,
            "enroll_token": Secret("tok-1"),
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.05,
            "connect_timeout_s": 2.0,
            "read_timeout_s": 2.0,
            "batch_max_envelopes": 7,
        }
        settings.update(overrides)
        self.config = CollectorSection(**settings)  # type: ignore[arg-type]
        spool = Spool(state / "spool", max_bytes=1 << 24, max_records=10_000)
        self.reporter = Reporter(
            spool, self.key, host_id=HOST, key_id="k", boot_id="b-1", state_dir=state
        )
        self.client = CollectorClient(self.config)
        token = self.config.enroll_token
        self.enrollment = Enrollment(
            state, self.client, self.key, host_id=HOST, token=token, facts=lambda: {"pool": None}
        )
        self.sender = Sender(
            self.reporter, self.client, self.enrollment, self.config, rng=random.Random(7)
        )

    def report(self, count: int, start: int = 0) -> None:
        for n in range(start, start + count):
            self.reporter.report("finding", {"source": "realtime", "findings": [{"n": n}]})

    def close(self) -> None:
        self.sender.stop(5)
        self.client.close()
        assert not self.sender.is_alive()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rx:
        yield rx


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(url: str, **overrides: object) -> Agent:
        agent = Agent(tmp_path, url, **overrides)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


def _numbers(rx: Receiver) -> list[int]:
    return [e.body["findings"][0]["n"] for e in rx.envelopes() if e.kind == "finding"]


def test_backoff_is_full_jitter_with_a_cap() -> None:
    backoff = Backoff(1.0, 30.0, random.Random(1))
    delays = [backoff.next_delay() for _ in range(40)]
    assert all(0 <= d <= min(30.0, 2.0**i) for i, d in enumerate(delays))
    assert max(delays[10:]) > 15  # it does reach towards the cap
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_delivers_everything_in_order_and_empties_the_spool(
    receiver: Receiver, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(receiver.url)
    agent.report(40)
    agent.sender.start()
    receiver.wait_for(lambda rx: len(rx.envelopes()) == 40)
    assert _numbers(receiver) == list(range(40))
    assert [e.seq for e in receiver.envelopes()] == list(range(1, 41))
    assert agent.sender.flush(10)
    assert receiver.enrollments[0]["status"] == 201
    assert receiver.requests >= 40 // 7  # batched, at most 7 at a time


def test_receiver_down_then_back_gets_everything_exactly_once(
    receiver: Receiver, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(receiver.url)
    agent.sender.start()
    agent.report(5)
    receiver.wait_for(lambda rx: len(rx.envelopes()) == 5)
    receiver.stop()
    agent.report(30, start=5)
    wait_until(lambda: agent.sender.state == "unreachable")
    assert agent.reporter.spool.health().depth == 30
    receiver.start()  # same port
    receiver.wait_for(lambda rx: len(rx.envelopes()) == 35)
    assert agent.sender.flush(10)
    assert _numbers(receiver) == list(range(35))
    assert [e.seq for e in receiver.envelopes()] == list(range(1, 36))
    assert receiver.hosts[HOST].gaps == []


def test_server_errors_are_retried_with_backoff(
    receiver: Receiver, make_agent: Callable[..., Agent]
) -> None:
    receiver.fail_next = 3
    agent = make_agent(receiver.url)
    agent.report(10)
    with capture_logs() as logs:
        agent.sender.start()
        receiver.wait_for(lambda rx: len(rx.envelopes()) == 10)
    assert _numbers(receiver) == list(range(10))
    assert sum(e["event"] == "delivery_backoff" for e in logs) == 3


def test_a_refused_envelope_is_set_aside_and_the_rest_delivered(
    receiver: Receiver, make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    receiver.refuse[4] = (400, "malformed")
    agent = make_agent(receiver.url)
    agent.report(12)
    agent.sender.start()
    receiver.wait_for(lambda rx: len(rx.envelopes()) == 11)
    assert agent.sender.flush(10)
    assert _numbers(receiver) == [n for n in range(12) if n != 3]
    assert receiver.hosts[HOST].gaps == [5]  # the collector sees the hole as evidence
    rejected = list((tmp_path / "spool" / "rejected").iterdir())
    assert [p.name for p in rejected] == ["0000000000000004.json"]
    assert agent.reporter.spool.health().rejected == 1


def test_a_refusal_without_a_collector_error_body_is_retried_never_parked(
    receiver: Receiver, make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    receiver.bare = [403, 407, 401, 400, 413]  # a WAF, a proxy, a gateway: HTML, no error body
    agent = make_agent(receiver.url)
    agent.report(6)
    with capture_logs() as logs:
        agent.sender.start()
        receiver.wait_for(lambda rx: len(rx.envelopes()) == 6)
    assert agent.sender.flush(10)
    assert _numbers(receiver) == list(range(6))
    assert receiver.hosts[HOST].gaps == []
    assert not list((tmp_path / "spool" / "rejected").iterdir())
    refused = [e for e in logs if e["event"] == "delivery_refused"]
    assert [e["status"] for e in refused] == [403, 407, 401, 400, 413]
    assert all("proxy" in e["advice"] for e in refused)


def test_a_chain_conflict_keeps_every_envelope(
    receiver: Receiver, make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    receiver.refuse[2] = (409, "replay")
    agent = make_agent(receiver.url)
    agent.report(3)
    with capture_logs() as logs:
        agent.sender.start()
        wait_until(lambda: sum(e["event"] == "chain_conflict" for e in logs) >= 3)
    assert agent.reporter.spool.health().depth == 3
    assert not list((tmp_path / "spool" / "rejected").iterdir())
    assert agent.sender.state == "chain_conflict"


def test_a_new_key_refused_by_the_collector_keeps_the_spool_and_retries(
    receiver: Receiver, make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    first = make_agent(receiver.url)
    first.report(1)
    first.sender.start()
    receiver.wait_for(lambda rx: len(rx.envelopes()) == 1)
    first.close()
    (tmp_path / "enrollment.json").unlink()
    (tmp_path / "chain.json").unlink()
    again = make_agent(receiver.url)  # the same host id, a new key
    again.report(2, start=1)
    with capture_logs() as logs:
        again.sender.start()
        wait_until(lambda: sum(e["event"] == "enroll_key_mismatch" for e in logs) >= 3)
        assert again.reporter.spool.health().depth == 2
        assert not list((tmp_path / "spool" / "rejected").iterdir())
        refused = [e for e in logs if e["event"] == "enroll_key_mismatch"]
        assert "driftwarden rekey" in refused[0]["advice"]
        receiver.allow_rekey = True  # an operator allowed the new key
        receiver.wait_for(lambda rx: len(rx.envelopes()) == 2)
    assert again.sender.flush(10)
    assert _numbers(receiver) == [1, 2]


def test_unknown_host_enrolls_again(receiver: Receiver, make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(receiver.url)
    agent.sender.start()
    agent.report(3)
    receiver.wait_for(lambda rx: len(rx.envelopes()) == 3)
    old = receiver.hosts.pop(HOST)  # the collector lost us
    agent.report(2, start=3)
    receiver.wait_for(lambda rx: HOST in rx.hosts and len(rx.envelopes()) >= 1)
    assert agent.sender.flush(10)
    assert len(receiver.enrollments) == 2
    assert [e.seq for e in old.envelopes] == [1, 2, 3]
    assert _numbers(receiver) == [3, 4]  # the new host record starts at the gap


def test_a_bad_token_is_reported_and_never_hangs(
    receiver: Receiver, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(receiver.url, enroll_token=Secret("wrong"))
    agent.report(2)
    with capture_logs() as logs:
        agent.sender.start()
        wait_until(lambda: agent.sender.state == "enroll_refused")
        assert not agent.sender.flush(0.2)
    refused = [e for e in logs if e["event"] == "enroll_refused"]
    assert refused and "bad_token" in refused[0]["error"]
    assert "wrong" not in repr(logs)
    assert agent.reporter.spool.health().depth == 2  # kept


def test_a_silent_collector_never_blocks_stop(make_agent: Callable[..., Agent]) -> None:
    with socket.socket() as blackhole:  # accepts connections, never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        url = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        agent = make_agent(url, read_timeout_s=0.2, connect_timeout_s=0.2)
        agent.report(1)
        agent.sender.start()
        wait_until(lambda: agent.sender.state == "unreachable")
        assert not agent.sender.flush(0.1)
        agent.sender.stop(5)
        assert not agent.sender.is_alive()


# --- TLS -------------------------------------------------------------------------------------


def test_tls_with_a_configured_ca_bundle(tmp_path: Path, make_agent: Callable[..., Agent]) -> None:
    context, ca = tls_material(tmp_path)
    with Receiver(tls=context) as rx:
        agent = make_agent(rx.url, ca_bundle=ca)
        agent.report(3)
        agent.sender.start()
        rx.wait_for(lambda r: len(r.envelopes()) == 3)
        assert rx.url.startswith("https://")


def test_tls_refuses_a_server_outside_the_bundle(
    tmp_path: Path, make_agent: Callable[..., Agent]
) -> None:
    context, _ = tls_material(tmp_path)
    with Receiver(tls=context) as rx, capture_logs() as logs:
        agent = make_agent(rx.url)  # system CAs only
        agent.report(1)
        agent.sender.start()
        wait_until(lambda: agent.sender.state == "unreachable")
        agent.sender.stop(5)
        assert rx.enrollments == []
    assert any("SSLError" in str(e.get("error")) for e in logs)


def test_wire_chain_from_the_receiver_verifies(
    receiver: Receiver, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(receiver.url)
    agent.report(4)
    agent.sender.start()
    receiver.wait_for(lambda rx: len(rx.envelopes()) == 4)
    objs = [e.to_json() for e in receiver.envelopes()]
    wire.verify_chain(objs, agent.key.public_key())
    objs[1], objs[2] = objs[2], objs[1]
    with pytest.raises(wire.ChainError):
        wire.verify_chain(objs, agent.key.public_key())
