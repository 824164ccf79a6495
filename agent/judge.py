"""Judging what the watchers see: a path measured again, against the baseline and against
what was last reported for it.

The realtime guard, the metadata pass and the rolling re-hash all judge through one ``Judge``,
so a change is reported once, whichever of them sees it first, and again only when the path
changes further in an attribute its rule cares about. A path that returns to its baseline
state is forgotten (``drift_reverted`` is logged; the host stays drifted at the collector).

By default only drift is reported: a change the policy allows (a mutable path, an attribute
the rule ignores, a first-boot path on the first boot) is counted, not sent. Paths under a
mutable rule are not even measured, since nothing about them can be drift.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Protocol

import structlog

from agent import record
from agent.compare import BaselineView, Finding, changed_fields, compare_entry
from agent.errors import advice
from agent.measure import Entry, full_path, measure_path, root_prefix
from agent.mounts import MountTable
from agent.policy import Decision, Policy
from agent.walk import Same, Signature, Walk
from agent.wire import display_path

_ALWAYS: Final = frozenset({"type"})

log = structlog.get_logger(__name__)


class Reference(BaselineView, Protocol):
    """What the judge needs from a baseline (``manifest.Baseline`` has it)."""

    def __contains__(self, path: object) -> bool: ...

    def __iter__(self) -> Iterator[Entry]: ...

    def unchanged(self, path: str, signature: Signature) -> bool: ...

    def same_line(self, path: str, line: str) -> bool: ...


@dataclass(frozen=True)
class PassStats:
    """What one walk over the trees did."""

    paths: int
    measured: int
    findings: int
    skipped: tuple[str, ...]


class Judge:
    """Measures and judges paths of the image at ``root`` against ``baseline``.

    Thread-safe: the guard and the rescanner call it from their own threads.
    """

    def __init__(
        self,
        root: Path,
        baseline: Reference,
        policy: Policy,
        *,
        first_boot: bool = False,
        report_allowed: bool = False,
        workers: int = 1,
    ) -> None:
        self.root = root
        self.baseline = baseline
        self.policy = policy
        self.first_boot = first_boot
        self.report_allowed = report_allowed
        self.workers = workers
        self.prefix = root_prefix(root)
        self.ignored = 0
        self._reported: dict[str, Entry | None] = {}
        self._inodes: dict[int, list[str]] | None = None  # built when a link count changes
        self._lock = threading.Lock()

    # --- paths ---------------------------------------------------------------------------

    def image_path(self, full: str) -> str | None:
        """The path inside the image of ``full`` (a path on this machine), or None when it
        lies outside the root."""
        prefix = self.prefix
        if not prefix:
            return full
        if full == prefix:
            return "/"
        if full.startswith(prefix) and full[len(prefix)] == "/":
            return full[len(prefix) :]
        return None

    def host_path(self, path: str) -> str:
        return full_path(self.prefix, path)

    def watched(self, path: str) -> bool:
        """Whether a change at ``path`` can matter: not excluded, and not under a mutable
        rule (unless allowed changes are reported too)."""
        decision = self.policy.decide(path)
        return not decision.excluded and (self.report_allowed or decision.kind != "mutable")

    @property
    def drifted(self) -> int:
        """How many paths currently differ from the baseline as last reported."""
        with self._lock:
            return len(self._reported)

    # --- judging -------------------------------------------------------------------------

    def check_path(self, path: str, *, follow_links: bool = True) -> list[Finding]:
        """Measure one path again and judge it. A link added to or removed from a file also
        changes the link count of the file's other names, which no watch reports: those
        names (as the baseline knows them) are measured again too."""
        if not self.watched(path):
            self.ignored += 1
            return []
        try:
            after = measure_path(self.root, path, self.policy)
        except OSError as exc:
            log.warning("measure_failed", path=display_path(path), error=advice(exc))
            return []
        finding = self.check_entry(path, after)
        if finding is None:
            return []
        found = [finding]
        if follow_links:
            for other in self._other_names(path, finding.before, after):
                found.extend(self.check_path(other, follow_links=False))
        return found

    def check_tree(self, path: str) -> list[Finding]:
        """Measure ``path`` and everything below it (a directory that appeared, moved or
        went); what the baseline or an earlier report knows below it and is not there any
        more is judged as removed."""
        if self.policy.excluded(path):
            return []
        try:
            with Walk(self.root, replace(self.policy, roots=(path,)), workers=1) as walk:
                return self._judge_walk(walk, under=path)
        except OSError as exc:
            log.warning("measure_failed", path=display_path(path), error=advice(exc))
            return []

    def check_all(self) -> tuple[list[Finding], PassStats]:
        """A metadata pass over every root: paths whose type, size, times and inode match
        what was last known are not read again. ``OSError`` reaches the caller."""
        with Walk(
            self.root, self.policy, workers=self.workers, fast=True, mounts=MountTable.from_proc()
        ) as walk:
            found = self._judge_walk(walk, under=None)
        stats = PassStats(walk.count, walk.measured, len(found), tuple(walk.skipped))
        return found, stats

    def check_entry(self, path: str, after: Entry | None) -> Finding | None:
        """Judge a measurement of ``path``: a finding when it is reportable and differs from
        what was last reported, else None."""
        decision = self.policy.decide(path)
        if decision.excluded:
            return None
        finding = compare_entry(
            self.baseline.get(path),
            after,
            decision,
            self.policy,
            first_boot=self.first_boot,
            root=self.root,
        )
        reportable = finding is not None and (finding.drift or self.report_allowed)
        with self._lock:
            known = path in self._reported
            previous = self._reported.get(path)
            if not reportable:
                if known:
                    del self._reported[path]
                    log.info("drift_reverted", path=display_path(path))
                return None
            if known and _same(decision, previous, after):
                return None
            self._reported[path] = after
        return finding

    def _other_names(self, path: str, before: Entry | None, after: Entry | None) -> list[str]:
        inodes = {
            e.ino for e in (before, after) if e is not None and e.type == "file" and e.nlink > 1
        }
        if not inodes:
            return []
        with self._lock:
            if self._inodes is None:
                index: dict[int, list[str]] = {}
                for entry in self.baseline:
                    if entry.type == "file":
                        index.setdefault(entry.ino, []).append(entry.path)
                self._inodes = index
            return [p for ino in inodes for p in self._inodes.get(ino, ()) if p != path]

    def unchanged(self, path: str, signature: Signature) -> bool:
        """The fast path of a pass: the path's signature (type, size, times, inode) is as
        last reported or, when nothing was reported, as the baseline recorded it."""
        with self._lock:
            if path not in self._reported:
                return self.baseline.unchanged(path, signature)
            entry = self._reported[path]
        if entry is None or entry.state != "ok":
            return False
        code, size, hints = signature
        return (
            record.TYPE_CODES[entry.type] == code
            and record.hints_suffix(entry.mtime_ns, entry.ctime_ns, entry.ino) == hints
            and (code == "d" or entry.size == size)
        )

    def same_line(self, path: str, line: str) -> bool:
        """Whether a measurement (a record line) is exactly what is known for ``path``."""
        with self._lock:
            if path not in self._reported:
                return self.baseline.same_line(path, line)
            entry = self._reported[path]
        return entry is not None and record.to_line(entry) == line

    def _judge_walk(self, walk: Walk, *, under: str | None) -> list[Finding]:
        seen: set[str] = set()
        found: list[Finding] = []
        for item in walk.compared(self):
            seen.add(item.path)
            if isinstance(item, Same):
                continue
            finding = self.check_entry(item.path, item)
            if finding is not None:
                found.append(finding)
        hidden = tuple(p + "/" for p in walk.skipped)
        for path in self._known(under):
            if path in seen or path in walk.skipped or path.startswith(hidden):
                continue
            if self.policy.excluded(path):
                continue
            finding = self.check_entry(path, None)
            if finding is not None:
                found.append(finding)
        return found

    def _known(self, under: str | None) -> Iterable[str]:
        """Paths the baseline or a report knows, at or below ``under`` (all when None)."""
        with self._lock:
            reported = list(self._reported)
        if under is None:
            return [*self.baseline.paths(), *(p for p in reported if p not in self.baseline)]
        below = under.rstrip("/") + "/"
        known = [
            p
            for p in (*self.baseline.paths(), *reported)
            if p == under or p.startswith(below) or under == "/"
        ]
        return dict.fromkeys(known)


def _same(decision: Decision, previous: Entry | None, after: Entry | None) -> bool:
    """Whether two measurements of a path agree in every attribute its rule cares about."""
    if previous is None or after is None:
        return previous is None and after is None
    fields = set(changed_fields(previous, after))
    return not fields & (decision.attributes | _ALWAYS)
