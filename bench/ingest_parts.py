"""Where a report's CPU goes, part by part: ``python3 bench/ingest_parts.py``.

The fleet-scale run (``bench/ingest.py``) measures what agents see, but its burst p99 varies by
tens of percent between runs of the same code on a shared two-core machine: too much to tell a
change of a tenth apart. This measures the parts of a report's path alone, each on an otherwise
idle process, repeated and interleaved, so that a change to one of them shows:

- **http**: uvicorn (with httptools and uvloop, as the collector serves) answering a trivial
  ASGI application, a new connection per request as agents make them, at a fixed rate; the
  server's CPU per request, and the load generator's (``bench/ingest_http.py``);
- **parse and verify**: decoding, checking and verifying one drift report's batch
  (``Ingestor._parse`` and ``_signed_by``), per report;
- **group commit** (SQLite): one group of drift reports, and one of heartbeats, from different
  hosts, through the store's group transaction (``SqliteGroupTx``: rows through the driver) and
  through the SQLAlchemy path it replaced (``GroupTx``), interleaved; the median of each.

It runs on the interpreter the packages run on (``bench.interpreter``), like ``ingest.py``,
unless ``--python current``; it prints a table and writes JSON to ``bench/out/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import uvloop

from bench import interpreter
from bench.ingest_http import Client, HttpError
from bench.ingest_load import SimHost
from collector import auth, logs
from collector.config import load
from collector.groupcommit import GroupCommitter, _Unit
from collector.ingest import Ingestor
from collector.metrics import Metrics
from collector.serve import settle_heap
from collector.store import SqlStore, open_store
from collector.store.tx import GroupTx
from tests.collector.servers import free_port

REPO: Final = Path(__file__).resolve().parents[1]
OUT: Final = REPO / "bench" / "out"
GROUP: Final = 200
TRIVIAL_APP: Final = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = b'{"acks":[{"seq":1,"status":"accepted"}],"last_seq":1,"last_digest":"00"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
"""


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def http(rate: float, seconds: float, workdir: Path) -> dict[str, float]:
    """uvicorn alone: CPU per request of the server and of the generator."""
    (workdir / "trivial_app.py").write_text(TRIVIAL_APP)
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "--app-dir", str(workdir), "trivial_app:app"),
            *("--port", str(port), "--loop", "uvloop", "--http", "httptools"),
            *("--log-level", "warning", "--no-access-log"),
        ]
    )
    try:
        client = Client(f"http://127.0.0.1:{port}")
        body = json.dumps({"host_id": "h", "envelopes": [{"pad": "x" * 600}]}).encode()
        uvloop.run(_until_up(client))
        before, mine = _cpu_s(server.pid), time.process_time()
        count = uvloop.run(_load(client, body, rate, seconds))
        used, generator = _cpu_s(server.pid) - before, time.process_time() - mine
    finally:
        server.terminate()
        server.wait(30)
    return {"server_ms": 1000 * used / count, "generator_ms": 1000 * generator / count}


async def _until_up(client: Client) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await client.request("GET", "/")
            return
        except HttpError:  # not listening yet
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


async def _load(client: Client, body: bytes, rate: float, seconds: float) -> int:
    count = int(rate * seconds)
    started = time.perf_counter()
    tasks = []
    for n in range(count):
        wait = started + n / rate - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(client.request("POST", "/v1/reports", body)))
    answers = await asyncio.gather(*tasks)
    if any(a.status != 200 for a in answers):
        raise RuntimeError("the trivial application refused a request")
    return count


class Fleet:
    """A SQLite store with ``count`` hosts enrolled and booted clean, and an ingestor on it."""

    def __init__(self, workdir: Path, count: int) -> None:
        config_path = workdir / "collector.toml"
        config_path.write_text("[images]\nrequire_registered = false\n")
        self.store: SqlStore = open_store(f"sqlite:///{workdir / 'parts.db'}", pool_size=2)
        self.ingest = Ingestor(self.store, load(config_path), Metrics(self.store))
        token = auth.create_enroll_token(self.store, note="bench")[0]
        self.hosts = [SimHost(1, n) for n in range(count)]
        for host in self.hosts:
            self.ingest.enroll(json.loads(host.enrollment(token)))
        for host in self.hosts:
            self.ingest.reports(json.loads(host.batch([host.boot()])))

    def units(self, kind: str, hosts: list[SimHost]) -> list[_Unit[Any]]:
        """A group's units: each host's next ``kind`` report, parsed and verified."""
        units: list[_Unit[Any]] = []
        for host in hosts:
            host_id, batch = self.ingest._parse(json.loads(host.batch([getattr(host, kind)()])))
            key_id = self.ingest._signed_by(host_id, batch)
            apply = partial(self.ingest._ingest, host_id=host_id, key_id=key_id, batch=batch)
            units.append(_Unit(apply, (host_id,)))
        return units

    def close(self) -> None:
        self.ingest.close()
        self.store.close()


def parse_and_verify(fleet: Fleet) -> float:
    """CPU ms per drift report to decode, check and verify its batch (signed by copies of
    the fleet's hosts, whose chains the group commits go on with)."""
    copies = [SimHost(1, h.index) for h in fleet.hosts]
    raw = [h.batch([h.finding()]) for h in copies]
    began = time.process_time()
    for body in raw:
        fleet.ingest._signed_by(*fleet.ingest._parse(json.loads(body)))
    return 1000 * (time.process_time() - began) / len(raw)


def group_commits(fleet: Fleet, rounds: int) -> dict[str, dict[str, float]]:
    """Median wall ms of a group of ``GROUP`` reports per path and kind, interleaved; every
    drift group is of hosts that were clean (their first drift, with its jobs)."""
    paths = {"driver": type(fleet.store).group_tx, "sqlalchemy": GroupTx}
    fresh = [fleet.hosts[n : n + GROUP] for n in range(0, len(fleet.hosts) - GROUP + 1, GROUP)]
    if len(fresh) < 2 * rounds:
        raise ValueError(f"{len(fleet.hosts)} hosts make fewer than {2 * rounds} drift groups")
    pick = random.Random(1)
    committer = GroupCommitter(fleet.store)
    times: dict[tuple[str, str], list[float]] = {}
    original = type(fleet.store).group_tx
    try:
        for n in range(rounds):
            for path in sorted(paths, reverse=bool(n % 2)):
                type(fleet.store).group_tx = paths[path]
                for kind in ("finding", "heartbeat"):
                    if kind == "finding":
                        hosts = fresh.pop()
                    else:
                        start = pick.randrange(len(fleet.hosts) - GROUP)
                        hosts = fleet.hosts[start : start + GROUP]
                    units = fleet.units(kind, hosts)
                    began = time.perf_counter()
                    committer._commit(units)
                    took = time.perf_counter() - began
                    failed = [u.future.exception() for u in units if u.future.exception()]
                    if failed:
                        raise RuntimeError(f"a unit failed: {failed[0]!r}")
                    times.setdefault((path, kind), []).append(1000 * took)
    finally:
        type(fleet.store).group_tx = original
        committer.close()
    out: dict[str, dict[str, float]] = {}
    for (path, kind), values in times.items():
        out.setdefault(path, {})[kind] = statistics.median(values)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="groups per path and kind")
    parser.add_argument("--rate", type=float, default=1000.0, help="HTTP requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="of HTTP load")
    interpreter.python_option(parser)
    args = parser.parse_args(argv)
    if args.python == "packaged":
        interpreter.run_packaged(REPO, Path(__file__).resolve(), sys.argv[1:])
    logs.configure("bench", level="warning")
    with tempfile.TemporaryDirectory(prefix="dw-parts-") as tmp:
        workdir = Path(tmp)
        result: dict[str, Any] = {
            "interpreter": interpreter.describe(sys.executable),
            "http": http(args.rate, args.seconds, workdir),
        }
        fleet = Fleet(workdir, GROUP * (2 * args.rounds + 1))
        try:
            settle_heap()  # as a serving process does
            result["parse_and_verify_ms"] = parse_and_verify(fleet)
            result["group_ms"] = group_commits(fleet, args.rounds)
        finally:
            fleet.close()
    print(_table(result))
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    (OUT / f"ingest-parts-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _table(result: dict[str, Any]) -> str:
    http_, groups = result["http"], result["group_ms"]
    rows = [
        f"interpreter: {result['interpreter']}",
        "| part | figure |",
        "| --- | ---: |",
        f"| uvicorn alone, server CPU per request | {http_['server_ms']:.3f} ms |",
        f"| load generator CPU per request | {http_['generator_ms']:.3f} ms |",
        f"| parse and verify, CPU per drift report | {result['parse_and_verify_ms']:.3f} ms |",
    ]
    for path in sorted(groups):
        for kind, ms in sorted(groups[path].items()):
            rows.append(f"| group of {GROUP} {kind} reports, {path}, median | {ms:.1f} ms |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
