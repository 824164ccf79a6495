"""Moving a host: decide (``verdicts``), write the audit line, enqueue what it causes — all in
the caller's transaction, so a state change and its alerts and replacement commit together."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final

import structlog

from collector.model import Host, HostState, Transition
from collector.store import Tx
from collector.verdicts import Observation, consequences, decide

log = structlog.get_logger(__name__)

SYSTEM: Final = "collector"


def apply(tx: Tx, host: Host, observation: Observation, *, actor: str = SYSTEM) -> Host:
    """Apply ``observation`` to ``host`` (locked by ``tx``); return the host as it now is."""
    to_state = decide(host.state, observation, resume=host.resume_state)
    if to_state is None or to_state is host.state:
        return host
    record(tx, host, to_state, observation.cause, dict(observation.evidence), actor=actor)
    return dataclasses.replace(
        host,
        state=to_state,
        state_since=tx.now,
        state_cause=observation.cause,
        resume_state=host.state if to_state is HostState.SILENT else None,
    )


def record(
    tx: Tx,
    host: Host,
    to_state: HostState,
    cause: str,
    evidence: Mapping[str, Any],
    *,
    actor: str,
    initial: bool = False,
) -> None:
    """Write one transition and enqueue its jobs. ``initial`` is the first line of a host.

    The audit trail is the transitions table (``driftwarden events ID``); the log line is
    debug, since a burst of drift is a burst of transitions, one per report."""
    source = None if initial else host.state
    tx.add_transition(Transition(host.host_id, source, to_state, cause, actor, tx.now, evidence))
    for job in consequences(host, to_state, cause, evidence, from_state=source):
        tx.enqueue(job)
    log.debug(
        "host_transition",
        host_id=host.host_id,
        from_state=source.value if source else None,
        to_state=to_state.value,
        cause=cause,
        actor=actor,
    )
