"""Group commit: concurrent units of work written in ONE transaction, with one commit.

A durable commit costs an fsync, whatever it holds; one per request caps ingest at a few
hundred requests a second. So requests check their input in parallel (parsing, signatures),
then hand what they write to the one writer of this process. The writer takes every unit that
is waiting, applies them in order in one transaction, commits once, and only then answers each
with its own result. Durability is unchanged — nothing is answered before its commit — while
the commit's cost is shared by the whole group, which grows with the load.

Refusals and errors stay each unit's own:

- a unit refuses by raising ``Refused``; the refusal is its answer and the rest of the group
  commits. A unit writes nothing before a refusal, except evidence that must outlive it (a
  chain conflict, a refused key), which commits with the group;
- any other error (a database error, a bug) rolls the whole group back, and each of its units
  is then tried again alone, in its own transaction, so it fails only the unit that causes it.

Every unit names the hosts whose rows it locks; the group locks all of them first, in host id
order, so two replicas' groups on one PostgreSQL database never deadlock on host rows.

Where the writer runs: in the server on SQLite, on the event loop itself (``loop=``). A writer
thread beside the event loop would share the interpreter lock with it, and the database drivers
let go of that lock at every statement and every row they step through; under load each of
those hand-overs waits on the event loop's work, so a group's commit took many times its own
CPU time, holding the database's write lock all along (SQLite: the whole collector's). On the
loop, a group is written from start to commit without a hand-over; requests that arrive
meanwhile wait in the socket buffers and form the next group. Without a loop a thread of its
own is the writer: the server's on PostgreSQL, where every statement is a round trip the loop
must not sit through (it gathers a group for ``window_s``), and the CLI's and tests' (no
window).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import structlog

from collector.errors import Refused, StoreError
from collector.store import Store, Tx

log = structlog.get_logger(__name__)

T = TypeVar("T")
MAX_GROUP: Final = 256
# How long the first unit of a group waits for others: in loop mode, and for the server's
# writer thread (``window_s``) on PostgreSQL. A group costs fixed work whatever it holds (its
# transaction, a statement per table, the commit and its flush to disk); at a few hundred
# reports a second per process 10 ms gathered about three per commit, which 2 ms did not.
# 25 ms: a serving process's CPU under the benchmark's burst fell by 14 % (17.3 against 20.0
# CPU-s), for 10 ms more latency at the median.
GROUP_WINDOW_S: Final = 0.025
STOP: Final = object()
LOCK_RETRY_S: Final = 0.5


@dataclass(frozen=True)
class _Unit(Generic[T]):
    apply: Callable[[Tx], T]
    locks: tuple[str, ...]
    future: Future[T] = field(default_factory=Future)


class GroupCommitter:
    """The one writer of a process for a store. ``submit`` (from any thread) returns a future
    answered after the unit's transaction commits; ``close`` lets the writer finish what is
    waiting, then stops. With ``loop`` the writer runs on that event loop, else in a thread."""

    def __init__(
        self,
        store: Store,
        *,
        max_group: int = MAX_GROUP,
        loop: asyncio.AbstractEventLoop | None = None,
        window_s: float = 0.0,
    ) -> None:
        self.store = store
        self.max_group = max_group
        self.window_s = window_s  # thread mode: how long a group's first unit waits for others
        self._loop = loop
        self._first_at = 0.0  # thread mode: when the waiting group's first unit came
        self._waiting: deque[_Unit[Any]] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._drain_due = False  # loop mode: a drain is scheduled or waits for its turn
        self._writing = 0  # groups being written (their units are no longer in _waiting)
        self._closed = False
        self._turns: queue.SimpleQueue[object] = queue.SimpleQueue()  # loop mode: turns wanted
        self._turn_held = False  # loop mode: the waiter holds a turn for the loop
        self._turn_waiter: threading.Thread | None = None
        if loop is not None:
            self._turn_waiter = threading.Thread(
                target=self._wait_for_turns, name="group-commit-turns", daemon=True
            )
            self._turn_waiter.start()

    def submit(self, apply: Callable[[Tx], T], *, locks: Sequence[str] = ()) -> Future[T]:
        """Queue ``apply(tx)``; its future holds what it returns, or what it raised."""
        unit: _Unit[T] = _Unit(apply, tuple(locks))
        schedule = False
        with self._wake:
            if self._closed:  # answered 503: the agent keeps the batch and retries
                raise StoreError("the collector is shutting down; nothing was written")
            self._waiting.append(unit)
            if self._loop is not None:
                schedule, self._drain_due = not self._drain_due, True
            else:
                if self._thread is None:
                    # a daemon: killed at exit, its open transaction is rolled back, unanswered
                    self._thread = threading.Thread(
                        target=self._run, name="group-commit", daemon=True
                    )
                    self._thread.start()
                if len(self._waiting) == 1:
                    self._first_at = time.monotonic()
                    self._wake.notify_all()  # ``wait_idle`` callers share the condition
                elif len(self._waiting) >= self.max_group:
                    self._wake.notify_all()
        if schedule:
            assert self._loop is not None
            # requests read meanwhile join the group
            self._loop.call_soon_threadsafe(self._loop.call_later, GROUP_WINDOW_S, self._drain)
        return unit.future

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is waiting to be written (True), or ``timeout_s`` (False). The
        job worker asks before each batch: the ingest, which agents wait on, goes first."""
        with self._wake:
            return self._wake.wait_for(self._idle, timeout_s)

    def _idle(self) -> bool:
        return self._closed or not (self._waiting or self._drain_due or self._writing)

    def _notify_if_idle(self) -> None:
        """Wake ``wait_idle`` callers if nothing waits (holding ``_wake``)."""
        if self._idle():
            self._wake.notify_all()

    def run(self, apply: Callable[[Tx], T], *, locks: Sequence[str] = ()) -> T:
        """``submit`` and wait for the answer (for callers that are threads themselves)."""
        return self.submit(apply, locks=locks).result()

    def close(self, timeout_s: float = 30.0) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()  # the writer thread, and ``wait_idle`` callers
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        if self._turn_waiter is not None:
            self._turns.put(STOP)
            self._turn_waiter.join(timeout_s)
            if self._turn_waiter.is_alive():  # still waiting for a writer that does not finish
                self._refuse_waiting()
                return
        if self._loop is not None:  # called on the loop (the server's shutdown): finish here
            self._take_turn()  # one the waiter holds for a drain the loop has not run yet
            while group := self._next_group():
                self._write(group)

    def _refuse_waiting(self) -> None:
        """Answer what waits as not written (503: the agents keep it and send it again)."""
        error = StoreError("the collector is shutting down; nothing was written")
        while group := self._next_group():
            for unit in group:
                _settle(unit, _Failed(error))
            self._done()

    # --- the writer --------------------------------------------------------------------------

    def _next_group(self) -> list[_Unit[Any]]:
        """Units to write now; a group taken counts as being written until ``_done``."""
        with self._wake:
            group = [self._waiting.popleft() for _ in range(self._group_size())]
            self._writing += bool(group)
            return group

    def _done(self) -> None:
        with self._wake:
            self._writing -= 1
            self._notify_if_idle()

    def _drain(self) -> None:
        """Loop mode: write the waiting group. The loop never waits for the writer's turn
        (SQLite: another process's writer, this process's job worker): if it is taken, a
        thread waits for it in line with the other writers and hands it to the loop, and the
        group grows meanwhile."""
        with self._wake:
            self._drain_due = False
            if not self._waiting:
                self._notify_if_idle()
                return
            self._drain_due = True  # until the turn is ours
        try:
            free = self.store.try_lock_writer()
        except Exception:  # the waiter tries again, and says why if it cannot
            free = False
        if free:
            self._drain_locked()
        else:
            self._turns.put(None)

    def _wait_for_turns(self) -> None:
        assert self._loop is not None
        while self._turns.get() is not STOP:
            try:
                self.store.lock_writer()
            except Exception:  # e.g. the lock file is gone: keep the units, try again
                log.exception("group_commit_lock_failed")
                time.sleep(LOCK_RETRY_S)
                self._turns.put(None)
                continue
            with self._wake:
                closing = self._closed
                self._turn_held = not closing
            if closing:  # ``close`` writes what is left, taking the turn itself
                self.store.unlock_writer()
                return
            try:
                self._loop.call_soon_threadsafe(self._take_turn)
            except RuntimeError:  # the loop is closed: ``close`` writes what is left
                return

    def _take_turn(self) -> None:
        with self._wake:
            held, self._turn_held = self._turn_held, False
        if held:
            self._drain_locked()

    def _drain_locked(self) -> None:
        """Loop mode, holding the writer's turn: write one group, let the turn go, and come
        back after the loop's I/O if more is waiting."""
        assert self._loop is not None
        try:
            group = self._next_group()
            if group:
                self._write(group, locked=True)
        finally:
            try:
                self.store.unlock_writer()
            finally:
                with self._wake:
                    self._drain_due = bool(self._waiting) and not self._closed
                    again = self._drain_due
                    self._notify_if_idle()
                if again:
                    self._loop.call_soon(self._drain)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if not self._waiting:
                    return
                # the group's first unit waits up to ``window_s`` for others (a full group or
                # ``close`` ends the wait)
                while not self._closed and len(self._waiting) < self.max_group:
                    left = self._first_at + self.window_s - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
            self._write(self._next_group())

    def _write(self, group: list[_Unit[Any]], *, locked: bool = False) -> None:
        try:
            self._commit(group, locked=locked)
        except Exception as exc:  # a bug here must not leave requests waiting forever
            log.exception("group_commit_failed", units=len(group))
            for unit in group:
                if not unit.future.done():
                    unit.future.set_exception(exc)
        finally:
            self._done()

    def _group_size(self) -> int:
        return min(len(self._waiting), self.max_group)

    def _commit(self, group: list[_Unit[Any]], *, locked: bool = False) -> None:
        try:
            with self.store.group_transaction(locked=locked) as tx:
                tx.lock_hosts(sorted({h for unit in group for h in unit.locks}))
                outcomes = [_apply(unit, tx) for unit in group]
        except Exception as exc:
            if len(group) == 1:
                _settle(group[0], _Failed(exc))
                return
            log.warning("group_commit_split", units=len(group), error=str(exc))
            for unit in group:
                self._commit([unit], locked=locked)
            return
        for unit, outcome in zip(group, outcomes, strict=True):
            _settle(unit, outcome)


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _apply(unit: _Unit[Any], tx: Tx) -> Any:
    try:
        return unit.apply(tx)
    except Refused as exc:  # refused before writing: the group goes on
        return _Failed(exc)


def _settle(unit: _Unit[Any], outcome: Any) -> None:
    if unit.future.done():  # cancelled meanwhile (its request is gone): nobody to answer
        return
    if isinstance(outcome, _Failed):
        unit.future.set_exception(outcome.exc)
    else:
        unit.future.set_result(outcome)
