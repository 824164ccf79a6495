"""Collector ingest at fleet scale: ``python3 bench/ingest.py [--scenario S] [--quick]``.

Scenarios: ``sqlite-1`` (one collector on a SQLite file) and ``postgres-2`` (two replicas on
two ports sharing one PostgreSQL database on 127.0.0.1:5432; the hosts are spread over both).
Each collector serves with ``--processes N`` worker processes, by default the machine's cores
shared among the scenario's collectors (two replicas on two cores: one each); the collector CPU
counted is its workers' too.
Everything runs on the interpreter driftwarden's packages run on (``bench.interpreter``: a
virtual environment on ``/usr/bin/python3`` with the agent's and the collector's dependencies,
under ``bench/out/``, into which this script starts itself again), unless ``--python current``
says to stay on the one it was started with.
Each run starts the collector(s) as ``python -m collector serve`` processes on a fresh
database, creates an enrollment and a viewer token with the ``driftwarden`` command, and drives
the load from separate generator processes (``bench/ingest_load.py``):

1. enroll every simulated host through the API (in parallel), then let each report a clean boot;
2. the measured run: every host heartbeats once per period at its own phase (open loop), and a
   burst of findings (one drift finding per report, each from another host) comes on top;
3. afterwards every acknowledged envelope is looked up in the database (by SQL).

The figures go to ``docs/performance.md`` between ``<!-- ingest:begin -->`` and
``<!-- ingest:end -->`` (the rest of the file belongs to other benchmarks) and, as JSON, to
``bench/out/``. ``--compare FILE`` sets an earlier JSON beside them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
from sqlalchemy import create_engine, text

from bench import ingest_load, interpreter
from bench.ingest_load import Outcome, Plan, percentiles
from tests.collector.servers import Server

REPO: Final = Path(__file__).resolve().parents[1]
OUT: Final = REPO / "bench" / "out"
DOC: Final = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- ingest:begin -->", "<!-- ingest:end -->"
PG_SERVER: Final = "postgresql+psycopg://postgres@127.0.0.1:5432"
SCENARIOS: Final = {"sqlite-1": ("sqlite", 1), "postgres-2": ("postgresql", 2)}
TARGET_P99_MS: Final = 100.0
TARGET_VISIBLE_MS: Final = 1000.0


@dataclass(frozen=True)
class Settings:
    hosts: int
    duration_s: float
    heartbeat_s: float
    burst_rate: float
    burst_s: float
    procs: int
    seed: int
    keep_alive: bool
    processes: int | None = None  # collector worker processes (None: its default)


@dataclass
class Result:
    scenario: str
    settings: Settings
    commit: str
    started: str
    enroll_s: float = 0.0
    prime_s: float = 0.0
    requests: int = 0
    envelopes_acked: int = 0
    duplicates: int = 0
    unsent: int = 0
    stored: int = 0
    missing: int = 0
    request_ms: dict[str, float] = field(default_factory=dict)
    burst_ms: dict[str, float] = field(default_factory=dict)
    heartbeat_ms: dict[str, float] = field(default_factory=dict)
    envelope_ms: dict[str, float] = field(default_factory=dict)
    visible_ms: dict[str, float] = field(default_factory=dict)
    lag_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    rate_per_s: float = 0.0
    server_cpu_s: float = 0.0
    jobs_cpu_s: float = 0.0  # of which the job process (the one at a lower priority)
    generator_cpu_s: float = 0.0
    other_cpu_s: float = 0.0  # every other process on the machine, during the run
    run_s: float = 0.0
    load_avg: float = 0.0  # 1-minute load average at the end of the run

    @property
    def lost(self) -> int:
        return self.missing + self.unsent

    def met(self) -> bool:
        return self.request_ms.get("p99", 1e9) <= TARGET_P99_MS and self.lost == 0


# --- the collector processes -----------------------------------------------------------------


def _cpu_s(pid: int | None) -> tuple[float, float]:
    """CPU seconds a collector has used so far, its worker processes' too, and of those the
    job process's (it runs niced: ``collector.serve.JOBS_NICE``)."""
    assert pid is not None
    parent = psutil.Process(pid)
    total = jobs = 0.0
    for proc in (parent, *parent.children(recursive=True)):
        times = proc.cpu_times()
        total += times.user + times.system
        if proc.nice() > 0:
            jobs += times.user + times.system
    return total, jobs


def _machine_cpu_s() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def _cli(db_url: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "collector", *args, "--db", db_url, "--json"],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


class Database:
    """A fresh database for one run: a SQLite file, or a PostgreSQL database dropped after."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self.backend = backend
        self.name = "driftwarden_bench_" + secrets.token_hex(4)
        if backend == "sqlite":
            self.url = f"sqlite:///{workdir / 'bench.db'}"
        else:
            self.url = f"{PG_SERVER}/{self.name}"
            self._admin(f'CREATE DATABASE "{self.name}"')

    def _admin(self, sql: str) -> None:
        engine = create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    def stored(self) -> set[tuple[str, int]]:
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT host_id, seq FROM envelopes"))
                return {(str(h), int(s)) for h, s in rows}
        finally:
            engine.dispose()

    def drop(self) -> None:
        if self.backend != "sqlite":
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# --- one scenario ----------------------------------------------------------------------------


def collector_processes(replicas: int) -> int:
    """Worker processes per collector by default: the machine's cores shared among the
    scenario's collectors, as an operator running that many replicas on it would set them."""
    return max(1, len(os.sched_getaffinity(0)) // replicas)


def run_scenario(
    scenario: str, settings: Settings, *, prime: bool = True, label: str = ""
) -> Result:
    backend, replicas = SCENARIOS[scenario]
    workdir = OUT / f"ingest-{scenario}"
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.iterdir():
        if old.is_file():
            old.unlink()
    # the last scenario's files reach the disk now, not under this one's commits: one flush
    # to disk waits for what else the file system has to write (seen: a 0.8 s stall)
    os.sync()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    result = Result(scenario + label, settings, _commit(), started)
    processes = settings.processes or collector_processes(replicas)
    db = Database(backend, workdir)
    collectors: list[Server] = []
    try:
        enroll_token = _cli(db.url, "enroll-token", "create", "--note", "bench")["token"]
        viewer_token = _cli(db.url, "token", "create", "--role", "viewer")["token"]
        for n in range(replicas):
            server = Server(db.url, workdir, name=f"collector-{n}", processes=processes)
            collectors.append(server.start(60))
        plan = Plan(
            seed=settings.seed,
            hosts=settings.hosts,
            procs=settings.procs,
            servers=tuple(c.url for c in collectors),
            duration_s=settings.duration_s,
            heartbeat_s=settings.heartbeat_s,
            burst_rate=settings.burst_rate,
            burst_s=settings.burst_s,
            burst_at_s=max(0.0, settings.duration_s / 2 - settings.burst_s / 2),
            enroll_token=enroll_token,
            viewer_token=viewer_token,
            keep_alive=settings.keep_alive,
        )
        outcome = _drive(plan, collectors, result, prime=prime)
        _summarise(result, outcome, db.stored())
    finally:
        for collector in collectors:
            collector.stop()
        db.drop()
    return result


def _drive(plan: Plan, collectors: list[Server], result: Result, *, prime: bool) -> Outcome:
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for n in range(plan.procs):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=ingest_load.worker, args=(plan, n, child), name=f"load-{n}")
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        began = time.monotonic()
        _gather(pipes, "enrolled")
        result.enroll_s = time.monotonic() - began
        _say(f"enrolled {plan.hosts} hosts in {result.enroll_s:.1f} s")
        began = time.monotonic()
        for pipe in pipes:
            pipe.send("prime" if prime else "skip")
        if prime:
            _gather(pipes, "primed")
            result.prime_s = time.monotonic() - began
            _say(f"{plan.hosts} clean boots reported in {result.prime_s:.1f} s")
        signed = _gather(pipes, "signed")
        _say(f"signed {sum(s['envelopes'] for s in signed)} envelopes; running")
        start_at = time.time() + 1.0
        servers = [c.proc.pid if c.proc else None for c in collectors]
        before = [_cpu_s(pid) for pid in servers]
        machine_before = _machine_cpu_s()
        began = time.monotonic()
        for pipe in pipes:
            pipe.send(start_at)
        outcomes: list[Outcome] = _gather(pipes, "ran", timeout_s=plan.duration_s + 300)
        after = [_cpu_s(pid) for pid in servers]
        machine = _machine_cpu_s() - machine_before
        result.run_s = time.monotonic() - began
        result.server_cpu_s = sum(a[0] for a in after) - sum(b[0] for b in before)
        result.jobs_cpu_s = sum(a[1] for a in after) - sum(b[1] for b in before)
        result.generator_cpu_s = sum(o.cpu_s for o in outcomes)
        result.other_cpu_s = max(0.0, machine - result.server_cpu_s - result.generator_cpu_s)
        result.load_avg = os.getloadavg()[0]
        return ingest_load.merge(outcomes)
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
                proc.join(10)


def _gather(pipes: list[Any], phase: str, timeout_s: float = 3600) -> list[Any]:
    out = []
    for pipe in pipes:
        if not pipe.poll(timeout_s):
            raise TimeoutError(f"a generator process did not finish {phase!r}")
        name, value = pipe.recv()
        if name != phase:
            raise RuntimeError(f"expected {phase!r} from a generator, got {name!r}")
        out.append(value)
    return out


def _summarise(result: Result, outcome: Outcome, stored: set[tuple[str, int]]) -> None:
    ms = 1000.0
    requests_s = [s for _, s, _ in outcome.requests]
    result.requests = len(outcome.requests)
    result.envelopes_acked = len(outcome.acked)
    result.duplicates = outcome.duplicates
    result.unsent = outcome.unsent
    result.stored = len(stored)
    result.missing = len(set(outcome.acked) - stored)
    result.request_ms = _scaled(percentiles(requests_s), ms)
    result.burst_ms = _scaled(percentiles([s for _, s, b in outcome.requests if b]), ms)
    result.heartbeat_ms = _scaled(percentiles([s for _, s, b in outcome.requests if not b]), ms)
    result.envelope_ms = _scaled(percentiles(outcome.envelope_s), ms)
    result.visible_ms = _scaled(percentiles(outcome.visible_s), ms)
    result.lag_ms = _scaled(percentiles(outcome.lag_s), ms)
    result.errors = dict(outcome.errors)
    if outcome.requests:
        span = max(at for at, _, _ in outcome.requests) - min(at for at, _, _ in outcome.requests)
        result.rate_per_s = len(outcome.requests) / span if span > 0 else 0.0


def _scaled(stats: dict[str, float], factor: float) -> dict[str, float]:
    return {k: (v if k == "n" else round(v * factor, 1)) for k, v in stats.items()}


def _commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the report ------------------------------------------------------------------------------


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _lat(stats: dict[str, float]) -> str:
    if not stats.get("n"):
        return "-"
    return f"{stats['p50']:g} / {stats['p95']:g} / {stats['p99']:g} / {stats['max']:g}"


def render(results: list[Result], before: list[dict[str, Any]], command_line: str) -> str:
    s = max((r.settings for r in results), key=lambda settings: settings.burst_rate)
    lines = [
        BEGIN,
        "## Collector ingest",
        "",
        f"Generated by `{command_line}` at commit {results[0].commit} "
        f"({results[0].started}; {os.cpu_count()} x {_cpu_model()}; Python "
        f"{interpreter.describe(sys.executable)}); re-run it rather than editing this section.",
        "",
        f"Load: {s.hosts:,} simulated hosts (real Ed25519 keys, enrolled through the API, real "
        f"signed and chained envelopes) heartbeating every {s.heartbeat_s:g} s at their own "
        f"phase (≈ {s.hosts / s.heartbeat_s:.0f} reports/s), plus a burst of "
        f"{s.burst_rate:g} findings/s for {s.burst_s:g} s (one drift finding per report, each "
        f"from another host) in the middle of a {s.duration_s:g} s open-loop run. "
        "Worker processes per collector (`[server] processes`): "
        + (
            f"{s.processes} (`--processes {s.processes}`)"
            if s.processes
            else "the machine's cores shared among the scenario's collectors ("
            + ", ".join(
                f"{name}: {collector_processes(replicas)}"
                for name, (_, replicas) in SCENARIOS.items()
            )
            + ")"
        )
        + f". {s.procs} generator processes share the machine with the collector; like agents, "
        "each host keeps one request in flight and "
        + (
            "connections are reused."
            if s.keep_alive
            else "opens a new connection per report (the collector's `[server] keep_alive_s` "
            "closes an agent's connection between heartbeats)."
        ),
        "Latency is per request, from the moment it is sent to the end of the answer; an "
        "acknowledgement comes only after the commit (durable: SQLite `synchronous=FULL`, "
        "PostgreSQL `synchronous_commit=on`). *Lost* counts acknowledged envelopes (the clean "
        "boots' too) missing from the database afterwards (by SQL) plus envelopes never "
        "acknowledged. A run *heartbeats only* is the same load without the burst.",
        "",
        "| scenario | requests | req/s | latency ms p50 / p95 / p99 / max | during the burst "
        "| heartbeats only | errors | lost | p99 ≤ 100 ms, none lost |",
        "| --- | ---: | ---: | --- | --- | --- | --- | ---: | --- |",
    ]
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0"
        lines.append(
            f"| {r.scenario} | {r.requests:,} | {r.rate_per_s:.0f} | {_lat(r.request_ms)} "
            f"| {_lat(r.burst_ms)} | {_lat(r.heartbeat_ms)} | {errors} | {r.lost} "
            f"| {'met' if r.met() else '**missed**'} |"
        )
    lines += [
        "",
        "| scenario | enroll (all hosts) | clean boots (all hosts) | acknowledged / stored "
        "| drift visible in the API ms p50 / p99 / max (n) | generator lag ms p99 |",
        "| --- | ---: | ---: | --- | --- | ---: |",
    ]
    for r in results:
        vis = r.visible_ms
        visible = (
            f"{vis['p50']:g} / {vis['p99']:g} / {vis['max']:g} ({vis['n']:.0f})"
            if vis.get("n")
            else "-"
        )
        lines.append(
            f"| {r.scenario} | {r.enroll_s:.1f} s ({s.hosts / max(r.enroll_s, 1e-9):.0f}/s) "
            f"| {r.prime_s:.1f} s ({s.hosts / max(r.prime_s, 1e-9):.0f}/s) "
            f"| {r.envelopes_acked:,} / {r.stored:,} | {visible} | {r.lag_ms.get('p99', 0):g} |"
        )
    lines += [
        "",
        "CPU during the run (the machine's other processes compete for the same two cores; "
        "*cores busy* is their CPU time over the run's wall time):",
        "",
        "| scenario | run s | collector CPU s | of which the job process | collector CPU ms per "
        "request | generators CPU s | other processes, cores busy | load average (1 min) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        per_request = 1000 * r.server_cpu_s / max(r.requests, 1)
        lines.append(
            f"| {r.scenario} | {r.run_s:.0f} | {r.server_cpu_s:.1f} | {r.jobs_cpu_s:.1f} "
            f"| {per_request:.2f} "
            f"| {r.generator_cpu_s:.1f} | {r.other_cpu_s / max(r.run_s, 1e-9):.2f} "
            f"| {r.load_avg:.1f} |"
        )
    if before:
        lines += [
            "",
            "Before (an earlier run, `--compare`):",
            "",
            "| scenario | commit | requests | req/s | latency ms p50 / p95 / p99 / max "
            "| errors | lost | collector CPU ms per request |",
            "| --- | --- | ---: | ---: | --- | --- | ---: | ---: |",
        ]
        for b in before:
            lost = b.get("missing", 0) + b.get("unsent", 0)
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(b["errors"].items())) or "0"
            per_request = 1000 * b["server_cpu_s"] / max(b["requests"], 1)
            lines.append(
                f"| {b['scenario']} | {b['commit']} | {b['requests']:,} | {b['rate_per_s']:.0f} "
                f"| {_lat(b['request_ms'])} | {errors} | {lost} | {per_request:.2f} |"
            )
    lines += [
        "",
        "Drift visible: for a sample of the burst's reports, the time from sending the report to "
        "the API (`GET /v1/hosts/ID`, viewer token) answering `drifted` — the collector's half "
        "of the one-second target (the agent's realtime guard adds its own detection time).",
        END,
    ]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    """Replace the ingest section of docs/performance.md; leave everything else as it is."""
    current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        updated = head + section + tail
    else:
        separator = "" if not current or current.endswith("\n\n") else "\n"
        updated = current + separator + section + "\n"
    DOC.write_text(updated, encoding="utf-8")


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="a small, short run")
    parser.add_argument("--hosts", type=int)
    parser.add_argument("--duration", type=float, help="seconds of measured load (default 60)")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="seconds")
    parser.add_argument("--burst-rate", type=float, help="findings per second (default 1000)")
    parser.add_argument("--burst", type=float, help="seconds of burst (default 10)")
    parser.add_argument("--procs", type=int, default=2, help="generator processes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-alive", action="store_true", help="reuse connections")
    parser.add_argument(
        "--processes",
        type=int,
        help="worker processes per collector (default: the cores shared among the collectors)",
    )
    parser.add_argument("--no-prime", action="store_true", help="skip the clean boot reports")
    parser.add_argument(
        "--steady", action="store_true", help="also run each scenario without the burst"
    )
    parser.add_argument("--compare", type=Path, help="an earlier run's JSON, shown as before")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/")
    interpreter.python_option(parser)
    args = parser.parse_args(argv)
    if args.python == "packaged":
        interpreter.run_packaged(REPO, Path(__file__).resolve(), sys.argv[1:])
    quick = args.quick
    settings = Settings(
        hosts=args.hosts or (1000 if quick else 10_000),
        duration_s=args.duration or (15.0 if quick else 60.0),
        heartbeat_s=args.heartbeat,
        burst_rate=(200.0 if quick else 1000.0) if args.burst_rate is None else args.burst_rate,
        burst_s=(3.0 if quick else 10.0) if args.burst is None else args.burst,
        procs=args.procs,
        seed=args.seed,
        keep_alive=args.keep_alive,
        processes=args.processes,
    )
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = []
    loads = [("", settings)]
    if args.steady:
        loads.append((", heartbeats only", replace(settings, burst_rate=0.0)))
    for scenario in scenarios:
        for suffix, load in loads:
            _say(f"{scenario}{suffix}: {load}")
            result = run_scenario(scenario, load, prime=not args.no_prime, label=suffix)
            results.append(result)
            _say(
                f"{result.scenario}: {result.requests} requests, {result.rate_per_s:.0f}/s, "
                f"latency ms {_lat(result.request_ms)}, burst {_lat(result.burst_ms)}, errors "
                f"{result.errors}, lost {result.lost}, visible {_lat(result.visible_ms)}, lag "
                f"p99 {result.lag_ms.get('p99')} ms"
            )
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    dump = [{**asdict(r), "lost": r.lost} for r in results]
    (OUT / f"ingest-{stamp}.json").write_text(json.dumps(dump, indent=2))
    before = json.loads(args.compare.read_text()) if args.compare else []
    if not args.no_doc:
        command = "python3 bench/ingest.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_doc(render(results, before, command.strip()))
    return 0 if all(r.met() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
