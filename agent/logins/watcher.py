"""Combine the login sources into one stream of events for the daemon.

The journal and the auth log usually carry the same sshd lines, and one session is told by
several lines (``Starting session``, ``pam_unix … session opened``); the watcher reports each
fact once. Two events are the same when they have the same event, user and peer address and
port (or, lacking a peer, the same sshd pid and session id), and their pids do not differ,
within ``dedup_window_s``. utmp events are held back for ``corroborate_s``: one that a log
line accounts for is dropped (counted in ``corroborated``), any other is reported with
``unlogged=True``. Failed and invalid-user attempts are counted in ``failures``, not
reported; as every source sees the same attempts, each count is the largest of any one source.

The daemon calls :meth:`poll`, hands the events on, then :meth:`commit`, which saves every
source's position to ``STATE_DIR/logins.json``; a crash in between repeats, never loses.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Protocol

import structlog

from agent.logins import state
from agent.logins.authlog import DEFAULT_PATHS, AuthLogSource
from agent.logins.event import Login
from agent.logins.journal import JournalSource
from agent.logins.utmp import UtmpSource

STATE_FILE: Final = "logins.json"
_OPENING: Final = frozenset({"accepted", "session_open"})
_MAX_REMEMBERED: Final = 65536

log = structlog.get_logger("agent.logins")


class LoginSource(Protocol):
    name: str
    failure: str | None  # why it cannot see logins right now (None: it can)

    def poll(self) -> list[Login]: ...

    def position(self) -> dict[str, Any]: ...

    def restore(self, position: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Failures:
    """Failed attempts since the watcher started: not drift, but worth a number."""

    failed: int = 0
    invalid_user: int = 0


def _identity(login: Login) -> tuple[Any, ...]:
    if login.source_ip is not None and login.source_port is not None:
        return (login.event, login.user, login.source_ip, login.source_port)
    return (login.event, login.user, login.pid, login.session_id)


def _phase_keys(login: Login) -> list[tuple[Any, ...]]:
    """Keys under which a log event corroborates a utmp event of the same phase."""
    phase = "open" if login.event in _OPENING else "close"
    keys: list[tuple[Any, ...]] = [(phase, login.user, login.source_ip)]
    if login.source_port is not None:
        keys.append((phase, login.user, login.source_ip, login.source_port))
    return keys


class LoginWatcher:
    """Polls every source, de-duplicates, and keeps their positions in ``state_dir``."""

    def __init__(
        self,
        state_dir: Path,
        sources: Sequence[LoginSource],
        *,
        corroborate_s: float = 10.0,
        dedup_window_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        written: Callable[[int], bool] | None = None,
    ) -> None:
        self.state_path = state_dir / STATE_FILE
        self.sources = list(sources)
        self._corroborate_s = corroborate_s
        self._window_s = dedup_window_s
        self._clock = clock
        self._recent: OrderedDict[tuple[Any, ...], tuple[float, int | None]] = OrderedDict()
        self._logged: OrderedDict[tuple[Any, ...], tuple[float, int | None]] = OrderedDict()
        self._held: list[tuple[float, Login]] = []
        self._failures: dict[str, Counter[str]] = {s.name: Counter() for s in self.sources}
        self._positions: dict[str, dict[str, Any]] = {}
        self._failing: dict[str, str] = {}  # source name: why, while it fails
        self._unreported: list[tuple[str, str]] = []
        self.corroborated = 0
        saved = state.load(self.state_path, written=written)
        self._committed: dict[str, dict[str, Any]] = saved
        for source in self.sources:
            if source.name in saved:
                source.restore(saved[source.name])
        log.info("login_sources", sources=[s.name for s in self.sources])

    @property
    def failures(self) -> Failures:
        """Per kind, the largest count of any one source: the sources see the same attempts."""
        counts = self._failures.values()
        return Failures(
            failed=max((c["failed"] for c in counts), default=0),
            invalid_user=max((c["invalid_user"] for c in counts), default=0),
        )

    def poll(self) -> list[Login]:
        """Every new login event from every source, each fact once. Never blocks."""
        now = self._clock()
        self._expire(now)
        events: list[Login] = []
        for source in self.sources:
            try:
                found = source.poll()
            except Exception as exc:
                log.exception("login_source_failed", source=source.name)
                self._note(source.name, f"{type(exc).__name__}: {exc}")
                continue
            self._note(source.name, source.failure)
            for login in found:
                if login.is_failure:
                    self._failures[source.name][login.event] += login.repeated
                elif login.source == "utmp":
                    self._held.append((now + self._corroborate_s, login))
                elif self._fresh(login, now):
                    events.append(login)
        events += self._release_held(now)
        for login in events:
            log.info(
                "login_detected",
                kind=login.event,
                user=login.user,
                method=login.method,
                source_ip=login.source_ip,
                source_port=login.source_port,
                source=login.source,
                unlogged=login.unlogged,
            )
        self._positions = {source.name: source.position() for source in self.sources}
        return events

    def _note(self, name: str, failure: str | None) -> None:
        if failure is None:
            if self._failing.pop(name, None) is not None:
                log.info("login_source_recovered", source=name)
        elif name not in self._failing:
            self._failing[name] = failure
            self._unreported.append((name, failure))

    def new_failures(self) -> list[tuple[str, str]]:
        """(source, why) for each source that started failing since the last call: once
        per failure, again only after it has recovered and fails anew."""
        out, self._unreported = self._unreported, []
        return out

    @property
    def failing(self) -> dict[str, str]:
        return dict(self._failing)

    def stage(self, q: int) -> None:
        """Save the positions as of the last :meth:`poll`, pending on spool record ``q``
        (the one about to carry its logins); :meth:`commit` once it is written."""
        if self._positions:
            state.save(self.state_path, self._positions, pending_q=q, previous=self._committed)

    def commit(self) -> None:
        """Save the positions as of the last :meth:`poll` (atomic, fsync'd) if they moved:
        the loop commits after every poll, and an idle agent writes nothing."""
        if self._positions and self._positions != self._committed:
            state.save(self.state_path, self._positions)
            self._committed = self._positions

    def close(self) -> None:
        for source in self.sources:
            try:
                source.close()
            except Exception:
                log.exception("login_source_close_failed", source=source.name)

    def __enter__(self) -> LoginWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- de-duplication and corroboration ------------------------------------------------

    def _fresh(self, login: Login, now: float) -> bool:
        """Remember a log event; False when it repeats one already reported."""
        key = _identity(login)
        seen = self._recent.get(key)
        if seen is not None and (seen[1] is None or login.pid is None or seen[1] == login.pid):
            return False
        _put(self._recent, key, (now, login.pid))
        for phase_key in _phase_keys(login):
            _put(self._logged, phase_key, (now, login.pid))
        return True

    def _release_held(self, now: float) -> list[Login]:
        released: list[Login] = []
        still: list[tuple[float, Login]] = []
        for deadline, login in self._held:
            if _phase_keys(login)[-1] in self._logged:
                self.corroborated += 1
            elif now >= deadline:
                released.append(replace(login, unlogged=True))
            else:
                still.append((deadline, login))
        self._held = still
        return released

    def _expire(self, now: float) -> None:
        for table in (self._recent, self._logged):
            while table:
                moment, _ = next(iter(table.values()))
                if now - moment < self._window_s:
                    break
                table.popitem(last=False)


def _put(table: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > _MAX_REMEMBERED:
        table.popitem(last=False)


def default_sources(
    *, auth_logs: Sequence[Path] | None = None, journal: bool | None = None, utmp: bool = True
) -> list[LoginSource]:
    """The sources this machine has: the journal when journald runs, the auth logs that
    exist (or the ones given), and utmp."""
    sources: list[LoginSource] = []
    if journal is None:
        journal = shutil.which("journalctl") is not None and Path("/run/systemd/journal").is_dir()
    if journal:
        sources.append(JournalSource())
    paths = auth_logs if auth_logs is not None else [p for p in DEFAULT_PATHS if p.exists()]
    sources += [AuthLogSource(path) for path in paths]
    if utmp:
        sources.append(UtmpSource())
    return sources
