"""The host state machine is a pure function: every edge, and what must never happen."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from collector.model import Host, HostState
from collector.verdicts import (
    ALERT,
    REPLACE,
    Observation,
    Signal,
    consequences,
    decide,
    edges,
)

S = HostState
NOW = datetime(2024, 1, 1, tzinfo=UTC)


def obs(signal: Signal, cause: str = "x") -> Observation:
    return Observation(signal, cause)


@pytest.mark.parametrize(("src", "signal", "dst"), edges())
def test_every_edge(src: HostState, signal: Signal, dst: HostState) -> None:
    assert decide(src, obs(signal), resume=dst if signal is Signal.ALIVE else None) is dst


def test_every_state_is_reachable_and_documented_edges_are_all() -> None:
    reached = {dst for _, _, dst in edges()} | {S.ENROLLED}
    assert reached == set(S)
    explicit = {(src, signal) for src, signal, _ in edges()}
    for state in S:
        for signal in Signal:
            if (state, signal) not in explicit:
                assert decide(state, obs(signal), resume=S.CLEAN) is None, (state, signal)


@pytest.mark.parametrize("state", [S.DRIFTED, S.TAINTED, S.SUSPECT])
def test_severity_only_rises(state: HostState) -> None:
    assert decide(state, obs(Signal.BOOT_CLEAN)) is None
    assert decide(state, obs(Signal.SILENT)) is None
    assert decide(state, obs(Signal.ALIVE)) is None
    assert decide(state, obs(Signal.DRIFT)) is None


def test_drift_then_login_then_tampering() -> None:
    assert decide(S.CLEAN, obs(Signal.DRIFT)) is S.DRIFTED
    assert decide(S.DRIFTED, obs(Signal.LOGIN)) is S.TAINTED
    assert decide(S.TAINTED, obs(Signal.SUSPECT)) is S.SUSPECT
    assert decide(S.TAINTED, obs(Signal.DRIFT)) is None


def test_silence_is_unknown_and_resumes() -> None:
    assert decide(S.CLEAN, obs(Signal.SILENT)) is S.SILENT
    assert decide(S.SILENT, obs(Signal.ALIVE), resume=S.CLEAN) is S.CLEAN
    assert decide(S.SILENT, obs(Signal.ALIVE), resume=None) is S.ENROLLED
    assert decide(S.SILENT, obs(Signal.DRIFT)) is S.DRIFTED


def test_gone_hosts_stay_gone() -> None:
    for signal in Signal:
        if signal is not Signal.RETIRE:
            assert decide(S.REPLACED, obs(signal)) is None
        assert decide(S.RETIRED, obs(signal)) is None


def test_replacement_path() -> None:
    assert decide(S.DRIFTED, obs(Signal.REPLACEMENT_REQUESTED)) is S.REPLACEMENT_REQUESTED
    assert decide(S.REPLACEMENT_REQUESTED, obs(Signal.REPLACING)) is S.REPLACING
    assert decide(S.REPLACING, obs(Signal.REPLACED)) is S.REPLACED
    assert decide(S.CLEAN, obs(Signal.REPLACING)) is None


def _host(state: HostState = S.CLEAN) -> Host:
    return Host(
        host_id="h1",
        state=state,
        state_since=NOW,
        state_cause="",
        resume_state=None,
        key_id="k",
        public_key=b"",
        hostname="h1.example",
        pool="web",
        boot_id="b",
        agent_version="0.1.0",
        image_build_id="img-1",
        image_root=None,
        cloud_image_id=None,
        measured_root=None,
        enrolled_at=NOW,
        last_seen_at=None,
        envelopes=0,
        health={},
    )


def test_consequences_alert_with_stable_keys_and_queue_replacement() -> None:
    jobs = consequences(_host(), S.DRIFTED, "drift", {"seq": 4}, from_state=S.CLEAN)
    alert, replace = jobs
    assert (alert.kind, alert.dedup_key) == (ALERT, "firing:h1:drift")
    assert alert.payload["dedup_key"] == "h1:drift" and alert.payload["severity"] == "critical"
    assert alert.payload["evidence"] == {"seq": 4} and alert.payload["pool"] == "web"
    assert (replace.kind, replace.dedup_key) == (REPLACE, "h1")
    again = consequences(_host(), S.DRIFTED, "drift", {"seq": 9}, from_state=S.CLEAN)
    assert [j.dedup_key for j in again] == [j.dedup_key for j in jobs]


def test_consequences_of_silence_and_of_going_away() -> None:
    [silent] = consequences(_host(), S.SILENT, "silent", {}, from_state=S.CLEAN)
    assert silent.payload["severity"] == "warning"
    [back] = consequences(_host(S.SILENT), S.CLEAN, "report", {}, from_state=S.SILENT)
    assert (back.payload["action"], back.payload["dedup_key"]) == ("resolve", "h1:silent")
    [gone] = consequences(_host(S.REPLACING), S.REPLACED, "done", {}, from_state=S.REPLACING)
    assert gone.payload["action"] == "resolve_host"
    assert consequences(_host(S.ENROLLED), S.CLEAN, "boot_clean", {}, from_state=S.ENROLLED) == []
