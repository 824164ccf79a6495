"""The silence sweep: hosts whose reports stopped become *silent* (unknown, not drift).

When many hosts fall silent at once, the likelier cause is the network or the collector
itself, so instead of judging each host the sweep opens one fleet-level
``collector_or_network`` event (and its alert) and leaves the hosts as they are; it closes
when they report again. It runs as a periodic job, so one replica sweeps at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

import structlog

from collector import transitions
from collector.config import VerdictConfig
from collector.jobs import Handler
from collector.model import GONE_STATES, HostState, Job, JobSpec
from collector.store import Store, Tx
from collector.verdicts import ALERT, Observation, Signal

log = structlog.get_logger(__name__)

SWEEP: Final = "sweep_silent"
FLEET_SILENCE: Final = "collector_or_network"
_SWEPT: Final = (HostState.ENROLLED, HostState.CLEAN)
_MONITORED: Final = tuple(s for s in HostState if s not in GONE_STATES)


@dataclass(frozen=True)
class SweepResult:
    silenced: list[str] = field(default_factory=list)
    fleet_silent: int = 0


def sweep(store: Store, config: VerdictConfig) -> SweepResult:
    with store.transaction() as tx:
        stale = tx.stale_hosts(tx.now - timedelta(seconds=config.silent_after_s), _SWEPT)
        monitored = tx.count_hosts(_MONITORED)
        fleet_wide = (
            len(stale) >= config.fleet_silent_min_hosts
            and 100.0 * len(stale) / max(monitored, 1) > config.fleet_silent_percent
        )
        if fleet_wide:
            _fleet_silence(tx, len(stale), monitored)
            return SweepResult(fleet_silent=len(stale))
        if tx.close_fleet_event(FLEET_SILENCE):
            log.info("fleet_silence_closed")
            tx.enqueue(_fleet_alert("resolve", {}))
        evidence = {"silent_after_s": config.silent_after_s}
        for host in stale:
            seen = host.last_seen_at or host.enrolled_at
            transitions.apply(
                tx,
                host,
                Observation(
                    Signal.SILENT, "silent", {**evidence, "last_seen_at": seen.isoformat()}
                ),
            )
        return SweepResult(silenced=[h.host_id for h in stale])


def _fleet_silence(tx: Tx, silent: int, monitored: int) -> None:
    detail = {"silent_hosts": silent, "monitored_hosts": monitored}
    if tx.open_fleet_event(FLEET_SILENCE, detail):
        log.warning("fleet_silence_opened", **detail)
        tx.enqueue(_fleet_alert("firing", detail))


def _fleet_alert(action: str, detail: dict[str, int]) -> JobSpec:
    key = f"fleet:{FLEET_SILENCE}"
    payload = {
        "action": action,
        "scope": "fleet",
        "dedup_key": key,
        "cause": FLEET_SILENCE,
        "severity": "critical",
        "evidence": detail,
    }
    return JobSpec(ALERT, f"{action}:{key}", payload)


def handler(store: Store, config: VerdictConfig) -> Handler:
    """The periodic job: sweep, then sleep ``sweep_interval_s``."""

    def run(job: Job) -> datetime:
        result = sweep(store, config)
        if result.silenced:
            log.info("hosts_silenced", hosts=len(result.silenced))
        return store.clock() + timedelta(seconds=config.sweep_interval_s)

    return run


def schedule(store: Store) -> None:
    """Make sure one sweep job exists (a no-op when another replica already queued it)."""
    store.enqueue(JobSpec(SWEEP, "silence", {}))
