"""The host daemon: ``driftwarden-agent run`` and ``check-config``.

Start: load and validate the configuration, establish the host's identity and key, open the
spool and the chain, start the sender, report ``agent_start``, verify the baked manifest and
run the boot check (first-boot allowances only on this host's first boot), report it, tell
systemd READY, then guard: the watching parts (``agent.watchers``: rescans, the realtime file
guard, the package watch) on their own threads, and on the loop the SSH login source,
heartbeats and watchdog pings. Findings from the watching parts reach the loop through a queue
and are written to the spool here. Signal handlers only record the signal; the loop acts on
it. Shutdown is ordered and idempotent: stop intake (the watching parts in reverse order, the
sources), report what they found and ``agent_stop``, flush the spool (bounded), stop the
sender, record the clean stop.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, Final, Protocol

import structlog

from agent import bootcheck, durable, identity, keys
from agent.config import ENROLL_TOKEN_ENV, AgentConfig, load_config
from agent.errors import (
    EXIT_DRIFT,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNTRUSTED,
    AgentError,
    ConfigError,
    KeyFileError,
    UntrustedError,
    advice,
)
from agent.policy import load_policy
from agent.reporter import Reporter
from agent.sdnotify import Notifier
from agent.sender import ENROLL_FILE, CollectorClient, Enrollment, Sender
from agent.spool import Spool
from agent.watchers import Outbox, Watchers
from agent.worker import integrity_finding

LIFECYCLE_FILE: Final = "lifecycle.json"
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

log = structlog.get_logger(__name__)


def agent_version() -> str:
    try:
        return metadata.version("driftwarden")
    except metadata.PackageNotFoundError:
        return "0+source"


class Source(Protocol):
    """An event source the loop polls (SSH logins, package database, …)."""

    name: str  # the finding envelope's "source"

    def poll(self) -> list[dict[str, Any]]: ...  # wire findings, never blocks

    def stage(self, q: int) -> None: ...  # the last poll's findings go into spool record q

    def commit(self) -> None: ...  # the findings of the last poll are queued durably

    def failures(self) -> list[dict[str, Any]]: ...  # integrity findings, each reported once

    def close(self) -> None: ...


def _staging(source: Source) -> Callable[[int], None]:
    def stage(q: int) -> None:
        try:
            source.stage(q)
        except Exception:  # the positions stay behind: the findings may be repeated
            log.exception("source_stage_failed", source=source.name)

    return stage


class SignalReceiver:
    """Records signals; the loop sleeps on a wake-up socket so a signal ends the sleep."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous: dict[int, Any] = {}
        self._previous_fd = -1

    def install(self) -> None:
        for signum in (*STOP_SIGNALS, signal.SIGHUP):
            self._previous[signum] = signal.signal(signum, self._record)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)

    def wake(self) -> None:
        """End the loop's sleep (from any thread)."""
        with contextlib.suppress(OSError):  # full: a wake-up is pending; closed: stopping
            self._writer.send(b"\0")

    def sleep(self, timeout_s: float) -> None:
        if self.received:
            return
        readable, _, _ = select.select([self._reader], [], [], max(0.0, timeout_s))
        if readable:
            try:
                while self._reader.recv(512):
                    pass
            except BlockingIOError:
                pass

    def take(self) -> list[int]:
        taken, self.received[:] = list(self.received), []
        return taken

    def close(self) -> None:
        if self._previous:
            signal.set_wakeup_fd(self._previous_fd)
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous.clear()
        self._reader.close()
        self._writer.close()


@dataclass
class Lifecycle:
    """Whether the previous run stopped cleanly: "clean", "unclean" or "first"."""

    path: Path

    def previous_stop(self) -> str:
        try:
            obj = durable.read_json(self.path)
        except (OSError, ValueError):
            return "unclean"
        if obj is None:
            return "first"
        return "clean" if obj.get("state") == "stopped" else "unclean"

    def record(self, state: str, **extra: Any) -> None:
        try:
            durable.write_json(self.path, {"state": state, "at": _now(), **extra})
        except OSError as exc:
            log.error("lifecycle_unwritable", path=str(self.path), error=advice(exc))


def _once_exit_code(check: bootcheck.BootCheck, *, baseline_configured: bool) -> int:
    if check.untrusted:
        return EXIT_UNTRUSTED
    if check.body is None and check.integrity and baseline_configured:
        return EXIT_ERROR
    return EXIT_DRIFT if check.body is not None and not check.clean else EXIT_OK


_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_MMAP_THRESHOLD_BYTES: Final = 256 << 10


def _steady_allocator() -> None:
    """Have glibc's malloc give large blocks back at once: buffers of 256 KiB and more (a
    re-hash chunk, a decompressed manifest block) are mapped and unmapped, never kept in a
    heap. Set explicitly, the threshold no longer rises to the largest block ever freed,
    which left a megabyte or two of a worker thread's heap resident for good."""
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        mallopt(_M_TRIM_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def _release_memory() -> None:
    """Give what the boot check used back to the system: collect, then trim the C heap
    (glibc's ``malloc_trim``; elsewhere, collecting is all there is)."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _now() -> str:
    from agent.wire import utc_now

    return utc_now()


class Daemon:
    def __init__(
        self,
        config: AgentConfig,
        *,
        once: bool = False,
        environ: Mapping[str, str] | None = None,
        boot_id_path: Path = identity.BOOT_ID,
    ) -> None:
        self.config = config
        self.once = once
        self._environ = os.environ if environ is None else environ
        self._boot_id_path = boot_id_path
        self._signals = SignalReceiver()
        self._notifier = Notifier(self._environ)
        self._sources: list[Source] = []
        self._failed_sources: dict[str, str] = {}  # name: why, while a source's poll fails
        self._outbox = Outbox(self._signals.wake)
        self._watchers: Watchers | None = None
        self._sender: Sender | None = None
        self._client: CollectorClient | None = None
        self._started = time.monotonic()
        self._stopped = False
        self._image: dict[str, Any] = {}

    # --- start -----------------------------------------------------------------------------

    def run(self) -> int:
        _steady_allocator()
        self._signals.install()
        try:
            return self._run()
        finally:
            self.shutdown("shutdown")
            self._signals.close()

    def _run(self) -> int:
        agent = self.config.agent
        self.identity = identity.read_identity(agent.root, boot_id_path=self._boot_id_path)
        structlog.contextvars.bind_contextvars(host_id=self.identity.host_id)
        state_dir = agent.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the state directory: {advice(exc)}", path=state_dir
            ) from exc
        key = identity.host_key(state_dir, self.identity.host_id)
        first_boot = identity.first_boot(state_dir, self.identity)
        spool = Spool(
            state_dir / "spool",
            max_bytes=self.config.spool.max_bytes,
            max_records=self.config.spool.max_envelopes,
        )
        self.reporter = Reporter(
            spool,
            key,
            host_id=self.identity.host_id,
            key_id=identity.key_id_of(key),
            boot_id=self.identity.boot_id,
            state_dir=state_dir,
        )
        self._lifecycle = Lifecycle(state_dir / LIFECYCLE_FILE)
        previous_stop = self._lifecycle.previous_stop()
        self._lifecycle.record("running", pid=os.getpid(), boot_id=self.identity.boot_id)

        self._image = bootcheck.image_of(agent, self.identity)
        self._start_sender(key)
        check = self._boot_check(first_boot)
        clean = check.clean
        if not self.once:
            self._sources = self._make_sources(check)
            self._watchers = Watchers(self.config, check, self._outbox, first_boot=first_boot)
            _release_memory()  # before the watchers start, so nothing of theirs pins the check's
            self._watchers.start()
        # Reported once the guard runs, so that it names the watch backend actually in use;
        # what the watchers find meanwhile waits in the outbox and follows the boot report.
        self.reporter.report(
            "agent_start",
            {
                "version": agent_version(),
                "pid": os.getpid(),
                "previous_stop": previous_stop,
                "watch_backend": self._watch_backend(),
                "image": self._image,
            },
        )
        if check.body is not None:
            self.reporter.report("boot", check.body)
        for finding in check.integrity:
            self.reporter.report("finding", {"source": "integrity", "findings": [finding]})
        if self.once:
            self._ready(previous_stop, first_boot, clean=clean)
            self._heartbeat()
            self.shutdown("shutdown")
            return _once_exit_code(check, baseline_configured=agent.baseline is not None)
        del check  # what the check loaded goes; the judge keeps the baseline compacted
        self._ready(previous_stop, first_boot, clean=clean)
        self._loop()
        return EXIT_OK

    def _ready(self, previous_stop: str, first_boot: bool, *, clean: bool) -> None:
        identity.mark_first_boot(self.config.agent.state_dir, self.identity)
        log.info(
            "agent_started",
            previous_stop=previous_stop,
            first_boot=first_boot,
            clean=clean,
            spool_depth=self.reporter.spool.health().depth,
        )
        self._notifier.ready(status="guarding")

    def _boot_check(self, first_boot: bool) -> bootcheck.BootCheck:
        """The boot check; whatever goes wrong is reported, and the agent keeps running."""
        args = (self.identity, self.config.agent)
        run = bootcheck.run if self.once else bootcheck.run_apart  # once: no idle to keep lean
        try:
            return run(self.config.agent, first_boot=first_boot, identity=self.identity)
        except ConfigError:
            raise
        except UntrustedError as exc:
            log.error("baseline_untrusted", error=str(exc))
            return bootcheck.failed("baseline_untrusted", str(exc), *args)
        except AgentError as exc:
            log.error("baseline_unreadable", error=str(exc))
            return bootcheck.failed("baseline_unreadable", str(exc), *args)
        except Exception as exc:  # the daemon must outlive a failed check
            log.exception("boot_check_failed")
            return bootcheck.failed("boot_check_failed", f"{type(exc).__name__}: {exc}", *args)

    def _make_sources(self, check: bootcheck.BootCheck) -> list[Source]:
        """The event sources the loop polls (the watching parts run on their own threads)."""
        sources: list[Source] = []
        if self.config.logins.watch:
            from agent.sources import LoginSource  # psutil (utmp): only when logins are watched

            mode = check.policy.ssh_login if check.policy else "taint"
            after = self.reporter.spool.next_q  # records below it were written before this start
            sources.append(
                LoginSource(
                    self.config.agent.state_dir,
                    self.config.logins,
                    ssh_login=mode,
                    written=lambda q: q < after,
                )
            )
        return sources

    def _start_sender(self, key: Any) -> None:
        collector = self.config.collector
        if not collector.url:
            log.warning("collector_not_configured", advice="reports stay in the spool")
            return
        self._client = CollectorClient(collector)
        from_file = not collector.enroll_token and not self._environ.get(ENROLL_TOKEN_ENV)
        enrollment = Enrollment(
            self.config.agent.state_dir,
            self._client,
            key,
            host_id=self.identity.host_id,
            token=lambda: self.config.token(self._environ),  # read only to enroll
            facts=self._facts,
            token_file=collector.enroll_token_file if from_file else None,
        )
        self._sender = Sender(self.reporter, self._client, enrollment, collector)
        self._sender.start()

    def _facts(self) -> dict[str, Any]:
        return {
            "hostname": self.identity.hostname,
            "boot_id": self.identity.boot_id,
            "agent_version": agent_version(),
            "pool": self.config.agent.pool or None,
            "image": self._image,
        }

    # --- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        agent = self.config.agent
        now = time.monotonic()
        next_heartbeat = now  # the first heartbeat says which watch backend runs
        watchdog = self._notifier.watchdog_interval_s
        next_ping = now + watchdog / 2 if watchdog else float("inf")
        self._notifier.watchdog()
        while True:
            for signum in self._signals.take():
                if signum in STOP_SIGNALS:
                    log.info("signal_received", signal=signal.Signals(signum).name)
                    self.shutdown("signal")
                    return
                log.info("signal_ignored", signal=signal.Signals(signum).name)
            self._report_emitted()
            self._poll_sources()
            self.reporter.spool.retry()
            now = time.monotonic()
            if now >= next_heartbeat:
                self._heartbeat()
                next_heartbeat = now + agent.heartbeat_interval_s
            if now >= next_ping:
                self._notifier.watchdog()
                next_ping = now + (watchdog or 0) / 2
            wait = min(next_heartbeat, next_ping) - time.monotonic()
            self._signals.sleep(min(agent.poll_interval_s, wait))

    def _poll_sources(self) -> None:
        for source in self._sources:
            try:
                findings = source.poll()
            except Exception as exc:  # one broken source must not stop the others
                log.exception("source_failed", source=source.name)
                self._source_failed(source.name, f"{type(exc).__name__}: {exc}")
                continue
            if self._failed_sources.pop(source.name, None) is not None:
                log.info("source_recovered", source=source.name)
            if findings:
                body = {"source": source.name, "findings": findings}
                self.reporter.report("finding", body, staged=_staging(source))
            try:
                source.commit()
            except Exception:
                log.exception("source_commit_failed", source=source.name)
            troubles = source.failures()
            if troubles:
                self.reporter.report("finding", {"source": "integrity", "findings": troubles})

    def _source_failed(self, name: str, why: str) -> None:
        """A source that fails is polled again; it is reported once until it recovers."""
        if name in self._failed_sources:
            return
        self._failed_sources[name] = why
        detail = (
            f"the {name} source failed ({why}): what it would have seen may be missing "
            "(integrity unknown) until it recovers; it is polled again"
        )
        finding = integrity_finding(f"{name}_source_failed", detail)
        self.reporter.report("finding", {"source": "integrity", "findings": [finding]})

    def _report_emitted(self) -> None:
        """Queue durably what the watching parts found (they hand it over, never write)."""
        for source, findings in self._outbox.drain():
            self.reporter.report("finding", {"source": source, "findings": findings})

    def _watch_backend(self) -> str:
        return self._watchers.health().watch_backend if self._watchers else "none"

    def health(self) -> dict[str, Any]:
        spool = self.reporter.spool.health()
        watch = self._watchers.health() if self._watchers else None
        return {
            "watch_backend": watch.watch_backend if watch else "none",
            "overflows": watch.overflows if watch else 0,
            "spool_depth": spool.depth,
            "rejected": spool.rejected,
            "last_rescan": watch.last_rescan if watch else None,
            "last_full_rehash": watch.last_full_rehash if watch else None,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "version": agent_version(),
            "spool_state": spool.state,
            "spool_bytes": spool.size_bytes,
            "spool_in_memory": spool.in_memory,
            "heartbeats_compacted": spool.compacted,
            "delivery": self._sender.state if self._sender else "offline",
        }

    def _heartbeat(self) -> None:
        self.reporter.report("heartbeat", {"health": self.health()})

    # --- stop ------------------------------------------------------------------------------

    def shutdown(self, reason: str) -> None:
        """Stop intake, report agent_stop, flush (bounded), stop the sender. Idempotent."""
        if self._stopped or not hasattr(self, "reporter"):
            self._stopped = True
            return
        self._stopped = True
        self._notifier.stopping()
        if self._watchers is not None:
            self._watchers.stop()
        for source in self._sources:
            try:
                source.close()
            except Exception:
                log.exception("source_close_failed", source=source.name)
        self._report_emitted()
        self.reporter.report("agent_stop", {"reason": reason})
        timeout_s = self.config.collector.stop_timeout_s
        flushed = True
        if self._sender is not None:
            flushed = self._sender.flush(timeout_s)
            self._sender.stop(timeout_s)
        if self._client is not None:
            self._client.close()
        self.reporter.spool.retry()
        spool = self.reporter.spool.health()
        if spool.in_memory:
            log.error("reports_lost_at_exit", in_memory=spool.in_memory, advice="free disk space")
        else:
            self._lifecycle.record("stopped", reason=reason)
        left = sorted(t.name for t in threading.enumerate() if t is not threading.current_thread())
        log.info(
            "agent_stopped",
            reason=reason,
            flushed=flushed,
            spool_depth=spool.depth,
            threads_left=left,
        )
        self._notifier.close()


# --- commands --------------------------------------------------------------------------------


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("root", "baseline", "state_dir", "collector", "enroll_token", "enroll_token_file")
    return {name: getattr(args, name, None) for name in names}


def _config_path(args: argparse.Namespace) -> Path | None:
    path: Path | None = getattr(args, "config", None)
    return path.resolve() if path is not None else None


def _resolved(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v.resolve() if isinstance(v, Path) else v for k, v in overrides.items()}


def preflight(config: AgentConfig) -> None:
    """What loading the configuration cannot check alone: the key and policy files parse."""
    key = config.agent.pipeline_public_key
    if key is not None:
        try:
            keys.load_public(key)
        except KeyFileError as exc:
            raise ConfigError(f"[agent] pipeline_public_key: {exc}") from exc
    if config.agent.policy is not None:
        load_policy(config.agent.policy)
    if not (config.agent.state_dir / ENROLL_FILE).exists():
        config.token()  # to enroll, a token file must be readable; once enrolled it is not read


def run_command(args: argparse.Namespace) -> int:
    if getattr(args, "enroll_token", None):
        log.warning(
            "enroll_token_argument_deprecated",
            advice="a token on the command line shows in ps: use --enroll-token-file or "
            "DRIFTWARDEN_ENROLL_TOKEN",
        )
    config = load_config(_config_path(args), _resolved(_overrides(args)))
    preflight(config)
    return Daemon(config, once=bool(args.once)).run()


def check_config_command(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args))
    if config.agent.baseline is None:
        raise ConfigError(f"{config.source}: [agent] baseline is not set (the boot check needs it)")
    preflight(config)
    print(f"{config.source}: configuration is valid")
    return EXIT_OK
