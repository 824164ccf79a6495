"""The host state machine, as a pure function, and the jobs a transition causes.

``decide(state, observation)`` says where a host goes when something is observed about it;
it reads nothing and writes nothing, so every edge is tested on its own. ``consequences`` names
the jobs (alerts, replacements) a transition enqueues in the same transaction. The machine is
drawn in ``docs/host-states.md``::

    enrolled ─boot clean─▶ clean
    enrolled/clean/silent ─drift─▶ drifted ─login─▶ tainted ─gap/unclean/key─▶ suspect
    enrolled/clean ─no heartbeat─▶ silent ─any report─▶ (where it was)
    live ─operator─▶ replacement_requested ─▶ replacing ─▶ replaced;  any ─▶ retired

Severity only rises: a drifted host that reboots clean is still drifted (it is replaced, not
repaired); silence is *unknown*, so only hosts believed clean go silent.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from collector.model import GONE_STATES, Host, HostState, JobSpec

S = HostState


class Signal(enum.StrEnum):
    ALIVE = "alive"  # any report arrived
    BOOT_CLEAN = "boot_clean"  # a boot measurement matching the image
    DRIFT = "drift"  # a file, package or image difference
    LOGIN = "login"  # an accepted login whose policy verdict is "taint"
    SUSPECT = "suspect"  # sequence gap, agent killed rather than stopped, key changed
    SILENT = "silent"  # heartbeats stopped
    REPLACEMENT_REQUESTED = "replacement_requested"
    REPLACING = "replacing"
    REPLACED = "replaced"
    RETIRE = "retire"


@dataclass(frozen=True)
class Observation:
    signal: Signal
    cause: str
    evidence: Mapping[str, Any] = field(default_factory=dict)


_LIVE: Final = (S.ENROLLED, S.CLEAN, S.SILENT, S.DRIFTED, S.TAINTED, S.SUSPECT)
_MOVES: Final[Mapping[Signal, Mapping[HostState, HostState]]] = MappingProxyType(
    {
        Signal.BOOT_CLEAN: {S.ENROLLED: S.CLEAN, S.SILENT: S.CLEAN},
        Signal.DRIFT: dict.fromkeys((S.ENROLLED, S.CLEAN, S.SILENT), S.DRIFTED),
        Signal.LOGIN: dict.fromkeys((S.ENROLLED, S.CLEAN, S.SILENT, S.DRIFTED), S.TAINTED),
        Signal.SUSPECT: dict.fromkeys(
            (S.ENROLLED, S.CLEAN, S.SILENT, S.DRIFTED, S.TAINTED), S.SUSPECT
        ),
        Signal.SILENT: dict.fromkeys((S.ENROLLED, S.CLEAN), S.SILENT),
        Signal.REPLACEMENT_REQUESTED: dict.fromkeys(_LIVE, S.REPLACEMENT_REQUESTED),
        Signal.REPLACING: {S.REPLACEMENT_REQUESTED: S.REPLACING},
        Signal.REPLACED: dict.fromkeys((S.REPLACEMENT_REQUESTED, S.REPLACING), S.REPLACED),
        Signal.RETIRE: {s: S.RETIRED for s in S if s is not S.RETIRED},
    }
)


def decide(
    state: HostState, observation: Observation, *, resume: HostState | None = None
) -> HostState | None:
    """The state a host in ``state`` moves to on ``observation``; None when it stays.

    ``resume`` is where a silent host was before it fell silent (enrolled or clean).
    """
    if observation.signal is Signal.ALIVE:
        if state is S.SILENT:
            return resume if resume in (S.ENROLLED, S.CLEAN) else S.ENROLLED
        return None
    return _MOVES[observation.signal].get(state)


def edges() -> list[tuple[HostState, Signal, HostState]]:
    """Every edge of the machine (for the drawing in docs/host-states.md and its test)."""
    out = [(S.SILENT, Signal.ALIVE, s) for s in (S.ENROLLED, S.CLEAN)]
    for signal, moves in _MOVES.items():
        out.extend((src, signal, dst) for src, dst in moves.items())
    return out


# --- consequences ---------------------------------------------------------------------------

ALERT: Final = "alert"
REPLACE: Final = "replace"
_FIRING: Final[Mapping[HostState, str]] = MappingProxyType(
    {S.DRIFTED: "critical", S.TAINTED: "critical", S.SUSPECT: "critical", S.SILENT: "warning"}
)
_REPLACE_FROM: Final = frozenset({S.DRIFTED, S.TAINTED, S.SUSPECT, S.REPLACEMENT_REQUESTED})


def alert_key(host_id: str, cause: str) -> str:
    """The stable dedup key of one incident: a host and a cause (sinks use it as is)."""
    return f"{host_id}:{cause}"


def _alert_base(
    host: Host, to_state: HostState, cause: str, from_state: HostState | None
) -> dict[str, Any]:
    return {
        "host_id": host.host_id,
        "hostname": host.hostname,
        "pool": host.pool,
        "image": host.image_build_id,
        "state": to_state.value,
        "from": from_state.value if from_state else None,
        "cause": cause,
    }


def _firing(
    base: Mapping[str, Any], host_id: str, cause: str, severity: str, evidence: Mapping[str, Any]
) -> JobSpec:
    key = alert_key(host_id, cause)
    payload = {
        **base,
        "action": "firing",
        "dedup_key": key,
        "severity": severity,
        "evidence": dict(evidence),
    }
    return JobSpec(ALERT, f"firing:{key}", payload)


def warning(host: Host, cause: str, evidence: Mapping[str, Any]) -> JobSpec:
    """A warning page about a host whose state does not change (a refused new key)."""
    base = _alert_base(host, host.state, cause, host.state)
    return _firing(base, host.host_id, cause, "warning", evidence)


def consequences(
    host: Host,
    to_state: HostState,
    cause: str,
    evidence: Mapping[str, Any],
    *,
    from_state: HostState | None,
) -> list[JobSpec]:
    """The jobs a transition causes, enqueued in the transaction that records it.

    An alert fires on entering drifted, tainted, suspect or silent (dedup key host + cause);
    coming back from silence resolves the silence alert; replaced or retired resolves every
    alert of the host. A replacement job (one open per host) is queued on entering drifted,
    tainted, suspect or replacement_requested; its handler applies the safety rails.
    """
    base = _alert_base(host, to_state, cause, from_state)
    out: list[JobSpec] = []
    if to_state in _FIRING:
        out.append(_firing(base, host.host_id, cause, _FIRING[to_state], evidence))
    if from_state is S.SILENT and to_state is not S.SILENT:
        key = alert_key(host.host_id, "silent")
        out.append(
            JobSpec(ALERT, f"resolve:{key}", {**base, "action": "resolve", "dedup_key": key})
        )
    if to_state in GONE_STATES:
        key = alert_key(host.host_id, "*")
        out.append(
            JobSpec(ALERT, f"resolve:{key}", {**base, "action": "resolve_host", "dedup_key": key})
        )
    if to_state in _REPLACE_FROM:
        out.append(JobSpec(REPLACE, host.host_id, {**base, "evidence": dict(evidence)}))
    return out
