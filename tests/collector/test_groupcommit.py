"""Group commit over the real databases (SQLite and PostgreSQL): units waiting together share
one transaction and are answered only after its commit; a refusal or an error stays with its
own unit; two writers (two replicas) locking the same hosts never deadlock."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from structlog.testing import capture_logs

from collector.config import Config
from collector.errors import Refused, StoreError
from collector.groupcommit import GroupCommitter
from collector.ingest import Ingestor
from collector.metrics import Metrics
from collector.store import SqlStore, Tx, open_store
from tests.collector.apptest import make_config
from tests.collector.hosts import SimHost, add_host

WAIT_S = 30


class Gate:
    """A first unit that holds the writer inside its transaction until released, so that the
    units submitted meanwhile wait together and form the next group."""

    def __init__(self, committer: GroupCommitter) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.future = committer.submit(self._hold)
        assert self.entered.wait(WAIT_S), "the writer never started"

    def _hold(self, tx: Tx) -> None:
        self.entered.set()
        assert self.release.wait(WAIT_S)

    def open(self) -> None:
        self.release.set()
        self.future.result(WAIT_S)


@pytest.fixture
def committer(store: SqlStore) -> Iterator[GroupCommitter]:
    writer = GroupCommitter(store)
    try:
        yield writer
    finally:
        writer.close()


def insert(host_id: str, seen: list[Tx] | None = None) -> Callable[[Tx], str]:
    def unit(tx: Tx) -> str:
        if seen is not None:
            seen.append(tx)
        tx.insert_host(host_id, _host_values(tx))
        return host_id

    return unit


def _host_values(tx: Tx) -> dict[str, Any]:
    return {
        "state": "enrolled",
        "state_since": tx.now,
        "state_cause": "test",
        "key_id": "ed25519:0",
        "public_key": b"\x00" * 32,
        "hostname": "h",
        "boot_id": "b",
        "agent_version": "0",
        "enrolled_at": tx.now,
        "envelopes": 0,
        "health": {},
        "facts": {},
    }


def test_waiting_units_share_one_transaction_and_are_answered_after_its_commit(
    store: SqlStore, committer: GroupCommitter
) -> None:
    gate = Gate(committer)
    seen: list[Tx] = []
    visible: dict[str, bool] = {}
    all_answered = threading.Event()

    def committed(done: Future[str]) -> None:  # runs as the answer is given
        visible[done.result()] = store.host(done.result()) is not None
        if len(visible) == 20:
            all_answered.set()

    futures = [committer.submit(insert(f"g-{n}", seen)) for n in range(20)]
    for future in futures:
        future.add_done_callback(committed)
    assert not any(f.done() for f in futures)
    gate.open()
    assert [f.result(WAIT_S) for f in futures] == [f"g-{n}" for n in range(20)]
    assert len(seen) == 20 and len({id(tx) for tx in seen}) == 1, "one transaction"
    assert all_answered.wait(WAIT_S)
    assert visible == {f"g-{n}": True for n in range(20)}, "answered only once committed"


def test_a_writer_thread_with_a_window_gathers_units_that_come_apart(store: SqlStore) -> None:
    """Thread mode with ``window_s`` (the server on PostgreSQL): a unit that comes while the
    group's first one waits out the window joins its transaction; ``close`` ends the wait."""
    writer = GroupCommitter(store, window_s=WAIT_S)
    try:
        seen: list[Tx] = []
        first = writer.submit(insert("w-1", seen))
        second = writer.submit(insert("w-2", seen))
        assert not first.done()  # waiting out the window
        began = time.monotonic()
        writer.close()  # ends the wait: what waits is written at once, not WAIT_S later
        assert time.monotonic() - began < WAIT_S / 2
        assert (first.result(WAIT_S), second.result(WAIT_S)) == ("w-1", "w-2")
        assert len(seen) == 2 and seen[0] is seen[1]  # one transaction for both
    finally:
        writer.close()


def test_a_writer_thread_writes_when_its_window_ends_or_its_group_is_full(
    store: SqlStore,
) -> None:
    """The window ends by itself (a unit that came during it shares the transaction), and a
    full group is written at once, without waiting the window out."""
    writer = GroupCommitter(store, window_s=1.0)
    try:
        seen: list[Tx] = []
        first = writer.submit(insert("e-1", seen))
        assert not first.done()
        later = threading.Timer(0.05, lambda: writer.submit(insert("e-2", seen)))
        later.start()
        assert first.result(WAIT_S) == "e-1"  # no close: the window ran out
        later.join()
        assert len(seen) == 2 and seen[0] is seen[1]
    finally:
        writer.close()
    full = GroupCommitter(store, window_s=WAIT_S, max_group=2)
    try:
        began = time.monotonic()
        futures = [full.submit(insert(f"f-{n}")) for n in range(2)]
        assert [f.result(WAIT_S) for f in futures] == ["f-0", "f-1"]
        assert time.monotonic() - began < WAIT_S / 2  # full: not the window's 30 s
    finally:
        full.close()


def test_a_refusal_is_its_own_and_the_rest_of_the_group_commits(
    store: SqlStore, committer: GroupCommitter
) -> None:
    def refuse(tx: Tx) -> None:
        raise Refused(409, "replay", "refused before writing anything", seq=3)

    gate = Gate(committer)
    first = committer.submit(insert("r-1"))
    refused = committer.submit(refuse)
    last = committer.submit(insert("r-2"))
    gate.open()
    assert (first.result(WAIT_S), last.result(WAIT_S)) == ("r-1", "r-2")
    with pytest.raises(Refused) as caught:
        refused.result(WAIT_S)
    assert (caught.value.status, caught.value.code, caught.value.details) == (
        409,
        "replay",
        {"seq": 3},
    )
    assert store.host("r-1") is not None and store.host("r-2") is not None


def test_an_error_splits_the_group_and_fails_only_the_unit_that_causes_it(
    store: SqlStore, committer: GroupCommitter
) -> None:
    add_host(store, "taken")
    gate = Gate(committer)
    with capture_logs() as logs:
        good = committer.submit(insert("e-1"))
        bad = committer.submit(insert("taken"))  # the primary key is taken: the database refuses
        other = committer.submit(insert("e-2"))
        gate.open()
        assert (good.result(WAIT_S), other.result(WAIT_S)) == ("e-1", "e-2")
        with pytest.raises(StoreError):
            bad.result(WAIT_S)
    assert [e["units"] for e in logs if e["event"] == "group_commit_split"] == [3]
    assert store.host("e-1") is not None and store.host("e-2") is not None


def test_close_writes_what_waits_then_refuses_more(store: SqlStore) -> None:
    committer = GroupCommitter(store)
    gate = Gate(committer)
    futures = [committer.submit(insert(f"c-{n}")) for n in range(5)]
    closing = threading.Thread(target=committer.close)
    closing.start()
    gate.open()
    closing.join(WAIT_S)
    assert not closing.is_alive()
    assert [f.result(0) for f in futures] == [f"c-{n}" for n in range(5)]
    with pytest.raises(StoreError, match="shutting down"):
        committer.submit(insert("late"))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.postgres
def test_two_writers_locking_the_same_hosts_in_opposite_orders_never_deadlock(
    store: SqlStore, db_url: str
) -> None:
    names = [f"d-{n:02d}" for n in range(12)]
    for name in names:
        add_host(store, name)
    other = open_store(db_url, pool_size=2, migrate=False)
    writers = [GroupCommitter(store), GroupCommitter(other)]

    def touch(host_id: str) -> Callable[[Tx], None]:
        def unit(tx: Tx) -> None:
            host = tx.lock_host(host_id)
            assert host is not None
            tx.update_host(host_id, {"envelopes": host.envelopes + 1})

        return unit

    try:
        with capture_logs() as logs:
            gates = [Gate(writer) for writer in writers]
            futures = [
                writer.submit(touch(h), locks=(h,))
                for writer, order in zip(writers, (names, names[::-1]), strict=True)
                for h in order
            ]
            for gate in gates:  # both groups start together
                gate.release.set()
            for future in futures:
                future.result(WAIT_S)
        assert not [e for e in logs if e["event"] == "group_commit_split"], "a deadlock"
        counts = {h: store.host(h).envelopes for h in names}  # type: ignore[union-attr]
        assert counts == dict.fromkeys(names, 2)
    finally:
        for writer in writers:
            writer.close()
        other.close()


# --- ingest through the group writer -------------------------------------------------------


@pytest.fixture
def ingestor(store: SqlStore) -> Iterator[Ingestor]:
    config: Config = make_config()
    ingest = Ingestor(store, config, Metrics(store))
    try:
        yield ingest
    finally:
        ingest.close()


def test_batches_of_one_host_in_one_group_keep_the_chain(
    store: SqlStore, ingestor: Ingestor, enroll_token: str
) -> None:
    host = SimHost()
    ingestor.enroll(host.enrollment(enroll_token))
    first = host.batch(host.agent_start(), host.heartbeat())
    second = host.batch(host.heartbeat(), host.heartbeat())
    again = host.batch(second["envelopes"][1], host.heartbeat())
    replay = host.batch(host.envelope("heartbeat", {"health": {"forged": True}}, seq=2))
    gate = Gate(ingestor.committer)
    futures = [ingestor.submit_reports(b) for b in (first, second, replay, again)]
    gate.open()
    statuses = [[a["status"] for a in f.result(WAIT_S)["acks"]] for f in (futures[0], futures[1])]
    assert statuses == [["accepted", "accepted"], ["accepted", "accepted"]]
    with pytest.raises(Refused) as caught:
        futures[2].result(WAIT_S)
    assert (caught.value.code, caught.value.details["last_seq"]) == ("replay", 4)
    assert [a["status"] for a in futures[3].result(WAIT_S)["acks"]] == ["duplicate", "accepted"]
    stored = store.host(host.host_id)
    assert stored is not None and stored.envelopes == 5
    assert sorted(r.seq for r in store.reports(host.host_id)) == [1, 2, 3, 4, 5]


def test_many_hosts_reporting_at_once_are_all_stored(
    store: SqlStore, ingestor: Ingestor, enroll_token: str
) -> None:
    hosts = [SimHost(f"many-{n}") for n in range(24)]
    enrolled = [ingestor.submit_enroll(h.enrollment(enroll_token)) for h in hosts]
    assert {f.result(WAIT_S).status for f in enrolled} == {201}
    batches = [h.batch(h.agent_start(), h.boot(), h.heartbeat()) for h in hosts]
    answers: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda b=b: answers.append(ingestor.reports(b))) for b in batches
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert len(answers) == len(hosts)
    for host in hosts:
        stored = store.host(host.host_id)
        assert stored is not None and stored.envelopes == 3 and stored.state.value == "clean"


# --- on the event loop (the server) ------------------------------------------------------------


def test_on_the_loop_units_submitted_together_share_one_commit(store: SqlStore) -> None:
    seen: list[Tx] = []

    async def main() -> list[str]:
        committer = GroupCommitter(store, loop=asyncio.get_running_loop())
        try:
            futures = [committer.submit(insert(f"l-{n}", seen)) for n in range(20)]
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        finally:
            committer.close()

    assert asyncio.run(main()) == [f"l-{n}" for n in range(20)]
    assert len({id(tx) for tx in seen}) == 1, "one transaction"
    assert all(store.host(f"l-{n}") is not None for n in range(20))


def test_on_the_loop_a_write_lock_held_elsewhere_never_blocks_the_loop(
    sqlite_store: SqlStore,
) -> None:
    """Another process holds SQLite's write lock (its flock): the units wait, the event loop
    goes on serving, and they are written as soon as the lock is let go."""
    lock_path = sqlite_store.engine.url.database + "-writer"  # type: ignore[operator]
    other = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    ticks = 0

    async def main() -> str:
        nonlocal ticks
        committer = GroupCommitter(sqlite_store, loop=asyncio.get_running_loop())
        try:
            future = asyncio.wrap_future(committer.submit(insert("busy-1")))
            while ticks < 50:  # the loop turns while the unit waits for the lock
                await asyncio.sleep(0.001)
                ticks += 1
            assert not future.done(), "written while another process held the write lock"
            fcntl.flock(other, fcntl.LOCK_UN)
            return await asyncio.wait_for(future, WAIT_S)
        finally:
            committer.close()

    fcntl.flock(other, fcntl.LOCK_EX)
    # were the loop to wait for the lock, this lets it go after a while: the test then fails
    # (the unit is written before the loop turned) rather than hangs
    watchdog = threading.Timer(10, fcntl.flock, (other, fcntl.LOCK_UN))
    watchdog.start()
    try:
        assert asyncio.run(main()) == "busy-1"
    finally:
        watchdog.cancel()
        os.close(other)
    assert ticks == 50
    assert sqlite_store.host("busy-1") is not None


def test_on_the_loop_close_refuses_what_waits_on_a_lock_held_elsewhere_and_leaks_no_lock(
    sqlite_store: SqlStore,
) -> None:
    """Shutting down while another process holds the write lock for longer than ``close``
    waits: what waits is refused (503: agents send it again), ``close`` returns, and the
    write lock is let go once the other process is done (nothing is left holding it)."""
    lock_path = sqlite_store.engine.url.database + "-writer"  # type: ignore[operator]
    other = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)
    released = threading.Event()

    def release() -> None:
        fcntl.flock(other, fcntl.LOCK_UN)
        released.set()

    releaser = threading.Timer(3, release)
    releaser.start()
    committer: GroupCommitter | None = None

    async def main() -> BaseException | None:
        nonlocal committer
        committer = GroupCommitter(sqlite_store, loop=asyncio.get_running_loop())
        future = committer.submit(insert("late-1"))
        await asyncio.sleep(0.5)  # the group's window passes; its turn is asked for
        committer.close(timeout_s=0.2)
        assert future.done(), "close returned with a unit unanswered"
        return future.exception()

    try:
        error = asyncio.run(main())
        assert not released.is_set(), "close waited for the other process"
        assert isinstance(error, StoreError)
        assert released.wait(WAIT_S)
        assert committer is not None and committer._turn_waiter is not None
        committer._turn_waiter.join(WAIT_S)
        assert not committer._turn_waiter.is_alive()
        assert sqlite_store.try_lock_writer(), "the write lock was left held"
        sqlite_store.unlock_writer()
        assert sqlite_store.host("late-1") is None
    finally:
        releaser.cancel()
        os.close(other)


def test_wait_idle_says_whether_reports_wait_to_be_written(sqlite_store: SqlStore) -> None:
    """What a job worker asks before each batch: False while a unit waits for the write lock
    (held here by another process), True once it is written."""
    lock_path = sqlite_store.engine.url.database + "-writer"  # type: ignore[operator]
    other = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    committer = GroupCommitter(sqlite_store)
    try:
        assert committer.wait_idle(0)  # nothing submitted
        fcntl.flock(other, fcntl.LOCK_EX)
        future = committer.submit(insert("idle-1"))
        assert not committer.wait_idle(0.2)
        assert not future.done()
        fcntl.flock(other, fcntl.LOCK_UN)
        assert committer.wait_idle(WAIT_S)
        assert future.result(WAIT_S) == "idle-1"
    finally:
        committer.close()
        os.close(other)
