"""The tree walk: every path under a policy's roots, in manifest order, measured in parallel.

Worker processes (forked where this process has a single thread) each take a
*task* — the contents of one directory, walked depth first until a budget of work is spent,
with the subdirectories left over handed back as further tasks — and return the results as
record lines. The calling process puts the pieces back together in manifest order, so entries
stream out in order while both cores hash; memory holds only the tasks in flight.

Two modes: ``measure`` (every entry measured and hashed: bake, ``check --full``) and ``stat``
(``lstat`` only: ``check``), where the caller compares each path's signature — type, size,
mtime, ctime, inode — with its reference and only the paths that differ are measured, in a
second round of tasks.

Each inode with several links is hashed at most once per worker process; the ``k`` field of
later names is set here, in manifest order.
"""

from __future__ import annotations

import errno
import heapq
import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from agent import record
from agent.measure import (
    Entry,
    full_path,
    measure_stat,
    order_key,
    root_prefix,
    stat_entry,
)
from agent.mounts import MountTable
from agent.policy import Policy

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

Signature = tuple[str, int, str]
"""(type code, size, ``record.hints_suffix(mtime_ns, ctime_ns, inode)``) of a path as
``lstat`` shows it now: what its record must hold for the path to be unchanged."""

_TOP_BUDGET: Final = 256  # the first task returns soon, so every worker has work at once
_BUDGET: Final = 4096  # units per task: one per path, one per 64 KiB hashed
_BATCH: Final = 256  # paths per task in the second round of ``stat`` mode
_GONE: Final = (errno.ENOENT, errno.ENOTDIR)
_FMT_CODES: Final = {
    stat.S_IFREG: "f",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
}

# A task's result: items in manifest order, and the directories it left for other tasks.
#   ("E", path, line, is_dir, link)  a measured entry; link = (dev, ino) when it has others
#   ("S", path, signature, is_dir)   a path seen in stat mode
#   ("X", path, full)                the contents of directory path come from another task
#   ("M", path)                      a mount point not descended
Item = tuple[Any, ...]


class Same(NamedTuple):
    """A path the walk saw unchanged against its reference."""

    path: str


class Reference(Protocol):
    """What the walk compares against (``manifest.Baseline``)."""

    def unchanged(self, path: str, signature: Signature) -> bool: ...

    def same_line(self, path: str, line: str) -> bool: ...


class _Scanner:
    """The work of one task; lives in each worker process (or in the caller, for one)."""

    def __init__(
        self, root: str, policy: Policy, mounts: MountTable, ignore: frozenset[str]
    ) -> None:
        self.root = root
        self.policy = policy
        self.mounts = mounts
        self.ignore = ignore
        self.root_dev = -1
        self.links: dict[tuple[int, int], Entry] = {}

    def run(self, task: tuple[Any, ...]) -> tuple[list[Item], list[tuple[str, str]]]:
        kind = task[0]
        out: list[Item] = []
        deferred: list[tuple[str, str]] = []
        if kind == "top":
            self._top(task[1], task[2], out, deferred)
        elif kind == "dir":
            _kind, path, full, measure = task
            self._walk(path, full, measure, _BUDGET, out, deferred)
        else:
            for path in task[1]:
                self._measure_path(path, out)
        return out, deferred

    def _top(
        self, tops: list[str], measure: bool, out: list[Item], deferred: list[tuple[str, str]]
    ) -> None:
        for top in tops:
            if self.policy.excluded(top):
                continue
            full = full_path(self.root, top)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode) and self._skip_mount(top, full, st, out):
                continue
            self._emit(top, full, st, measure, out)
            if stat.S_ISDIR(st.st_mode):
                self._walk(top, full, measure, _TOP_BUDGET, out, deferred)

    def _walk(
        self,
        path: str,
        full: str,
        measure: bool,
        budget: int,
        out: list[Item],
        deferred: list[tuple[str, str]],
    ) -> None:
        spent = 0
        stack = [self._children(full, path)]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                continue
            cpath, cfull, st = child
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir and self._skip_mount(cpath, cfull, st, out):
                continue
            spent += self._emit(cpath, cfull, st, measure, out)
            if is_dir:
                if spent < budget:
                    stack.append(self._children(cfull, cpath))
                else:
                    out.append(("X", cpath, cfull))
                    deferred.append((cpath, cfull))

    def _children(self, full: str, path: str) -> Iterator[tuple[str, str, os.stat_result]]:
        try:
            with os.scandir(full) as it:
                names = sorted(
                    (e.name for e in it), key=lambda n: n.encode("utf-8", "surrogateescape")
                )
        except OSError as exc:
            if exc.errno in (*_GONE, errno.EACCES, errno.EPERM):
                return  # vanished, or unreadable (the directory's own entry still stands)
            raise
        prefix = "" if path == "/" else path
        fprefix = "" if full == "/" else full
        excluded = self.policy.excluded
        ignore = self.ignore
        for name in names:
            child = prefix + "/" + name
            if excluded(child) or child in ignore:
                continue
            cfull = fprefix + "/" + name
            try:
                yield child, cfull, os.lstat(cfull)
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise

    def _skip_mount(self, path: str, full: str, st: os.stat_result, out: list[Item]) -> bool:
        if st.st_dev == self.root_dev:
            return False
        if self.policy.one_filesystem or self.mounts.fstype(full) in self.policy.exclude_fstypes:
            out.append(("M", path))
            return True
        return False

    def _emit(
        self, path: str, full: str, st: os.stat_result, measure: bool, out: list[Item]
    ) -> int:
        """Measure (or just sign) one path into ``out``; return the work units it cost."""
        mode = st.st_mode
        is_dir = stat.S_ISDIR(mode)
        if not measure:
            code = _FMT_CODES.get(stat.S_IFMT(mode), "?")
            hints = record.hints_suffix(st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            out.append(("S", path, (code, st.st_size, hints), is_dir))
            return 1
        link = (st.st_dev, st.st_ino) if st.st_nlink > 1 and not is_dir else None
        entry = self._linked(path, full, st, link) if link else None
        if entry is None:
            entry = measure_stat(full, path, st, self.policy, hash_content=True)
            if entry is None:
                return 1
            if link:
                self.links[link] = entry
        out.append(("E", path, record.to_line(entry), entry.type == "dir", link))
        return 1 + (st.st_size >> 16 if entry.digest else 0)

    def _linked(
        self, path: str, full: str, st: os.stat_result, link: tuple[int, int]
    ) -> Entry | None:
        """Another name of a file this process hashed already: its digest, not read again."""
        first = self.links.get(link)
        if (
            first is None
            or first.state != "ok"
            or (first.size, first.mtime_ns, first.ctime_ns)
            != (
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
        ):
            return None
        digest = first.digest if self.policy.wants_content(path) else None
        return stat_entry(full, path, st, digest, "ok")

    def _measure_path(self, path: str, out: list[Item]) -> None:
        full = full_path(self.root, path)
        try:
            st = os.lstat(full)
        except OSError as exc:
            if exc.errno in _GONE:
                return
            raise
        self._emit(path, full, st, True, out)


_worker: _Scanner | None = None


def _init_worker(scanner: _Scanner) -> None:
    global _worker  # noqa: PLW0603 (one scanner per worker process, set once at its start)
    _worker = scanner


def _run_in_worker(task: tuple[Any, ...]) -> tuple[list[Item], list[tuple[str, str]]]:
    assert _worker is not None
    return _worker.run(task)


class Walk:
    """Walk ``root`` per ``policy``: ``records()`` for bake, ``compared(reference)`` for check.

    ``workers`` processes do the work (0: one per core; 1: none, all in this process).
    ``fast`` selects stat mode. Afterwards ``count`` is the number of paths, ``measured``
    those measured (in stat mode, the ones that differed), ``skipped`` the mount points not
    descended. Use it as a context manager, or call ``close``.
    """

    def __init__(
        self,
        root: Path,
        policy: Policy,
        *,
        workers: int = 0,
        fast: bool = False,
        ignore: frozenset[str] = frozenset(),
        mounts: MountTable | None = None,
    ) -> None:
        self.root = root_prefix(root)
        self.policy = policy
        self.fast = fast
        self.workers = workers or os.cpu_count() or 1
        self.count = 0
        self.measured = 0
        self.skipped: list[str] = []
        self._scanner = _Scanner(
            self.root, policy, mounts if mounts is not None else MountTable.from_proc(), ignore
        )
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[str, Future[tuple[list[Item], list[tuple[str, str]]]]] = {}
        self._heard: set[int] = set()
        self._queue: list[tuple[bytes, str, str]] = []
        self._top: Future[tuple[list[Item], list[tuple[str, str]]]] | None = None
        self._limit = 4 * self.workers

    def __enter__(self) -> Walk:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def start(self) -> None:
        """Begin walking in the workers (the caller may do other work meanwhile)."""
        if self._top is not None:
            return
        tops = _top_roots(self.policy.roots)
        for top in tops:
            try:
                self._scanner.root_dev = os.lstat(full_path(self.root, top)).st_dev
                break
            except FileNotFoundError:
                continue
        task = ("top", tops, not self.fast)
        if self.workers > 1:
            import multiprocessing  # not loaded by a process that never walks in parallel
            from concurrent.futures import ProcessPoolExecutor

            # fork is fast, but only safe while this process has no other thread
            method = "fork" if threading.active_count() == 1 else "forkserver"
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                initargs=(self._scanner,),
            )
            self._top = self._pool.submit(_run_in_worker, task)
        else:
            self._top = Future()
            self._top.set_result(self._scanner.run(task))

    # -- putting the pieces back in order -----------------------------------------------------

    def _items(self) -> Iterator[Item]:
        self.start()
        assert self._top is not None
        stack = [iter(self._result(self._top))]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
            elif item[0] == "X":
                stack.append(iter(self._take(item[1], item[2])))
            elif item[0] == "M":
                self.skipped.append(item[1])
            else:
                yield item

    def _task(self, path: str, full: str) -> tuple[Any, ...]:
        return ("dir", path, full, not self.fast)

    def _result(self, future: Future[tuple[list[Item], list[tuple[str, str]]]]) -> list[Item]:
        """Wait for ``future``, handing out newly found tasks while waiting; its items."""
        while not future.done():
            running = {f for f in self._futures.values() if not f.done()}
            done, _ = wait({future, *running}, return_when=FIRST_COMPLETED)
            for other in done:
                self._hear(other)
        self._hear(future)
        return future.result()[0]

    def _hear(self, future: Future[tuple[list[Item], list[tuple[str, str]]]]) -> None:
        if id(future) in self._heard or future.cancelled() or future.exception() is not None:
            return
        self._heard.add(id(future))
        for path, full in future.result()[1]:
            heapq.heappush(self._queue, (order_key(path), path, full))
        self._pump()

    def _pump(self) -> None:
        while self._queue and len(self._futures) < self._limit:
            _key, path, full = heapq.heappop(self._queue)
            if path not in self._futures:
                self._submit(path, full)

    def _submit(self, path: str, full: str) -> None:
        if self._pool is not None:
            self._futures[path] = self._pool.submit(_run_in_worker, self._task(path, full))

    def _take(self, path: str, full: str) -> list[Item]:
        if self._pool is None:
            return self._scanner.run(self._task(path, full))[0]
        future = self._futures.get(path)
        if future is None:
            self._submit(path, full)
            future = self._futures[path]
        items = self._result(future)
        del self._futures[path]
        self._heard.discard(id(future))
        self._pump()
        return items

    # -- what callers see ---------------------------------------------------------------------

    def records(self) -> Iterator[tuple[str, str, bool]]:
        """(path, record line, is_dir) for every path, in manifest order (measure mode)."""
        assert not self.fast, "records() needs measure mode"
        links: dict[tuple[int, int], str] = {}
        for item in self._items():
            _kind, path, line, is_dir, link = item
            self.count += 1
            self.measured += 1
            if link is not None:
                first = links.setdefault(link, path)
                if first != path:
                    line = record.to_line(replace(record.from_line(line), hardlink=first))
            yield path, line, is_dir

    def compared(self, reference: Reference) -> Iterator[Entry | Same]:
        """Every path as ``Same`` where ``reference`` has it as it is, else measured."""
        if not self.fast:
            for path, line, _is_dir in self.records():
                yield Same(path) if reference.same_line(path, line) else record.from_line(line)
            return
        differ: list[str] = []
        for item in self._items():
            self.count += 1
            path = item[1]
            if reference.unchanged(path, item[2]):
                yield Same(path)
            else:
                differ.append(path)
        self.measured = len(differ)
        yield from self._measure_paths(differ)

    def _measure_paths(self, paths: list[str]) -> Iterator[Entry]:
        batches = [paths[i : i + _BATCH] for i in range(0, len(paths), _BATCH)]
        results: Iterator[tuple[list[Item], list[tuple[str, str]]]]
        if self._pool is None:
            results = (self._scanner.run(("paths", batch)) for batch in batches)
        else:
            results = self._pool.map(_run_in_worker, [("paths", batch) for batch in batches])
        for items, _deferred in results:
            for item in items:
                yield record.from_line(item[2])


def _top_roots(roots: tuple[str, ...]) -> list[str]:
    """The policy's roots in manifest order, without any that lies inside another."""
    out: list[str] = []
    for root in sorted(set(roots), key=order_key):
        if not any(r in (root, "/") or root.startswith(r + "/") for r in out):
            out.append(root)
    return out
