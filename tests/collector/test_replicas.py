"""Two collector replicas on one database (PostgreSQL, or one SQLite file as a collector's worker
processes share it): the same reports sent to both are processed once, and jobs are claimed
once, even when a worker is killed holding a lease."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from collector import auth
from collector.model import HostState, JobSpec, JobState
from collector.store import SqlStore
from tests.collector.hosts import SimHost, file_drift
from tests.collector.servers import REPO, Server, send_at_once

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize(
        "db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
    ),
]


def test_the_same_reports_at_two_replicas_are_processed_once(
    store: SqlStore, db_url: str, tmp_path: Path
) -> None:
    token, _ = auth.create_enroll_token(store)
    with Server(db_url, tmp_path, name="a") as a, Server(db_url, tmp_path, name="b") as b:
        hosts = [SimHost(f"rep-{n}") for n in range(4)]
        for host in hosts:
            assert requests.post(a.url + "/v1/enroll", json=host.enrollment(token)).ok
        statuses: dict[tuple[str, int], list[str]] = {}
        for round_ in range(10):
            batches = []
            for host in hosts:
                envs = [host.heartbeat() for _ in range(4)]
                if round_ == 5:
                    envs.append(host.finding(file_drift("/etc/sudoers")))
                batches.append(host.batch(*envs))
            statuses.update(send_at_once([a.url, b.url], batches))
        assert statuses and all(
            sorted(s) == ["accepted", "duplicate"] for s in statuses.values()
        ), statuses
    for host in hosts:
        stored = store.host(host.host_id)
        assert stored is not None and stored.envelopes == host.seq == 41
        assert stored.state is HostState.DRIFTED
        drifts = [t for t in store.transitions(host.host_id) if t.to_state is HostState.DRIFTED]
        assert len(drifts) == 1
    alerts = Counter(j.dedup_key for j in store.jobs(kind="alert"))
    assert alerts == {f"firing:rep-{n}:drift": 1 for n in range(4)}


def _worker(db_url: str, name: str, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.collector.worker_proc", db_url, name, str(out)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
    )


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_jobs_are_claimed_once_even_when_a_worker_is_killed(
    store: SqlStore, db_url: str, tmp_path: Path
) -> None:
    store.enqueue(JobSpec("probe", "first", {"block": True}))
    for n in range(200):
        store.enqueue(JobSpec("probe", f"job-{n}", {}))
    outputs = {name: tmp_path / f"{name}.out" for name in ("blocker", "w1", "w2")}
    blocker = _worker(db_url, "blocker", outputs["blocker"])
    workers = []
    try:

        def blocker_holds_a_lease() -> bool:
            return any(
                j.claimed_by == "blocker" and j.state is JobState.RUNNING
                for j in store.jobs(kind="probe")
            )

        _wait_for(blocker_holds_a_lease, 30, "the blocking worker never claimed")
        workers = [_worker(db_url, n, outputs[n]) for n in ("w1", "w2")]
        blocker.kill()  # SIGKILL while it holds a lease
        blocker.wait(10)

        def all_done() -> bool:
            return all(j.state is JobState.DONE for j in store.jobs(kind="probe"))

        _wait_for(all_done, 60, "jobs left undone")
    finally:
        for proc in (blocker, *workers):
            proc.terminate()
            proc.wait(10)
    runs = Counter(
        int(line) for path in outputs.values() if path.exists() for line in path.read_text().split()
    )
    assert set(runs) == {j.job_id for j in store.jobs(kind="probe")}
    assert set(runs.values()) == {1}, [job for job, n in runs.items() if n > 1]
    first = store.jobs(kind="probe")[0]
    assert first.claimed_by in ("w1", "w2") and first.attempts == 2
