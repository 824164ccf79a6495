"""The package watch: a change to the package database is a change to the package set.

The database's files (``agent.packages.database_paths``: dpkg's ``status`` and ``updates/``,
apk's ``installed``, rpm's database directory) are watched through watchdog; package managers
replace them by rename, so each file's directory is watched and names are matched. A burst of
writes (one ``apt-get install`` rewrites ``status`` many times) settles for ``settle_s``
before the database is read again with ``read_packages`` and diffed against the last known
set; each package installed, removed or changed is reported as a ``packages`` finding, judged
by the policy's ``package_change`` as ``check`` judges it (``compare.compare_packages``). A
database caught half written (``PackageDbError``) is read again after ``retry_s``; nothing is
reported from it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from agent.compare import compare_packages
from agent.errors import PackageDbError, advice
from agent.packages import PackageSet, database_paths, read_packages
from agent.policy import Policy
from agent.worker import Emit, Worker

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PackageWatchConfig:
    settle_s: float = 0.5
    retry_s: float = 5.0


class _Handler(FileSystemEventHandler):
    def __init__(self, watch: PackageWatch) -> None:
        self.watch = watch

    def dispatch(self, event: FileSystemEvent) -> None:
        paths = [os.fsdecode(event.src_path)]
        if event.dest_path:
            paths.append(os.fsdecode(event.dest_path))
        if any(self.watch.concerns(p) for p in paths):
            self.watch.touched()


class PackageWatch(Worker):
    """Watches the package database under ``root`` (see the module's docstring). ``initial``:
    the package set to diff the first change against (what the boot check read); read at
    start when None."""

    name = "packages"

    def __init__(
        self,
        root: Path,
        emit: Emit,
        policy: Policy,
        *,
        initial: PackageSet | None = None,
        config: PackageWatchConfig = PackageWatchConfig(),
    ) -> None:
        super().__init__(emit)
        self.root = root
        self.policy = policy
        self.config = config
        self.known = initial
        self.reads = 0
        self._files: set[str] = set()
        self._dirs: set[str] = set()
        self._observer: BaseObserver | None = None
        self._touched = threading.Event()

    def concerns(self, full: str) -> bool:
        """Whether a change at ``full`` may change the package set."""
        return full in self._files or any(full.startswith(d + "/") for d in self._dirs)

    def touched(self) -> None:
        self._touched.set()

    def wake(self) -> None:
        self._touched.set()

    def prepare(self) -> None:
        paths = database_paths(self.root)
        if not paths:
            log.warning("package_db_absent", root=str(self.root))
        watched: set[str] = set()
        for path in paths:
            full = os.fsdecode(os.path.abspath(path))
            if os.path.isdir(full):
                self._dirs.add(full)
                watched.add(full)
            self._files.add(full)
            watched.add(os.path.dirname(full))
        if self.known is None:
            self.known = self._read()
        observer = Observer()
        for directory in sorted(watched):
            try:
                observer.schedule(_Handler(self), directory, recursive=False)
            except OSError as exc:
                log.warning("package_watch_failed", path=directory, error=advice(exc))
        observer.start()
        self._observer = observer
        log.info("package_watch_started", paths=sorted(self._files))

    def cleanup(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()

    def run(self) -> None:
        retry = False
        while not self.stopping.is_set():
            if not self._touched.wait(self.config.retry_s if retry else None):
                if not retry:
                    continue
            elif self.stopping.is_set():
                break
            self._settle()
            if self.stopping.is_set():
                break
            retry = not self._check()

    def _settle(self) -> None:
        """Wait until the database has been quiet for ``settle_s``."""
        self._touched.clear()
        while self._touched.wait(self.config.settle_s) and not self.stopping.is_set():
            self._touched.clear()

    def _read(self) -> PackageSet | None:
        try:
            found = read_packages(self.root)
        except PackageDbError as exc:
            log.warning("package_db_unreadable", error=str(exc))
            return None
        self.reads += 1
        return found

    def _check(self) -> bool:
        """Read the database again and report the difference; False to try again later."""
        current = self._read()
        if current is None:
            return False
        previous, self.known = self.known, current
        if previous is None:
            log.info("package_set_known", packages=len(current.packages))
            return True
        changes = compare_packages(previous, current, self.policy)
        if changes:
            log.warning("packages_changed", count=len(changes), manager=current.manager)
            self.emit("packages", [c.to_wire() for c in changes])
        return True
