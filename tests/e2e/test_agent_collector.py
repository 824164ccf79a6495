"""End to end: real agent processes on copies of a baked image report to a real collector
process; everything is seen through the SRE API and the ``driftwarden`` command."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent import wire
from tests.e2e.world import BUILD_ID, STATE_TIMEOUT_S, Agent, World, logins
from tests.sshd import Sshd, SshUser, local_port, wait_until

pytestmark = pytest.mark.slow

NewAgent = Callable[..., Agent]


def transitions(host: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    """The host's audit trail, oldest first, as (from, to, cause)."""
    return [(t["from"], t["to"], t["cause"]) for t in reversed(host["transitions"])]


def test_a_host_enrolls_then_is_clean_in_the_api_and_the_cli(
    world: World, new_agent: NewAgent
) -> None:
    agent = new_agent()
    host = agent.start_clean()
    assert transitions(host) == [
        (None, "enrolled", "enrolled"),
        ("enrolled", "clean", "boot_clean"),
    ]
    assert host["image"]["build_id"] == BUILD_ID
    assert host["image"]["root"] == wire.read_statement(world.image.manifest)["root"]
    kinds = [r["kind"] for r in world.reports(agent.host_id)]
    assert kinds[:2] == ["agent_start", "boot"]
    start, boot = world.reports(agent.host_id)[:2]
    assert start["body"]["previous_stop"] == "first"
    assert boot["body"]["clean"] is True and boot["body"]["baseline"]["signed"] is True
    world.wait_host(
        agent.host_id, lambda h: h["health"].get("spool_state") == "ok", what="a heartbeat"
    )

    rows = [line.split() for line in world.cli("hosts").splitlines()]
    assert rows[0][:3] == ["HOST_ID", "STATE", "STATE_CAUSE"]
    assert [agent.host_id, "clean", "boot_clean", "-", BUILD_ID] in [r[:5] for r in rows[1:]]
    listed = json.loads(world.cli("hosts", "--state", "clean", "--json"))["hosts"]
    assert agent.host_id in [h["host_id"] for h in listed]

    shown = world.cli("host", agent.host_id)
    assert re.search(r"^state +clean$", shown, re.MULTILINE) and "transitions:" in shown
    assert "spool_state" in shown  # the agent's health, from its last heartbeat

    events = world.cli("events", agent.host_id).splitlines()
    assert events[0].split() == ["AT", "TYPE", "SEQ", "WHAT"]
    whats = [line.split(maxsplit=3)[3] for line in events[1:]]
    assert "agent_start" in whats and "boot" in whats and "heartbeat" in whats
    assert "- -> enrolled (enrolled)" in whats and "enrolled -> clean (boot_clean)" in whats
    data = json.loads(world.cli("events", agent.host_id, "--json"))
    assert data["host_id"] == agent.host_id and data["events"]

    fleet = world.cli("fleet")
    assert re.search(rf"^{BUILD_ID}\s+\d+\s+yes$", fleet, re.MULTILINE), fleet
    summary = json.loads(world.cli("fleet", "--json"))
    assert summary["states"]["clean"] >= 1
    assert {"build_id": BUILD_ID, "registered": True}.items() <= next(
        i for i in summary["images"] if i["build_id"] == BUILD_ID
    ).items()


def test_sigterm_is_a_clean_stop_and_no_suspicion(world: World, new_agent: NewAgent) -> None:
    agent = new_agent()
    agent.start_clean()
    assert agent.stop() == 0
    stops = world.reports(agent.host_id, "agent_stop")
    assert [s["body"] for s in stops] == [{"reason": "signal"}]  # delivered before it exited

    agent.start()
    world.wait_reports(
        agent.host_id, lambda r: len([e for e in r if e["kind"] == "boot"]) == 2, what="2nd boot"
    )
    starts = world.reports(agent.host_id, "agent_start")
    assert [s["body"]["previous_stop"] for s in starts] == ["first", "clean"]
    host = world.host(agent.host_id)
    assert host is not None and host["state"] == "clean"
    assert transitions(host) == [
        (None, "enrolled", "enrolled"),
        ("enrolled", "clean", "boot_clean"),
    ]


def test_a_file_changed_while_stopped_makes_the_host_drifted_at_the_next_start(
    world: World, new_agent: NewAgent
) -> None:
    agent = new_agent()
    agent.start_clean()
    assert agent.stop() == 0
    agent.path("/etc/hosts").write_text("203.0.113.9 updates.example\n")

    agent.start()
    host = world.wait_state(agent.host_id, "drifted")
    assert transitions(host)[-1] == ("clean", "drifted", "drift")
    (finding,) = [f for f in host["findings"] if f["drift"]]
    assert finding["path"] == "/etc/hosts" and finding["source"] == "boot"
    assert finding["detail"]["change"] == "modified" and "content" in finding["detail"]["fields"]
    assert "/etc/hosts" in world.cli("host", agent.host_id)


def test_a_file_changed_while_running_makes_the_host_drifted_at_once(
    world: World, new_agent: NewAgent
) -> None:
    agent = new_agent()
    agent.start_clean()
    host = world.wait_host(
        agent.host_id, lambda h: "watch_backend" in h["health"], what="a heartbeat"
    )
    assert host["health"]["watch_backend"] in ("inotify", "fanotify")  # the realtime guard
    agent.path("/usr/bin/app").write_bytes(b"#!/bin/sh\necho replaced\n")
    host = world.wait_state(agent.host_id, "drifted")
    (finding,) = [f for f in host["findings"] if f["drift"]]
    assert finding["path"] == "/usr/bin/app" and finding["source"] == "realtime"
    assert agent.proc.poll() is None  # no restart was needed


def test_an_ssh_login_taints_the_host_with_who_and_how(
    world: World, new_agent: NewAgent, sshd: Sshd, ssh_user: SshUser
) -> None:
    agent = new_agent(auth_log=sshd.log_path)
    agent.start_clean()

    client = sshd.connect(pkey=ssh_user.key())
    port = local_port(client)
    host = world.wait_state(agent.host_id, "tainted")
    client.close()

    (finding,) = logins(host, port)
    assert finding["user"] == ssh_user.name
    assert finding["method"] == "publickey"
    assert finding["fingerprint"] == ssh_user.fingerprint
    assert finding["verdict"] == "taint" and finding["severity"] == "critical"
    trail = [t for t in host["transitions"] if t["to"] == "tainted"]
    assert trail[0]["cause"] == "login" and trail[0]["evidence"]["source_port"] == port
    assert trail[0]["evidence"]["user"] == ssh_user.name
    assert trail[0]["evidence"]["fingerprint"] == ssh_user.fingerprint
    assert logins(world.reports(agent.host_id), port) == [finding]
    assert f"{ssh_user.name}" in world.cli("events", agent.host_id, "--json")


def test_kill_9_then_restart_is_suspect_and_nothing_is_lost(
    world: World, new_agent: NewAgent, sshd: Sshd, ssh_user: SshUser
) -> None:
    """The agent is killed while reports wait in its spool (the collector is down): after
    both come back, every report arrives once, and the unclean stop is evidence."""
    agent = new_agent(auth_log=sshd.log_path)
    agent.start_clean()

    world.server.stop()
    try:
        client = sshd.connect(password=ssh_user.password)
        port = local_port(client)
        wait_until(
            lambda: logins(agent.spooled(), port),
            timeout_s=STATE_TIMEOUT_S,
            what="the login to wait in the agent's spool",
        )
        agent.kill()
        client.close()
    finally:
        world.server.start()
    agent.start()
    host = world.wait_state(agent.host_id, "suspect")
    assert host["state_cause"] == "unclean_stop"
    starts = world.reports(agent.host_id, "agent_start")
    assert [s["body"]["previous_stop"] for s in starts] == ["first", "unclean"]

    wait_until(lambda: not agent.spooled(), timeout_s=STATE_TIMEOUT_S, what="the spool to drain")
    reports = world.reports(agent.host_id)
    seqs = [r["seq"] for r in reports]
    assert seqs == list(range(1, len(seqs) + 1))  # no hole, nothing twice
    found = logins(reports, port)
    summary = [(r["seq"], r["kind"], r["body"].get("source")) for r in reports]
    assert len(found) == 1, f"the login from port {port} once in {summary}"
    (finding,) = found
    assert finding["user"] == ssh_user.name and finding["method"] == "password"
    host = world.host(agent.host_id)
    assert host is not None and host["envelopes"] == len(seqs)
    assert "sequence_gap" not in [t["cause"] for t in host["transitions"]]
    assert agent.rejected() == []


def test_a_forged_envelope_for_the_host_is_refused(world: World, new_agent: NewAgent) -> None:
    agent = new_agent()
    agent.start_clean()
    before = world.host(agent.host_id)
    assert before is not None
    genuine = world.reports(agent.host_id)[-1]

    rogue = Ed25519PrivateKey.generate()
    forged = wire.make_envelope(
        rogue,
        host_id=agent.host_id,
        boot_id="rogue-boot",
        seq=genuine["seq"] + 1,
        prev="0" * 64,
        kind="boot",
        body={**world.reports(agent.host_id, "boot")[0]["body"], "clean": True},
    )
    answer = requests.post(
        world.url + "/v1/reports",
        json={"host_id": agent.host_id, "envelopes": [forged.to_json()]},
        timeout=10,
    )
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "bad_signature"
    assert answer.json()["error"]["details"] == {"index": 0, "seq": genuine["seq"] + 1}

    raw = rogue.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    facts = {k: before[k] for k in ("hostname", "boot_id", "agent_version", "pool", "image")}
    takeover = wire.make_enrollment(
        rogue, token="dwe_guessed", host_id=agent.host_id, public_key_raw=raw, facts=facts
    )
    answer = requests.post(world.url + "/v1/enroll", json=takeover, timeout=10)
    assert (answer.status_code, answer.json()["error"]["code"]) == (401, "bad_token")

    host = world.host(agent.host_id)
    assert host is not None
    assert host["key_id"] == before["key_id"] and host["state"] == "clean"
    # The host's own reports still go on: the chain was not disturbed.
    world.wait_host(
        agent.host_id, lambda h: h["envelopes"] > before["envelopes"] + 1, what="more reports"
    )
    assert world.host(agent.host_id)["state"] == "clean"  # type: ignore[index]
