"""Replacing a host: the ``replace`` job and the ``replace_verify`` job.

Exactly once: a host has at most one open replacement (a unique index over the open states
of the ``replacements`` table), and its request id is the action's idempotency key. The job
locks the host, asks the rails (``rails.judge``); a held replacement stays *blocked* with
its reason, visible, and the job sleeps until the rails may say otherwise (its next attempt,
never a held worker). When the rails allow it, the replacement is leased (*acting*) for the
action's timeout and committed before the action runs; a worker killed mid-action leaves the
lease to run out, and the next attempt repeats the same request, which the action answers
``already``. The outcome is recorded with the host's move to *replacing* and the jobs it
causes, in one transaction.

Then the outcome is verified, ``verify_after_s`` later: an action that can tell
(``Verifier``: AWS Auto Scaling) says gone, leaving or stayed; otherwise a host that stopped
reporting for ``gone_after_s`` is gone. Gone: the host is *replaced* (its alerts resolve).
Stayed — ``SetInstanceHealth`` arriving in the group's health-check grace period is ignored by
AWS, a pipeline that dropped the request — the replacement is requested again, up to
``max_requests`` times, then paged as stuck. A final failure of the action is paged too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final

import structlog

from collector import transitions
from collector.actions import (
    ActionError,
    ActionOutcome,
    CapacityReader,
    Check,
    MalformedRequestError,
    ReplacementAction,
    ReplacementRequest,
    Verifier,
)
from collector.errors import JobFailed
from collector.jobs import Handler
from collector.model import GONE_STATES, Host, HostState, Job, JobSpec
from collector.response import ledger, rails
from collector.response.config import PoolConfig, ResponseConfig
from collector.response.records import Replacement, ReplacementState
from collector.store import Store
from collector.store.tx import SqlTx
from collector.verdicts import ALERT, REPLACE, Observation, Signal

log = structlog.get_logger(__name__)

VERIFY: Final = "replace_verify"
ACTOR: Final = "replacer"
LEASE_FACTOR: Final = 2.0  # an acting replacement is leased for twice the action's timeout
WANTS_REPLACEMENT: Final = frozenset(
    {HostState.DRIFTED, HostState.TAINTED, HostState.SUSPECT, HostState.REPLACEMENT_REQUESTED}
)
_OBSERVED: Final = frozenset({HostState.DRIFTED, HostState.TAINTED, HostState.SUSPECT})
_INSTANCE_RE: Final = re.compile(r"^i-[0-9a-f]{8,17}$")
S = ReplacementState


def instance_id(host_id: str) -> str | None:
    """The host's cloud instance: the host id itself when it is an EC2 instance id (agents on
    EC2 use it as their host id), else none. Never a fact the host reports about itself: the
    target of a replacement must not be the host's choice."""
    return host_id if _INSTANCE_RE.match(host_id) else None


def host_alert(host: Host, cause: str, evidence: Mapping[str, Any]) -> JobSpec:
    """A page about one host, for what the replacer could not do."""
    payload = {
        "action": "firing",
        "scope": "host",
        "host_id": host.host_id,
        "hostname": host.hostname,
        "pool": host.pool,
        "image": host.image_build_id,
        "state": host.state.value,
        "cause": cause,
        "severity": "critical",
        "dedup_key": f"{host.host_id}:{cause}",
        "evidence": dict(evidence),
    }
    return JobSpec(ALERT, f"firing:{host.host_id}:{cause}", payload)


class Replacer:
    def __init__(self, store: Store, config: ResponseConfig) -> None:
        self.store = store
        self.config = config

    def handlers(self) -> dict[str, Handler]:
        return {REPLACE: self.handle_replace, VERIFY: self.handle_verify}

    # --- replace ----------------------------------------------------------------------------

    def handle_replace(self, job: Job) -> datetime | None:
        host_id = str(job.payload["host_id"])
        seen = self.store.host(host_id)
        if seen is None:
            return None
        pool = self.config.pool(seen.pool)
        action = self.config.actions.get(pool.action) if pool.action else None
        capacity = self._capacity(pool, action)
        evidence = dict(job.payload.get("evidence") or {})
        with ledger.transaction(self.store) as tx:
            host = tx.lock_host(host_id)
            if host is None or host.state not in WANTS_REPLACEMENT:
                self._cancel(tx, host_id, host)
                return None
            row = ledger.open_replacement(tx, host_id)
            if row is not None and row.state is S.VERIFYING:
                return None  # requested already; its verification carries on
            if row is not None and row.state is S.ACTING and row.lease_until is not None:
                if row.lease_until > tx.now:
                    return row.lease_until  # another worker is acting; look again after
                log.warning("replacement_lease_expired", host_id=host_id, request=row.request_id)
            else:
                cause = str(job.payload.get("cause") or host.state_cause)
                if row is None:
                    row = ledger.insert_replacement(
                        tx, host_id=host_id, pool=host.pool, action=pool.action, cause=cause
                    )
                if host.state in _OBSERVED:
                    rails.observe(tx, pool, host, cause, evidence)
                if pool.desired_capacity_from == "hosts" and host.pool is not None:
                    capacity = ledger.live_hosts(tx, host.pool)
                verdict = rails.judge(tx, host, pool, self.config, capacity)
                if not verdict.go:
                    self._block(tx, host, row, verdict)
                    interval = timedelta(seconds=self.config.settings.recheck_interval_s)
                    return verdict.until or tx.now + interval
                ledger.decide(
                    tx,
                    "would_replace" if verdict.dry_run else "allowed",
                    verdict.reason,
                    host_id=host_id,
                    pool=host.pool,
                    detail={"request_id": row.request_id, "action": pool.action},
                )
            assert action is not None  # the rails refuse a pool without one
            request = self._lease(tx, host, row, action, dry_run=pool.dry_run)
            if request is None:
                return None
        return self._act(action, request, row.replacement_id, verifying=False)

    def _capacity(self, pool: PoolConfig, action: object) -> int | None:
        if pool.desired_capacity_from != "action":
            return pool.desired_capacity
        if not isinstance(action, CapacityReader):  # pragma: no cover - refused at start
            raise JobFailed(f"pool {pool.name}: its action cannot read a capacity")
        try:
            return action.desired_capacity()
        except ActionError as exc:  # fail closed: no capacity, no replacement
            raise JobFailed(f"pool {pool.name}: desired capacity unknown: {exc}") from exc

    def _lease(
        self,
        tx: SqlTx,
        host: Host,
        row: Replacement,
        action: ReplacementAction,
        *,
        dry_run: bool,
    ) -> ReplacementRequest | None:
        """Lease the replacement to this worker and make its request; a request whose values
        are not safe action targets fails the replacement (and pages) instead."""
        try:
            request = ReplacementRequest(
                request_id=row.request_id,
                host_id=host.host_id,
                instance_id=instance_id(host.host_id),
                pool=host.pool or "",
                reason=row.cause,
                dry_run=dry_run,
            )
        except MalformedRequestError as exc:
            self._fail(tx, host, row, "replacement_refused", str(exc), {"action": action.name})
            return None
        lease = tx.now + timedelta(seconds=action.timeout_s * LEASE_FACTOR)
        ledger.update_replacement(
            tx,
            row.replacement_id,
            state=S.ACTING,
            lease_until=lease,
            blocked_by=None,
            blocked_reason=None,
            action=action.name,
        )
        return request

    def _block(self, tx: SqlTx, host: Host, row: Replacement, verdict: rails.Verdict) -> None:
        changed = row.state is not S.BLOCKED or row.blocked_by != verdict.rail
        ledger.update_replacement(
            tx,
            row.replacement_id,
            state=S.BLOCKED,
            blocked_by=verdict.rail,
            blocked_reason=verdict.reason,
            lease_until=None,
        )
        if not changed:
            return
        log.info(
            "replacement_blocked", host_id=host.host_id, rail=verdict.rail, reason=verdict.reason
        )
        ledger.decide(
            tx,
            "blocked",
            verdict.reason,
            host_id=host.host_id,
            pool=host.pool,
            detail={"rail": verdict.rail, "request_id": row.request_id},
        )

    def _cancel(self, tx: SqlTx, host_id: str, host: Host | None) -> None:
        row = ledger.open_replacement(tx, host_id)
        if row is None or row.state is not S.BLOCKED:
            return
        state = host.state.value if host else "gone"
        ledger.update_replacement(tx, row.replacement_id, state=S.CANCELLED)
        ledger.decide(
            tx,
            "cancelled",
            f"the host is {state}: no replacement needed",
            host_id=host_id,
            pool=row.pool,
            detail={"request_id": row.request_id},
        )

    # --- acting and recording ---------------------------------------------------------------

    def _act(
        self,
        action: ReplacementAction,
        request: ReplacementRequest,
        replacement_id: int,
        *,
        verifying: bool,
    ) -> datetime | None:
        """Run the action (outside any transaction), then record what it did."""
        outcome = action.replace(request)
        with ledger.transaction(self.store) as tx:
            host = tx.lock_host(request.host_id)
            row = ledger.open_replacement(tx, request.host_id)
            if host is None or row is None or row.replacement_id != replacement_id:
                return None
            if row.state is not S.ACTING:
                return None  # another worker recorded it meanwhile
            retry = self._record(tx, host, row, outcome, verifying=verifying)
        if retry is not None:
            raise retry  # committed first: the replacement is blocked until the retry
        if verifying and outcome.status in ("done", "already"):
            return self.store.clock() + timedelta(seconds=self.config.settings.verify_after_s)
        return None

    def _record(
        self, tx: SqlTx, host: Host, row: Replacement, outcome: ActionOutcome, *, verifying: bool
    ) -> JobFailed | None:
        facts = outcome.to_json()
        where: dict[str, Any] = {"host_id": host.host_id, "pool": host.pool}
        detail = {"request_id": row.request_id, "action": row.action, **facts}
        if outcome.status in ("done", "already"):
            ledger.update_replacement(
                tx,
                row.replacement_id,
                state=S.VERIFYING,
                lease_until=None,
                acted_at=tx.now,
                requests=row.requests + 1,
                outcome=facts,
            )
            decision = "requested_again" if verifying else "replacement_requested"
            ledger.decide(tx, decision, outcome.detail, detail=detail, **where)
            self._move(tx, host, row, facts)
            if not verifying:
                run_at = tx.now + timedelta(seconds=self.config.settings.verify_after_s)
                tx.enqueue(JobSpec(VERIFY, host.host_id, {"host_id": host.host_id}, run_at=run_at))
            return None
        if outcome.status == "would_replace":
            ledger.update_replacement(
                tx, row.replacement_id, state=S.WOULD_REPLACE, lease_until=None, outcome=facts
            )
            ledger.decide(tx, "would_replace_detail", outcome.detail, detail=detail, **where)
            return None
        if outcome.retryable:
            ledger.update_replacement(
                tx,
                row.replacement_id,
                state=S.BLOCKED,
                blocked_by="action_failed",
                blocked_reason=f"{outcome.detail} (retrying)",
                lease_until=None,
                outcome=facts,
            )
            ledger.decide(tx, "action_failed", outcome.detail, detail=detail, **where)
            return JobFailed(f"{row.action}: {outcome.detail}")
        self._fail(tx, host, row, "replacement_failed", outcome.detail, detail)
        return None

    def _move(self, tx: SqlTx, host: Host, row: Replacement, facts: Mapping[str, Any]) -> None:
        evidence = {"request_id": row.request_id, "outcome": dict(facts)}
        if host.state is not HostState.REPLACING:
            host = transitions.apply(
                tx,
                host,
                Observation(Signal.REPLACEMENT_REQUESTED, row.cause, evidence),
                actor=ACTOR,
            )
            transitions.apply(
                tx,
                host,
                Observation(Signal.REPLACING, "action_" + facts["status"], evidence),
                actor=ACTOR,
            )

    def _fail(
        self,
        tx: SqlTx,
        host: Host,
        row: Replacement,
        cause: str,
        reason: str,
        detail: Mapping[str, Any],
    ) -> None:
        ledger.update_replacement(
            tx,
            row.replacement_id,
            state=S.FAILED,
            lease_until=None,
            outcome={**row.outcome, "detail": reason},
        )
        ledger.decide(tx, cause, reason, host_id=host.host_id, pool=host.pool, detail=detail)
        log.error("replacement_failed", host_id=host.host_id, cause=cause, reason=reason)
        self._next(tx, host.pool)
        tx.enqueue(host_alert(host, cause, {"reason": reason, **detail}))

    # --- verify -----------------------------------------------------------------------------

    def handle_verify(self, job: Job) -> datetime | None:
        host_id = str(job.payload["host_id"])
        with ledger.transaction(self.store) as tx:
            row = ledger.open_replacement(tx, host_id)
            host = tx.lock_host(host_id)
            if row is None or row.state is not S.VERIFYING:
                return None
            if host is None or host.state in GONE_STATES:
                ledger.update_replacement(tx, row.replacement_id, state=S.DONE)
                return None
        action = self.config.actions.get(row.action or "")
        request = ReplacementRequest(
            request_id=row.request_id,
            host_id=host_id,
            instance_id=instance_id(host_id),
            pool=host.pool or "",
            reason=row.cause,
        )
        check: Check = action.check(request) if isinstance(action, Verifier) else "unknown"
        with ledger.transaction(self.store) as tx:
            host = tx.lock_host(host_id)
            row = ledger.open_replacement(tx, host_id)
            if host is None or row is None or row.state is not S.VERIFYING:
                return None
            if check == "unknown":
                seen = host.last_seen_at or host.enrolled_at
                quiet = tx.now - seen >= timedelta(seconds=self.config.settings.gone_after_s)
                check = "gone" if quiet else "stayed"
            later = tx.now + timedelta(seconds=self.config.settings.verify_after_s)
            if check == "gone":
                self._replaced(tx, host, row)
                return None
            if check == "leaving" or action is None:
                return later
            if row.requests >= self.config.settings.max_requests:
                reason = f"the host did not go away after {row.requests} request(s) to {row.action}"
                self._fail(tx, host, row, "replacement_stuck", reason, {"check": check})
                return None
            ledger.decide(
                tx,
                "host_stayed",
                f"the host is still there {self.config.settings.verify_after_s:g}s after the "
                f"request ({check}); requesting again",
                host_id=host_id,
                pool=host.pool,
                detail={"request_id": row.request_id, "requests": row.requests},
            )
            again = self._lease(tx, host, row, action, dry_run=False)
            if again is None:
                return None
        return self._act(action, again, row.replacement_id, verifying=True)

    def _next(self, tx: SqlTx, pool: str | None) -> None:
        """A replacement left the budget: the pool's waiting ones are looked at now."""
        if pool is not None:
            ledger.wake(tx, REPLACE, ledger.blocked_hosts(tx, pool))

    def _replaced(self, tx: SqlTx, host: Host, row: Replacement) -> None:
        ledger.update_replacement(tx, row.replacement_id, state=S.DONE)
        evidence = {"request_id": row.request_id, "action": row.action}
        transitions.apply(tx, host, Observation(Signal.REPLACED, "replaced", evidence), actor=ACTOR)
        self._next(tx, host.pool)
        ledger.decide(
            tx,
            "replaced",
            f"{host.host_id} went away after {row.requests} request(s)",
            host_id=host.host_id,
            pool=host.pool,
            detail=evidence,
        )
