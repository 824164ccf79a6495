"""What a real agent sends is what the collector accepts, and the collector acts on it: the
integrity reasons of a failed boot check, a boot report split over several envelopes, and the
agent's health."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from agent.errors import EXIT_DRIFT, EXIT_ERROR, EXIT_UNTRUSTED
from tests.collector.hosts import SimHost
from tests.e2e.world import BUILD_ID, POLICY, Agent, World, command

pytestmark = pytest.mark.slow

NewAgent = Callable[..., Agent]
SPLIT_FILES = 2500  # enough added files that the boot's findings need more than 1 MiB


def integrity_reasons(host: dict[str, object]) -> list[object]:
    findings = host["findings"]
    assert isinstance(findings, list)
    return [f["detail"]["reason"] for f in findings if f["type"] == "integrity"]


def test_a_manifest_signed_by_another_key_makes_the_host_suspect(
    world: World, new_agent: NewAgent, tmp_path: Path
) -> None:
    agent = new_agent()
    other_key = tmp_path / "other.key"
    command("agent", "keygen", "--out", str(other_key))
    agent.baseline = tmp_path / "other.dwm"
    command(
        "agent", "bake", "--root", str(world.image.root), "--policy", str(POLICY),
        "--out", str(agent.baseline), "--key", str(other_key), "--build-id", BUILD_ID,
    )  # fmt: skip
    assert agent.start("--once").wait(60) == EXIT_UNTRUSTED, agent.log()
    host = world.wait_state(agent.host_id, "suspect")
    assert host["state_cause"] == "baseline_untrusted"
    assert integrity_reasons(host) == ["baseline_untrusted"]
    assert "baseline_untrusted" in world.cli("host", agent.host_id)


def test_an_unreadable_manifest_makes_the_host_suspect(
    world: World, new_agent: NewAgent, tmp_path: Path
) -> None:
    agent = new_agent()
    agent.baseline = tmp_path / "garbage.dwm"
    agent.baseline.write_bytes(b"not a manifest")
    assert agent.start("--once").wait(60) == EXIT_ERROR, agent.log()
    host = world.wait_state(agent.host_id, "suspect")
    assert host["state_cause"] == "baseline_unreadable"
    assert integrity_reasons(host) == ["baseline_unreadable"]


def test_no_baseline_is_reported_and_the_host_stays_unmeasured(
    world: World, new_agent: NewAgent
) -> None:
    agent = new_agent()
    agent.baseline = None
    assert agent.start("--once").wait(60) == 0, agent.log()
    reports = world.wait_reports(
        agent.host_id, lambda r: "agent_stop" in [e["kind"] for e in r], what="the agent's stop"
    )
    assert [r["kind"] for r in reports] == ["agent_start", "finding", "heartbeat", "agent_stop"]
    host = world.host(agent.host_id)
    assert host is not None and host["state"] == "enrolled"
    assert integrity_reasons(host) == ["no_baseline"]


def test_a_boot_report_split_over_envelopes_is_the_boot_s_and_counted_once(
    world: World, new_agent: NewAgent
) -> None:
    agent = new_agent()
    added = agent.path("/usr/lib/app/added")
    added.mkdir()
    for index in range(SPLIT_FILES):
        (added / f"{index:05d}-{'x' * 180}").write_bytes(b"")
    assert agent.start("--once").wait(120) == EXIT_DRIFT, agent.log()
    reports = world.wait_reports(
        agent.host_id, lambda r: "agent_stop" in [e["kind"] for e in r], what="the agent's stop"
    )
    (boot,) = [r for r in reports if r["kind"] == "boot"]
    rest = [r for r in reports if r["body"].get("continues") == "boot"]
    assert rest and all(r["kind"] == "finding" for r in rest)
    found = [f for r in [boot, *rest] for f in r["body"]["findings"]]
    paths = {f["path"] for f in found if f["drift"]}
    assert len(paths) == SPLIT_FILES + 1  # every added file, and the directory
    host = world.wait_state(agent.host_id, "drifted")
    assert {f["source"] for f in host["findings"]} == {"boot"}
    assert [t["cause"] for t in host["transitions"]].count("drift") == 1


def test_the_collector_refuses_a_health_of_the_wrong_shape(world: World) -> None:
    sim = SimHost(build_id=BUILD_ID)
    assert requests.post(world.url + "/v1/enroll", json=sim.enrollment(world.enroll_token)).ok
    bad = sim.envelope("heartbeat", {"health": {"spool_depth": "many", "version": "0.1.0"}})
    answer = requests.post(world.url + "/v1/reports", json=sim.batch(bad), timeout=10)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "malformed" and "spool_depth" in error["message"]
