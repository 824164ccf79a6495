"""Running a command and measuring it: wall time, CPU time and peak RSS, warm or cold.

A command is spawned directly (``posix_spawn``) and reaped with ``os.wait4``, whose rusage
covers the command and every descendant it waited for; ``ru_maxrss`` is then the peak RSS of
the largest single process of the tree (a shell pipeline's biggest member), in KiB.

- **warm**: one warm-up run whose figures are discarded, then ``runs`` measured runs;
- **cold**: ``sync`` and ``echo 3 > /proc/sys/vm/drop_caches`` before each measured run. If the
  kernel refuses, the cold figures are not faked: ``cold_cache_refusal()`` says why.

The reported figure is the median wall time over the runs and the highest peak RSS seen.

Peak RSS has a floor: at ``exec`` Linux folds the spawning process's own peak RSS into the
child's ``ru_maxrss``. The harness resets its peak (``/proc/self/clear_refs``) before each
spawn and measures the floor by spawning ``true`` the same way; a figure at the floor means
"no more than this", and the report says so.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

Cache = Literal["warm", "cold"]
DROP_CACHES: Final = Path("/proc/sys/vm/drop_caches")
CLEAR_REFS: Final = Path("/proc/self/clear_refs")
FLOOR_MARGIN: Final = 1.05  # within 5 % of the floor counts as at the floor


class BenchError(Exception):
    """A benchmark that cannot be run as asked; the message says what to do."""


@dataclass(frozen=True)
class Command:
    """A command to measure. ``before`` runs (unmeasured) ahead of every run."""

    label: str
    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None
    ok_exit: frozenset[int] = frozenset({0})
    before: Callable[[], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Sample:
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_kib: int
    exit_code: int


@dataclass(frozen=True)
class Measurement:
    """Runs of one command on one subject (``files`` names holding ``size_bytes``)."""

    label: str
    cache: Cache
    samples: tuple[Sample, ...]
    files: int
    size_bytes: int
    ok: bool
    log: Path
    floor_kib: int = 0

    @property
    def wall_s(self) -> float:
        return statistics.median(s.wall_s for s in self.samples)

    @property
    def cpu_s(self) -> float:
        return statistics.median(s.user_s + s.sys_s for s in self.samples)

    @property
    def max_rss_mib(self) -> float:
        return max(s.max_rss_kib for s in self.samples) / 1024

    @property
    def floor_mib(self) -> float:
        return self.floor_kib / 1024

    @property
    def at_floor(self) -> bool:
        """The peak RSS is indistinguishable from the method's floor: it is at most that."""
        return self.max_rss_mib <= self.floor_mib * FLOOR_MARGIN

    @property
    def mb_per_s(self) -> float:
        return self.size_bytes / 1e6 / self.wall_s

    @property
    def files_per_s(self) -> float:
        return self.files / self.wall_s

    @property
    def exit_codes(self) -> tuple[int, ...]:
        return tuple(sorted({s.exit_code for s in self.samples}))


def run_once(command: Command, log: Path) -> Sample:
    """Spawn the command with stdin from /dev/null and stdout/stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(command.env) if command.env is not None else dict(os.environ)
    with log.open("ab") as out:
        out.write(f"\n$ {shlex.join(command.argv)}\n".encode())
        out.flush()
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 2),
        ]
        _reset_peak_rss()
        started = time.perf_counter()
        try:
            pid = os.posix_spawnp(command.argv[0], command.argv, env, file_actions=actions)
        except OSError as exc:
            raise BenchError(f"{command.label}: cannot run {command.argv[0]}: {exc}") from exc
        _, status, usage = os.wait4(pid, 0)
        wall_s = time.perf_counter() - started
    return Sample(
        wall_s=wall_s,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        max_rss_kib=usage.ru_maxrss,
        exit_code=os.waitstatus_to_exitcode(status),
    )


def _reset_peak_rss() -> None:
    # On a kernel without it, the floor measured with ``true`` shows the effect.
    with contextlib.suppress(OSError):
        CLEAR_REFS.write_text("5\n")


def cold_cache_refusal() -> str | None:
    """Drop the page cache, dentries and inodes; return why not if the kernel refuses."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as exc:
        return f"cannot drop caches ({DROP_CACHES}: {exc.strerror}); run as root on a host"
    return None


def measure(
    command: Command,
    *,
    cache: Cache,
    runs: int,
    files: int,
    size_bytes: int,
    log: Path,
) -> Measurement:
    """Measure ``runs`` runs; a run whose exit status is not expected marks the row failed."""
    if cache == "warm":
        _prepare(command)
        run_once(command, log)
    samples: list[Sample] = []
    for _ in range(runs):
        _prepare(command)
        if cache == "cold":
            refusal = cold_cache_refusal()
            if refusal is not None:
                raise BenchError(refusal)
        samples.append(run_once(command, log))
    ok = all(s.exit_code in command.ok_exit for s in samples)
    floor = run_once(Command("floor", ("true",)), log).max_rss_kib
    found = Measurement(command.label, cache, tuple(samples), files, size_bytes, ok, log, floor)
    outcome = f"{found.wall_s:8.2f} s" if ok else f"failed (exit {found.exit_codes})"
    print(f"{cache} {runs}x {command.label:<40} {outcome}", file=sys.stderr, flush=True)
    return found


def _prepare(command: Command) -> None:
    if command.before is not None:
        command.before()


def shell(script: str, *args: str | os.PathLike[str]) -> tuple[str, ...]:
    """``sh -c SCRIPT`` with positional arguments, so paths are never spliced into the script."""
    return ("sh", "-c", script, "sh", *(os.fspath(a) for a in args))
