"""A simulated fleet for response tests: real signed envelopes through the real ingest, the
collector's configuration loader, and the real job worker, run pass by pass."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from collector import auth
from collector.api import create_app
from collector.config import Config, ServerConfig, from_mapping
from collector.handlers import default_registry
from collector.ingest import Ingestor
from collector.jobs import Worker
from collector.metrics import Metrics
from collector.model import Host, Role
from collector.response import ledger
from collector.response.records import Decision, Hold, Replacement
from collector.store import SqlStore
from tests.collector.hosts import SimHost, file_drift


def recording_action(path: Path, name: str = "recorder") -> dict[str, Any]:
    """A command action that appends ``HOST REQUEST`` to ``path`` for each real replacement."""
    script = 'echo "$DRIFTWARDEN_HOST_ID $DRIFTWARDEN_REQUEST_ID" >> "$0"'
    return {
        "type": "command",
        "name": name,
        "argv": ["/bin/sh", "-c", script, str(path)],
        "timeout_s": 30,
    }


def replaced_by(path: Path) -> Counter[str]:
    """How many times the recording action was run for each host."""
    if not path.exists():
        return Counter()
    return Counter(line.split()[0] for line in path.read_text().splitlines())


class Fleet:
    def __init__(self, store: SqlStore, settings: dict[str, Any], *, worker: str = "w1") -> None:
        self.store = store
        self.config: Config = from_mapping(
            {"images": {"require_registered": False}, **settings}, source="test.toml"
        )
        self.ingestor = Ingestor(store, self.config, Metrics(store))
        self.registry = default_registry(store, self.config)
        self.worker = Worker(store, self.registry, self.config.jobs, name=worker)
        self.enroll_token = auth.create_enroll_token(store, note="fleet")[0]
        self.hosts: dict[str, SimHost] = {}

    def client(self) -> TestClient:
        """The API on this fleet's store and configuration (its workers are ours to run)."""
        config = self.config.replace(server=ServerConfig(workers=False))
        return TestClient(create_app(config, store=self.store))

    def token(self, role: Role, name: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + auth.create_api_token(self.store, role, name)[0]}

    def close(self) -> None:
        self.config.response.close()

    def enroll(self, *host_ids: str, pool: str = "web", build_id: str = "img-1") -> list[SimHost]:
        out = []
        for host_id in host_ids:
            sim = SimHost(host_id, pool=pool, build_id=build_id)
            self.ingestor.enroll(sim.enrollment(self.enroll_token))
            self.send(sim, sim.agent_start(), sim.boot())
            self.hosts[host_id] = sim
            out.append(sim)
        return out

    def send(self, sim: SimHost, *envelopes: dict[str, Any]) -> dict[str, Any]:
        return self.ingestor.reports(sim.batch(*envelopes))

    def drift(self, host_id: str, *paths: str) -> None:
        sim = self.hosts[host_id]
        self.send(sim, sim.finding(*(file_drift(p) for p in paths or ("/etc/passwd",))))

    def heartbeat(self, *host_ids: str) -> None:
        for host_id in host_ids:
            sim = self.hosts[host_id]
            self.send(sim, sim.heartbeat())

    def run(self, passes: int = 20) -> int:
        """Run the worker until a pass finds nothing due (at most ``passes``)."""
        total = 0
        for _ in range(passes):
            ran = self.worker.run_once()
            total += ran
            if not ran:
                break
        return total

    # --- reads ---------------------------------------------------------------------------

    def host(self, host_id: str) -> Host:
        host = self.store.host(host_id)
        assert host is not None
        return host

    def replacements(self, **filters: Any) -> list[Replacement]:
        with ledger.transaction(self.store) as tx:
            return ledger.list_replacements(tx, **filters)

    def replacement(self, host_id: str) -> Replacement:
        with ledger.transaction(self.store) as tx:
            found = ledger.latest_replacement(tx, host_id)
        assert found is not None, host_id
        return found

    def decisions(self, **filters: Any) -> list[Decision]:
        with ledger.transaction(self.store) as tx:
            return ledger.list_decisions(tx, limit=10_000, **filters)

    def holds(self, *, open_only: bool = True) -> list[Hold]:
        with ledger.transaction(self.store) as tx:
            return ledger.list_holds(tx, open_only=open_only)
