"""Serving the API: ``[server] processes`` worker processes on one socket, and a job process.

The collector's Python runs on one core at a time per process, so a machine with several cores
serves ingest with several processes. The parent binds the listening socket, brings the
database schema up to date, then forks its workers; each opens its own store, runs its own
group commit writer, and accepts connections from the shared socket (the kernel hands each
connection to one of them). With ``[server] workers``, one more process runs the job worker
(alerts, replacements, the silence sweep), at a lower CPU priority (``JOBS_NICE``): what an
agent waits on goes first, and the jobs a burst of drift queues run in the gaps. A job worker
thread inside a serving process would share its interpreter lock with the event loop, which
then waits for it at every call that lets the lock go (a signature check, a database step): so
the job worker has a process of its own even when one process serves (``processes = 1``).
Nothing is shared in memory: everything the processes agree on lives in the database, as it
does between replicas on PostgreSQL —

- SQLite: one write transaction at a time across the processes (``SqliteStore``'s lock file,
  then ``BEGIN IMMEDIATE``), so a job is claimed by one worker and a host's batch is checked
  against its chain tip by one writer at a time;
- PostgreSQL: host rows are locked (``FOR UPDATE``), jobs claimed with ``SKIP LOCKED``.

The parent only supervises: SIGTERM or SIGINT stops the workers in order (each finishes what
it has acknowledged to commit) and exits 0; a worker that dies stops the others and the parent
exits 1, so systemd restarts the whole service. A worker whose parent dies (``kill -9``) is
killed with it by the kernel (``PR_SET_PDEATHSIG``): it acknowledged only what it committed.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

import structlog
import uvicorn

from collector import silence
from collector.api import create_app
from collector.config import Config
from collector.errors import EXIT_ERROR, EXIT_OK
from collector.handlers import default_registry
from collector.jobs import Worker, WorkerThread
from collector.store import open_store

log = structlog.get_logger(__name__)

GRACEFUL_S: Final = 10
JOBS_NICE: Final = 19  # the lowest priority: about 1.5 % of a core's share against one busy process
JOBS: Final = -1  # the job process's number among the workers
_STOP_SIGNALS: Final = {signal.SIGTERM, signal.SIGINT}
_WATCHED: Final = {*_STOP_SIGNALS, signal.SIGCHLD}
_PR_SET_PDEATHSIG: Final = 1
# The cyclic garbage collector's thresholds while serving: a young collection after this many
# more container objects allocated than freed (Python's default is 700), an older one after 20
# and 10 of the one below. Requests allocate thousands of short-lived containers, nearly all
# freed by reference counting; at the default every request paid for a collection or two. A
# young collection walks the objects still alive of those allocated since the last one: its
# pause grows with the threshold (tens of ms at this one, a few times a minute under the
# benchmark's load), its total cost does not.
GC_THRESHOLDS: Final = (50_000, 20, 10)


def run(config: Config) -> int:
    """Serve until stopped; the exit status."""
    _open_files_limit()
    processes = config.server.process_count()
    if processes == 1 and not config.server.workers:
        _serve(config, sockets=None)
        return EXIT_OK
    open_store(config.database.url, pool_size=1).close()  # migrate once, before the workers
    host, port = config.server.host_port()
    listener = _bind(host, port)
    log.info("collector_processes", processes=processes, listen=config.server.listen)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    workers: dict[int, int] = {}  # pid -> worker number (JOBS: the job process)
    serving = config.replace(server=replace(config.server, workers=False))
    try:
        for number in range(processes):
            workers[_fork(lambda: _serve(serving, sockets=[listener]), number, previous)] = number
        if config.server.workers:
            workers[_fork(lambda: _work(config), JOBS, previous)] = JOBS
        listener.close()
        return _supervise(workers)
    finally:
        _stop(workers)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _serve(config: Config, *, sockets: list[socket.socket] | None) -> None:
    """One process's server: its own store, application and writer. Forked, it serves with
    ``workers = false`` (the job process runs the job worker); alone (one process, no job
    worker), it is the collector."""
    store = open_store(
        config.database.url, pool_size=config.database.pool_size, migrate=sockets is None
    )
    try:
        host, port = config.server.host_port()
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(config, store=store),
                host=host,
                port=port,
                log_config=None,
                access_log=False,
                timeout_keep_alive=config.server.keep_alive_s,
                timeout_graceful_shutdown=GRACEFUL_S,
            )
        )
        settle_heap()
        server.run(sockets=sockets)
    finally:
        store.close()


def settle_heap() -> None:
    """Take what the process holds once started (modules, the application, the store) out of
    the cyclic garbage collector's sight, and make its collections rarer.

    Every full collection walks every object the collector still tracks, and the interpreter
    starts a new one each time the tracked heap has grown by a quarter. A serving process held
    some 135,000 objects once started (165,000 with the fleet's keys cached): a full
    collection took tens of milliseconds of the event loop, on which every request waits, and
    came every few seconds while the key cache filled. Frozen (``gc.freeze``), those objects
    are never walked again. Nearly all of them live as long as the process; one that later
    became cyclic garbage (a pooled connection's record after a database restart) would be
    kept, at most what existed at start."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _open_files_limit() -> None:
    """Raise the soft limit of open files to the hard one: each connection is a file
    descriptor, and the usual soft limit (1024) is less than the reports a burst from a fleet
    of thousands has in flight, with the connections kept open (``[server] keep_alive_s``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:  # serve with the limit there is
        log.warning("open_files_limit_unchanged", limit=soft, error=str(exc))
        return
    log.info("open_files_limit_raised", before=soft, limit=hard)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener


def _work(config: Config) -> None:
    """The job process: the job worker (a thread) until SIGTERM or SIGINT, which this thread
    waits for, at a lower CPU priority."""
    try:
        os.nice(JOBS_NICE)
    except OSError as exc:  # not allowed here (EPERM, EACCES): run at the usual priority
        log.warning("job_priority_unchanged", nice=JOBS_NICE, error=str(exc))
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # the worker thread inherits it
    store = open_store(config.database.url, pool_size=2, migrate=False)
    try:
        silence.schedule(store)
        settle_heap()
        worker = WorkerThread(Worker(store, default_registry(store, config), config.jobs))
        worker.start()
        signal.sigwait(_STOP_SIGNALS)
        worker.stop()  # after the job it is running; the parent waits GRACEFUL_S + 20 s
    finally:
        store.close()


def _fork(body: Callable[[], None], number: int, mask: set[Any]) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    status = EXIT_ERROR
    try:
        _die_with(parent)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        structlog.contextvars.bind_contextvars(worker=_label(number))
        body()
        status = EXIT_OK
    except BaseException:
        log.exception("collector_worker_failed", worker=_label(number))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _label(number: int) -> int | str:
    return "jobs" if number == JOBS else number


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:  # pragma: no cover
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(EXIT_ERROR)


def _supervise(workers: dict[int, int]) -> int:
    """Wait for a stop signal (exit 0) or a worker's death (exit 1)."""
    while True:
        info = signal.sigtimedwait(_WATCHED, 1.0)
        if info is not None and info.si_signo in _STOP_SIGNALS:
            log.info("collector_stopping", signal=signal.Signals(info.si_signo).name)
            return EXIT_OK
        for pid, status in _reap(workers):
            log.error(
                "collector_worker_exited",
                worker=_label(workers.pop(pid)),
                pid=pid,
                status=os.waitstatus_to_exitcode(status),
            )
            return EXIT_ERROR


def _reap(workers: dict[int, int]) -> list[tuple[int, int]]:
    ended = []
    for pid in list(workers):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            ended.append((pid, status))
    return ended


def _stop(workers: dict[int, int]) -> None:
    """SIGTERM every worker (each drains, commits and closes), then wait; SIGKILL stragglers."""
    for pid in workers:
        _signal(pid, signal.SIGTERM)
    deadline_s = GRACEFUL_S + 20.0
    while workers and deadline_s > 0:
        for pid, _ in _reap(workers):
            workers.pop(pid)
        if workers:
            signal.sigtimedwait({signal.SIGCHLD}, 0.2)
            deadline_s -= 0.2
    for pid in workers:  # pragma: no cover - a worker that would not stop
        _signal(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.kill(pid, signum)
