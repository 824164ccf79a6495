"""The durable job queue's workers: claim, run the handler for the job's kind, record the end.

Jobs are rows (``jobs`` table) inserted in the same transaction as the state change that causes
them; ``Store.claim`` leases them to one worker (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the
single write transaction on SQLite), and a lease that runs out — a worker killed mid-job — makes
the job claimable again, so delivery is at least once. Handlers are registered by kind in a
``Registry``; the built-in silence sweep uses it as the response sinks and actions do.

A handler returns None when the job is done, or a time to run again (a periodic job); raising
is a failed attempt, retried with exponential backoff and jitter until ``max_attempts``. A
``JobFailed`` says more: not retryable (buried at once), or not before ``retry_after_s``.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from collector.config import JobConfig
from collector.errors import JobFailed, StoreError
from collector.model import Job
from collector.store import Store

log = structlog.get_logger(__name__)

Handler = Callable[[Job], datetime | None]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Registry:
    """Job handlers by kind; registering a kind twice is an error."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, kind: str, handler: Handler) -> None:
        if kind in self._handlers:
            raise ValueError(f"a handler for job kind {kind!r} is already registered")
        self._handlers[kind] = handler

    def kinds(self) -> list[str]:
        return sorted(self._handlers)

    def __getitem__(self, kind: str) -> Handler:
        return self._handlers[kind]


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
    ) -> None:
        self.store = store
        self.registry = registry
        self.config = config
        self.name = name or worker_name()
        self.batch = batch

    def run_once(self) -> int:
        ran = 0
        for kind in self.registry.kinds():
            for job in self.store.claim(
                kind, self.name, limit=self.batch, lease_s=self.config.lease_s
            ):
                self._run(job)
                ran += 1
        return ran

    def _run(self, job: Job) -> None:
        handler = self.registry[job.kind]
        try:
            again = handler(job)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            final = isinstance(exc, JobFailed) and not exc.retryable
            if final or job.attempts >= self.config.max_attempts:
                self.store.fail(job.job_id, self.name, error, retry_at=None)
                log.error("job_dead", job_id=job.job_id, kind=job.kind, error=error)
                return
            delay = backoff(job.attempts, self.config)
            if isinstance(exc, JobFailed) and exc.retry_after_s is not None:
                delay = max(delay, exc.retry_after_s)
            retry_at = self.store.clock() + timedelta(seconds=delay)
            self.store.fail(job.job_id, self.name, error, retry_at=retry_at)
            log.warning(
                "job_failed",
                job_id=job.job_id,
                kind=job.kind,
                attempts=job.attempts,
                retry_in_s=round(delay, 3),
                error=error,
            )
            return
        if again is None:
            self.store.complete(job.job_id, self.name)
        else:
            self.store.reschedule(job.job_id, self.name, again)

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; a database outage is waited out, never fatal."""
        log.info("job_worker_started", worker=self.name, kinds=self.registry.kinds())
        while not stop.is_set():
            try:
                ran = self.run_once()
            except StoreError as exc:
                log.warning("job_worker_store_error", worker=self.name, error=str(exc))
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
        """Ask the worker to stop after its current job (``stop`` waits for it)."""
        self._stop.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
