"""The running agent's watching parts, built from the boot check and run beside the main loop.

From the boot check's baseline and policy: one ``Judge``, the ``Rescanner`` (metadata passes,
rolling re-hash), the realtime ``Guard`` (fanotify or inotify) and the ``PackageWatch``.
They start in that order once the boot check is reported and stop in the reverse order. The
package watch runs even without a baseline (against the package set read at its start, judged
by the built-in policy); the file guard and rescans need a baseline.

The agent's own files inside the root (the state directory with its spool, the manifest) are
excluded from the policy the judge uses: the agent's own writes are never reported, and never
watched, so reporting a change cannot cause another.

Findings leave the workers' threads through ``Outbox.emit``: a lock-free queue append and a
wake-up of the main loop, which drains the queue and writes to the spool (an fsync that must
not hold up a watch thread).
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog

from agent.bootcheck import BootCheck
from agent.compare import Finding
from agent.config import AgentConfig
from agent.guard import Guard, GuardConfig
from agent.judge import Judge
from agent.pkgwatch import PackageWatch, PackageWatchConfig
from agent.policy import parse_policy
from agent.rescan import RescanConfig, Rescanner
from agent.worker import Worker, integrity_finding

STOP_TIMEOUT_S: Final = 5.0
REHASH_FILE: Final = "rehash.json"  # where the rolling re-hash keeps its place
BUILT_IN_POLICY: Final = parse_policy({"policy": {"name": "built-in"}}, source="<built-in>")

log = structlog.get_logger(__name__)


class Outbox:
    """Where the workers' ``emit`` puts findings; the main loop takes them (``drain``).

    ``wake`` is called after each put (the loop's sleep ends at once). Thread-safe and
    non-blocking for the emitting side."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._queue: queue.SimpleQueue[tuple[str, list[dict[str, Any]]]] = queue.SimpleQueue()
        self._wake = wake

    def emit(self, source: str, findings: list[dict[str, Any]]) -> None:
        if findings:
            self._queue.put((source, findings))
            self._wake()

    def drain(self) -> list[tuple[str, list[dict[str, Any]]]]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out


@dataclass(frozen=True)
class WatchHealth:
    """The watching parts' share of the heartbeat (``docs/protocol.md``)."""

    watch_backend: str  # fanotify, inotify, polling (rescans only), none (no realtime guard)
    overflows: int
    last_rescan: str | None
    last_full_rehash: str | None


class Watchers:
    """The judge and the workers for one run of the daemon (see the module's docstring)."""

    def __init__(
        self, config: AgentConfig, check: BootCheck, outbox: Outbox, *, first_boot: bool
    ) -> None:
        self.config = config
        self.first_boot = first_boot
        self.outbox = outbox
        self.judge: Judge | None = None
        self.rescanner: Rescanner | None = None
        self.guard: Guard | None = None
        self.packages: PackageWatch | None = None
        self._started: list[Worker] = []
        self._build(check)

    def _build(self, check: BootCheck) -> None:
        config, emit = self.config, self.outbox.emit
        result = check.result
        if result is not None and check.policy is not None:
            policy = check.policy.excluding(result.own)
            self.judge = Judge(
                config.agent.root,
                result.baseline.compact(),  # the loaded one is freed after the boot check
                policy,
                first_boot=self.first_boot,
            )
            _seed(self.judge, result.findings)
            rescan = config.rescan
            self.rescanner = Rescanner(
                self.judge,
                emit,
                config=RescanConfig(
                    metadata_interval_s=rescan.metadata_interval_s,
                    fallback_interval_s=rescan.fallback_interval_s,
                    full_rehash_period_s=rescan.full_rehash_period_s,
                    io_budget_mb_s=rescan.io_budget_mb_s,
                    nice=rescan.nice,
                ),
                place_file=config.agent.state_dir / REHASH_FILE,
                baseline=_judged_by(check),
            )
            guard = config.guard
            if guard.backend != "none":
                self.guard = Guard(
                    self.judge,
                    emit,
                    self.rescanner,
                    config=GuardConfig(backend=guard.backend, coalesce_s=guard.coalesce_s),
                )
        if config.packages.watch:
            self.packages = PackageWatch(
                config.agent.root,
                emit,
                check.policy or BUILT_IN_POLICY,
                initial=result.packages if result is not None else None,
                config=PackageWatchConfig(
                    settle_s=config.packages.settle_s, retry_s=config.packages.retry_s
                ),
            )

    @property
    def workers(self) -> list[Worker]:
        """In start order."""
        return [w for w in (self.rescanner, self.guard, self.packages) if w is not None]

    def start(self) -> None:
        """Start every worker; one that cannot start is reported and the others go on."""
        for worker in self.workers:
            try:
                worker.start()
            except Exception as exc:
                log.exception("worker_start_failed", worker=worker.name)
                detail = f"{type(exc).__name__}: {exc}"
                self.outbox.emit(
                    "integrity",
                    [integrity_finding(f"{worker.name}_failed", detail, severity="critical")],
                )
                continue
            self._started.append(worker)
        log.info(
            "watchers_started",
            workers=[w.name for w in self._started],
            watch_backend=self.health().watch_backend,
        )

    def stop(self) -> None:
        """Stop what was started, in the reverse order. Idempotent."""
        started, self._started = self._started, []
        for worker in reversed(started):
            worker.stop(STOP_TIMEOUT_S)

    def health(self) -> WatchHealth:
        if self.guard is not None:
            guard = self.guard.health()
            return WatchHealth(
                guard.backend, guard.overflows, guard.last_rescan, guard.last_full_rehash
            )
        rescanner = self.rescanner
        if rescanner is not None:
            return WatchHealth("none", 0, rescanner.last_rescan, rescanner.last_full_rehash)
        return WatchHealth("none", 0, None, None)


def _judged_by(check: BootCheck) -> str:
    """What the rolling re-hash runs over: the manifest's root and the policy's digest (a
    place saved for another image or policy is not resumed)."""
    baseline = check.body["baseline"] if check.body is not None else {}
    override = baseline.get("policy_override") or {}
    return (
        f"{baseline.get('root', '')} {override.get('digest') or baseline.get('policy_digest', '')}"
    )


def _seed(judge: Judge, findings: list[Any]) -> None:
    """Tell the judge what the boot check reported, so it is not reported again."""
    for finding in findings:
        if isinstance(finding, Finding):
            judge.check_entry(finding.path, finding.after)
