"""The realtime file guard: every change under the protected trees, judged as it happens.

A backend reports raw events into an ``Intake``: fanotify (``agent/fanotify.py``; filesystem
marks, no per-directory watches, names the process) where the kernel and privileges allow,
else inotify through watchdog (``agent/inotify.py``). The guard's thread takes what arrived,
waits ``coalesce_s`` for the rest of a burst, merges it (one look per path; a path below a
directory that is looked at whole is not looked at twice), and has the ``Judge`` measure each
path again (a directory that appeared, moved or went is walked at once). Findings leave as
``emit("realtime", …)``.

Nothing degrades silently: a queue overflow (the kernel dropped events) is counted, reported
as an integrity finding and answered by a metadata pass at once; a part of the tree that
cannot be watched (the watch limit) is reported with advice, and the rescanner falls back to
frequent metadata passes; with no realtime backend at all, rescans are all there is, and that
is reported too. The backend in use is logged (``guard_backend``) and in ``health()``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

from agent import fanotify
from agent.compare import Finding
from agent.errors import advice
from agent.inotify import LIMIT_ADVICE, InotifyBackend
from agent.judge import Judge
from agent.wire import display_path
from agent.worker import Emit, Worker, integrity_finding

BACKENDS: Final = ("auto", "fanotify", "inotify")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GuardConfig:
    """``backend``: ``auto`` (fanotify where it can run, else inotify), ``fanotify`` (only
    fanotify) or ``inotify``. ``coalesce_s``: how long a burst of events is gathered before
    the paths are measured."""

    backend: str = "auto"
    coalesce_s: float = 0.05
    check_interval_s: float = 5.0  # how often the backend's threads are seen to be alive

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {list(BACKENDS)}")
        if not self.coalesce_s >= 0:
            raise ValueError(f"coalesce_s {self.coalesce_s!r} is not a number >= 0")
        if not self.check_interval_s > 0:
            raise ValueError(f"check_interval_s {self.check_interval_s!r} is not a number > 0")


@dataclass(frozen=True)
class Health:
    """The guard's part of the heartbeat. ``backend``: fanotify, inotify, or polling (no
    realtime backend: rescans only)."""

    backend: str
    overflows: int
    watches: int
    unwatched: int
    last_rescan: str | None
    last_full_rehash: str | None


class Reverifier(Protocol):
    """What the guard asks of the rescanner (``agent.rescan.Rescanner``)."""

    last_rescan: str | None
    last_full_rehash: str | None

    def request(self, reason: str) -> None: ...

    def degrade(self, reason: str) -> None: ...


class Backend(Protocol):
    name: str

    @property
    def watches(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def failure(self) -> str | None:
        """None while the backend's threads run; once one has ended, what ended."""
        ...


# --- the intake: what the backends saw, merged ------------------------------------------------


@dataclass
class Change:
    tree: bool = False
    process: dict[str, Any] | None = None


@dataclass
class Batch:
    changes: dict[str, Change] = field(default_factory=dict)
    overflows: list[str] = field(default_factory=list)
    unwatched: list[tuple[str, str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.changes or self.overflows or self.unwatched)


class Intake:
    """The ``Sink`` the backends report into (from their threads); the guard takes batches."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._batch = Batch()
        self.events = 0

    def changed(self, full_path: str, *, tree: bool, process: dict[str, Any] | None) -> None:
        with self._cond:
            self.events += 1
            change = self._batch.changes.setdefault(full_path, Change())
            change.tree = change.tree or tree
            if process is not None:
                change.process = process
            self._cond.notify()

    def overflow(self, backend: str) -> None:
        with self._cond:
            self._batch.overflows.append(backend)
            self._cond.notify()

    def unwatched(self, backend: str, reason: str, detail: str) -> None:
        with self._cond:
            self._batch.unwatched.append((backend, reason, detail))
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def take(
        self, stopping: threading.Event, settle_s: float, timeout_s: float | None = None
    ) -> Batch:
        """Wait for something to arrive (at most ``timeout_s``), then ``settle_s`` for the
        rest of the burst; return it all (empty when stopping or nothing came)."""
        with self._cond:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while not self._batch and not stopping.is_set():
                if deadline is None:
                    self._cond.wait()
                elif (wait_s := deadline - time.monotonic()) > 0:
                    self._cond.wait(wait_s)
                else:
                    return Batch()
            deadline = time.monotonic() + settle_s
            while not stopping.is_set() and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            batch, self._batch = self._batch, Batch()
        return _merged(batch)


def _merged(batch: Batch) -> Batch:
    """Drop the paths that lie below a directory that is looked at whole."""
    trees = {p for p, c in batch.changes.items() if c.tree}
    if trees:
        batch.changes = {p: c for p, c in batch.changes.items() if not _below_any(p, trees)}
    return batch


def _below_any(path: str, trees: set[str]) -> bool:
    while path not in ("/", ""):
        path = path.rsplit("/", 1)[0] or "/"
        if path in trees:
            return True
    return False


# --- the guard ---------------------------------------------------------------------------------


class Guard(Worker):
    """The realtime guard (see the module's docstring). The backend starts in ``start()``."""

    name = "guard"

    def __init__(
        self,
        judge: Judge,
        emit: Emit,
        rescanner: Reverifier,
        *,
        config: GuardConfig = GuardConfig(),
    ) -> None:
        super().__init__(emit)
        self.judge = judge
        self.rescanner = rescanner
        self.config = config
        self.intake = Intake()
        self.backend: Backend | None = None
        self.overflows = 0
        self._unwatched = 0
        self._degraded_for: set[str] = set()

    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend is not None else "polling"

    def health(self) -> Health:
        backend = self.backend
        return Health(
            backend=self.backend_name,
            overflows=self.overflows,
            watches=backend.watches if backend is not None else 0,
            unwatched=self._unwatched,
            last_rescan=self.rescanner.last_rescan,
            last_full_rehash=self.rescanner.last_full_rehash,
        )

    def prepare(self) -> None:
        self.backend = self._start_backend()
        log.info("guard_backend", backend=self.backend_name, watches=self.health().watches)

    def _start_backend(self) -> Backend | None:
        wanted = self.config.backend
        names = ["fanotify", "inotify"] if wanted == "auto" else [wanted]
        for name in names:
            backend: Backend
            if name == "fanotify":
                usable, why = fanotify.available()
                if not usable:
                    log.info("fanotify_unavailable", reason=why)
                    continue
                backend = fanotify.FanotifyBackend(self.judge, self.intake)
            else:
                backend = InotifyBackend(self.judge, self.intake)
            try:
                backend.start()
            except OSError as exc:
                log.warning("guard_backend_failed", backend=name, error=advice(exc))
                backend.stop()
                continue
            return backend
        return None

    def wake(self) -> None:
        self.intake.wake()

    def cleanup(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.stop()

    def run(self) -> None:
        if self.backend is None:
            self._degrade(
                "realtime_unavailable",
                "no realtime file watching could be started; falling back to rescans",
            )
        while not self.stopping.is_set():
            config = self.config
            batch = self.intake.take(self.stopping, config.coalesce_s, config.check_interval_s)
            if self.stopping.is_set():
                break
            if batch.overflows:
                self._overflowed(batch.overflows)
            if batch.unwatched:
                self._unwatched_parts(batch.unwatched)
            self._check_backend()  # after what its threads said of themselves
            findings = self._judge(batch)
            if findings:
                self.emit("realtime", findings)

    def _judge(self, batch: Batch) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for full, change in batch.changes.items():
            path = self.judge.image_path(full)
            if path is None:
                continue
            try:
                found = self.judge.check_tree(path) if change.tree else self.judge.check_path(path)
            except Exception:  # one bad path must not stop the guard
                log.exception("guard_check_failed", path=display_path(path))
                continue
            out.extend(_wire(f, change.process) for f in found)
        for finding in out:
            if finding.get("drift"):
                log.warning(
                    "drift_detected",
                    path=finding["path"],
                    change=finding["change"],
                    rule=finding["rule"],
                    severity=finding["severity"],
                )
        return out

    def _check_backend(self) -> None:
        backend = self.backend
        failure = backend.failure() if backend is not None else None
        if failure is not None:
            self._backend_failed(failure)

    def _backend_failed(self, failure: str) -> None:
        """A backend whose thread has ended sees nothing more: say so, and fall back to
        frequent rescans (the guard itself goes on, as ``polling``)."""
        backend = self.backend
        if backend is None:
            return
        self.backend = None
        log.error("guard_backend_died", backend=backend.name, failure=failure)
        try:
            backend.stop()
        except Exception:  # what is left of it must not take the guard along
            log.exception("guard_backend_stop_failed", backend=backend.name)
        self._degrade(
            f"{backend.name}_failed",
            f"{failure}: no realtime watching since (integrity unknown until the metadata pass "
            "that was started at once has finished); falling back to frequent rescans",
        )

    def _overflowed(self, backends: list[str]) -> None:
        self.overflows += len(backends)
        name = backends[0]
        log.warning("event_queue_overflow", backend=name, overflows=self.overflows)
        self.emit(
            "integrity",
            [
                integrity_finding(
                    f"{name}_overflow",
                    f"the kernel dropped {name} events (overflow {self.overflows}): integrity "
                    "unknown until the metadata pass that was started at once has finished",
                )
            ],
        )
        self.rescanner.request(f"{name}_overflow")

    def _unwatched_parts(self, parts: list[tuple[str, str, str]]) -> None:
        failed = [detail for _b, reason, detail in parts if reason == "backend_failed"]
        if failed:
            self._backend_failed(failed[0])
            parts = [p for p in parts if p[1] != "backend_failed"]
        self._unwatched += len(parts)
        for reason in dict.fromkeys(r for _b, r, _d in parts):
            if reason in self._degraded_for:
                continue  # reported already; the count goes on in health()
            self._degraded_for.add(reason)
            same = [(b, d) for b, r, d in parts if r == reason]
            backend, detail = same[0]
            if reason == "watch_limit":
                text = (
                    f"{LIMIT_ADVICE}; {len(same)} director{'y' if len(same) == 1 else 'ies'} "
                    f"not watched (first: {detail}); falling back to frequent rescans"
                )
            else:
                text = f"{detail}; falling back to frequent rescans"
            log.error("guard_unwatched", backend=backend, reason=reason, detail=text)
            self._degrade(reason, text)

    def _degrade(self, reason: str, detail: str) -> None:
        self.emit("integrity", [integrity_finding(reason, detail)])
        self.rescanner.degrade(reason)


def _wire(finding: Finding, process: dict[str, Any] | None) -> dict[str, Any]:
    out = finding.to_wire()
    if process is not None:
        out["process"] = process
    return out
