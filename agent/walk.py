"""The tree walk: every path under a policy's roots, in manifest order, measured in parallel.

Worker processes (forked where this process has a single thread) each take a
*task* — the contents of one directory, walked depth first until a budget of work is spent,
with the subdirectories left over handed back as further tasks — and return the results as
record lines. The calling process puts the pieces back together in manifest order, so entries
stream out in order while both cores hash; memory holds only the tasks in flight. As each task
is done (in the pool's thread) the directories it left are queued and more tasks handed out,
up to two running per worker and sixteen per worker waiting to be put in order, so the workers
never wait for the caller.

Inside a task a measured path is measured 32 paths after the walk has seen it: meanwhile its
file is open and its first 4 MiB announced to the kernel (``measure.open_ahead``), so the disk
reads the files ahead while the worker hashes, and a cold cache costs little more than the
reads themselves. The file is still checked against what ``lstat`` saw after it is read.
Each directory is listed through an open descriptor, and its names are looked up in it
(``lstat`` and ``open`` relative to it): the kernel resolves one name, not the whole path.
In measure mode a task sends each run of measured entries as one ``record.Block`` (the lines
with their Merkle leaves), so the caller, which also feeds the workers, handles a block, not
every entry.

Two modes: ``measure`` (every entry measured and hashed: bake, ``check --full``) and ``stat``
(``lstat`` only: ``check``), where each path's signature — type, size, mtime, ctime, inode —
is compared with a reference and only the paths that differ are measured, in a second round
of tasks. Given the reference when it is made, the walk compares in its workers (each has a
copy), which send back only the paths that differ and, per task, the unchanged ones as one
string: the caller handles no item per unchanged path. Otherwise the caller compares.

Each inode with several links is hashed at most once per worker process; the ``k`` field of
later names is set here, in manifest order.
"""

from __future__ import annotations

import errno
import functools
import gc
import heapq
import os
import stat
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from agent import record
from agent.measure import (
    AHEAD_FILE_BYTES,
    Entry,
    full_path,
    measure_fields,
    open_ahead,
    order_key,
    read_open,
    root_prefix,
    stat_fields,
)
from agent.mounts import MountTable
from agent.policy import Policy, under
from agent.record import Block

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

Signature = tuple[str, int, str]
"""(type code, size, ``record.hints_suffix(mtime_ns, ctime_ns, inode)``) of a path as
``lstat`` shows it now: what its record must hold for the path to be unchanged."""

_TOP_BUDGET: Final = 256  # the first task returns soon, so every worker has work at once
_BUDGET: Final = 4096  # units per task: one per path, one per 64 KiB hashed
_BATCH: Final = 256  # paths per task in the second round of ``stat`` mode
# In stat mode the caller is the critical path (it reads and verifies the baseline, then puts
# every path in order and compares it) while the workers' lstat walk has time to spare: the
# workers yield the processor to it rather than share it.
_STAT_NICENESS: Final = 5
_TOP: Final = ""  # the key of the first task (every other task's is its directory's path)
_AHEAD_FILES: Final = 32  # paths measured this far behind the walk, their files read meanwhile
_AHEAD_BYTES: Final = 16 << 20  # and no more bytes than this announced ahead
_GONE: Final = (errno.ENOENT, errno.ENOTDIR)
# A directory that vanished, was replaced (by a symlink: never followed) or cannot be read.
_DENIED: Final = (errno.EACCES, errno.EPERM)
_UNLISTED: Final = (*_GONE, errno.ELOOP, *_DENIED)
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
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
#   ("E", path, content, hints, is_dir, link)
#                                    a measured entry, its record line split in two
#                                    (``record.split_line``); link = (dev, ino) when it has
#                                    other links
#   ("B", block)                     measured entries without other links (``record.Block``)
#   ("S", path, signature, is_dir)   a path seen in stat mode
#   ("X", path, full)                the contents of directory path come from another task
#   ("M", path)                      a mount point not descended
#   ("R", count, paths)              the task's paths unchanged against the reference
Item = tuple[Any, ...]


class Same(NamedTuple):
    """A path the walk saw unchanged against its reference."""

    path: str


class SameRun(NamedTuple):
    """Paths a walk's worker saw unchanged against its reference: ``total`` of them, their
    paths joined by NUL (which no path holds), split only by whoever needs them."""

    total: int
    paths: str


class Reference(Protocol):
    """What the walk compares against (``manifest.Baseline``)."""

    def unchanged(self, path: str, signature: Signature) -> bool: ...

    def same_line(self, path: str, line: str) -> bool: ...


class _Scanner:
    """The work of one task; lives in each worker process (or in the caller, for one)."""

    def __init__(
        self,
        root: str,
        policy: Policy,
        mounts: MountTable,
        ignore: frozenset[str],
        reference: Reference | None = None,
    ) -> None:
        self.root = root
        self.policy = policy
        self.mounts = mounts
        self.ignore = ignore
        self.reference = reference
        self.same: list[str] = []  # the task's paths found unchanged against the reference
        self.root_dev = -1
        self.links: dict[tuple[int, int], Entry] = {}
        # Paths to measure, in order, each with its place in ``out`` and, for a file to hash,
        # the file opened and announced to the kernel (``measure.open_ahead``).
        self.ahead: deque[tuple[int, str, str, os.stat_result, int | None]] = deque()
        self.ahead_bytes = 0
        self.listed: dict[str, bool] = {}  # directories this task listed: could it?

    def run(self, task: tuple[Any, ...]) -> tuple[list[Item], list[tuple[str, str]]]:
        kind = task[0]
        out: list[Item | None] = []
        deferred: list[tuple[str, str]] = []
        same = self.same = []
        # A task makes no reference cycles: the cyclic collector, which would otherwise run
        # every few files to look at everything the task keeps, waits until it is done.
        collecting = gc.isenabled()
        gc.disable()
        try:
            if kind == "top":
                self._top(task[1], task[2], out, deferred)
            elif kind == "dir":
                _kind, path, full, measure = task
                self._walk(path, full, measure, _BUDGET, out, deferred)
            else:
                for path in task[1]:
                    self._measure_path(path, out)
            while self.ahead:
                self._settle(out)
            if same:
                out.append(("R", len(same), "\0".join(same)))
        finally:
            while self.ahead:
                opened = self.ahead.popleft()[-1]
                if opened is not None:
                    os.close(opened)
            self.ahead_bytes = 0
            self.listed.clear()
            if collecting:
                gc.enable()
        items = [item for item in out if item is not None]  # None: vanished
        if kind != "paths" and task[-1]:  # a walk in measure mode
            items = _blocked(items)
        return items, deferred

    def _top(
        self,
        tops: list[str],
        measure: bool,
        out: list[Item | None],
        deferred: list[tuple[str, str]],
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
        out: list[Item | None],
        deferred: list[tuple[str, str]],
    ) -> None:
        """Walk below the directory ``path`` depth first, in manifest order, until ``budget``
        is spent; the directories met after that are left to other tasks.

        Every path passes through here: what ``_emit`` does is inline, and the names of a
        directory are taken in a loop of their own, left to descend into a subdirectory."""
        spent = 0
        excluded = self.policy.excluded
        ignore = self.ignore
        reference = self.reference
        same = self.same
        ahead = self.ahead
        settle = self._settle
        will_read = self._will_read
        root_dev = self.root_dev
        lstat = os.stat
        S_ISREG, S_ISDIR = stat.S_ISREG, stat.S_ISDIR  # looked up once per task, not per path
        stack = [_listing(full, path, self.listed)]
        try:
            while stack:
                names, prefix, fprefix, dir_fd = stack[-1]
                for name in names:
                    cpath = prefix + name
                    if excluded(cpath) or cpath in ignore:
                        continue
                    try:
                        st = lstat(name, dir_fd=dir_fd, follow_symlinks=False)
                    except OSError as exc:
                        if exc.errno not in _GONE:
                            raise
                        continue
                    mode = st.st_mode
                    is_dir = S_ISDIR(mode)
                    if (
                        is_dir
                        and st.st_dev != root_dev
                        and self._skip_mount(cpath, fprefix + name, st, out)
                    ):
                        continue
                    spent += 1
                    if measure:  # ``_emit`` in measure mode
                        opened = None
                        if S_ISREG(mode) and will_read(cpath, st):
                            size = st.st_size
                            opened = open_ahead(name, size, dir_fd)
                            if opened is not None:
                                self.ahead_bytes += min(size, AHEAD_FILE_BYTES)
                                spent += size >> 16
                        out.append(None)  # its place, filled in by _settle
                        ahead.append((len(out) - 1, cpath, fprefix + name, st, opened))
                        while len(ahead) > _AHEAD_FILES or self.ahead_bytes > _AHEAD_BYTES:
                            settle(out)
                    else:  # ``_emit`` in stat mode
                        hints = record.hints_suffix(st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                        signature = (_FMT_CODES.get(stat.S_IFMT(mode), "?"), st.st_size, hints)
                        if reference is not None and reference.unchanged(cpath, signature):
                            same.append(cpath)
                        else:
                            out.append(("S", cpath, signature, is_dir))
                    if is_dir:
                        cfull = fprefix + name
                        if spent < budget:
                            stack.append(_listing(cfull, cpath, self.listed))
                            break  # into it; this directory's next names after it
                        out.append(("X", cpath, cfull))
                        deferred.append((cpath, cfull))
                else:  # every name of this directory taken
                    stack.pop()
                    if dir_fd >= 0:
                        os.close(dir_fd)
        finally:
            for _names, _prefix, _fprefix, dir_fd in stack:
                if dir_fd >= 0:
                    os.close(dir_fd)

    def _skip_mount(self, path: str, full: str, st: os.stat_result, out: list[Item | None]) -> bool:
        if st.st_dev == self.root_dev:
            return False
        if self.policy.one_filesystem or self.mounts.fstype(full) in self.policy.exclude_fstypes:
            out.append(("M", path))
            return True
        return False

    def _emit(
        self,
        path: str,
        full: str,
        st: os.stat_result,
        measure: bool,
        out: list[Item | None],
        dir_fd: int | None = None,
        name: str = "",
    ) -> int:
        """Measure (or just sign) one path into ``out``; return the work units it cost.
        ``dir_fd``: its directory, open, where it is called ``name`` (else ``full`` is used).

        A measured path takes its place in ``out`` now and is measured a few files later
        (``_settle``), so that the files ahead of it are being read from disk meanwhile."""
        mode = st.st_mode
        if not measure:
            code = _FMT_CODES.get(stat.S_IFMT(mode), "?")
            hints = record.hints_suffix(st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            signature = (code, st.st_size, hints)
            reference = self.reference
            if reference is not None and reference.unchanged(path, signature):
                self.same.append(path)
            else:
                out.append(("S", path, signature, stat.S_ISDIR(mode)))
            return 1
        opened = None
        size = st.st_size
        if stat.S_ISREG(mode) and self._will_read(path, st):
            opened = open_ahead(full, size) if dir_fd is None else open_ahead(name, size, dir_fd)
            if opened is not None:
                self.ahead_bytes += min(size, AHEAD_FILE_BYTES)
        out.append(None)  # its place, filled in by _settle
        self.ahead.append((len(out) - 1, path, full, st, opened))
        while len(self.ahead) > _AHEAD_FILES or self.ahead_bytes > _AHEAD_BYTES:
            self._settle(out)
        return 1 + (size >> 16 if opened is not None else 0)

    def _will_read(self, path: str, st: os.stat_result) -> bool:
        """Whether measuring this regular file reads its content (not another name of a file
        read already)."""
        cap = self.policy.max_file_size_bytes
        if (cap and st.st_size > cap) or not self.policy.wants_content(path):
            return False
        return st.st_nlink < 2 or (st.st_dev, st.st_ino) not in self.links

    def _settle(self, out: list[Item | None]) -> None:
        """Measure the oldest path of ``ahead`` into its place in ``out``."""
        index, path, full, st, opened = self.ahead.popleft()
        if opened is not None:
            self.ahead_bytes -= min(st.st_size, AHEAD_FILE_BYTES)
            if st.st_nlink < 2:  # the most common case: one look through the open file
                look = read_open(st, opened)
                if look is not None:
                    content, hints = record.file_parts(path, st, *look)
                    out[index] = ("E", path, content, hints, False, None)
                    return
                opened = None  # closed: measured again below, the careful way
        is_dir = stat.S_ISDIR(st.st_mode)
        listed = self.listed.pop(full, None) if is_dir else None
        if listed is not None:  # the walk listed it (or could not): no need to look again
            fields = stat_fields(full, path, st, None, "ok" if listed else "unreadable")
            if fields is not None:
                out[index] = ("E", path, *record.fields_parts(*fields), True, None)
            return
        if st.st_nlink < 2 or is_dir:  # the common case: no Entry made, the line straight away
            fields = measure_fields(full, path, st, self.policy, hash_content=True, opened=opened)
            if fields is not None:  # else vanished: its place stays empty
                is_dir = fields[1] == "dir"
                out[index] = ("E", path, *record.fields_parts(*fields), is_dir, None)
            return
        link = (st.st_dev, st.st_ino)
        entry = self._linked(path, full, st, link)
        if entry is None:
            fields = measure_fields(full, path, st, self.policy, hash_content=True, opened=opened)
            if fields is None:
                return
            entry = self.links[link] = Entry(*fields)
        elif opened is not None:
            os.close(opened)
        content, hints = record.split_line(record.to_line(entry))
        out[index] = ("E", path, content, hints, entry.type == "dir", link)

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
        fields = stat_fields(full, path, st, digest, "ok")
        return Entry(*fields) if fields is not None else None

    def _measure_path(self, path: str, out: list[Item | None]) -> None:
        full = full_path(self.root, path)
        try:
            st = os.lstat(full)
        except OSError as exc:
            if exc.errno in _GONE:
                return
            raise
        self._emit(path, full, st, True, out)


def _blocked(items: list[Item]) -> list[Item]:
    """``items`` with each run of measured entries that have no other links made one
    ``("B", block)``: the caller then handles a block, not every entry."""
    out: list[Item] = []
    run: list[tuple[str, str, str, bool]] = []
    for item in items:
        if item[0] == "E" and item[5] is None:
            run.append(item[1:5])
            continue
        if run:
            out.append(("B", Block.of_parts(run)))
            run = []
        out.append(item)
    if run:
        out.append(("B", Block.of_parts(run)))
    return out


def _listing(full: str, path: str, listed: dict[str, bool]) -> tuple[Iterator[str], str, str, int]:
    """The names in the directory ``full`` (``path`` in the image) in manifest order, the
    prefixes that make them paths, and the directory, open (its names are looked up in it,
    not from the root again): no names and -1 if it vanished, was replaced or cannot be read
    (its own entry still stands). ``listed[full]`` says whether it could be read."""
    try:
        fd = os.open(full, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in _UNLISTED:
            if exc.errno in _DENIED:
                listed[full] = False
            return iter(()), "", "", -1
        raise
    try:
        names = os.listdir(fd)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _UNLISTED:
            return iter(()), "", "", -1
        raise
    listed[full] = True
    if "".join(names).isascii():
        names.sort()  # ASCII sorts as its bytes do
    else:
        names.sort(key=_name_order)
    return iter(names), path.rstrip("/") + "/", full.rstrip("/") + "/", fd


def _name_order(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


_worker: _Scanner | None = None


def _init_worker(scanner: _Scanner, niceness: int) -> None:
    global _worker  # noqa: PLW0603 (one scanner per worker process, set once at its start)
    _worker = scanner
    if niceness:
        os.nice(niceness)


def _run_in_worker(task: tuple[Any, ...]) -> tuple[list[Item], list[tuple[str, str]]]:
    assert _worker is not None
    return _worker.run(task)


class Walk:
    """Walk ``root`` per ``policy``: ``records()`` for bake, ``compared(reference)`` for check.

    ``workers`` processes do the work (0: one per core; 1: none, all in this process).
    ``fast`` selects stat mode; with a ``reference`` the workers compare against it
    themselves (it is copied into them when the walk starts: ``compared`` must be given the
    same). Afterwards ``count`` is the number of paths, ``measured``
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
        reference: Reference | None = None,
    ) -> None:
        self.root = root_prefix(root)
        self.policy = policy
        self.fast = fast
        self.workers = workers or os.cpu_count() or 1
        self.count = 0
        self.measured = 0
        self.skipped: list[str] = []
        self._scanner = _Scanner(
            self.root,
            policy,
            mounts if mounts is not None else MountTable.from_proc(),
            ignore,
            reference if fast else None,
        )
        self._pool: ProcessPoolExecutor | None = None
        self._top: tuple[Any, ...] | None = None
        # Shared with the pool's thread, which hands out new tasks as each one is done:
        self._lock = threading.RLock()
        self._futures: dict[str, Future[tuple[list[Item], list[tuple[str, str]]]]] = {}
        self._heard: set[str] = set()  # tasks whose subdirectories were queued
        self._taken: set[str] = set()  # tasks whose items were put in order
        self._queue: list[tuple[bytes, str, str]] = []
        self._running = 2 * self.workers  # tasks handed out and not done
        self._held = 16 * self.workers  # tasks handed out and not yet put in order

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
            with self._lock:
                self._queue.clear()  # nothing more is handed out (not held while shutting down)
                self._running = 0
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
        self._top = ("top", tops, not self.fast)
        if self.workers > 1:
            import multiprocessing  # not loaded by a process that never walks in parallel
            from concurrent.futures import ProcessPoolExecutor

            # fork is fast, but only safe while this process has no other thread
            method = "fork" if threading.active_count() == 1 else "forkserver"
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                initargs=(self._scanner, self._niceness()),
            )
            with self._lock:
                self._launch(_TOP, self._top)

    def _niceness(self) -> int:
        """The caller is the critical path when it compares (see ``_STAT_NICENESS``); when the
        workers do, it waits for them."""
        return _STAT_NICENESS if self.fast and self._scanner.reference is None else 0

    # -- putting the pieces back in order -----------------------------------------------------

    def _items(self) -> Iterator[Item]:
        self.start()
        assert self._top is not None
        stack = [iter(self._take(_TOP, self._top))]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
            elif item[0] == "X":
                stack.append(iter(self._take(item[1], ("dir", item[1], item[2], not self.fast))))
            elif item[0] == "M":
                self.skipped.append(item[1])
            else:
                yield item

    def _launch(self, key: str, task: tuple[Any, ...]) -> None:
        """Hand ``task`` to the pool (with the lock held)."""
        assert self._pool is not None
        future = self._pool.submit(_run_in_worker, task)
        self._futures[key] = future
        future.add_done_callback(functools.partial(self._done, key))

    def _done(self, key: str, future: Future[tuple[list[Item], list[tuple[str, str]]]]) -> None:
        """A task is done (called in the pool's thread): queue what it found, hand out more."""
        with self._lock:
            if self._futures.get(key) is future:
                self._hear(key, future)

    def _hear(self, key: str, future: Future[tuple[list[Item], list[tuple[str, str]]]]) -> None:
        if key in self._heard or future.cancelled() or future.exception() is not None:
            return
        self._heard.add(key)
        for path, full in future.result()[1]:
            heapq.heappush(self._queue, (order_key(path), path, full))
        self._pump()

    def _pump(self) -> None:
        running = sum(1 for f in self._futures.values() if not f.done())
        while self._queue and running < self._running and len(self._futures) < self._held:
            _key, path, full = heapq.heappop(self._queue)
            if path not in self._futures and path not in self._taken:
                self._launch(path, ("dir", path, full, not self.fast))
                running += 1

    def _take(self, key: str, task: tuple[Any, ...]) -> list[Item]:
        """The items of ``task``, waiting for it (or, without workers, doing it now)."""
        if self._pool is None:
            return self._scanner.run(task)[0]
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                self._launch(key, task)
                future = self._futures[key]
        items = future.result()[0]
        with self._lock:
            self._hear(key, future)
            del self._futures[key]
            self._heard.discard(key)
            self._taken.add(key)  # it may still be queued: never hand it out again
            self._pump()
        return items

    # -- what callers see ---------------------------------------------------------------------

    def blocks(self) -> Iterator[Block]:
        """Every path's record in manifest order, in blocks (measure mode): what bake
        writes."""
        assert not self.fast, "blocks() needs measure mode"
        links: dict[tuple[int, int], str] = {}
        for item in self._items():
            if item[0] == "B":
                block: Block = item[1]
                self.count += len(block.paths)
                self.measured += len(block.paths)
                yield block
                continue
            _kind, path, content, hints, is_dir, link = item  # a file with other links
            self.count += 1
            self.measured += 1
            first = links.setdefault(link, path)
            if first != path:
                line = record.to_line(replace(record.from_line(content + hints), hardlink=first))
                content, hints = record.split_line(line)
            yield Block.of_parts([(path, content, hints, is_dir)])

    def records(self) -> Iterator[tuple[str, str, bool]]:
        """(path, record line, is_dir) for every path, in manifest order (measure mode)."""
        for block in self.blocks():
            yield from block.records()

    def compared(self, reference: Reference) -> Iterator[Entry | Same]:
        """Every path as ``Same`` where ``reference`` has it as it is, else measured."""
        for item in self._compared(reference):
            if isinstance(item, SameRun):
                yield from map(Same, item.paths.split("\0"))
            else:
                yield item

    def changes(self) -> Iterator[Entry | SameRun]:
        """In stat mode with a reference (which the workers compared against): every path
        that differs from it, measured, and the unchanged ones as a ``SameRun`` per task."""
        reference = self._scanner.reference
        assert reference is not None, "changes() needs stat mode and a reference"
        for item in self._compared(reference):
            assert not isinstance(item, Same)
            yield item

    def _compared(self, reference: Reference) -> Iterator[Entry | Same | SameRun]:
        if not self.fast:
            for path, line, _is_dir in self.records():
                yield Same(path) if reference.same_line(path, line) else record.from_line(line)
            return
        compared = self._scanner.reference
        if compared is not None and compared is not reference:
            raise ValueError("the walk compares against the reference it was made with")
        differ: list[str] = []
        unchanged = reference.unchanged
        count = self.count
        try:
            for item in self._items():
                if item[0] == "R":
                    count += item[1]
                    yield SameRun(item[1], item[2])
                    continue
                count += 1
                path = item[1]
                if compared is None and unchanged(path, item[2]):
                    yield Same(path)
                else:
                    differ.append(path)
        finally:
            self.count = count
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
                yield record.from_line(item[2] + item[3])


def _top_roots(roots: tuple[str, ...]) -> list[str]:
    """The policy's roots in manifest order, without any that lies inside another."""
    out: list[str] = []
    for root in sorted(set(roots), key=order_key):
        if not under(root, out):
            out.append(root)
    return out
