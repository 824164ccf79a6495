"""One collector serving with two worker processes on one SQLite file (``[server] processes``)
and a job process beside them: reports sent twice at once are stored once, the silence sweep
and the jobs run once (in the job process, at a lower CPU priority), and ``kill -9`` of the
collector takes its workers with it."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import requests

from collector import auth
from collector.model import HostState
from collector.serve import JOBS_NICE
from collector.store import SqlStore
from tests.collector.hosts import SimHost, file_drift
from tests.collector.servers import CONFIG, Server, send_at_once
from tests.sshd import wait_until

pytestmark = pytest.mark.slow

FAST = """
[verdicts]
heartbeat_interval_s = 0.5
silent_after_intervals = 1
sweep_interval_s = 0.05
fleet_silent_min_hosts = 1000

[jobs]
poll_interval_s = 0.05
"""


def test_two_processes_store_each_report_once_and_sweep_once(
    sqlite_store: SqlStore, tmp_path: Path
) -> None:
    store = sqlite_store
    token, _ = auth.create_enroll_token(store)
    url = f"sqlite:///{tmp_path / 'collector.db'}"
    with Server(url, tmp_path, config=CONFIG + FAST, processes=2) as server:
        workers = server.workers()
        assert sorted(w.nice() for w in workers) == [0, 0, JOBS_NICE]
        jobs_pid = next(w.pid for w in workers if w.nice() == JOBS_NICE)
        drifting = [SimHost(f"proc-d{n}") for n in range(4)]
        quiet = [SimHost(f"proc-q{n}") for n in range(4)]
        for host in drifting + quiet:
            answer = requests.post(server.url + "/v1/enroll", json=host.enrollment(token))
            assert answer.status_code == 201, answer.text
        statuses: dict[tuple[str, int], list[str]] = {}
        for round_ in range(6):
            batches = []
            for host in drifting:
                envs = [host.heartbeat() for _ in range(3)]
                if round_ == 3:
                    envs.append(host.finding(file_drift("/etc/sudoers")))
                batches.append(host.batch(*envs))
            statuses.update(send_at_once([server.url, server.url], batches))
        assert len(statuses) == 4 * 19
        assert all(sorted(s) == ["accepted", "duplicate"] for s in statuses.values()), statuses

        def quiet_are_silent() -> bool:
            return all(_state(store, h.host_id) is HostState.SILENT for h in quiet)

        wait_until(quiet_are_silent, timeout_s=30, what="the quiet hosts to be swept silent")
        (sweep,) = store.jobs(kind="sweep_silent")
        later = sweep.next_attempt_at + timedelta(seconds=0.5)
        wait_until(  # ten more sweeps (every 0.05 s), by either worker
            lambda: store.jobs(kind="sweep_silent")[0].next_attempt_at >= later,
            timeout_s=30,
            what="ten more sweeps",
        )
    for host in drifting:
        stored = store.host(host.host_id)
        assert stored is not None and stored.envelopes == host.seq == 19
        assert stored.state is HostState.DRIFTED
        moves = Counter(t.to_state for t in store.transitions(host.host_id))
        assert moves[HostState.DRIFTED] == 1
    for host in quiet:
        moves = Counter(t.to_state for t in store.transitions(host.host_id))
        assert moves[HostState.SILENT] == 1, moves
    claimers = {j.claimed_by for j in store.jobs() if j.claimed_by}
    assert claimers and {int(c.split(":")[1]) for c in claimers} == {jobs_pid}
    alerts = Counter(j.dedup_key for j in store.jobs(kind="alert"))
    assert alerts == {
        **{f"firing:proc-d{n}:drift": 1 for n in range(4)},
        **{f"firing:proc-q{n}:silent": 1 for n in range(4)},
    }


def test_the_workers_die_with_the_collector(sqlite_store: SqlStore, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'collector.db'}"
    server = Server(url, tmp_path, processes=2).start()
    workers = server.workers()
    assert len(workers) == 3  # two serving, one running jobs
    server.kill()  # SIGKILL of the parent: the kernel kills the workers too
    assert not any(w.is_running() for w in workers)
    server.start()  # on the same port and database: nothing of the old one holds them
    try:
        assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
        assert len(server.workers()) == 3
    finally:
        server.stop()


def test_stopping_the_collector_stops_its_workers(sqlite_store: SqlStore, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'collector.db'}"
    server = Server(url, tmp_path, processes=2).start()
    workers = server.workers()
    server.stop()  # SIGTERM: each worker drains and exits, then the parent exits 0
    assert server.proc is not None and server.proc.returncode == 0
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive and len(gone) == 3


def _state(store: SqlStore, host_id: str) -> HostState | None:
    host = store.host(host_id)
    return host.state if host else None
