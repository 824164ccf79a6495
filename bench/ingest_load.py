"""The ingest load generator: one process of simulated hosts, driven by ``bench/ingest.py``.

Every simulated host is what an agent looks like to the collector: an Ed25519 key (derived from
the run's seed, so a run is reproducible), enrolled through ``POST /v1/enroll`` with an
enrollment token, and a chain of real signed envelopes (``agent.wire``). Like an agent, a host
has at most one request in flight: what falls due meanwhile waits and goes in its next batch.

The schedule is open-loop: every host heartbeats once per period at its own phase, and the
findings burst (one drift finding per report, each from another host) comes on top at a fixed
rate, whatever the collector's answers. Envelopes are signed before the clock starts so the
generator spends its share of the CPU on sending, not on signing.

A process talks to its orchestrator over a pipe, one phase at a time: enroll, prime (each host
reports a clean boot), sign, then run from a start time the orchestrator gives every process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent import wire
from bench.ingest_http import Client, HttpError

IMAGE: Final = {"build_id": "bench-image-1", "root": "ab" * 32, "cloud_image_id": None}
RETRY_S: Final = 0.5
GRACE_S: Final = 120.0


@dataclass(frozen=True)
class Plan:
    """One run's load, the same for every generator process."""

    seed: int
    hosts: int
    procs: int
    servers: tuple[str, ...]
    duration_s: float
    heartbeat_s: float
    burst_rate: float
    burst_s: float
    burst_at_s: float
    enroll_token: str = field(repr=False)
    viewer_token: str = field(repr=False)
    keep_alive: bool = False
    concurrency: int = 64
    visibility_every: int = 50

    def host_ids(self, proc: int) -> range:
        return range(proc, self.hosts, self.procs)

    def server(self, index: int) -> str:
        return self.servers[index % len(self.servers)]

    def burst(self) -> list[tuple[float, int]]:
        """(time, host index) of every finding of the burst, over the whole fleet."""
        count = round(self.burst_rate * self.burst_s)
        order = random.Random(self.seed).sample(range(self.hosts), min(count, self.hosts))
        return [
            (self.burst_at_s + n / self.burst_rate, order[n % len(order)]) for n in range(count)
        ]


class SimHost:
    """A host's key and chain; ``envelope`` signs the next link."""

    def __init__(self, seed: int, index: int) -> None:
        self.index = index
        self.host_id = f"bench-{index:05d}"
        secret = hashlib.sha256(f"driftwarden-bench:{seed}:{index}".encode()).digest()
        self.key = Ed25519PrivateKey.from_private_bytes(secret)
        self.seq = 0
        self.prev = ""

    def enrollment(self, token: str) -> bytes:
        facts = {
            "hostname": f"{self.host_id}.bench.example",
            "boot_id": "boot-1",
            "agent_version": "bench",
            "pool": f"pool-{self.index % 10}",
            "image": IMAGE,
        }
        raw = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        request = wire.make_enrollment(
            self.key, token=token, host_id=self.host_id, public_key_raw=raw, facts=facts
        )
        return json.dumps(request).encode()

    def envelope(self, kind: str, body: dict[str, Any]) -> bytes:
        env = wire.make_envelope(
            self.key,
            host_id=self.host_id,
            boot_id="boot-1",
            seq=self.seq + 1,
            prev=self.prev,
            kind=kind,
            body=body,
        )
        self.seq, self.prev = env.seq, env.digest
        return json.dumps(env.to_json()).encode()

    def heartbeat(self) -> bytes:
        health = {"watch_backend": "inotify", "overflows": 0, "spool_depth": 0, "rejected": 0}
        return self.envelope("heartbeat", {"health": {**health, "version": "bench"}})

    def boot(self) -> bytes:
        baseline = {
            "build_id": IMAGE["build_id"],
            "root": IMAGE["root"],
            "policy_digest": "sha256:00",
            "key_id": "ed25519:bench",
            "signed": True,
        }
        body = {
            "first_boot": True,
            "baseline": baseline,
            "measured_root": IMAGE["root"],
            "clean": True,
            "findings": [],
            "stats": {},
        }
        return self.envelope("boot", body)

    def finding(self) -> bytes:
        change = {
            "type": "file",
            "drift": True,
            "severity": "critical",
            "path": f"/etc/bench/changed-{self.seq + 1}.conf",
            "change": "content",
        }
        return self.envelope("finding", {"source": "realtime", "findings": [change]})

    def batch(self, envelopes: list[bytes]) -> bytes:
        return b'{"host_id":"%s","envelopes":[%s]}' % (
            self.host_id.encode(),
            b",".join(envelopes),
        )


@dataclass
class Pending:
    body: bytes
    finding: bool
    due: float  # perf_counter time it was scheduled for


@dataclass
class Outcome:
    """What one process saw; the orchestrator merges them."""

    requests: list[tuple[float, float, bool]] = field(default_factory=list)  # at, s, burst
    envelope_s: list[float] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)
    visible_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    acked: list[tuple[str, int]] = field(default_factory=list)
    duplicates: int = 0
    unsent: int = 0
    cpu_s: float = 0.0  # this process's CPU time during the run


class Generator:
    def __init__(self, plan: Plan, proc: int) -> None:
        self.plan = plan
        self.hosts = {i: SimHost(plan.seed, i) for i in plan.host_ids(proc)}
        self.clients = [Client(url, keep_alive=plan.keep_alive) for url in plan.servers]
        self.outcome = Outcome()
        self.outboxes: dict[int, list[Pending]] = {i: [] for i in self.hosts}
        self.busy: set[int] = set()
        self.t0 = 0.0

    def client(self, index: int) -> Client:
        return self.clients[index % len(self.clients)]

    # --- set-up phases -----------------------------------------------------------------------

    async def enroll(self) -> dict[str, Any]:
        async def one(host: SimHost) -> int:
            body = host.enrollment(self.plan.enroll_token)
            answer = await self._insist(host.index, "/v1/enroll", body)
            if answer.status not in (200, 201):
                raise RuntimeError(f"enroll {host.host_id}: {answer.status} {answer.body!r}")
            tip = json.loads(answer.body)
            host.seq, host.prev = tip["last_seq"], tip["last_digest"]
            return answer.status

        statuses = await self._each(one)
        return {"hosts": len(statuses), "statuses": dict(Counter(statuses))}

    async def prime(self) -> dict[str, Any]:
        async def one(host: SimHost) -> int:
            answer = await self._insist(host.index, "/v1/reports", host.batch([host.boot()]))
            if answer.status != 200:
                raise RuntimeError(f"boot {host.host_id}: {answer.status} {answer.body!r}")
            self.outcome.acked.append((host.host_id, host.seq))  # checked in the database too
            return answer.status

        return {"hosts": len(await self._each(one))}

    async def _each(self, work: Any) -> list[Any]:
        gate = asyncio.Semaphore(self.plan.concurrency)

        async def bounded(host: SimHost) -> Any:
            async with gate:
                return await work(host)

        return list(await asyncio.gather(*(bounded(h) for h in self.hosts.values())))

    async def _insist(self, index: int, path: str, body: bytes) -> Any:
        for _ in range(20):
            try:
                answer = await self.client(index).request("POST", path, body)
            except HttpError:
                await asyncio.sleep(RETRY_S)
                continue
            if answer.status < 500:
                return answer
            await asyncio.sleep(RETRY_S)
        raise RuntimeError(f"{path}: the collector kept failing")

    # --- the measured run --------------------------------------------------------------------

    def schedule(self) -> list[tuple[float, int, bytes, bool]]:
        """Every envelope of the run, signed in chain order: (time, host, body, is finding)."""
        plan = self.plan
        due: list[tuple[float, int, str]] = []
        for index in self.hosts:
            phase = random.Random(plan.seed * 1_000_003 + index).uniform(0, plan.heartbeat_s)
            t = phase
            while t < plan.duration_s:
                due.append((t, index, "heartbeat"))
                t += plan.heartbeat_s
        due.extend((t, index, "finding") for t, index in plan.burst() if index in self.hosts)
        due.sort()
        out = []
        for t, index, kind in due:
            host = self.hosts[index]
            body = host.finding() if kind == "finding" else host.heartbeat()
            out.append((t, index, body, kind == "finding"))
        return out

    async def run(self, events: list[tuple[float, int, bytes, bool]], start_at: float) -> Outcome:
        # start_at is wall-clock time shared by every process; the run is timed on perf_counter
        self.t0 = time.perf_counter() + (start_at - time.time())
        cpu_before = time.process_time()
        tasks: set[asyncio.Task[None]] = set()
        for t, index, body, finding in events:
            due = self.t0 + t
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self.outcome.lag_s.append(max(0.0, time.perf_counter() - due))
            self.outboxes[index].append(Pending(body, finding, due))
            if index not in self.busy:
                self.busy.add(index)
                task = asyncio.create_task(self._send(index))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=GRACE_S)
            for task in late:
                task.cancel()
        self.outcome.unsent = sum(len(box) for box in self.outboxes.values())
        self.outcome.cpu_s = time.process_time() - cpu_before
        for client in self.clients:
            client.close()
        return self.outcome

    async def _send(self, index: int) -> None:
        host, box = self.hosts[index], self.outboxes[index]
        try:
            while box:
                batch = box[: wire.MAX_BATCH_ENVELOPES]
                started = time.perf_counter()
                try:
                    answer = await self.client(index).request(
                        "POST", "/v1/reports", host.batch([p.body for p in batch])
                    )
                except HttpError:
                    self.outcome.errors["connection"] += 1
                    await asyncio.sleep(RETRY_S)
                    continue
                done = time.perf_counter()
                burst = self._in_burst(started)
                self.outcome.requests.append((started - self.t0, done - started, burst))
                if answer.status != 200:
                    self.outcome.errors[f"{answer.status} {_code(answer.body)}"] += 1
                    if answer.status >= 500:
                        await asyncio.sleep(RETRY_S)
                        continue
                    del box[: len(batch)]  # refused: an agent sets it aside; counted above
                    continue
                for ack in json.loads(answer.body)["acks"]:
                    self.outcome.acked.append((host.host_id, ack["seq"]))
                    self.outcome.duplicates += ack["status"] == "duplicate"
                self.outcome.envelope_s.extend(done - p.due for p in batch)
                del box[: len(batch)]
                if any(p.finding for p in batch) and index % self.plan.visibility_every == 0:
                    await self._visible(index, started)
        finally:
            self.busy.discard(index)

    def _in_burst(self, started: float) -> bool:
        at = started - self.t0
        return self.plan.burst_at_s <= at < self.plan.burst_at_s + self.plan.burst_s

    async def _visible(self, index: int, started: float) -> None:
        """How long after its report was sent the host reads as drifted through the API."""
        host = self.hosts[index]
        headers = {"Authorization": f"Bearer {self.plan.viewer_token}"}
        for _ in range(100):
            try:
                answer = await self.client(index).request(
                    "GET", f"/v1/hosts/{host.host_id}", headers=headers
                )
            except HttpError:
                self.outcome.errors["connection"] += 1
                await asyncio.sleep(RETRY_S)
                continue
            if answer.status == 200 and json.loads(answer.body)["state"] == "drifted":
                self.outcome.visible_s.append(time.perf_counter() - started)
                return
            await asyncio.sleep(0.01)
        self.outcome.errors["never_visible"] += 1


def _code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


def worker(plan: Plan, proc: int, conn: Connection) -> None:
    """A generator process: answer each phase the orchestrator asks for, in order."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    gen = Generator(plan, proc)
    conn.send(("enrolled", asyncio.run(gen.enroll())))
    if conn.recv() == "prime":
        conn.send(("primed", asyncio.run(gen.prime())))
    events = gen.schedule()
    conn.send(("signed", {"envelopes": len(events)}))
    start_at = conn.recv()
    conn.send(("ran", asyncio.run(gen.run(events, start_at))))
    conn.close()


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max (nearest rank), in the values' unit; empty gives zeros."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": ordered[-1],
        "n": len(ordered),
    }


def merge(outcomes: list[Outcome]) -> Outcome:
    merged = Outcome()
    for o in outcomes:
        merged.requests.extend(o.requests)
        merged.envelope_s.extend(o.envelope_s)
        merged.lag_s.extend(o.lag_s)
        merged.visible_s.extend(o.visible_s)
        merged.errors.update(o.errors)
        merged.acked.extend(o.acked)
        merged.duplicates += o.duplicates
        merged.unsent += o.unsent
        merged.cpu_s += o.cpu_s
    return merged
