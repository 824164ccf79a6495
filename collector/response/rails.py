"""The safety rails: may this host be replaced now — and if not, which rail holds it, why,
and when to look again.

Fail closed for destruction: a replacement goes ahead only when every rail lets it, and any
error on the way is a failed attempt, never an action. In order:

1. an operator's **hold** on the host;
2. an announced **break-glass** session on the host (until it ends, plus a grace period);
3. the pool has an **action** at all (a pool without one is alerted on, never replaced);
4. an operator's hold on the **pool**;
5. the **storm breaker**: ``storm_hosts`` hosts of the pool drifting with the same findings
   signature within ``storm_window_s`` pause the pool's replacements — one page for the pool
   — until an operator resumes it; for ``storm_cooldown_s`` after that it does not trip again,
   and only drift newer than the resume counts;
6. **image quarantine**: ``quarantine_hosts`` fresh replacements of one image drifting
   again — hosts that enrolled within ``quarantine_window_s`` after a replacement in their
   pool was requested, and drifted within that window of starting — quarantine the image:
   replacing with it only makes more of the same. The pool is paused while its newest image
   is quarantined;
7. **dry-run**: the decision is recorded as "would replace" and nothing is touched;
8. the **budget**: at most ``budget_limit`` replacements of the pool in flight.

``observe`` is what feeds 5 and 6; the alert and replacement jobs both call it (it is
idempotent), so the page for a storm goes out with the alert that completes it.

A storm's hold names the hosts that tripped it and the first of those folded into it after, up
to ``LISTED_HOSTS``, and counts them all (``host_count``): a storm of ten thousand hosts costs
each of its alerts the same small write, and its page stays a page. Every folded host has its
``alert_grouped`` decision in the rails' audit trail (``driftwarden decisions --pool P``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import structlog

from collector.model import Host, JobSpec
from collector.response import breakglass, ledger
from collector.response.config import PoolConfig, ResponseConfig
from collector.response.records import Hold, HoldKind, Scope
from collector.store.tx import SqlTx
from collector.verdicts import ALERT

log = structlog.get_logger(__name__)

STORM_CAUSE: Final = "drift_storm"
QUARANTINE_CAUSE: Final = "image_quarantined"
IMAGE_DRIFT_CAUSES: Final = frozenset(
    {"drift", "baseline_mismatch", "measurement_mismatch", "image_unregistered"}
)
BREAKER: Final = "storm-breaker"
QUARANTINE: Final = "image-quarantine"
_INSTANT: Final = timedelta(microseconds=1)
LISTED_HOSTS: Final = 50  # hosts a storm's hold and page name; the rest are counted


@dataclass(frozen=True)
class Verdict:
    """``rail`` None: go (``dry_run`` says whether for real). Otherwise the rail that holds
    the replacement, the reason shown to people, and when to look again (None: the
    configured re-check interval)."""

    rail: str | None
    reason: str
    until: datetime | None = None
    dry_run: bool = False

    @property
    def go(self) -> bool:
        return self.rail is None


def signature(cause: str, evidence: Mapping[str, Any]) -> str:
    """What makes two hosts' drift "the same": the cause and the set of (type, path) found
    (or the user, for a login). Order and counts do not matter."""
    found = evidence.get("findings")
    items = sorted(
        {
            (str(f.get("type")), str(f.get("path")))
            for f in (found if isinstance(found, list) else [])
            if isinstance(f, dict)
        }
    )
    text = json.dumps([cause, items, evidence.get("user")], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def pool_alert(
    action: str,
    pool: str,
    cause: str,
    *,
    summary: str = "",
    severity: str = "critical",
    evidence: Mapping[str, Any] | None = None,
) -> JobSpec:
    """An alert about a whole pool (a storm, a quarantined image), keyed by pool and cause."""
    key = f"pool:{pool}:{cause}"
    payload = {
        "action": action,
        "scope": "pool",
        "pool": pool,
        "cause": cause,
        "severity": severity,
        "summary": summary,
        "dedup_key": key,
        "evidence": dict(evidence or {}),
    }
    return JobSpec(ALERT, f"{action}:{key}", payload)


# --- observing drift --------------------------------------------------------------------------


def observe(
    tx: SqlTx, pool: PoolConfig, host: Host, cause: str, evidence: Mapping[str, Any]
) -> Hold | None:
    """Mark the host's drift; trip the storm breaker or quarantine the image when this drift
    completes a pattern. Return the pool's open storm hold when this drift belongs to it."""
    if host.pool is None:
        return None
    sig = signature(cause, evidence)
    window = timedelta(seconds=pool.quarantine_window_s)
    fresh = (
        cause in IMAGE_DRIFT_CAUSES
        and host.enrolled_at >= tx.now - window
        and ledger.acted_between(tx, host.pool, host.enrolled_at - window, host.enrolled_at)
    )
    ledger.mark(
        tx,
        host_id=host.host_id,
        signature=sig,
        pool=host.pool,
        image=host.image_build_id,
        fresh=fresh,
    )
    if fresh and host.image_build_id:
        _quarantine(tx, pool, host.image_build_id)
    storm = _storm(tx, pool, sig, evidence)
    return storm if storm is not None and storm.detail.get("signature") == sig else None


def _storm(tx: SqlTx, pool: PoolConfig, sig: str, evidence: Mapping[str, Any]) -> Hold | None:
    for held in ledger.open_holds(tx, Scope.POOL, pool.name):
        if held.kind is HoldKind.STORM:
            return held
    since = tx.now - timedelta(seconds=pool.storm_window_s)
    resumed = ledger.last_release(tx, Scope.POOL, pool.name, HoldKind.STORM)
    if resumed is not None:
        if tx.now < resumed + timedelta(seconds=pool.storm_cooldown_s):
            return None
        since = max(since, resumed + _INSTANT)
    hosts = ledger.marked_hosts(tx, pool.name, since, signature=sig)
    if len(hosts) < pool.storm_hosts:
        return None
    window = f"{pool.storm_window_s:g}s"
    reason = (
        f"{len(hosts)} hosts drifted the same way within {window}: a fleet cause, not a host; "
        f"replacements paused until an operator resumes the pool"
    )
    findings = evidence.get("findings") if isinstance(evidence.get("findings"), list) else []
    detail = {"signature": sig, "hosts": hosts, "host_count": len(hosts), "findings": findings}
    hold = ledger.add_hold(
        tx, Scope.POOL, pool.name, HoldKind.STORM, reason=reason, actor=BREAKER, detail=detail
    )
    if hold is None:  # another worker tripped it in the same instant
        return None
    log.warning("storm_breaker_tripped", pool=pool.name, hosts=len(hosts), signature=sig)
    ledger.decide(tx, "storm_tripped", reason, pool=pool.name, actor=BREAKER, detail=detail)
    summary = f"pool {pool.name}: {len(hosts)} hosts drifted the same way; replacements paused"
    tx.enqueue(pool_alert("firing", pool.name, STORM_CAUSE, summary=summary, evidence=detail))
    return hold


def fold(tx: SqlTx, storm: Hold, host_id: str) -> Mapping[str, Any] | None:
    """Count one more host into an open storm (its alert is grouped into the pool's); named
    while fewer than ``LISTED_HOSTS`` are. The storm's new detail, or None when the host was
    counted already: it tripped the storm, or an ``alert_grouped`` decision since the storm
    began says it was folded (the caller records that decision with every fold). The hold is
    read again, locked: two workers folding hosts into one storm at once both count."""
    if ledger.decided_since(tx, host_id, "alert_grouped", storm.created_at):
        return None
    now = ledger.lock_hold(tx, storm.hold_id)
    if now is None or now.released_at is not None:
        return None  # released meanwhile: nothing to fold into
    hosts = list(now.detail.get("hosts", []))
    if host_id in hosts:
        return None
    detail = {**now.detail, "host_count": host_count(now.detail) + 1}
    if len(hosts) < LISTED_HOSTS:
        detail["hosts"] = [*hosts, host_id]
    ledger.update_hold_detail(tx, storm.hold_id, detail)
    return detail


def listed(detail: Mapping[str, Any]) -> dict[str, Any]:
    """What a storm's page says of its hosts: those its hold names, sorted, and how many."""
    return {"hosts": sorted(detail.get("hosts") or []), "host_count": host_count(detail)}


def host_count(detail: Mapping[str, Any]) -> int:
    """How many hosts a storm's hold counts (one made before the count was kept: its list)."""
    count = detail.get("host_count")
    return count if isinstance(count, int) else len(detail.get("hosts") or [])


def _quarantine(tx: SqlTx, pool: PoolConfig, image: str) -> None:
    since = tx.now - timedelta(seconds=pool.quarantine_window_s)
    lifted = ledger.last_release(tx, Scope.IMAGE, image, HoldKind.QUARANTINE)
    if lifted is not None:  # an operator lifted it: only drift after that counts
        since = max(since, lifted + _INSTANT)
    hosts = ledger.marked_hosts(tx, pool.name, since, image=image, fresh_only=True)
    if len(hosts) < pool.quarantine_hosts:
        return
    if any(h.kind is HoldKind.QUARANTINE for h in ledger.open_holds(tx, Scope.IMAGE, image)):
        return
    reason = (
        f"{len(hosts)} fresh replacements running image {image} drifted again within "
        f"{pool.quarantine_window_s:g}s of starting: replacing with it makes more of the same"
    )
    detail = {"image": image, "pool": pool.name, "hosts": hosts}
    hold = ledger.add_hold(
        tx, Scope.IMAGE, image, HoldKind.QUARANTINE, reason=reason, actor=QUARANTINE, detail=detail
    )
    if hold is None:
        return
    log.warning("image_quarantined", image=image, pool=pool.name, hosts=len(hosts))
    ledger.decide(tx, "image_quarantined", reason, pool=pool.name, actor=QUARANTINE, detail=detail)
    summary = f"image {image} quarantined: {len(hosts)} fresh hosts of pool {pool.name} drifted"
    tx.enqueue(pool_alert("firing", pool.name, QUARANTINE_CAUSE, summary=summary, evidence=detail))


# --- judging ----------------------------------------------------------------------------------


def judge(
    tx: SqlTx, host: Host, pool: PoolConfig, config: ResponseConfig, capacity: int | None
) -> Verdict:
    """Whether ``host`` may be replaced now (see the module docstring for the order)."""
    for hold in ledger.open_holds(tx, Scope.HOST, host.host_id):
        return Verdict("hold", f"host held by {hold.actor}: {hold.reason}")
    deferred = breakglass.deferral(tx, host.host_id, config.breakglass)
    if deferred is not None:
        return Verdict("breakglass", deferred.reason, deferred.until)
    if host.pool is None or pool.action is None:
        where = f"pool {host.pool!r}" if host.pool else "a host without a pool"
        return Verdict("no_action", f"{where} has no replacement action: alerted, not replaced")
    for hold in ledger.open_holds(tx, Scope.POOL, pool.name):
        if hold.kind is HoldKind.STORM:
            return Verdict(
                "storm",
                f"storm breaker: {hold.reason} (resume: driftwarden release --pool {pool.name})",
            )
        return Verdict("hold", f"pool held by {hold.actor}: {hold.reason}")
    image = ledger.newest_image(tx, pool.name)
    if image is not None:
        for hold in ledger.open_holds(tx, Scope.IMAGE, image):
            return Verdict("quarantine", f"image {image} of the pool is on hold: {hold.reason}")
    if pool.dry_run:
        return Verdict(None, "dry run: would replace", dry_run=True)
    limit = pool.budget_limit(capacity)
    if limit < 1:
        return Verdict(
            "budget",
            f"budget_percent = {pool.budget_percent:g} of a desired capacity of {capacity} "
            f"computes to 0 replacements in flight; nothing is replaced (set budget)",
        )
    flying = ledger.in_flight(tx, pool.name)
    if flying >= limit:
        return Verdict("budget", f"budget: {flying} of {limit} replacements in flight")
    return Verdict(None, f"allowed: {flying + 1} of {limit} in flight")
