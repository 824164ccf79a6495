"""The HTTP API: the authorisation matrix (every route, without a token and with each role), the one
error envelope on every error response, and the SRE routes."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route
from structlog.testing import capture_logs

from collector.api import create_app
from collector.config import Config, ImageConfig, ServerConfig
from collector.errors import StoreError
from collector.model import HostState, Role
from collector.store import SqlStore, open_store
from collector.store.schema import hosts
from tests.collector.apptest import (
    AGENT,
    PUBLIC,
    ROUTES,
    assert_error,
    bearer,
    make_config,
    statement,
)
from tests.collector.hosts import SimHost, file_drift

READ_WAIT_S = 10.0
BODIES: dict[str, dict[str, Any]] = {
    "/v1/tokens": {"role": "viewer", "name": "matrix"},
    "/v1/enroll-tokens": {"note": "matrix", "uses": 1},
    "/v1/images": {"statement": {}},
    "/v1/hosts/{host_id}/breakglass": {"reason": "matrix", "user": "sre"},
}


@pytest.fixture
def pipeline_key(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "pipeline.pub"
    path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return key, path


@pytest.fixture
def config(pipeline_key: tuple[Ed25519PrivateKey, Path]) -> Config:
    return make_config(pipeline_public_keys=(str(pipeline_key[1]),))


@pytest.fixture
def enrolled(client: TestClient, enroll_token: str) -> SimHost:
    sim = SimHost("web-1")
    assert client.post("/v1/enroll", json=sim.enrollment(enroll_token)).status_code == 201
    batch = sim.batch(sim.agent_start(), sim.boot())
    assert client.post("/v1/reports", json=batch).status_code == 200
    return sim


def app_routes(routes: list[Any]) -> set[tuple[str, str]]:
    """(method, path) of every route, routers included (the SRE router has its prefix)."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, APIRoute | Route):
            found.update((m, route.path) for m in route.methods or () if m != "HEAD")
        elif hasattr(route, "original_router"):
            found |= app_routes(route.original_router.routes)
    return found


def test_every_route_is_in_the_matrix(client: TestClient) -> None:
    assert app_routes(client.app.routes) == set(ROUTES)  # type: ignore[attr-defined]


def test_authorisation_matrix(
    client: TestClient, store: SqlStore, tokens: dict[str, str], enrolled: SimHost
) -> None:
    callers: list[tuple[str, Role | None]] = [("none", None)] + [(r.label, r) for r in Role]
    for (method, template), needs in sorted(ROUTES.items(), key=str):
        for name, role in callers:
            path = template.format(
                host_id=enrolled.host_id, build_id="img-1", token_id=999, pool="web", session_id=999
            )
            headers = bearer(tokens[name]) if role is not None else {}
            body = BODIES.get(template, {"reason": "matrix"}) if method == "POST" else None
            response = client.request(method, path, headers=headers, json=body)
            where = f"{method} {template} as {name}: {response.status_code} {response.text}"
            if needs in (PUBLIC, AGENT):
                assert response.status_code not in (401, 403), where
            elif role is None:
                assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == "Bearer"
            elif isinstance(needs, Role) and role < needs:
                assert_error(response, 403, "forbidden")
            else:
                assert response.status_code not in (401, 403) and response.status_code < 500, where
            if response.status_code >= 400:
                assert_error(response, response.status_code, response.json()["error"]["code"])


def test_metrics_can_be_public(store: SqlStore) -> None:
    config = make_config().replace(server=ServerConfig(workers=False, metrics_public=True))
    with TestClient(create_app(config, store=store)) as client:
        assert client.get("/metrics").status_code == 200
        assert_error(client.get("/v1/hosts"), 401, "unauthorized")


def test_error_envelope_everywhere(client: TestClient, tokens: dict[str, str]) -> None:
    admin = bearer(tokens["admin"])
    assert_error(client.get("/nowhere", headers=admin), 404, "not_found")
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.delete("/healthz"), 405, "method_not_allowed")
    assert_error(client.put("/v1/reports"), 405, "method_not_allowed")
    details = assert_error(
        client.get("/v1/hosts?state=fine", headers=admin), 422, "invalid_request"
    )
    assert details["errors"][0]["loc"] == ["query", "state"]
    assert_error(
        client.post("/v1/tokens", headers=admin, json={"role": "god"}), 422, "invalid_request"
    )
    assert_error(client.post("/v1/tokens", headers=admin, content=b"{"), 422, "invalid_request")
    assert_error(client.get("/v1/hosts/nope", headers=admin), 404, "unknown_host")
    assert_error(client.get("/v1/hosts", headers=bearer("dwt_forged")), 401, "unauthorized")
    assert_error(
        client.get("/v1/hosts", headers={"Authorization": "Basic eDp5"}), 401, "unauthorized"
    )


def test_database_outage_is_503_in_the_envelope(pg_url: str) -> None:
    missing = pg_url.rsplit("/", 1)[0] + "/driftwarden_no_such_database"
    store = open_store(missing, migrate=False)
    try:
        with TestClient(create_app(make_config(), store=store)) as client:
            with capture_logs() as logs:
                answer = client.get("/readyz")
            assert_error(answer, 503, "not_ready")
            # the database's own words (host, port, user, database) only in the log
            assert answer.json()["error"]["message"] == "database unavailable"
            [failed] = [e for e in logs if e["event"] == "readiness_failed"]
            assert "driftwarden_no_such_database" in failed["error"]
            assert client.get("/healthz").status_code == 200
            sim = SimHost()
            assert_error(
                client.post("/v1/reports", json=sim.batch(sim.heartbeat())), 503, "unavailable"
            )
    finally:
        store.close()


def test_health_readiness_openapi_and_page(client: TestClient, tokens: dict[str, str]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["schema"]
    spec = client.get("/openapi.json", headers=bearer(tokens["viewer"])).json()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert documented == set(ROUTES)
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    page = client.get("/")
    assert page.status_code == 200 and "driftwarden" in page.text and "/v1/hosts" in page.text


def test_host_reads(client: TestClient, tokens: dict[str, str], enrolled: SimHost) -> None:
    viewer = bearer(tokens["viewer"])
    client.post("/v1/reports", json=enrolled.batch(enrolled.finding(file_drift("/etc/shadow"))))
    hosts = client.get("/v1/hosts", headers=viewer).json()["hosts"]
    assert [(h["host_id"], h["state"]) for h in hosts] == [("web-1", "drifted")]
    assert client.get("/v1/hosts?state=clean", headers=viewer).json() == {"hosts": []}
    host = client.get("/v1/hosts/web-1", headers=viewer).json()
    assert host["findings"][0]["path"] == "/etc/shadow"
    assert [t["to"] for t in host["transitions"]] == ["drifted", "clean", "enrolled"]
    events = client.get("/v1/hosts/web-1/events?limit=3", headers=viewer).json()["events"]
    assert len(events) == 3 and {e["type"] for e in events} <= {"report", "transition"}
    fleet = client.get("/v1/fleet", headers=viewer).json()
    assert fleet["hosts"] == 1 and fleet["states"]["drifted"] == 1
    assert fleet["pools"] == {"web": {"drifted": 1}}
    assert fleet["jobs"]["alert"] == {"pending": 1}
    assert fleet["images"] == [{"build_id": "img-1", "hosts": 1, "registered": False}]
    metrics = client.get("/metrics", headers=viewer).text
    assert 'driftwarden_hosts{state="drifted"} 1.0' in metrics
    assert 'driftwarden_envelopes_total{kind="finding",status="accepted"} 1.0' in metrics
    assert 'driftwarden_jobs{kind="alert",state="pending"} 1.0' in metrics


def test_operator_actions_are_audited(
    client: TestClient, store: SqlStore, tokens: dict[str, str], enrolled: SimHost
) -> None:
    operator = bearer(tokens["operator"])
    ack = client.post("/v1/hosts/web-1/acknowledge", headers=operator, json={"reason": "seen"})
    assert ack.json() == {"host_id": "web-1", "state": "clean", "acknowledged": True}
    moved = client.post("/v1/hosts/web-1/replace", headers=operator, json={"reason": "old"})
    assert moved.status_code == 200 and moved.json()["state"] == "replacement_requested"
    assert [j.dedup_key for j in store.jobs(kind="replace")] == ["web-1"]
    again = client.post("/v1/hosts/web-1/replace", headers=operator, json={"reason": "again"})
    assert assert_error(again, 409, "invalid_transition") == {"state": "replacement_requested"}
    client.post("/v1/hosts/web-1/retire", headers=operator, json={"reason": "gone"})
    trail = store.transitions("web-1")
    assert [(t.to_state, t.cause) for t in trail[:3]] == [
        (HostState.RETIRED, "operator"),
        (HostState.REPLACEMENT_REQUESTED, "operator"),
        (HostState.CLEAN, "acknowledged"),
    ]
    assert trail[0].actor.endswith(":operator-test") and trail[0].evidence == {"reason": "gone"}
    assert_error(
        client.post("/v1/hosts/web-1/replace", headers=operator, json={}), 422, "invalid_request"
    )


def test_tokens_are_shown_once(client: TestClient, tokens: dict[str, str]) -> None:
    admin = bearer(tokens["admin"])
    made = client.post("/v1/tokens", headers=admin, json={"role": "viewer", "name": "ci"}).json()
    assert made["token"].startswith("dwt_") and made["role"] == "viewer"
    listed = client.get("/v1/tokens", headers=admin).json()["tokens"]
    assert made["token"] not in str(listed) and {t["name"] for t in listed} >= {"ci"}
    assert client.get("/v1/hosts", headers=bearer(made["token"])).status_code == 200
    assert client.delete(f"/v1/tokens/{made['id']}", headers=admin).json()["revoked"]
    assert_error(client.get("/v1/hosts", headers=bearer(made["token"])), 401, "unauthorized")
    assert_error(client.delete(f"/v1/tokens/{made['id']}", headers=admin), 404, "unknown_token")
    enroll = client.post("/v1/enroll-tokens", headers=admin, json={"uses": 1}).json()
    assert enroll["token"].startswith("dwe_") and enroll["uses_left"] == 1
    sim = SimHost()
    assert client.post("/v1/enroll", json=sim.enrollment(enroll["token"])).status_code == 201


def test_image_registration_verifies_the_pipeline_key(
    client: TestClient, tokens: dict[str, str], pipeline_key: tuple[Ed25519PrivateKey, Path]
) -> None:
    operator = bearer(tokens["operator"])
    key = pipeline_key[0]
    signed = statement(key, "img-1", "ab" * 32)
    made = client.post("/v1/images", headers=operator, json={"statement": signed})
    assert made.status_code == 201 and made.json()["root"] == "ab" * 32
    same = client.post("/v1/images", headers=operator, json={"statement": signed})
    assert same.status_code == 201
    other = statement(key, "img-1", "cd" * 32)
    conflict = client.post("/v1/images", headers=operator, json={"statement": other})
    assert assert_error(conflict, 409, "image_conflict") == {"registered_root": "ab" * 32}
    stranger = statement(Ed25519PrivateKey.generate(), "img-2", "ab" * 32)
    refused = client.post("/v1/images", headers=operator, json={"statement": stranger})
    assert_error(refused, 400, "bad_signature")
    assert_error(
        client.post("/v1/images", headers=operator, json={"statement": {"format": "x"}}),
        400,
        "malformed",
    )
    listed = client.get("/v1/images", headers=operator).json()["images"]
    assert [i["build_id"] for i in listed] == ["img-1"]


@pytest.fixture
def cohort_client(store: SqlStore) -> Iterator[TestClient]:
    config = make_config().replace(images=ImageConfig(require_registered=False))
    with TestClient(create_app(config, store=store)) as client:
        yield client


def test_cohort_names_the_odd_host_out(
    cohort_client: TestClient, tokens: dict[str, str], enroll_token: str
) -> None:
    client = cohort_client
    fleet = [SimHost(f"c-{n}") for n in range(5)]
    for sim in fleet:
        client.post("/v1/enroll", json=sim.enrollment(enroll_token))
        client.post("/v1/reports", json=sim.batch(sim.agent_start(), sim.boot()))
    for sim in fleet:  # a change every host shares is not odd
        client.post("/v1/reports", json=sim.batch(sim.finding(file_drift("/etc/motd"))))
    odd = fleet[3]
    client.post("/v1/reports", json=odd.batch(odd.finding(file_drift("/usr/bin/sudo"))))
    other, unmeasured = SimHost("c-5"), SimHost("c-6")  # measured another image; no boot yet
    for sim in (other, unmeasured):
        client.post("/v1/enroll", json=sim.enrollment(enroll_token))
    client.post(
        "/v1/reports", json=other.batch(other.agent_start(), other.boot(measured_root="cd" * 32))
    )
    cohort = client.get("/v1/images/img-1/cohort", headers=bearer(tokens["viewer"])).json()
    assert cohort["hosts"] == 7 and cohort["majority_root"] == "ab" * 32
    assert cohort["odd"] == [
        {
            "host_id": "c-3",
            "state": "drifted",
            "measured_root": "ab" * 32,
            "root_differs": False,
            "paths": ["/usr/bin/sudo"],
        },
        {
            "host_id": "c-5",
            "state": "clean",
            "measured_root": "cd" * 32,
            "root_differs": True,
            "paths": [],
        },
    ]


def test_reads_do_not_wait_for_the_writer(
    client: TestClient, store: SqlStore, tokens: dict[str, str], enrolled: SimHost
) -> None:
    """An SRE's views answer while another process holds the database's write lock (a group
    commit, a job): they read in a transaction of their own, which needs no writer's turn."""
    viewer = bearer(tokens["viewer"])
    client.post("/v1/reports", json=enrolled.batch(enrolled.finding(file_drift("/etc/shadow"))))
    views = ["/v1/hosts/web-1", "/v1/replacements", "/v1/holds", "/v1/decisions", "/v1/pools"]
    # another process's store, in effect: its own connections and its own lock file descriptor
    other = open_store(store.engine.url.render_as_string(hide_password=False), pool_size=1)
    with ThreadPoolExecutor(1) as pool:
        other.lock_writer()
        try:
            with other.engine.connect() as conn, conn.begin():  # the write transaction itself
                conn.execute(hosts.update().values(boot_id="held"))
                reading = pool.submit(lambda: [client.get(p, headers=viewer) for p in views])
                answers = reading.result(timeout=READ_WAIT_S)
        finally:
            other.unlock_writer()
            other.close()
    assert [a.status_code for a in answers] == [200] * len(views)
    assert answers[0].json()["state"] == "drifted"


def test_a_read_transaction_refuses_to_write(store: SqlStore, enrolled: SimHost) -> None:
    """A view's transaction is read-only: a write in it is refused, and the connection, back
    in the pool, writes again for the next write transaction."""
    with pytest.raises(StoreError), store.read_transaction() as tx:
        tx.conn.execute(hosts.update().values(boot_id="written-in-a-read"))
    for _ in range(4):  # every pooled connection, the one used above among them
        with store.transaction() as tx:
            tx.conn.execute(hosts.update().values(boot_id="written"))
    assert {h.boot_id for h in store.hosts()} == {"written"}
