"""The store suite: one set of tests, run against SQLite (a temporary file) and the real
PostgreSQL server (a database made for this session)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from agent import wire
from collector import auth, transitions
from collector.errors import ConfigError, StoreError
from collector.model import HostState, Image, JobSpec, JobState, Role
from collector.store import SqlStore, migrate, open_store
from collector.store.schema import metadata
from collector.verdicts import Observation, Signal
from tests.collector.clock import T0, Clock
from tests.collector.hosts import add_host


def test_schema_is_migrated_and_matches_the_model(store: SqlStore, db_url: str) -> None:
    current, head = store.schema_revision()
    assert current == head
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    again = open_store(db_url)  # upgrading an up-to-date database changes nothing
    try:
        assert again.schema_revision() == (head, head)
    finally:
        again.close()


def test_a_database_of_an_older_schema_is_upgraded_in_place_keeping_its_rows(
    store: SqlStore, db_url: str, clock: Clock
) -> None:
    """A collector started on a database an older release made upgrades it where it stands:
    every revision after the first, applied to a database that holds a fleet."""
    add_host(store, "h1", state=HostState.DRIFTED)
    with store.transaction() as tx:
        tx.enqueue(JobSpec("alert", "firing:h1:drift", {"host_id": "h1"}))
    token, _ = auth.create_enroll_token(store, note="rack 4")
    with store.engine.begin() as conn:
        command.downgrade(migrate.alembic_config(conn), "0001")
    old = open_store(db_url, migrate=False)
    try:
        assert old.schema_revision()[0] == "0001"
    finally:
        old.close()
    upgraded = open_store(db_url)
    try:
        current, head = upgraded.schema_revision()
        assert current == head != "0001"
        with upgraded.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        host = upgraded.host("h1")
        assert host is not None
        assert (host.state, host.key_id, host.pool, host.enrolled_at) == (
            HostState.DRIFTED,
            "ed25519:0",
            "web",
            T0,
        )
        assert host.rekey_allowed_by is None and host.refused_key_id is None  # added by 0003
        assert [j.dedup_key for j in upgraded.jobs()] == ["firing:h1:drift"]
        with upgraded.transaction() as tx:
            live = tx.live_enroll_token(auth.token_hash(token))
        assert live is not None and live.note == "rack 4" and live.pool is None
    finally:
        upgraded.close()


def test_sqlite_is_durable_in_wal_mode(sqlite_store: SqlStore) -> None:
    """Readers beside the one writer (WAL), and a commit is on disk before it is answered."""
    with sqlite_store.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_unknown_scheme_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown database URL scheme 'mysql'.*sqlite:///"):
        open_store("mysql://localhost/x")
    with pytest.raises(ConfigError, match="must be a file"):
        open_store("sqlite://")
    with pytest.raises(ConfigError, match="not a database URL"):
        open_store("::")


def test_a_failed_transaction_leaves_nothing(store: SqlStore) -> None:
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.enqueue(JobSpec("alert", "k", {}))
        raise RuntimeError("boom")
    assert store.jobs() == []


def test_timestamps_are_utc_aware(store: SqlStore, clock: Clock) -> None:
    add_host(store, "h1")
    host = store.host("h1")
    assert host is not None and host.enrolled_at == T0 and host.enrolled_at.tzinfo is not None


def test_transition_and_its_jobs_commit_together(store: SqlStore, clock: Clock) -> None:
    add_host(store, "h1")
    with pytest.raises(RuntimeError), store.transaction() as tx:
        host = tx.lock_host("h1")
        assert host is not None
        transitions.apply(tx, host, Observation(Signal.DRIFT, "drift", {"seq": 1}))
        raise RuntimeError("crash before commit")
    assert store.host("h1").state is HostState.CLEAN  # type: ignore[union-attr]
    assert store.jobs() == [] and store.transitions("h1") == []
    with store.transaction() as tx:
        host = tx.lock_host("h1")
        assert host is not None
        transitions.apply(tx, host, Observation(Signal.DRIFT, "drift", {"seq": 1}), actor="t")
    [trail] = store.transitions("h1")
    assert (trail.from_state, trail.to_state, trail.cause, trail.actor, trail.at) == (
        HostState.CLEAN,
        HostState.DRIFTED,
        "drift",
        "t",
        T0,
    )
    assert {j.kind for j in store.jobs()} == {"alert", "replace"}


def test_chain_tip_and_stored_digests(store: SqlStore) -> None:
    add_host(store, "h1")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    env = wire.make_envelope(
        key, host_id="h1", boot_id="b", seq=1, prev="", kind="heartbeat", body={"health": {}}
    )
    with store.transaction() as tx:
        tx.add_key("h1", "ed25519:0", b"\x00" * 32)
        tx.add_envelope("h1", "ed25519:0", env)
        tx.set_tip("h1", "ed25519:0", wire.ChainState(1, env.digest))
    with store.transaction() as tx:
        assert tx.key_tip("h1", "ed25519:0") == wire.ChainState(1, env.digest)
        assert tx.key_tip("h1", "other") is None
        assert tx.stored_digest("h1", "ed25519:0", 1) == env.digest
        assert tx.stored_digest("h1", "ed25519:0", 2) is None
    with pytest.raises(StoreError), store.transaction() as tx:  # stored once, by primary key
        tx.add_envelope("h1", "ed25519:0", env)


def test_open_jobs_are_unique_per_dedup_key(store: SqlStore) -> None:
    assert store.enqueue(JobSpec("alert", "h1:drift", {"n": 1}))
    assert not store.enqueue(JobSpec("alert", "h1:drift", {"n": 2}))
    assert store.enqueue(JobSpec("replace", "h1:drift", {}))  # another kind
    [job] = store.claim("alert", "w1", limit=10)
    assert not store.enqueue(JobSpec("alert", "h1:drift", {}))  # running is still open
    assert store.complete(job.job_id, "w1")
    assert store.enqueue(JobSpec("alert", "h1:drift", {"n": 3}))  # a new incident
    assert [j.payload["n"] for j in store.jobs(kind="alert")] == [1, 3]


def test_claim_lease_expiry_and_failure(store: SqlStore, clock: Clock) -> None:
    store.enqueue(JobSpec("alert", "a", {}))
    store.enqueue(JobSpec("alert", "b", {}, run_at=T0 + timedelta(seconds=60)))
    [job] = store.claim("alert", "w1", limit=10, lease_s=30)
    assert (job.dedup_key, job.state, job.attempts, job.claimed_by) == (
        "a",
        JobState.RUNNING,
        1,
        "w1",
    )
    assert store.claim("alert", "w2", limit=10, lease_s=30) == []
    clock.advance(31)  # w1 was killed: its lease runs out
    [again] = store.claim("alert", "w2", limit=1, lease_s=30)
    assert (again.job_id, again.attempts, again.claimed_by) == (job.job_id, 2, "w2")
    assert not store.complete(job.job_id, "w1")  # the old holder cannot finish it
    assert store.fail(again.job_id, "w2", "503", retry_at=clock.now + timedelta(seconds=100))
    clock.advance(30)
    assert [j.dedup_key for j in store.claim("alert", "w2", limit=10, lease_s=300)] == ["b"]
    clock.advance(71)
    [retried] = store.claim("alert", "w3", limit=10)
    assert retried.last_error == "503" and retried.attempts == 3
    assert store.fail(retried.job_id, "w3", "gave up", retry_at=None)
    assert store.jobs(state="dead")[0].job_id == retried.job_id
    assert store.job_counts()[("alert", "dead")] == 1


def test_concurrent_claims_take_each_job_once(store: SqlStore) -> None:
    for n in range(60):
        store.enqueue(JobSpec("alert", f"k{n}", {}))
    taken: dict[str, list[int]] = {}
    barrier = threading.Barrier(4)

    def work(name: str) -> None:
        barrier.wait()
        mine = taken.setdefault(name, [])
        while batch := store.claim("alert", name, limit=3):
            mine.extend(j.job_id for j in batch)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [job_id for ids in taken.values() for job_id in ids]
    assert len(every) == 60 and len(set(every)) == 60


def test_tokens_store_only_hashes(store: SqlStore, clock: Clock) -> None:
    secret, record = auth.create_api_token(store, Role.OPERATOR, "alice")
    assert secret.startswith("dwt_") and secret not in repr(record)
    assert store.api_token(auth.token_hash(secret)) == record
    assert store.api_token(secret) is None
    assert store.revoke_api_token(record.token_id)
    assert not store.revoke_api_token(record.token_id)
    assert store.api_token(auth.token_hash(secret)) is None
    enroll, _ = auth.create_enroll_token(store, uses=2, expires_in_s=60)
    with store.transaction() as tx:
        assert tx.use_enroll_token(auth.token_hash(enroll))
    clock.advance(61)
    with store.transaction() as tx:
        assert not tx.use_enroll_token(auth.token_hash(enroll))  # expired
    twice, _ = auth.create_enroll_token(store, uses=2)
    with store.transaction() as tx:
        assert [tx.use_enroll_token(auth.token_hash(twice)) for _ in range(3)] == [
            True,
            True,
            False,
        ]
    assert [t.uses for t in store.enroll_tokens()] == [1, 2]


def test_images_are_registered_once(store: SqlStore) -> None:
    first = Image("b1", "aa" * 32, "ed25519:1", "sha256:0", "2024", T0, {"x": 1})
    assert store.put_image(first).root == "aa" * 32
    other = Image("b1", "bb" * 32, "ed25519:1", "sha256:0", "2024", T0, {})
    assert store.put_image(other).root == "aa" * 32
    assert [i.build_id for i in store.images()] == ["b1"]


def test_host_queries(store: SqlStore) -> None:
    add_host(store, "h1")
    add_host(store, "h2", state=HostState.DRIFTED)
    assert [h.host_id for h in store.hosts(state=HostState.DRIFTED)] == ["h2"]
    assert [h.host_id for h in store.hosts(image="img-1")] == ["h1", "h2"]
    assert store.state_counts() == {"clean": 1, "drifted": 1}
    assert sorted(store.group_counts()) == [
        ("web", "img-1", "clean", 1),
        ("web", "img-1", "drifted", 1),
    ]
    with store.transaction() as tx:
        stale = tx.stale_hosts(tx.now + timedelta(seconds=1), [HostState.CLEAN])
        assert [h.host_id for h in stale] == ["h1"]
        assert tx.count_hosts([HostState.CLEAN, HostState.DRIFTED]) == 2
        assert tx.open_fleet_event("collector_or_network", {"n": 1})
        assert not tx.open_fleet_event("collector_or_network", {"n": 2})
    assert [e.detail for e in store.fleet_events(open_only=True)] == [{"n": 1}]
    with store.transaction() as tx:
        assert tx.close_fleet_event("collector_or_network")
    assert store.fleet_events(open_only=True) == []
