"""The portable realtime backend: watchdog's inotify observer on the policy's protected trees.

Which directories are watched (``plan_watches``): each root is watched recursively, unless an
excluded path or an excluded mount (``/proc``, a ``tmpfs``) lies below it; then it is watched
on its own and each child directory is planned in turn, so no watch ever enters an excluded
tree. A child whose whole subtree is mutable is not watched at all (its parent's watch still
sees the directory's own entry). A directory that appears in a directory watched on its own
gets a watch of its own at once.

watchdog hides two things the guard must know, so its inotify instance is subclassed:
``IN_Q_OVERFLOW`` (the kernel dropped events) and ``ENOSPC`` from ``inotify_add_watch`` (the
watch limit), which watchdog swallows for every directory below a watched root.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import stat
from collections.abc import Callable
from typing import Any, Final

import structlog
from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD

from agent.errors import advice
from agent.judge import Judge
from agent.mounts import MountTable
from agent.policy import Policy
from agent.wire import display_path
from agent.worker import Sink

NAME: Final = "inotify"
LIMIT_ADVICE: Final = "inotify watch limit reached — raise fs.inotify.max_user_watches"
# No open/close-without-write events: reading a protected file must cost the guard nothing.
EVENTS: Final[list[type[FileSystemEvent]]] = [
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirAttribEvent,
    DirMovedEvent,
]

log = structlog.get_logger(__name__)


# --- which directories to watch --------------------------------------------------------------


def _segments(path: str) -> list[str]:
    return [] if path == "/" else path.strip("/").split("/")


def may_lie_below(pattern: str, path: str) -> bool:
    """Whether ``pattern`` can match some path strictly below the directory ``path``."""
    pat, segs = _segments(pattern), _segments(path)
    for index, seg in enumerate(segs):
        if index >= len(pat):
            return False
        if pat[index] == "**":
            return True
        if not fnmatch.fnmatchcase(seg, pat[index]):
            return False
    return len(pat) > len(segs)


def _covers_below(pattern: str, path: str) -> bool:
    """Whether ``pattern`` matches every path strictly below the directory ``path``."""
    pat, segs = _segments(pattern), _segments(path)
    for index, piece in enumerate(pat):
        if piece == "**" and index == len(pat) - 1:
            return index <= len(segs)
        if index >= len(segs) or piece == "**" or not fnmatch.fnmatchcase(segs[index], piece):
            return False
    return False


def mutable_below(policy: Policy, path: str) -> bool:
    """Whether every path strictly below ``path`` is decided by a mutable rule."""
    for rule in policy.rules:
        for pattern in rule.patterns:
            if _covers_below(pattern, path):
                return rule.kind == "mutable"
            if rule.kind != "mutable" and may_lie_below(pattern, path):
                return False
    return False


class WatchPlan:
    """The directories of the image at ``judge.root`` to watch, as image paths."""

    def __init__(self, judge: Judge, mounts: MountTable) -> None:
        self.judge = judge
        self.policy = judge.policy
        self.mounts = mounts

    def roots(self) -> list[tuple[str, bool]]:
        """(image path, recursive) for every watch the policy's roots need."""
        out: list[tuple[str, bool]] = []
        tops = sorted(set(self.policy.roots))
        for top in tops:
            if any(top.startswith(other.rstrip("/") + "/") for other in tops if other != top):
                continue
            self.directory(top, out)
        return out

    def directory(self, path: str, out: list[tuple[str, bool]]) -> None:
        """Plan the watches for the directory ``path`` and below into ``out``."""
        full = self.judge.host_path(path)
        if self.policy.excluded(path) or not _is_dir(full):
            return
        if not self._needs_split(path, full):
            out.append((path, True))
            return
        out.append((path, False))
        try:
            with os.scandir(full) as entries:
                names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except OSError as exc:
            log.warning("watch_plan_failed", path=display_path(path), error=advice(exc))
            return
        for name in names:
            child = (path.rstrip("/") + "/" + name) if path != "/" else "/" + name
            if self.policy.excluded(child) or self._excluded_mount(child):
                continue
            if not self.judge.report_allowed and mutable_below(self.policy, child):
                continue
            self.directory(child, out)

    def _needs_split(self, path: str, full: str) -> bool:
        if any(may_lie_below(pattern, path) for pattern in self.policy.excludes):
            return True
        below = full.rstrip("/") + "/"
        return any(
            mount.startswith(below) and self._excluded_mount(self.judge.image_path(mount))
            for mount in self.mounts.fstypes
        )

    def _excluded_mount(self, path: str | None) -> bool:
        if path is None:
            return False
        full = self.judge.host_path(path)
        fstype = self.mounts.fstypes.get(full)
        if fstype is None:
            return False
        return self.policy.one_filesystem or fstype in self.policy.exclude_fstypes


def _is_dir(full: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(full).st_mode)
    except OSError:
        return False


# --- watchdog, with overflow and watch-limit detection ---------------------------------------


def _run_telling(run: Callable[[], None], sink: Sink, what: str) -> None:
    """Run a watchdog thread's loop; if it fails, tell the sink: nothing is watched any more,
    and the guard falls back to rescans."""
    try:
        run()
    except Exception as exc:
        log.exception("inotify_thread_failed", thread=what)
        sink.unwatched(NAME, "backend_failed", f"{what} failed: {type(exc).__name__}: {exc}")


class _InotifyFD(InotifyFD):
    """watchdog's inotify instance, telling the sink about overflow and the watch limit."""

    def __init__(self, sink: Sink) -> None:
        super().__init__()
        self.sink = sink

    def handle_event(self, event: InotifyEvent) -> None:
        if event.is_queue_overflow:
            self.sink.overflow(NAME)
        try:
            super().handle_event(event)
        except Exception:  # an event watchdog could not handle is an event lost
            log.exception("inotify_event_failed", mask=event.mask)
            self.sink.overflow(NAME)

    def add_callback(self, path: bytes, mask: Any, callback: Any, id_: Any) -> Any:
        try:
            return super().add_callback(path, mask, callback, id_)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.sink.unwatched(NAME, "watch_limit", os.fsdecode(path))
            raise

    def _add_callback(self, path: bytes, mask: Any, callback: Any, id_: Any) -> Any:
        # As watchdog's, without its warning when a directory made by ``mkdir -p`` is added
        # twice (once while its parent is walked, once for its own creation event): the same
        # callback again is harmless.
        watch = self._get_or_create_watch(path, mask)
        watch.callbacks[id_] = callback
        return watch.wd

    @property
    def watches(self) -> int:
        return len(self._watch_for_wd)

    def run(self) -> None:
        _run_telling(super().run, self.sink, "the inotify reader")


class _Observer(BaseObserver):
    def __init__(self, inotify_fd: _InotifyFD) -> None:
        super().__init__(InotifyEmitter, timeout=1.0, inotify_fd=inotify_fd)
        self._inotify_fd = inotify_fd

    def run(self) -> None:
        _run_telling(super().run, self._inotify_fd.sink, "the watchdog observer")

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()


class _Handler(FileSystemEventHandler):
    def __init__(self, backend: InotifyBackend) -> None:
        self.backend = backend

    def dispatch(self, event: FileSystemEvent) -> None:
        backend = self.backend
        src = os.fsdecode(event.src_path)
        if isinstance(event, DirMovedEvent):
            dest = os.fsdecode(event.dest_path)
            backend.gone(src)
            backend.appeared(dest)
            backend.report(src, tree=True)
            backend.report(dest, tree=True)
        elif isinstance(event, FileMovedEvent):
            backend.report(src, tree=False)
            backend.report(os.fsdecode(event.dest_path), tree=False)
        elif isinstance(event, DirCreatedEvent):
            backend.appeared(src)
            backend.report(src, tree=True)
        elif isinstance(event, DirDeletedEvent):
            backend.gone(src)
            backend.report(src, tree=True)
        else:
            backend.report(src, tree=False)


class InotifyBackend:
    """Realtime events from inotify through watchdog. ``start`` raises ``OSError`` when no
    inotify instance can be had (``EMFILE``: the instance limit)."""

    name = NAME

    def __init__(self, judge: Judge, sink: Sink, *, mounts: MountTable | None = None) -> None:
        self.judge = judge
        self.sink = sink
        self.plan = WatchPlan(judge, mounts if mounts is not None else MountTable.from_proc())
        self._fd: _InotifyFD | None = None
        self._observer: _Observer | None = None
        self._handler = _Handler(self)
        self._scheduled: dict[str, ObservedWatch] = {}
        self._single: set[str] = set()  # image paths watched on their own (not recursively)

    @property
    def watches(self) -> int:
        return self._fd.watches if self._fd is not None else 0

    def failure(self) -> str | None:
        observer, fd = self._observer, self._fd
        if observer is None or fd is None:
            return None
        threads = [("the inotify reader", fd), ("the watchdog observer", observer)]
        # (an emitter stopped on purpose, its directory gone, has not failed)
        threads += [("a watchdog emitter", e) for e in observer.emitters.copy()]
        ended = [n for n, t in threads if not t.is_alive() and t.should_keep_running()]
        return f"{ended[0]} thread has ended" if ended else None

    def start(self) -> None:
        self._fd = _InotifyFD(self.sink)
        self._fd.start()
        self._observer = _Observer(self._fd)
        self._observer.start()
        planned = self.plan.roots()
        for path, recursive in planned:
            self._schedule(path, recursive=recursive)
        log.info(
            "inotify_watching",
            roots=len(planned),
            recursive=sum(1 for _, r in planned if r),
            watches=self.watches,
        )

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()
        elif self._fd is not None:
            self._fd.stop()
            self._fd.join()
        self._fd = None

    def _schedule(self, path: str, *, recursive: bool) -> None:
        observer = self._observer
        if observer is None or path in self._scheduled:
            return
        full = self.judge.host_path(path)
        try:
            watch = observer.schedule(self._handler, full, recursive=recursive, event_filter=EVENTS)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # gone again before it could be watched; its events say so
            if exc.errno != errno.ENOSPC:  # ENOSPC was reported by _InotifyFD
                log.warning("watch_failed", path=display_path(path), error=advice(exc))
                self.sink.unwatched(NAME, "watch_failed", f"{full}: {advice(exc)}")
            return
        self._scheduled[path] = watch
        if not recursive:
            self._single.add(path)

    def report(self, full: str, *, tree: bool) -> None:
        path = self.judge.image_path(full)
        if path is None:
            return
        if self.judge.watched(path) or (tree and not mutable_below(self.judge.policy, path)):
            self.sink.changed(full, tree=tree, process=None)

    def appeared(self, full: str) -> None:
        """A directory appeared: one in a directory watched on its own needs its watches."""
        path = self.judge.image_path(full)
        if path is None or path == "/":
            return
        parent = path.rsplit("/", 1)[0] or "/"
        if parent not in self._single:
            return  # inside a recursive watch: watchdog watches it already
        if self.judge.report_allowed or not mutable_below(self.judge.policy, path):
            planned: list[tuple[str, bool]] = []
            self.plan.directory(path, planned)
            for sub, recursive in planned:
                self._schedule(sub, recursive=recursive)

    def gone(self, full: str) -> None:
        """A directory went: drop the watches scheduled at or below it."""
        path = self.judge.image_path(full)
        observer = self._observer
        if path is None or observer is None:
            return
        below = path.rstrip("/") + "/"
        for sub in [p for p in self._scheduled if p == path or p.startswith(below)]:
            watch = self._scheduled.pop(sub)
            self._single.discard(sub)
            with contextlib.suppress(KeyError):
                observer.unschedule(watch)
