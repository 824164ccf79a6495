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
"""

from __future__ import annotations

import threading
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


@dataclass(frozen=True)
class _Unit(Generic[T]):
    apply: Callable[[Tx], T]
    locks: tuple[str, ...]
    future: Future[T] = field(default_factory=Future)


class GroupCommitter:
    """The one writer of a process for a store. ``submit`` returns a future answered after the
    unit's transaction commits; ``close`` lets the writer finish what is waiting, then stops."""

    def __init__(self, store: Store, *, max_group: int = MAX_GROUP) -> None:
        self.store = store
        self.max_group = max_group
        self._waiting: deque[_Unit[Any]] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, apply: Callable[[Tx], T], *, locks: Sequence[str] = ()) -> Future[T]:
        """Queue ``apply(tx)``; its future holds what it returns, or what it raised."""
        unit: _Unit[T] = _Unit(apply, tuple(locks))
        with self._wake:
            if self._closed:  # answered 503: the agent keeps the batch and retries
                raise StoreError("the collector is shutting down; nothing was written")
            if self._thread is None:
                # a daemon: killed at exit, its open transaction is rolled back, unanswered
                self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
                self._thread.start()
            self._waiting.append(unit)
            self._wake.notify()
        return unit.future

    def run(self, apply: Callable[[Tx], T], *, locks: Sequence[str] = ()) -> T:
        """``submit`` and wait for the answer (for callers that are threads themselves)."""
        return self.submit(apply, locks=locks).result()

    def close(self, timeout_s: float = 30.0) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    # --- the writer --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if not self._waiting:
                    return
                group = [self._waiting.popleft() for _ in range(self._group_size())]
            try:
                self._commit(group)
            except Exception as exc:  # a bug here must not leave requests waiting forever
                log.exception("group_commit_failed", units=len(group))
                for unit in group:
                    if not unit.future.done():
                        unit.future.set_exception(exc)

    def _group_size(self) -> int:
        return min(len(self._waiting), self.max_group)

    def _commit(self, group: list[_Unit[Any]]) -> None:
        try:
            with self.store.group_transaction() as tx:
                tx.lock_hosts(sorted({h for unit in group for h in unit.locks}))
                outcomes = [_apply(unit, tx) for unit in group]
        except Exception as exc:
            if len(group) == 1:
                _settle(group[0], _Failed(exc))
                return
            log.warning("group_commit_split", units=len(group), error=str(exc))
            for unit in group:
                self._commit([unit])
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
    if isinstance(outcome, _Failed):
        unit.future.set_exception(outcome.exc)
    else:
        unit.future.set_result(outcome)
