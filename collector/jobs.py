"""The durable job queue's workers: claim, run the handler for the job's kind, record the end.

Jobs are rows (``jobs`` table) inserted in the same transaction as the state change that causes
them; ``Store.claim`` leases them to one worker (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the
single write transaction on SQLite), and a lease that runs out — a worker killed mid-job — makes
the job claimable again, so delivery is at least once. Handlers are registered by kind in a
``Registry``; the built-in silence sweep uses it as the response sinks and actions do.

A handler returns None when the job is done, or a time to run again (a periodic job); raising
is a failed attempt, retried with exponential backoff and jitter until ``max_attempts``. A
``JobFailed`` says more: not retryable (buried at once), or not before ``retry_after_s``.

Every commit costs a flush to disk and a turn of the database's write lock (SQLite: the one
the ingest's group commit waits for), so a worker spends few of them:

- a handler that only reads and writes the database (``Registry.register_tx``: an alert opens
  an incident and queues its deliveries) runs inside the worker's transaction, and the job's
  end commits with it. On SQLite a claimed batch is handled (each job in a savepoint, so a
  failing one is undone alone) and ended in ONE transaction; on PostgreSQL, whose row locks two
  replicas' batches would take in clashing orders, each job has its own. The claim commits
  first, so no uncommitted job rows are held while host rows are waited for; the host rows a
  job names are locked first, in host id order, as the group commit locks them;
- any other handler (it calls out: a sink, a cloud API) runs outside a transaction; the ends of
  a batch's attempts are written together in one transaction after the batch, or sooner when
  half the lease has gone by or the worker is stopping. A worker killed mid-batch leaves its
  unrecorded attempts to run out their lease and run again (delivery is at least once).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Final

import structlog

from collector.config import JobConfig
from collector.errors import JobFailed, StoreError
from collector.model import Job
from collector.store import Store, Tx

log = structlog.get_logger(__name__)

# SQLite: how long a batch of transactional jobs holds the database's one write lock before it
# commits and lets the ingest's writers have a turn (a job started within it runs to its end).
# A batch of 20 alerts in one transaction held it for tens of milliseconds, and the reports
# agents waited that long.
TX_BUDGET_S: Final = 0.010
# ...and after such a commit the job worker waits this long before it asks for the lock again:
# an flock is not handed over in order, and a writer woken by the unlock has yet to run
YIELD_S: Final = 0.001

Handler = Callable[[Job], datetime | None]
TxHandler = Callable[[Tx, Job], datetime | None]
Locks = Callable[[Job], Sequence[str]]  # the host rows a job's handler locks
_End = Callable[[Tx], bool]  # records how an attempt ended, in a transaction (False: not ours)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Registry:
    """Job handlers by kind; registering a kind twice is an error."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._tx_handlers: dict[str, tuple[TxHandler, Locks]] = {}

    def register(self, kind: str, handler: Handler) -> None:
        self._refuse_known(kind)
        self._handlers[kind] = handler

    def register_tx(self, kind: str, handler: TxHandler, *, locks: Locks = lambda job: ()) -> None:
        """A handler that works inside the worker's transaction (the database only, no calls
        out); ``locks`` names the hosts whose rows it locks."""
        self._refuse_known(kind)
        self._tx_handlers[kind] = (handler, locks)

    def _refuse_known(self, kind: str) -> None:
        if kind in self._handlers or kind in self._tx_handlers:
            raise ValueError(f"a handler for job kind {kind!r} is already registered")

    def kinds(self) -> list[str]:
        return sorted([*self._handlers, *self._tx_handlers])

    def __getitem__(self, kind: str) -> Handler:
        return self._handlers[kind]

    def tx_handler(self, kind: str) -> tuple[TxHandler, Locks] | None:
        return self._tx_handlers.get(kind)


def backoff(attempts: int, config: JobConfig) -> float:
    """Seconds before the next attempt: exponential, capped, with full jitter on the top half."""
    delay = min(config.backoff_cap_s, config.backoff_base_s * 2 ** max(attempts - 1, 0))
    return float(delay * random.uniform(0.5, 1.0))


class Worker:
    """Claims and runs jobs of every registered kind. ``run_once`` is one pass (for tests)."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        config: JobConfig,
        *,
        name: str | None = None,
        batch: int = 20,
        yield_to: Callable[[float], object] | None = None,
    ) -> None:
        self.store = store
        # waits (at most the given seconds) for the process's ingest to catch up: a burst of
        # reports is answered first, and the jobs it queued are run in the gaps, never starved
        self.yield_to = yield_to
        self.registry = registry
        self.config = config
        self.name = name or worker_name()
        self.batch = batch

    def run_once(self, stop: threading.Event | None = None) -> int:
        """One pass over every kind; ``stop`` ends it early (between jobs)."""
        stop = stop or threading.Event()
        ran = 0
        for kind in self.registry.kinds():
            if stop.is_set():
                break
            if self.yield_to is not None:
                self.yield_to(self.config.ingest_first_s)
            in_tx = self.registry.tx_handler(kind)
            ran += self._run_in_tx(kind, *in_tx) if in_tx else self._run_batch(kind, stop)
        return ran

    def _run_batch(self, kind: str, stop: threading.Event) -> int:
        """Claim a batch and run each job's handler; the ends are recorded together, in one
        transaction, once the batch is done, or earlier when half the lease has gone by (slow
        handlers: the jobs must not be taken by another worker as abandoned) or the worker is
        asked to stop (then the rest of the batch is left to run out its lease)."""
        lease_s = self.config.lease_s
        claimed = self.store.claim(kind, self.name, limit=self.batch, lease_s=lease_s)
        handler = self.registry[kind]
        ends: list[tuple[Job, _End]] = []
        started = time.monotonic()
        for job in claimed:
            ends.append((job, self._attempt(job, partial(handler, job))))
            if stop.is_set() or time.monotonic() - started > lease_s / 2:
                self._record(ends)
                started = time.monotonic()
                if stop.is_set():
                    break
        self._record(ends)
        return len(claimed)

    def _record(self, ends: list[tuple[Job, _End]]) -> None:
        if ends:
            with self.store.transaction() as tx:
                for job, end in ends:
                    _end(tx, job, end)
            ends.clear()

    def _run_in_tx(self, kind: str, handler: TxHandler, locks: Locks) -> int:
        """Claim a batch (committed at once, as for any kind), then handle and end each job in
        a savepoint of a transaction, its hosts' rows locked first in host id order.

        Where a write transaction locks the whole database (SQLite) the batch shares a
        transaction: writers take turns, so nothing can wait on it in a cycle. It is committed
        after the job that takes it past ``TX_BUDGET_S``, the rest going on in the next: every
        report waits while a job holds that lock. Where rows are
        locked (PostgreSQL) each job has a transaction of its own (its end committed with it):
        a batch would lock the rows of many hosts, pools and incidents in the order of its
        jobs, and two replicas' batches deadlocked on them. The claim commits first so that no
        uncommitted job rows are held while host rows are waited for."""
        lease_s = self.config.lease_s
        claimed = self.store.claim(kind, self.name, limit=self.batch, lease_s=lease_s)
        hosts: dict[int, Sequence[str]] = {}
        failed: dict[int, _End] = {}
        for job in claimed:
            try:
                hosts[job.job_id] = locks(job)
            except Exception as exc:  # a malformed payload fails its own job only
                failed[job.job_id] = self._failed(job, exc)
        position = 0
        while position < len(claimed):
            if position:  # a budget's commit: the writers it let go take their turn first
                time.sleep(YIELD_S)
            with self.store.transaction() as tx:
                began = time.monotonic()
                while position < len(claimed):
                    job = claimed[position]
                    position += 1
                    tx.lock_hosts(sorted(hosts.get(job.job_id, ())))
                    end = failed.get(job.job_id) or self._attempt(
                        job, partial(_in_savepoint, tx, handler, job)
                    )
                    _end(tx, job, end)
                    if self.store.row_locks or time.monotonic() - began >= TX_BUDGET_S:
                        break
        return len(claimed)

    def _attempt(self, job: Job, run: Callable[[], datetime | None]) -> _End:
        """Run one attempt; what records its end (done, again later, retry or dead)."""
        try:
            again = run()
        except Exception as exc:
            return self._failed(job, exc)
        if again is None:
            return lambda tx: tx.complete_job(job.job_id, self.name)
        return lambda tx: tx.reschedule_job(job.job_id, self.name, again)

    def _failed(self, job: Job, exc: Exception) -> _End:
        error = f"{type(exc).__name__}: {exc}"
        final = isinstance(exc, JobFailed) and not exc.retryable
        if final or job.attempts >= self.config.max_attempts:
            log.error("job_dead", job_id=job.job_id, kind=job.kind, error=error)
            return lambda tx: tx.fail_job(job.job_id, self.name, error, retry_at=None)
        delay = backoff(job.attempts, self.config)
        if isinstance(exc, JobFailed) and exc.retry_after_s is not None:
            delay = max(delay, exc.retry_after_s)
        retry_at = self.store.clock() + timedelta(seconds=delay)
        log.warning(
            "job_failed",
            job_id=job.job_id,
            kind=job.kind,
            attempts=job.attempts,
            retry_in_s=round(delay, 3),
            error=error,
        )
        return lambda tx: tx.fail_job(job.job_id, self.name, error, retry_at=retry_at)

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; a database outage, or a bug a job runs into outside its
        handler, is logged and waited out, never fatal."""
        log.info("job_worker_started", worker=self.name, kinds=self.registry.kinds())
        while not stop.is_set():
            try:
                ran = self.run_once(stop)
            except StoreError as exc:
                log.warning("job_worker_store_error", worker=self.name, error=str(exc))
                ran = 0
            except Exception:
                log.exception("job_worker_error", worker=self.name)
                ran = 0
            if not ran:
                stop.wait(self.config.poll_interval_s)
        log.info("job_worker_stopped", worker=self.name)


class WorkerThread:
    """A worker on its own thread, stopped (and joined) in order at shutdown."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=worker.run, args=(self._stop,), name=f"jobs-{worker.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def signal_stop(self) -> None:
        """Ask the worker to stop after the job it is running (``stop`` waits for it)."""
        self._stop.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)


def _in_savepoint(tx: Tx, handler: TxHandler, job: Job) -> datetime | None:
    with tx.savepoint():
        return handler(tx, job)


def _end(tx: Tx, job: Job, end: _End) -> None:
    if not end(tx):  # its lease ran out and another worker took it
        log.warning("job_end_lost", job_id=job.job_id, kind=job.kind)
