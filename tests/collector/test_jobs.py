"""Job workers: handlers by kind, retries with backoff, dead jobs, periodic jobs, and the
silence sweep that runs as one."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import event
from structlog.testing import capture_logs

from collector import jobs, silence
from collector.config import JobConfig, VerdictConfig
from collector.jobs import Registry, Worker, WorkerThread, backoff
from collector.model import HostState, Job, JobSpec, JobState
from collector.store import SqlStore, Tx
from tests.collector.clock import T0, Clock
from tests.collector.hosts import add_host


def test_registry_refuses_a_second_handler() -> None:
    registry = Registry()
    registry.register("alert", lambda job: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("alert", lambda job: None)


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    config = JobConfig(backoff_base_s=2, backoff_cap_s=60)
    for attempts, top in ((1, 2), (2, 4), (3, 8), (10, 60)):
        delay = backoff(attempts, config)
        assert top / 2 <= delay <= top


def test_worker_runs_retries_and_buries(store: SqlStore, clock: Clock) -> None:
    calls: list[str] = []

    def deliver(job: Job) -> None:
        calls.append(job.dedup_key)
        if job.payload.get("fail"):
            raise ConnectionError("sink down")

    registry = Registry()
    registry.register("alert", deliver)
    worker = Worker(store, registry, JobConfig(max_attempts=2), name="w1")
    store.enqueue(JobSpec("alert", "ok", {}))
    store.enqueue(JobSpec("alert", "bad", {"fail": True}))
    store.enqueue(JobSpec("other", "x", {}))  # no handler here: left for another worker
    with capture_logs() as logs:
        assert worker.run_once() == 2
    assert {j.dedup_key: j.state for j in store.jobs()} == {
        "ok": JobState.DONE,
        "bad": JobState.PENDING,
        "x": JobState.PENDING,
    }
    failed = next(e for e in logs if e["event"] == "job_failed")
    assert failed["error"] == "ConnectionError: sink down" and failed["attempts"] == 1
    assert worker.run_once() == 0  # not due yet: backing off
    clock.advance(3600)
    with capture_logs() as logs:
        assert worker.run_once() == 1
    assert [e["event"] for e in logs] == ["job_dead"]
    [dead] = store.jobs(state="dead")
    assert dead.dedup_key == "bad" and dead.last_error == "ConnectionError: sink down"
    assert calls == ["ok", "bad", "bad"]


def test_periodic_job_reschedules_itself(store: SqlStore, clock: Clock) -> None:
    registry = Registry()
    registry.register("tick", lambda job: clock.now + timedelta(seconds=10))
    worker = Worker(store, registry, JobConfig(), name="w1")
    store.enqueue(JobSpec("tick", "tick", {}))
    assert worker.run_once() == 1
    [job] = store.jobs()
    assert (job.state, job.next_attempt_at, job.attempts) == (
        JobState.PENDING,
        T0 + timedelta(seconds=10),
        0,
    )
    assert worker.run_once() == 0
    clock.advance(10)
    assert worker.run_once() == 1


def test_worker_thread_stops_in_order(store: SqlStore) -> None:
    ran = threading.Event()

    def handler(job: Job) -> datetime | None:
        ran.set()
        return None

    registry = Registry()
    registry.register("alert", handler)
    store.enqueue(JobSpec("alert", "a", {}))
    thread = WorkerThread(Worker(store, registry, JobConfig(poll_interval_s=0.05)))
    thread.start()
    assert ran.wait(10)
    thread.stop()
    assert store.jobs()[0].state is JobState.DONE


def _commits(store: SqlStore) -> list[int]:
    """Counts the store's commits from now on."""
    count = [0]

    def commit(conn: object) -> None:
        count[0] += 1

    event.listen(store.engine, "commit", commit)
    return count


def test_a_transactional_batch_commits_once_and_undoes_only_the_failing_job(
    store: SqlStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "TX_BUDGET_S", 3600.0)  # however slow this machine is now
    for n in range(3):
        add_host(store, f"h{n}")
    locked: list[str] = []

    def locks(job: Job) -> list[str]:
        locked.append(job.dedup_key)
        return [str(job.payload["host_id"])]

    def mark(tx: Tx, job: Job) -> None:
        tx.update_host(str(job.payload["host_id"]), {"hostname": f"marked-{job.dedup_key}"})
        if job.payload.get("fail"):
            raise ConnectionError("half done")

    registry = Registry()
    registry.register_tx("mark", mark, locks=locks)
    for n in range(3):
        store.enqueue(JobSpec("mark", f"m{n}", {"host_id": f"h{n}", "fail": n == 1}))
    commits = _commits(store)
    with capture_logs() as logs:
        assert Worker(store, registry, JobConfig(), name="w1").run_once() == 3
    # the claim, then the batch handled and ended together (SQLite) or each job in a
    # transaction of its own (PostgreSQL: row locks)
    assert commits[0] == (4 if store.row_locks else 2)
    assert [h.hostname for h in (store.host(f"h{n}") for n in range(3))] == [  # type: ignore[union-attr]
        "marked-m0",
        "h1",  # undone
        "marked-m2",
    ]
    assert {j.dedup_key: j.state for j in store.jobs()} == {
        "m0": JobState.DONE,
        "m1": JobState.PENDING,
        "m2": JobState.DONE,
    }
    assert [e["error"] for e in logs if e["event"] == "job_failed"] == [
        "ConnectionError: half done"
    ]
    assert sorted(locked) == ["m0", "m1", "m2"]  # every job's hosts, read up front


def test_transactional_jobs_past_the_budget_let_the_write_lock_go(
    sqlite_store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: a batch's transaction is committed after the job that takes it past
    ``TX_BUDGET_S``, so the reports waiting for the one write lock get a turn between jobs.
    With no budget at all, each job commits alone."""
    store = sqlite_store
    monkeypatch.setattr(jobs, "TX_BUDGET_S", 0.0)
    registry = Registry()
    registry.register_tx("quick", lambda tx, job: None, locks=lambda job: [])
    for n in range(3):
        store.enqueue(JobSpec("quick", f"q{n}", {}))
    commits = _commits(store)
    assert Worker(store, registry, JobConfig(), name="w1").run_once() == 3
    assert commits[0] == 1 + 3  # the claim, then one commit per job
    assert {j.state for j in store.jobs()} == {JobState.DONE}


def test_a_batch_of_calls_out_records_its_ends_in_one_transaction(
    store: SqlStore, clock: Clock
) -> None:
    registry = Registry()
    registry.register("call", lambda job: None)
    for n in range(5):
        store.enqueue(JobSpec("call", f"c{n}", {}))
    commits = _commits(store)
    assert Worker(store, registry, JobConfig(), name="w1").run_once() == 5
    assert commits[0] == 2  # the claim, then the five ends together
    assert {j.state for j in store.jobs()} == {JobState.DONE}


def test_a_job_whose_locks_cannot_be_read_fails_alone(store: SqlStore, clock: Clock) -> None:
    add_host(store, "h0")
    registry = Registry()
    registry.register_tx(
        "mark", lambda tx, job: None, locks=lambda job: [str(job.payload["host_id"])]
    )
    store.enqueue(JobSpec("mark", "good", {"host_id": "h0"}))
    store.enqueue(JobSpec("mark", "bad", {}))  # no host_id: its locks raise KeyError
    with capture_logs() as logs:
        assert Worker(store, registry, JobConfig(), name="w1").run_once() == 2
    assert {j.dedup_key: j.state for j in store.jobs()} == {
        "good": JobState.DONE,
        "bad": JobState.PENDING,  # retried later, buried after max_attempts
    }
    [failed] = [e for e in logs if e["event"] == "job_failed"]
    assert failed["error"] == "KeyError: 'host_id'" and failed["attempts"] == 1


def test_a_stopping_worker_records_what_it_ran_and_leaves_the_rest(
    store: SqlStore, clock: Clock
) -> None:
    stop = threading.Event()
    ran: list[str] = []

    def deliver(job: Job) -> None:
        ran.append(job.dedup_key)
        if len(ran) == 2:
            stop.set()

    registry = Registry()
    registry.register("call", deliver)
    for n in range(5):
        store.enqueue(JobSpec("call", f"c{n}", {}))
    Worker(store, registry, JobConfig(), name="w1").run_once(stop)
    assert ran == ["c0", "c1"]
    assert [j.state for j in store.jobs()] == [JobState.DONE] * 2 + [JobState.RUNNING] * 3


def test_a_transactional_handler_shares_its_kind_with_no_other(store: SqlStore) -> None:
    registry = Registry()
    registry.register("alert", lambda job: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_tx("alert", lambda tx, job: None)


# --- the silence sweep -------------------------------------------------------------------

VERDICTS = VerdictConfig(heartbeat_interval_s=30, silent_after_intervals=3, fleet_silent_percent=50)


def test_a_quiet_host_goes_silent_and_comes_back(store: SqlStore, clock: Clock) -> None:
    for n in range(6):
        add_host(store, f"h{n}")
    clock.advance(60)
    with store.transaction() as tx:  # the others keep reporting
        for n in range(1, 6):
            tx.update_host(f"h{n}", {"last_seen_at": tx.now})
    clock.advance(31)
    result = silence.sweep(store, VERDICTS)
    assert result.silenced == ["h0"]
    host = store.host("h0")
    assert host is not None and (host.state, host.resume_state) == (
        HostState.SILENT,
        HostState.CLEAN,
    )
    assert [j.payload["severity"] for j in store.jobs(kind="alert")] == ["warning"]
    assert silence.sweep(store, VERDICTS).silenced == []


def test_many_hosts_silent_at_once_is_a_fleet_event(store: SqlStore, clock: Clock) -> None:
    for n in range(10):
        add_host(store, f"h{n}")
    clock.advance(91)
    result = silence.sweep(store, VERDICTS)
    assert (result.silenced, result.fleet_silent) == ([], 10)
    assert store.state_counts() == {"clean": 10}
    [event] = store.fleet_events(open_only=True)
    assert event.kind == "collector_or_network" and event.detail["silent_hosts"] == 10
    [alert] = store.jobs(kind="alert")
    assert alert.payload["scope"] == "fleet" and alert.payload["action"] == "firing"
    silence.sweep(store, VERDICTS)
    assert len(store.jobs(kind="alert")) == 1  # paged once
    with store.transaction() as tx:
        for n in range(10):
            tx.update_host(f"h{n}", {"last_seen_at": tx.now})
    silence.sweep(store, VERDICTS)
    assert store.fleet_events(open_only=True) == []
    assert [j.payload["action"] for j in store.jobs(kind="alert")] == ["firing", "resolve"]


def test_sweep_runs_as_a_job(store: SqlStore, clock: Clock) -> None:
    add_host(store, "h0")
    registry = Registry()
    registry.register(silence.SWEEP, silence.handler(store, VERDICTS))
    silence.schedule(store)
    silence.schedule(store)  # another replica: still one sweep job
    assert len(store.jobs(kind=silence.SWEEP)) == 1
    clock.advance(91)
    assert Worker(store, registry, JobConfig()).run_once() == 1
    assert store.host("h0").state is HostState.SILENT  # type: ignore[union-attr]
    [job] = store.jobs(kind=silence.SWEEP)
    assert job.next_attempt_at == clock.now + timedelta(seconds=VERDICTS.sweep_interval_s)
