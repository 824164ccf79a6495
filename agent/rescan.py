"""Re-verification: a metadata pass every ``metadata_interval_s``, and a rolling full re-hash
spread over ``full_rehash_period_s`` under an I/O budget.

The metadata pass walks every root and measures again only what does not match its baseline
(type, size, mtime, ctime, inode): cheap, and it catches what realtime watching missed. It
also runs at once when the guard asks (``request``: the kernel dropped events), and every
``fallback_interval_s`` while realtime watching is degraded (``degrade``: the watch limit, or
no backend at all).

The full re-hash reads every file the baseline hashed, a few at a time, so a change that kept
size and times (``touch -r``) is still found. Reads are paced to spread one round over the
period and never exceed ``io_budget_mb_s``; the thread runs at the lowest CPU priority
(nice 19) and in the idle I/O class, and reads do not pollute the page cache: the pages of a
chunk that were not cached before it was read (``mincore``) are dropped after hashing
(``POSIX_FADV_DONTNEED``), and readahead is off (``POSIX_FADV_RANDOM``); what others had
cached stays.

Where the round stands is kept in the state directory (``rehash.json``: the baseline it is
for, when the round began, how many files it has checked, when it finished), saved every
``SAVE_EVERY_S`` and at stop: a restart resumes the round where it was rather than starting
over, and after a finished round waits for the next one as planned. Another baseline or
policy starts afresh.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import itertools
import mmap
import os
import platform
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import structlog

from agent import durable
from agent.compare import Finding
from agent.errors import advice
from agent.judge import Judge
from agent.measure import measure_path
from agent.wire import display_path, utc_now
from agent.worker import Emit, Worker, integrity_finding

MB: Final = 1_000_000
PAGE_BYTES: Final = mmap.PAGESIZE
IOPRIO_WHO_PROCESS: Final = 1
IOPRIO_CLASS_IDLE: Final = 3
IOPRIO_CLASS_SHIFT: Final = 13
_IOPRIO_SET: Final = {
    "x86_64": 251,
    "aarch64": 30,
    "riscv64": 30,
    "i686": 289,
    "armv7l": 314,
    "ppc64le": 273,
    "s390x": 282,
}
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NOATIME: Final = getattr(os, "O_NOATIME", 0)

SAVE_EVERY_S: Final = 30.0

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RescanConfig:
    metadata_interval_s: float = 900.0
    fallback_interval_s: float = 60.0
    full_rehash_period_s: float = 7 * 86400.0
    io_budget_mb_s: float = 10.0
    chunk_bytes: int = 1 << 20
    nice: int = 19

    def __post_init__(self) -> None:
        for name in (
            "metadata_interval_s",
            "fallback_interval_s",
            "full_rehash_period_s",
            "io_budget_mb_s",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} = {value!r} is not a number > 0")
        if self.chunk_bytes < PAGE_BYTES or self.chunk_bytes % PAGE_BYTES:
            raise ValueError(f"chunk_bytes = {self.chunk_bytes!r} is not a multiple of a page")


@dataclass(frozen=True)
class RescanHealth:
    last_rescan: str | None
    last_full_rehash: str | None
    passes: int
    rehashed_bytes: int
    degraded: str | None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


# --- priority --------------------------------------------------------------------------------


def lower_priority(nice: int) -> None:
    """Lowest CPU priority and the idle I/O class for the calling thread (Linux keeps both
    per thread; threads it starts inherit them)."""
    tid = threading.get_native_id()
    number = _IOPRIO_SET.get(platform.machine())
    if number is None:
        log.warning("io_priority_unchanged", reason=f"no ioprio_set for {platform.machine()}")
    elif _libc.syscall(number, IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT):
        log.warning("io_priority_unchanged", error=os.strerror(ctypes.get_errno()))
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        log.warning("cpu_priority_unchanged", error=advice(exc))


# --- the I/O budget --------------------------------------------------------------------------


class IoBudget:
    """A token bucket over bytes read: ``rate`` bytes a second on average, at most ``burst``
    ahead. ``history`` keeps the last reads as (monotonic time, bytes)."""

    def __init__(self, rate_bytes_s: float, burst_bytes: int) -> None:
        self.rate = rate_bytes_s
        self.burst = burst_bytes
        self.total = 0
        self.history: deque[tuple[float, int]] = deque(maxlen=4096)
        self._tokens = float(burst_bytes)
        self._last = time.monotonic()

    def acquire(self, count: int, interrupt: threading.Event) -> bool:
        """Wait until ``count`` bytes (at most ``burst``) may be read; False when
        ``interrupt`` was set first. The bytes are taken at the moment they may be read, so
        in no interval of ``w`` seconds are more than ``burst + rate * w`` bytes read."""
        if count > self.burst:
            raise ValueError(f"{count} bytes at once is more than the burst of {self.burst}")
        while not interrupt.is_set():
            now = time.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= count:
                self._tokens -= count
                self.total += count
                self.history.append((now, count))
                return True
            interrupt.wait((count - self._tokens) / self.rate)
        return False


def hash_budgeted(
    full: str, budget: IoBudget, interrupt: threading.Event, chunk_bytes: int
) -> tuple[str, os.stat_result] | None:
    """SHA-256 of a regular file read under ``budget``, and its ``fstat`` from before the
    read; None when it is not a regular file, changed while read, or was interrupted."""
    try:
        fd = os.open(full, _OPEN_FLAGS | _NOATIME)
    except PermissionError:
        fd = os.open(full, _OPEN_FLAGS)  # O_NOATIME needs ownership or CAP_FOWNER
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return None
        # No readahead: pages read ahead would look cached to the next read and stay.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        hasher = hashlib.sha256()
        view = memoryview(bytearray(min(chunk_bytes, _whole_pages(before.st_size))))
        offset, size = 0, before.st_size
        while offset < size:
            want = min(chunk_bytes, size - offset)
            if not budget.acquire(want, interrupt):
                return None
            got = _read_uncached(fd, view[:want], offset)
            if not got:
                break
            hasher.update(view[:got])
            offset += got
        after = os.fstat(fd)
    finally:
        os.close(fd)
    same = (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )
    return (hasher.hexdigest(), before) if same and offset == before.st_size else None


def resident(fd: int, offset: int, length: int) -> list[bool]:
    """Which pages of ``length`` bytes at ``offset`` (page-aligned) are in the page cache,
    asked with ``mincore`` (which, unlike a read, starts no I/O)."""
    pages = (length + PAGE_BYTES - 1) // PAGE_BYTES
    if not pages:
        return []
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr in (None, _MAP_FAILED):
        return [False] * pages
    try:
        vec = ctypes.create_string_buffer(pages)
        if _libc.mincore(addr, length, vec) != 0:
            return [False] * pages
        return [bool(b & 1) for b in vec.raw[:pages]]
    finally:
        _libc.munmap(addr, length)


def _whole_pages(size_bytes: int) -> int:
    """A buffer for ``size_bytes``: whole pages, at least one (a small file's read does not
    zero, and leave to the allocator, a whole chunk)."""
    return max(PAGE_BYTES, -(-size_bytes // PAGE_BYTES) * PAGE_BYTES)


def _read_uncached(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` at ``offset``, then drop from the page cache the pages that were
    not cached before (what others had cached stays)."""
    before = resident(fd, offset, len(view))
    got = os.preadv(fd, [view], offset)
    start = None
    for index, cached in enumerate([*before, True]):
        if not cached and start is None:
            start = index
        elif cached and start is not None:
            os.posix_fadvise(
                fd,
                offset + start * PAGE_BYTES,
                (index - start) * PAGE_BYTES,
                os.POSIX_FADV_DONTNEED,
            )
            start = None
    return got


# --- the rolling re-hash ---------------------------------------------------------------------


@dataclass(frozen=True)
class RehashPlace:
    """Where the rolling re-hash stands (``rehash.json`` in the state directory)."""

    baseline: str  # what the round is over (the manifest's root and the policy's digest)
    started_at: float  # when the round began (seconds since the epoch)
    done: int  # files of the round checked
    finished_at: float | None = None  # when the round ended (then ``done`` is all of them)

    @classmethod
    def load(cls, path: Path) -> RehashPlace | None:
        try:
            obj = durable.read_json(path)
            return None if obj is None else cls(**obj)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("rehash_place_unreadable", path=str(path), error=str(exc))
            return None

    def save(self, path: Path) -> None:
        try:
            durable.write_json(path, dataclasses.asdict(self))
        except OSError as exc:
            log.warning("rehash_place_unwritable", path=str(path), error=advice(exc))


class RollingRehash:
    """One round after another over every file the baseline hashed, in manifest order.

    With ``place_file``, where the round stands is saved there and a new instance (a
    restart) resumes from it when it is for the same ``baseline`` (see the module)."""

    def __init__(
        self,
        judge: Judge,
        config: RescanConfig,
        *,
        place_file: Path | None = None,
        baseline: str = "",
    ) -> None:
        self.judge = judge
        self.config = config
        self.budget = IoBudget(config.io_budget_mb_s * MB, config.chunk_bytes)
        self.rounds = 0
        self.place_file = place_file
        self.baseline = baseline
        self._todo: Iterator[str] = iter(())
        self._round_started = 0.0
        self._round_bytes = 0
        self._files = 0
        self._started_at = 0.0
        self._done = 0
        self._finished_at: float | None = None
        self._saved_at = 0.0
        saved = RehashPlace.load(place_file) if place_file is not None else None
        self._saved = saved if saved is not None and saved.baseline == baseline else None

    @property
    def last_finished_at(self) -> float | None:
        """When the last round finished, as saved by an earlier run."""
        return self._saved.finished_at if self._saved is not None else None

    def first_round_in_s(self) -> float:
        """How long until the first round of this run: at once, unless an earlier run
        finished one less than a period ago."""
        saved = self._saved
        if saved is None or saved.finished_at is None:
            return 0.0
        return max(0.0, saved.started_at + self.config.full_rehash_period_s - time.time())

    @property
    def round_age_s(self) -> float:
        """How long ago the current round began (across restarts)."""
        return max(0.0, time.time() - self._started_at)

    def _hashed(self) -> Iterator[tuple[str, int]]:
        """(path, size) of every file the baseline hashed and the policy wants hashed."""
        policy = self.judge.policy
        for entry in self.judge.baseline:
            if (
                entry.type == "file"
                and entry.digest is not None
                and policy.wants_content(entry.path)
            ):
                yield entry.path, entry.size

    def start_round(self, interrupt: threading.Event) -> bool:
        """Size up a round and start it; False when ``interrupt`` was set first. The paths
        are not held: the round reads the baseline again as it goes."""
        files = total = 0
        for files, (_path, size) in enumerate(self._hashed(), 1):
            total += size
            if not files % 4096 and interrupt.is_set():
                return False
        budget = self.config.io_budget_mb_s * MB
        pace = total / self.config.full_rehash_period_s
        if pace > budget:
            log.warning(
                "full_rehash_period_unreachable",
                bytes=total,
                period_s=self.config.full_rehash_period_s,
                io_budget_mb_s=self.config.io_budget_mb_s,
            )
        self.budget.rate = max(min(budget, pace), 1.0)
        saved, self._saved = self._saved, None
        skip = 0
        self._started_at = time.time()
        if saved is not None and saved.finished_at is None and 0 < saved.done < files:
            skip, self._started_at = saved.done, saved.started_at
        self._todo = itertools.islice((path for path, _size in self._hashed()), skip, None)
        self._round_started = time.monotonic()
        self._round_bytes = total
        self._files = files
        self._done = skip
        self._finished_at = None
        self._save()
        if skip:
            log.info("full_rehash_resumed", files=files, done=skip, bytes=total)
        log.info("full_rehash_started", files=files, bytes=total, rate_b_s=self.budget.rate)
        return True

    def next_path(self) -> str | None:
        return next(self._todo, None)

    def advanced(self) -> None:
        """One more file of the round checked; saved now and then."""
        self._done += 1
        if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            self._save()

    def finish_round(self) -> None:
        self.rounds += 1
        self._finished_at = time.time()
        self._save()
        log.info(
            "full_rehash_finished",
            files=self._files,
            bytes=self._round_bytes,
            seconds=round(time.monotonic() - self._round_started, 3),
        )

    def save(self) -> None:
        """Save where the round stands (at stop)."""
        if self._started_at:
            self._save()

    def _save(self) -> None:
        if self.place_file is None:
            return
        self._saved_at = time.monotonic()
        place = RehashPlace(self.baseline, self._started_at, self._done, self._finished_at)
        place.save(self.place_file)

    def check(self, path: str, interrupt: threading.Event) -> list[Finding] | None:
        """Re-hash one file and judge it: the findings (the judge has recorded them as
        reported, so they must be sent), or None when interrupted (try the file again)."""
        judge = self.judge
        full = judge.host_path(path)
        try:
            hashed = hash_budgeted(full, self.budget, interrupt, self.config.chunk_bytes)
            entry = measure_path(judge.root, path, judge.policy, hash_content=False)
        except FileNotFoundError:
            return _listed(judge.check_entry(path, None))
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink now: the metadata says so
                return judge.check_path(path)
            log.warning("rehash_failed", path=display_path(path), error=advice(exc))
            return []
        if hashed is None:
            return None if interrupt.is_set() else judge.check_path(path)
        digest, st = hashed
        if entry is None or (entry.ino, entry.size, entry.mtime_ns, entry.ctime_ns) != (
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        ):
            return judge.check_path(path)  # changed meanwhile: measure it the usual way
        return _listed(judge.check_entry(path, replace(entry, digest=digest)))


def _utc(epoch_s: float) -> str:
    """``epoch_s`` as ``wire.utc_now`` writes a time."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _listed(finding: Finding | None) -> list[Finding]:
    return [finding] if finding is not None else []


# --- the rescanner ---------------------------------------------------------------------------


class Rescanner(Worker):
    """Runs the metadata passes and the rolling re-hash on one low-priority thread."""

    name = "rescan"

    def __init__(
        self,
        judge: Judge,
        emit: Emit,
        *,
        config: RescanConfig = RescanConfig(),
        clock: Callable[[], float] = time.monotonic,
        place_file: Path | None = None,
        baseline: str = "",
    ) -> None:
        """``place_file``, ``baseline``: where the rolling re-hash keeps its place, and for
        which baseline (see the module)."""
        super().__init__(emit)
        self.judge = judge
        self.config = config
        self.rehash = RollingRehash(judge, config, place_file=place_file, baseline=baseline)
        self.last_rescan: str | None = None
        finished = self.rehash.last_finished_at
        self.last_full_rehash: str | None = _utc(finished) if finished is not None else None
        self.passes = 0
        self._clock = clock
        self._wakeup = threading.Event()
        self._requests: list[str] = []
        self._degraded: str | None = None
        self._round_open = False
        self._round_began = 0.0
        self._lock = threading.Lock()

    def health(self) -> RescanHealth:
        return RescanHealth(
            last_rescan=self.last_rescan,
            last_full_rehash=self.last_full_rehash,
            passes=self.passes,
            rehashed_bytes=self.rehash.budget.total,
            degraded=self._degraded,
        )

    def request(self, reason: str) -> None:
        """Run a metadata pass as soon as possible."""
        with self._lock:
            self._requests.append(reason)
        self._wakeup.set()

    def degrade(self, reason: str) -> None:
        """Realtime watching cannot be trusted: pass every ``fallback_interval_s``."""
        if self._degraded is None:
            log.warning(
                "rescan_fallback", reason=reason, interval_s=self.config.fallback_interval_s
            )
        self._degraded = reason
        self.request(reason)

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def interval_s(self) -> float:
        config = self.config
        if self._degraded is None:
            return config.metadata_interval_s
        return min(config.fallback_interval_s, config.metadata_interval_s)

    def run(self) -> None:
        lower_priority(self.config.nice)
        next_pass = self._clock() + self.interval_s
        next_round = self._clock() + self.rehash.first_round_in_s()
        pending: str | None = None
        while not self.stopping.is_set():
            with self._lock:
                reasons, self._requests = self._requests, []
                self._wakeup.clear()
            now = self._clock()
            if reasons or now >= next_pass:
                self.metadata_pass(reasons[0] if reasons else "interval")
                next_pass = self._clock() + self.interval_s
                continue
            if pending is None and self._round_open:
                pending = self.rehash.next_path()
                if pending is None:
                    self._round_done()
                    next_round = self._round_began + self.config.full_rehash_period_s
            if not self._round_open and now >= next_round:
                self._round_begin()
                continue
            if pending is not None:
                if self._rehash_one(pending):
                    pending = None
                continue
            wake_at = next_pass if self._round_open else min(next_pass, next_round)
            self._wakeup.wait(max(0.0, wake_at - self._clock()))

    def _round_begin(self) -> None:
        if not self.rehash.start_round(self._wakeup):
            return  # asked for a pass, or to stop: the round starts after that
        self._round_open = True
        self._round_began = self._clock() - self.rehash.round_age_s  # a resumed round is older

    def _round_done(self) -> None:
        self.rehash.finish_round()
        self.last_full_rehash = utc_now()
        self._round_open = False

    def _rehash_one(self, path: str) -> bool:
        """Re-hash ``path`` and send what it found; False when interrupted."""
        try:
            found = self.rehash.check(path, self._wakeup)
        except Exception:  # one odd file must not end the re-hash
            log.exception("rehash_failed", path=display_path(path))
            return True
        if found is None:
            return False
        self.rehash.advanced()
        if found:
            self.emit("rescan", [f.to_wire() for f in found])
        return True

    def cleanup(self) -> None:
        self.rehash.save()

    def metadata_pass(self, reason: str) -> None:
        """Walk every root now; report what differs (``rescan``) or that it failed."""
        started = time.monotonic()
        try:
            findings, stats = self.judge.check_all()
        except Exception as exc:
            log.exception("rescan_failed", reason=reason)
            text = advice(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            self.emit("integrity", [integrity_finding("rescan_failed", text)])
            return
        self.last_rescan = utc_now()
        self.passes += 1  # last: whoever sees the count sees the pass's time too
        log.info(
            "rescan_finished",
            reason=reason,
            paths=stats.paths,
            measured=stats.measured,
            findings=stats.findings,
            seconds=round(time.monotonic() - started, 3),
        )
        if findings:
            self.emit("rescan", [f.to_wire() for f in findings])
