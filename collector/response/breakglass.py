"""Break-glass: an operator announces an SSH session to a host, with a reason, before opening
it (``driftwarden breakglass``). The announcement is an expectation: the next login of that
user on that host that the agent reports within ``login_window_s`` is **attributed** — the
host is still tainted (a human was inside, it is no longer the image) but as
``attributed_login``, a warning rather than an intrusion page — and the host's replacement
waits until the session ends (the operator's client says so, or the agent reports the
session closing; after ``max_session_s`` it is taken as ended) plus ``grace_s``. A login
nobody announced stays an unattributed ``login``: critical.

``attribute`` is called by ingest, in the transaction that stores the login; ``deferral`` by
the rails.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import structlog

from collector.model import Finding, Host, iso
from collector.response import ledger, sessions
from collector.response.config import BreakglassSettings
from collector.response.records import Session
from collector.store import Tx
from collector.store.tx import SqlTx
from collector.verdicts import Observation, Signal

log = structlog.get_logger(__name__)

ATTRIBUTED: Final = "attributed_login"
_ENDING_EVENTS: Final = frozenset({"session_close", "disconnected"})
_LOGIN_KEEP: Final = ("source_ip", "source_port", "method", "fingerprint", "at", "source")


@dataclass(frozen=True)
class Deferral:
    reason: str
    until: datetime | None  # None: while the session is open, look again at the usual pace


def announce(
    tx: SqlTx,
    host: Host,
    *,
    login_user: str,
    actor: str,
    operator: str,
    reason: str,
    ticket: str | None,
    settings: BreakglassSettings,
) -> Session:
    """Expect ``login_user`` to log in to ``host`` within the login window; audit who, why."""
    session = sessions.add_session(
        tx,
        host_id=host.host_id,
        login_user=login_user,
        actor=actor,
        operator=operator,
        reason=reason,
        ticket=ticket,
        expires_at=tx.now + timedelta(seconds=settings.login_window_s),
    )
    detail = {"session": session.session_id, "user": login_user, "operator": operator}
    ledger.decide(
        tx,
        "breakglass_announced",
        reason + (f" (ticket {ticket})" if ticket else ""),
        host_id=host.host_id,
        pool=host.pool,
        actor=actor,
        detail={**detail, "ticket": ticket},
    )
    log.info("breakglass_announced", host_id=host.host_id, actor=actor, **detail)
    return session


def end(tx: SqlTx, session: Session, *, by: str, actor: str) -> Session:
    """Record that the session ended (once; a later end changes nothing)."""
    if session.ended_at is not None:
        return session
    sessions.update_session(tx, session.session_id, ended_at=tx.now, ended_by=by)
    ledger.decide(
        tx,
        "breakglass_ended",
        f"session of {session.login_user} ended ({by})",
        host_id=session.host_id,
        actor=actor,
        detail={"session": session.session_id},
    )
    log.info("breakglass_ended", host_id=session.host_id, session=session.session_id, by=by)
    return dataclasses.replace(session, ended_at=tx.now, ended_by=by)


def attribute(
    tx: Tx, host: Host, found: Sequence[Finding], observations: list[Observation]
) -> list[Observation]:
    """Match reported logins to announced sessions: an announced login's observation becomes
    ``attributed_login`` with who and why; a reported session end ends the session."""
    logins = [f for f in found if f.type == "login"]
    if not logins:
        return observations
    assert isinstance(tx, SqlTx)
    waiting = sessions.of_host(tx, host.host_id, unended=True)
    if not waiting:
        return observations
    out = list(observations)
    for login in logins:
        event, user = login.detail.get("event"), login.detail.get("user")
        if event == "accepted":
            session = _announced(tx, waiting, user)
            if session is None:
                continue
            facts = {k: login.detail.get(k) for k in _LOGIN_KEEP}
            sessions.update_session(tx, session.session_id, login_at=tx.now, login=facts)
            waiting = [
                dataclasses.replace(s, login_at=tx.now, login=facts)
                if s.session_id == session.session_id
                else s
                for s in waiting
            ]
            out = [_attributed(o, session) if _is_login_of(o, user) else o for o in out]
            ledger.decide(
                tx,
                "breakglass_login",
                f"login of {user} attributed to {session.operator}: {session.reason}",
                host_id=host.host_id,
                pool=host.pool,
                detail={"session": session.session_id, **facts},
            )
            log.info("breakglass_login", host_id=host.host_id, session=session.session_id)
        elif event in _ENDING_EVENTS:
            for session in waiting:
                if session.login_at is not None and _same_connection(session, login.detail):
                    end(tx, session, by="agent", actor="collector")
                    waiting = [s for s in waiting if s.session_id != session.session_id]
                    break
    return out


def _announced(tx: SqlTx, waiting: list[Session], user: Any) -> Session | None:
    for session in waiting:
        if (
            session.login_at is None
            and session.login_user == user
            and session.created_at <= tx.now <= session.expires_at
        ):
            return session
    return None


def _same_connection(session: Session, detail: Any) -> bool:
    if session.login_user != detail.get("user"):
        return False
    ours, theirs = session.login.get("source_port"), detail.get("source_port")
    return ours is None or theirs is None or ours == theirs


def _is_login_of(observation: Observation, user: Any) -> bool:
    return observation.signal is Signal.LOGIN and observation.evidence.get("user") == user


def _attributed(observation: Observation, session: Session) -> Observation:
    who = {
        "session": session.session_id,
        "actor": session.actor,
        "operator": session.operator,
        "reason": session.reason,
        "ticket": session.ticket,
    }
    return Observation(Signal.LOGIN, ATTRIBUTED, {**observation.evidence, "breakglass": who})


def deferral(tx: SqlTx, host_id: str, settings: BreakglassSettings) -> Deferral | None:
    """Why and until when the host's replacement waits for a break-glass session, or None."""
    grace = timedelta(seconds=settings.grace_s)
    found: Deferral | None = None
    for session in sessions.of_host(tx, host_id):
        who = f"{session.login_user} ({session.operator}: {session.reason})"
        if session.login_at is None:
            if session.ended_at is None and tx.now <= session.expires_at:
                return Deferral(
                    f"break-glass announced for {who}; waiting for the login until "
                    f"{iso(session.expires_at)}",
                    session.expires_at,
                )
            continue
        ended = session.ended_at or session.login_at + timedelta(seconds=settings.max_session_s)
        if session.ended_at is None and tx.now < ended:
            return Deferral(f"break-glass session of {who} is open", None)
        release_at = ended + grace
        if tx.now < release_at and (found is None or (found.until or release_at) < release_at):
            found = Deferral(
                f"break-glass session of {who} ended at {iso(ended)}; replacement waits "
                f"until {iso(release_at)}",
                release_at,
            )
    return found
