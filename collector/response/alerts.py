"""Alerts through the durable outbox: the ``alert`` job and the ``deliver`` job.

An ``alert`` job (queued with the state change that causes it) opens, or resolves, an
**incident** keyed by its dedup key — stable per pool, host and cause — and queues one
``deliver`` job per sink that wants it, all in one transaction. A firing alert whose
incident is already firing changes nothing: a repeat never opens a second incident. A host
replaced or retired resolves every incident of the host.

A ``deliver`` job sends the incident *as it is now* to one sink: so a resolution that
arrives while a firing alert waits to be re-sent is what goes out, and a firing alert never
overtakes its resolution; an incident resolved before the sink ever took its firing alert
is sent firing first, then resolved, so every alert is delivered. A receiver's refusal is a
failed attempt, retried with backoff and jitter through the job's next attempt (never by
holding a worker), honouring Retry-After; a final refusal buries the job. A sink's rate
limit defers the job until a send is allowed. A sink that needs firing alerts re-sent
(Alertmanager) gets them every ``resend_interval_s`` until the incident resolves. At least
once: a worker killed mid-send leaves the job to be claimed again when its lease runs out,
and the dedup key makes the repeat harmless.

Grouping: a host whose drift belongs to an open storm of its pool (same findings signature)
is folded into the pool's one incident instead of paging on its own. An attributed
break-glass login is a warning, not a page.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Final, cast

import structlog

from collector.errors import JobFailed
from collector.jobs import Handler, Registry
from collector.model import Host, HostState, Job, JobSpec
from collector.response import incidents, ledger, rails
from collector.response.breakglass import ATTRIBUTED
from collector.response.config import ResponseConfig
from collector.response.records import HoldKind, Incident, Scope
from collector.sinks import (
    Alert,
    AlertLink,
    ConfiguredSink,
    DeliveryError,
    MalformedAlertError,
    dedup_key,
)
from collector.sinks.alert import Severity
from collector.store import Store, Tx
from collector.store.tx import SqlTx

log = structlog.get_logger(__name__)

DELIVER: Final = "deliver"
FLEET_POOL: Final = "_fleet"
NO_POOL: Final = "_none"
_GROUPED_STATES: Final = frozenset(
    s.value for s in (HostState.DRIFTED, HostState.TAINTED, HostState.SUSPECT)
)
_SEVERITY_BY_CAUSE: Final[Mapping[str, Severity]] = {ATTRIBUTED: "warning"}


def sink_key(payload: Mapping[str, Any]) -> str:
    """The dedup key the sinks see for a job's alert. The cause is the one its own key names
    (``HOST:CAUSE``, ``pool:POOL:CAUSE``, ``fleet:CAUSE``): a resolution's payload carries the
    cause of the transition that resolves it, its key the cause it resolves."""
    cause = str(payload.get("dedup_key") or payload["cause"]).rpartition(":")[2]
    scope = payload.get("scope", "host")
    if scope == "fleet":
        return dedup_key(FLEET_POOL, cause)
    pool = payload.get("pool") or NO_POOL
    if scope == "pool":
        return dedup_key(pool, cause)
    return dedup_key(pool, cause, str(payload["host_id"]))


class Alerts:
    """The handlers of ``alert`` and ``deliver`` jobs for one configuration."""

    def __init__(self, store: Store, config: ResponseConfig) -> None:
        self.store = store
        self.config = config
        self.sinks = {s.name: s for s in config.sinks}

    # --- alert: incidents and fan-out ---------------------------------------------------------

    def handle_alert(self, tx: Tx, job: Job) -> datetime | None:
        """Open or resolve the job's incident, in the job worker's transaction."""
        assert isinstance(tx, SqlTx), "the response needs the SQL store"
        payload = job.payload
        action = payload.get("action")
        if action == "firing":
            self._fire(tx, payload)
        elif action == "resolve":
            self._resolve(tx, sink_key(payload))
        elif action == "resolve_host":
            for incident in incidents.firing_incidents(tx, str(payload["host_id"])):
                self._resolve(tx, incident.dedup_key)
        else:
            raise JobFailed(f"alert action {action!r} is unknown", retryable=False)
        return None

    def _fire(self, tx: SqlTx, payload: Mapping[str, Any]) -> None:
        key = sink_key(payload)
        known = incidents.incident(tx, key)
        if known is not None and known.status == "firing":
            log.info("alert_repeat", dedup_key=key)
            return
        host = self._host(tx, payload)
        if host is not None and self._grouped(tx, host, payload):
            return
        if payload.get("cause") == rails.STORM_CAUSE:
            payload = self._storm_now(tx, payload)
        alert = self._alert(tx, payload, key)
        incidents.put_incident(
            tx,
            dedup_key=key,
            host_id=alert.host_id,
            pool=payload.get("pool"),
            cause=alert.cause,
            status="firing",
            alert=alert.to_json(),
        )
        log.info("incident_opened", dedup_key=key, severity=alert.severity)
        self._fan_out(tx, alert)

    def _host(self, tx: SqlTx, payload: Mapping[str, Any]) -> Host | None:
        if payload.get("scope", "host") != "host":
            return None
        return tx.lock_host(str(payload["host_id"]))

    def _grouped(self, tx: SqlTx, host: Host, payload: Mapping[str, Any]) -> bool:
        """Fold the host into its pool's open storm; True when it was."""
        if payload.get("state") not in _GROUPED_STATES or host.pool is None:
            return False
        evidence = payload.get("evidence") or {}
        storm = rails.observe(
            tx, self.config.pool(host.pool), host, str(payload["cause"]), evidence
        )
        if storm is None:
            return False
        folded = rails.fold(tx, storm, host.host_id)
        ledger.decide(
            tx,
            "alert_grouped",
            f"{host.host_id}'s alert is part of the pool's drift storm",
            host_id=host.host_id,
            pool=host.pool,
            detail={"storm_hold": storm.hold_id, "cause": payload.get("cause")},
        )
        if folded is None:  # counted already: the pool's page has it
            return True
        incident = incidents.incident(
            tx, sink_key({"scope": "pool", "pool": host.pool, "cause": rails.STORM_CAUSE})
        )
        if incident is not None and incident.status == "firing":
            alert = dict(incident.alert)
            details = dict(alert.get("details") or {})
            details.update(rails.listed(folded))
            alert["details"] = details
            incidents.put_incident(
                tx,
                dedup_key=incident.dedup_key,
                host_id=None,
                pool=host.pool,
                cause=incident.cause,
                status="firing",
                alert=alert,
                bump=False,  # the next re-send carries it; one page, not one per host
            )
        return True

    def _storm_now(self, tx: SqlTx, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        """The storm's page: the hosts its hold names (the first ``rails.LISTED_HOSTS``) and
        how many it counts."""
        for hold in ledger.open_holds(tx, Scope.POOL, str(payload.get("pool"))):
            if hold.kind is HoldKind.STORM:
                evidence = {**(payload.get("evidence") or {}), **rails.listed(hold.detail)}
                return {**payload, "evidence": evidence}
        return payload

    def _resolve(self, tx: SqlTx, key: str) -> None:
        known = incidents.incident(tx, key)
        if known is None or known.status != "firing":
            return
        alert = Alert.from_json(known.alert).resolved(tx.now)
        incidents.put_incident(
            tx,
            dedup_key=key,
            host_id=known.host_id,
            pool=known.pool,
            cause=known.cause,
            status="resolved",
            alert=alert.to_json(),
        )
        log.info("incident_resolved", dedup_key=key)
        self._fan_out(tx, alert)

    def _fan_out(self, tx: SqlTx, alert: Alert) -> None:
        for sink in self.sinks.values():
            if not sink.wants(alert):
                continue
            job_key = f"{sink.name}:{alert.dedup_key}"
            spec = JobSpec(DELIVER, job_key, {"sink": sink.name, "dedup_key": alert.dedup_key})
            if not tx.enqueue(spec):
                ledger.wake(tx, DELIVER, [job_key])

    def _alert(self, tx: SqlTx, payload: Mapping[str, Any], key: str) -> Alert:
        cause = str(payload.get("cause") or "unknown")
        severity = _SEVERITY_BY_CAUSE.get(cause) or cast(
            Severity, payload.get("severity") or "critical"
        )
        scope = payload.get("scope", "host")
        evidence = dict(payload.get("evidence") or {})
        host_id = str(payload["host_id"]) if scope == "host" else None
        pool = FLEET_POOL if scope == "fleet" else (payload.get("pool") or NO_POOL)
        details: dict[str, Any] = {"evidence": evidence}
        if scope == "host":
            details.update(
                hostname=payload.get("hostname"),
                image=payload.get("image"),
                state=payload.get("state"),
            )
        elif isinstance(evidence.get("hosts"), list):
            details["hosts"] = evidence["hosts"]
            if isinstance(evidence.get("host_count"), int):
                details["host_count"] = evidence["host_count"]
        runbook = self.config.settings.runbook_url
        links = (AlertLink(f"{runbook}#{cause}", "runbook"),) if runbook else ()
        return Alert(
            dedup_key=key,
            status="firing",
            severity=severity,
            summary=payload.get("summary") or summarize(payload),
            host_id=host_id,
            pool=pool,
            cause=cause,
            details=details,
            starts_at=tx.now,
            links=links,
        )

    # --- deliver: one sink ------------------------------------------------------------------

    def handle_deliver(self, job: Job) -> datetime | None:
        sink = self.sinks.get(str(job.payload.get("sink")))
        key = str(job.payload.get("dedup_key"))
        if sink is None:
            log.warning("alert_sink_gone", sink=job.payload.get("sink"), dedup_key=key)
            return None
        with ledger.transaction(self.store) as tx:
            incident = incidents.incident(tx, key)
        if incident is None:
            return None
        try:
            alert = Alert.from_json(dict(incident.alert))
        except MalformedAlertError as exc:
            raise JobFailed(f"stored alert {key!r}: {exc}", retryable=False) from exc
        if not sink.wants(alert):
            return None
        if sink.limiter is not None:
            wait_s = sink.limiter.reserve()
            if wait_s > 0:
                return self.store.clock() + timedelta(seconds=wait_s)
        unfired = alert.status == "resolved" and not incident.fired_at(sink.name)
        if unfired:  # resolved before this sink heard of it: the page goes out first
            alert = replace(alert, status="firing", ends_at=None)
        self._send(sink, alert, job)
        with ledger.transaction(self.store) as tx:
            version = incidents.mark_sent(
                tx, key, sink.name, version=incident.version, fired=alert.status == "firing"
            )
        if unfired or version != incident.version:
            return self.store.clock()  # more to send (the resolution, or news): at once
        if alert.status == "firing" and sink.sink.resend_interval_s:
            return self.store.clock() + timedelta(seconds=sink.sink.resend_interval_s)
        return None

    def _send(self, sink: ConfiguredSink, alert: Alert, job: Job) -> None:
        bound = log.bind(sink=sink.name, dedup_key=alert.dedup_key, status=alert.status)
        try:
            sink.sink.send(alert)
        except DeliveryError as exc:
            bound.warning(
                "alert_delivery_failed",
                attempt=job.attempts,
                retryable=exc.retryable,
                retry_after_s=exc.retry_after_s,
                error=str(exc),
            )
            raise JobFailed(
                str(exc), retryable=exc.retryable, retry_after_s=exc.retry_after_s
            ) from exc
        bound.info("alert_delivered", attempt=job.attempts)

    def handlers(self) -> dict[str, Handler]:
        return {DELIVER: self.handle_deliver}

    def register(self, registry: Registry) -> None:
        """``alert`` works in the job worker's transaction (it locks the host it names);
        ``deliver`` calls the sinks, outside any transaction."""
        registry.register_tx("alert", self.handle_alert, locks=_alert_locks)
        for kind, handler in self.handlers().items():
            registry.register(kind, handler)


def _alert_locks(job: Job) -> tuple[str, ...]:
    """The host row a firing host alert locks (``Alerts._host``)."""
    payload = job.payload
    if payload.get("action") == "firing" and payload.get("scope", "host") == "host":
        return (str(payload["host_id"]),)
    return ()


def summarize(payload: Mapping[str, Any]) -> str:
    """One line for people: what happened to which host."""
    evidence = payload.get("evidence") or {}
    cause = str(payload.get("cause"))
    if payload.get("scope") == "fleet":
        return (
            f"{evidence.get('silent_hosts')} of {evidence.get('monitored_hosts')} hosts went "
            "silent at once: the collector or the network, not the hosts"
        )
    host = payload.get("hostname") or payload.get("host_id")
    if cause == "drift":
        paths = [f.get("path") for f in evidence.get("findings", []) if f.get("path")]
        shown = ", ".join(paths[:3]) + (" …" if len(paths) > 3 else "")
        return f"{host} drifted: {evidence.get('count', len(paths))} change(s) {shown}".rstrip()
    if cause == "login":
        return (
            f"{host} tainted: unannounced SSH login by {evidence.get('user')} "
            f"from {evidence.get('source_ip')}"
        )
    if cause == ATTRIBUTED:
        who = evidence.get("breakglass") or {}
        return (
            f"{host}: break-glass login by {evidence.get('user')} for {who.get('operator')} "
            f"({who.get('reason')}); replaced after the session"
        )
    return f"{host} {payload.get('state')}: {cause.replace('_', ' ')}"


def incidents_of(store: Store, host_id: str) -> list[Incident]:
    with ledger.transaction(store) as tx:
        return incidents.firing_incidents(tx, host_id)
