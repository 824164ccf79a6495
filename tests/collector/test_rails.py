"""The safety rails over dozens of simulated hosts: real signed envelopes through ingest, the
real job worker, a real command action that records each replacement. Budget, storm breaker,
dry-run, image quarantine, holds — and exactly one open replacement per host."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.errors import StoreError
from collector.model import HostState, JobState, Role
from collector.response import incidents, ledger, rails
from collector.response.records import HoldKind, ReplacementState, Scope
from collector.store import SqlStore
from tests.collector.apptest import assert_error
from tests.collector.clock import Clock
from tests.collector.fleet import Fleet, recording_action, replaced_by

S = ReplacementState
RECHECK_S = 30
VERIFY_S = 300


def settings(out: Path, **pool: Any) -> dict[str, Any]:
    return {
        "action": [recording_action(out)],
        "pool": [{"name": "web", "action": "recorder", **pool}],
        "response": {
            "recheck_interval_s": RECHECK_S,
            "verify_after_s": VERIFY_S,
            "gone_after_s": 120,
        },
    }


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "replaced"


@pytest.fixture
def make_fleet(store: SqlStore, out: Path) -> Iterator[Callable[..., Fleet]]:
    """Build a fleet whose pool ``web`` replaces through the recording action."""
    made: list[Fleet] = []

    def make(**pool: Any) -> Fleet:
        made.append(Fleet(store, settings(out, **pool)))
        return made[-1]

    yield make
    for fleet in made:
        fleet.close()


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:02d}" for i in range(n)]


def states(fleet: Fleet, hosts: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for host_id in hosts:
        state = fleet.host(host_id).state.value
        counts[state] = counts.get(state, 0) + 1
    return counts


def test_budget_limits_replacements_in_flight_and_frees_as_hosts_go(
    make_fleet: Callable[..., Fleet], clock: Clock, out: Path, store: SqlStore
) -> None:
    fleet = make_fleet(budget=5, budget_percent=10, desired_capacity=30)
    hosts = ids("web", 30)
    fleet.enroll(*hosts)
    drifted = hosts[:10]
    for n, host_id in enumerate(drifted):
        fleet.drift(host_id, f"/etc/cron.d/job{n}")  # ten different ways: no storm
    fleet.run()
    # 10% of 30 is 3, less than the absolute 5: three replacements in flight, seven held
    assert sum(replaced_by(out).values()) == 3
    assert states(fleet, drifted) == {"replacing": 3, "drifted": 7}
    blocked = fleet.replacements(state="blocked")
    assert len(blocked) == 7
    assert {r.blocked_by for r in blocked} == {"budget"}
    assert {r.blocked_reason for r in blocked} == {"budget: 3 of 3 replacements in flight"}
    assert len([d for d in fleet.decisions() if d.decision == "blocked"]) == 7

    rounds = 0
    while sum(replaced_by(out).values()) < 10 or fleet.replacements(state="verifying"):
        rounds += 1
        assert rounds < 10, fleet.replacements()
        gone = [h for h in drifted if fleet.host(h).state is HostState.REPLACING]
        alive = [h for h in hosts if h not in gone]
        clock.advance(VERIFY_S)
        fleet.heartbeat(*alive)  # the replaced hosts stopped reporting
        fleet.run()
        in_flight = len(fleet.replacements(state="verifying"))
        assert in_flight <= 3
    assert replaced_by(out) == {h: 1 for h in drifted}  # each host exactly once
    assert states(fleet, drifted) == {"replaced": 10}
    assert states(fleet, hosts[10:]) == {"clean": 20}
    with ledger.transaction(store) as tx:
        assert all(not incidents.firing_incidents(tx, h) for h in drifted)  # alerts resolved


def test_a_storm_names_its_first_hosts_and_counts_every_host_once(
    make_fleet: Callable[..., Fleet],
    clock: Clock,
    store: SqlStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each folded alert writes the storm's hold and its page: the lists stop growing at
    # LISTED_HOSTS, so a storm of thousands costs each alert the same, and the count goes on.
    monkeypatch.setattr(rails, "LISTED_HOSTS", 7)
    fleet = make_fleet(budget=10, storm_hosts=5, storm_window_s=600)
    stormy = ids("web", 12)
    fleet.enroll(*stormy)
    for host_id in stormy:
        clock.advance(20)
        fleet.drift(host_id, "/usr/bin/sudo", "/etc/sudoers")
    fleet.run()
    [storm] = fleet.holds()
    assert storm.detail["hosts"] == stormy[:7] and storm.detail["host_count"] == 12
    with ledger.transaction(store) as tx:
        pool_page = incidents.incident(tx, "driftwarden/web/*/drift_storm")
        assert pool_page is not None
        assert pool_page.alert["details"]["hosts"] == stormy[:7]
        assert pool_page.alert["details"]["host_count"] == 12
        # folding a host again (an alert run twice) counts nothing, named or not
        [held] = ledger.open_holds(tx, Scope.POOL, "web")
        assert rails.fold(tx, held, stormy[3]) is None  # tripped it
        assert rails.fold(tx, held, stormy[10]) is None  # folded, past the list
        assert rails.fold(tx, held, "web-new") == {**held.detail, "host_count": 13}
        # folding from a look at the hold taken before another fold (another worker's) counts
        # both: the hold is read again, locked
        assert rails.fold(tx, held, "web-newer") == {**held.detail, "host_count": 14}


def test_one_open_replacement_per_host_is_a_database_constraint(store: SqlStore) -> None:
    with ledger.transaction(store) as tx:
        ledger.insert_replacement(tx, host_id="h1", pool="web", action="a", cause="drift")
    with pytest.raises(StoreError, match=r"(?i)unique"), ledger.transaction(store) as tx:
        ledger.insert_replacement(tx, host_id="h1", pool="web", action="a", cause="drift")
    with ledger.transaction(store) as tx:
        row = ledger.open_replacement(tx, "h1")
        assert row is not None
        ledger.update_replacement(tx, row.replacement_id, state=S.DONE)
        ledger.insert_replacement(tx, host_id="h1", pool="web", action="a", cause="drift")


def test_storm_breaker_pauses_the_pool_and_pages_once(
    make_fleet: Callable[..., Fleet], clock: Clock, out: Path, store: SqlStore
) -> None:
    fleet = make_fleet(budget=10, storm_hosts=5, storm_window_s=600)
    hosts = ids("web", 30)
    fleet.enroll(*hosts)
    stormy = hosts[:12]
    for host_id in stormy:
        clock.advance(20)
        fleet.drift(host_id, "/usr/bin/sudo", "/etc/sudoers")  # the same way, within T
    fleet.run()
    assert replaced_by(out) == {}  # paused before any replacement
    [storm] = fleet.holds()
    assert (storm.scope, storm.target, storm.kind) == (Scope.POOL, "web", HoldKind.STORM)
    assert sorted(storm.detail["hosts"]) == stormy and storm.detail["host_count"] == 12
    blocked = fleet.replacements(state="blocked")
    assert {r.blocked_by for r in blocked} == {"storm"} and len(blocked) == 12
    with ledger.transaction(store) as tx:
        pages = [i for h in stormy for i in incidents.firing_incidents(tx, h)]
        pool_page = incidents.incident(tx, "driftwarden/web/*/drift_storm")
    assert len(pages) == 4  # the hosts before the fifth paged on their own …
    assert pool_page is not None and pool_page.status == "firing"  # … then one page
    assert sorted(pool_page.alert["details"]["hosts"]) == stormy
    assert pool_page.alert["details"]["host_count"] == 12
    grouped = [d.host_id for d in fleet.decisions() if d.decision == "alert_grouped"]
    assert sorted(grouped) == stormy[4:]
    assert [d.decision for d in fleet.decisions(pool="web")].count("storm_tripped") == 1
    with fleet.client() as client:  # the rails on /metrics, read from the store
        metrics = client.get("/metrics", headers=fleet.token(Role.VIEWER, "grafana")).text
    assert 'driftwarden_holds_open{kind="storm",scope="pool"} 1.0' in metrics
    assert 'driftwarden_replacements_open{pool="web",state="blocked"} 12.0' in metrics
    assert 'driftwarden_incidents_firing{cause="drift"} 4.0' in metrics  # the four host pages
    assert f'driftwarden_incidents_firing{{cause="{pool_page.cause}"}} 1.0' in metrics
    assert 'driftwarden_rail_decisions_total{decision="storm_tripped"} 1.0' in metrics

    # a different drift in the paused pool still pages on its own, and still waits
    fleet.drift(hosts[20], "/etc/hosts")
    fleet.run()
    with ledger.transaction(store) as tx:
        assert len(incidents.firing_incidents(tx, hosts[20])) == 1
    assert fleet.replacement(hosts[20]).blocked_by == "storm"

    # only an operator resumes it
    clock.advance(3600)
    fleet.run()
    assert replaced_by(out) == {}
    with fleet.client() as client:
        operator = fleet.token(Role.OPERATOR, "oncall")
        released = client.post(
            "/v1/pools/web/release", json={"reason": "bad deploy rolled back"}, headers=operator
        )
        assert released.status_code == 200, released.text
        assert [h["kind"] for h in released.json()["released"]] == ["storm"]
    fleet.run()
    assert sum(replaced_by(out).values()) == 10  # the budget, now
    with ledger.transaction(store) as tx:
        resolved = incidents.incident(tx, "driftwarden/web/*/drift_storm")
    assert resolved is not None and resolved.status == "resolved"
    # within the cooldown, the same drift does not trip it again
    for host_id in hosts[21:27]:
        fleet.drift(host_id, "/usr/bin/sudo", "/etc/sudoers")
    fleet.run()
    assert not [h for h in fleet.holds() if h.kind is HoldKind.STORM]
    release = [d for d in fleet.decisions(pool="web") if d.decision == "release"]
    assert release[0].actor.endswith(":oncall") and release[0].reason == "bad deploy rolled back"


def test_dry_run_records_would_replace_and_touches_nothing(
    make_fleet: Callable[..., Fleet], clock: Clock, out: Path, store: SqlStore
) -> None:
    fleet = make_fleet(budget=2, dry_run=True)
    hosts = ids("web", 24)
    fleet.enroll(*hosts)
    for n, host_id in enumerate(hosts[:12]):
        fleet.drift(host_id, f"/opt/app/lib{n}.so")
    fleet.run()
    assert not out.exists()  # the command never ran
    rows = fleet.replacements()
    assert [r.state for r in rows] == [S.WOULD_REPLACE] * 12
    assert all(r.outcome["status"] == "would_replace" for r in rows)
    decisions = [d.decision for d in fleet.decisions()]
    assert decisions.count("would_replace") == 12
    assert states(fleet, hosts[:12]) == {"drifted": 12}  # nothing moved
    assert store.jobs(kind="replace_verify") == []


def test_fresh_replacements_drifting_again_quarantine_their_image(
    make_fleet: Callable[..., Fleet], clock: Clock, out: Path, store: SqlStore
) -> None:
    fleet = make_fleet(budget=10, quarantine_hosts=3, quarantine_window_s=1800)
    old = ids("old", 20)
    fleet.enroll(*old, build_id="img-1")
    clock.advance(7200)  # the old hosts are not fresh
    for n, host_id in enumerate(old[:4]):
        fleet.drift(host_id, f"/srv/www/page{n}.html")
    fleet.run()
    assert sum(replaced_by(out).values()) == 4
    clock.advance(120)
    new = ids("new", 4)
    fleet.enroll(*new, build_id="img-2")  # their replacements, from the new image
    clock.advance(60)
    for n, host_id in enumerate(new[:3]):
        fleet.drift(host_id, f"/usr/lib/x86_64-linux-gnu/libc{n}.so")  # and they drift again
    fleet.run()
    [quarantine] = [h for h in fleet.holds() if h.kind is HoldKind.QUARANTINE]
    assert (quarantine.scope, quarantine.target) == (Scope.IMAGE, "img-2")
    assert sorted(quarantine.detail["hosts"]) == new[:3]
    with ledger.transaction(store) as tx:
        page = incidents.incident(tx, "driftwarden/web/*/image_quarantined")
    assert page is not None and page.status == "firing"
    # replacing with img-2 stops: the fresh hosts and any other host of the pool wait
    fleet.drift(old[10], "/etc/motd")
    fleet.run()
    assert sum(replaced_by(out).values()) == 4
    waiting = fleet.replacements(state="blocked")
    assert {r.host_id for r in waiting} == {*new[:3], old[10]}
    assert {r.blocked_by for r in waiting} == {"quarantine"}
    assert "img-2" in (waiting[0].blocked_reason or "")
    with fleet.client() as client:
        operator = fleet.token(Role.OPERATOR, "oncall")
        answer = client.post(
            "/v1/images/img-2/release", json={"reason": "img-3 is out"}, headers=operator
        )
        assert answer.status_code == 200, answer.text
    fleet.run()
    assert sum(replaced_by(out).values()) == 8


def test_operator_holds_a_host_and_a_pool(
    make_fleet: Callable[..., Fleet], clock: Clock, out: Path, store: SqlStore
) -> None:
    fleet = make_fleet(budget=20)
    hosts = ids("web", 24)
    fleet.enroll(*hosts)
    with fleet.client() as client:
        operator = fleet.token(Role.OPERATOR, "alice")
        viewer = fleet.token(Role.VIEWER, "bob")
        held = client.post(
            f"/v1/hosts/{hosts[0]}/hold", json={"reason": "forensics"}, headers=operator
        )
        assert held.status_code == 201, held.text
        assert_error(
            client.post(f"/v1/hosts/{hosts[0]}/hold", json={"reason": "again"}, headers=operator),
            409,
            "already_held",
        )
        for n, host_id in enumerate(hosts[:3]):
            fleet.drift(host_id, f"/root/.ssh/authorized_keys{n}")
        fleet.run()
        assert replaced_by(out) == {hosts[1]: 1, hosts[2]: 1}
        view = client.get(f"/v1/hosts/{hosts[0]}", headers=viewer).json()
        assert view["state"] == "drifted"
        assert view["replacement"]["state"] == "blocked"
        assert view["replacement"]["blocked_by"] == "hold"
        assert "forensics" in view["replacement"]["blocked_reason"]
        assert view["holds"][0]["actor"].endswith(":alice")

        assert (
            client.post(
                "/v1/pools/web/hold", json={"reason": "deploy freeze"}, headers=operator
            ).status_code
            == 201
        )
        for n, host_id in enumerate(hosts[3:15]):
            fleet.drift(host_id, f"/etc/ssl/cert{n}.pem")
        fleet.run()
        assert len(replaced_by(out)) == 2
        blocked = client.get("/v1/replacements?state=blocked", headers=viewer).json()
        reasons = {r["host_id"]: r["blocked_reason"] for r in blocked["replacements"]}
        assert len(reasons) == 13 and "deploy freeze" in reasons[hosts[5]]
        pools = client.get("/v1/pools", headers=viewer).json()["pools"]
        assert pools[0]["blocked"] == 13 and pools[0]["holds"][0]["reason"] == "deploy freeze"

        assert (
            client.post(
                "/v1/pools/web/release", json={"reason": "freeze over"}, headers=operator
            ).status_code
            == 200
        )
        fleet.run()
        assert len(replaced_by(out)) == 14  # all but the held host
        assert fleet.replacement(hosts[0]).blocked_by == "hold"
        assert (
            client.post(
                f"/v1/hosts/{hosts[0]}/release", json={"reason": "image taken"}, headers=operator
            ).status_code
            == 200
        )
        fleet.run()
        assert replaced_by(out) == {h: 1 for h in hosts[:15]}
        assert_error(
            client.post(f"/v1/hosts/{hosts[0]}/release", json={"reason": "x"}, headers=operator),
            409,
            "not_held",
        )
        trail = client.get("/v1/decisions?pool=web&limit=1000", headers=viewer).json()
        kinds = [d["decision"] for d in trail["decisions"]]
        assert kinds.count("hold") == 2 and kinds.count("release") == 2


def test_a_pool_without_an_action_is_alerted_not_replaced(
    make_fleet: Callable[..., Fleet], clock: Clock, store: SqlStore
) -> None:
    fleet = make_fleet()
    fleet.enroll("db-1", pool="db")
    fleet.drift("db-1")
    fleet.run()
    assert fleet.replacement("db-1").blocked_by == "no_action"
    with ledger.transaction(store) as tx:
        assert len(incidents.firing_incidents(tx, "db-1")) == 1  # fail open for alerts


def test_a_failed_action_is_paged_and_retried_after_release(
    store: SqlStore, clock: Clock, tmp_path: Path
) -> None:
    failing = {
        "type": "command",
        "name": "broken",
        "argv": ["/bin/sh", "-c", "exit 3"],
    }
    fleet = Fleet(
        store,
        {"action": [failing], "pool": [{"name": "web", "action": "broken", "budget": 1}]},
    )
    try:
        fleet.enroll("web-1")
        fleet.drift("web-1")
        fleet.run()
        assert fleet.replacement("web-1").state is S.FAILED
        with ledger.transaction(store) as tx:
            causes = {i.cause for i in incidents.firing_incidents(tx, "web-1")}
        assert causes == {"drift", "replacement_failed"}
        with fleet.client() as client:
            operator = fleet.token(Role.OPERATOR, "x")
            answer = client.post(
                "/v1/hosts/web-1/release", json={"reason": "fixed the script"}, headers=operator
            )
            assert answer.status_code == 200 and answer.json()["retried"] is True
        fleet.run()
        failures = [r for r in fleet.replacements() if r.state is S.FAILED]
        assert len(failures) == 2  # tried again, once
        assert [j.state for j in store.jobs(kind="replace")] == [JobState.DONE] * 2
    finally:
        fleet.close()
