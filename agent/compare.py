"""Judging differences: a baseline entry against a measurement, by the policy.

``compare_entry`` is the one judge that ``check``, the realtime guard and rescans all use;
``compare_tree`` runs it over a whole walk against a baseline. A ``Finding`` is reported
whether or not it is drift (a change under a mutable path is a finding with ``drift`` false);
``docs/check-output.md`` describes the wire shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from agent import record
from agent.measure import Entry, full_path, hash_file, order_key, root_prefix
from agent.packages import PackageSet, diff_packages
from agent.policy import Decision, Policy
from agent.walk import Same, SameRun
from agent.wire import encode_path


@dataclass(frozen=True)
class Finding:
    """One path that differs from the baseline, and the policy's verdict on it."""

    path: str
    change: str  # "added" | "removed" | "modified"
    fields: tuple[str, ...]
    rule: str
    kind: str  # the deciding rule's kind: immutable, critical, mutable, first_boot, ...
    drift: bool
    severity: str
    reason: str
    before: Entry | None
    after: Entry | None
    # a rename: on an added path, the removed one it was (same content, type, mode and owner);
    # on a removed path, where it went
    renamed_from: str | None = None
    renamed_to: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wired = {
            "type": "file",
            "path": encode_path(self.path),
            "change": self.change,
            "fields": list(self.fields),
            "rule": self.rule,
            "class": self.kind,
            "drift": self.drift,
            "severity": self.severity,
            "reason": self.reason,
            "before": record.to_json(self.before) if self.before is not None else None,
            "after": record.to_json(self.after) if self.after is not None else None,
        }
        if self.renamed_from is not None:
            wired["renamed_from"] = encode_path(self.renamed_from)
        if self.renamed_to is not None:
            wired["renamed_to"] = encode_path(self.renamed_to)
        return wired


@dataclass(frozen=True)
class PackageFinding:
    """A package installed, removed or changed in version since the baseline."""

    change: str  # "installed" | "removed" | "changed"
    name: str
    arch: str
    before: str | None
    after: str | None
    drift: bool
    severity: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "package",
            "change": self.change,
            "name": self.name,
            "arch": self.arch,
            "before": self.before,
            "after": self.after,
            "drift": self.drift,
            "severity": self.severity,
        }


def compare_packages(before: PackageSet, after: PackageSet, policy: Policy) -> list[PackageFinding]:
    """Package changes judged by the policy's ``package_change``: ``drift`` (drift, warning),
    ``alert`` (reported as a warning, not drift) or ``allow`` (reported as info)."""
    mode = policy.package_change
    severity = "info" if mode == "allow" else "warning"
    return [
        PackageFinding(c.change, c.name, c.arch, c.before, c.after, mode == "drift", severity)
        for c in diff_packages(before, after)
    ]


def changed_fields(before: Entry, after: Entry) -> tuple[str, ...]:
    """The policy attributes (``policy.ATTRIBUTES``) in which two entries of a path differ.

    Content counts as changed when both digests are known and differ, or when one side could
    not be read (unreadable, unstable, too large): it cannot be confirmed. Content that was
    not measured (a rule that ignores it) is not a change.
    ``hardlinks`` is the link count, and the identity when both walks recorded one.
    """
    changed = []
    if before.type != after.type:
        changed.append("type")
    if before.mode != after.mode:
        changed.append("mode")
    if before.uid != after.uid:
        changed.append("uid")
    if before.gid != after.gid:
        changed.append("gid")
    if before.size != after.size:
        changed.append("size")
    if _content_changed(before, after):
        changed.append("content")
    if before.target != after.target:
        changed.append("target")
    if before.xattrs != after.xattrs:
        changed.append("xattrs")
    if before.nlink != after.nlink or (
        before.hardlink is not None
        and after.hardlink is not None
        and before.hardlink != after.hardlink
    ):
        changed.append("hardlinks")
    if before.rdev != after.rdev:
        changed.append("device")
    if before.mtime_ns != after.mtime_ns:
        changed.append("mtime")
    return tuple(changed)


def _content_changed(before: Entry, after: Entry) -> bool:
    if before.type != "file" or after.type != "file":
        return False  # a change of type is reported as such
    if before.digest is not None and after.digest is not None:
        return before.digest != after.digest
    return before.state != after.state


def compare_entry(
    before: Entry | None,
    after: Entry | None,
    decision: Decision,
    policy: Policy,
    *,
    first_boot: bool,
    root: Path | None = None,
) -> Finding | None:
    """Judge one path: a ``Finding``, or None when nothing the deciding rule looks at changed
    (or the path is excluded). A path added or removed is always a finding, drift or not.

    ``root`` lets a growth-only rule confirm that a file only grew, by hashing the first
    ``before.size`` bytes of the file as it is now; without it a growth is not assumed.
    """
    if decision.excluded:
        return None
    fields: tuple[str, ...] = ()
    if before is None:
        if after is None:
            return None
        change, path = "added", after.path
    elif after is None:
        change, path = "removed", before.path
    else:
        path = after.path
        fields = changed_fields(before, after)
        if not set(fields) & decision.attributes:
            return None  # only attributes this rule ignores changed
        change = "modified"
    grew_only = (
        decision.kind == "growth_only"
        and before is not None
        and after is not None
        and root is not None
        and _grew_only(root, before, after)
    )
    verdict = policy.verdict(decision, change, fields, first_boot=first_boot, grew_only=grew_only)
    return Finding(
        path=path,
        change=change,
        fields=fields,
        rule=decision.rule,
        kind=decision.kind,
        drift=verdict.drift,
        severity=verdict.severity,
        reason=verdict.reason,
        before=before,
        after=after,
    )


def _grew_only(root: Path, before: Entry, after: Entry) -> bool:
    if before.type != "file" or after.type != "file" or after.size < before.size:
        return False
    if before.digest is None:
        return False
    path = full_path(root_prefix(root), after.path)
    return hash_file(path, before.size) == before.digest


class BaselineView(Protocol):
    """What ``compare_tree`` needs from a baseline (``manifest.Baseline`` has it)."""

    def __len__(self) -> int: ...

    def get(self, path: str) -> Entry | None: ...

    def paths(self) -> Iterable[str]: ...


def compare_tree(
    baseline: BaselineView,
    measured: Iterable[Entry | Same | SameRun],
    policy: Policy,
    *,
    first_boot: bool,
    root: Path | None = None,
    skipped: Sequence[str] = (),
    drifted: dict[str, Entry | None] | None = None,
) -> Iterator[Finding]:
    """Every finding between a baseline and a walk of the tree, in manifest order.
    ``drifted`` (when given) is filled with what each drift finding saw: the measured entry,
    or None for a removed path (``manifest.Baseline.measured_root``).

    Paths the walk found unchanged (``Same``, ``SameRun``) are not compared again. Paths in
    the baseline that the walk did not see are removed, unless they lie under one of the
    ``skipped`` mount points (read once the walk is over: ``Walk.skipped``). When the walk saw
    as many of the baseline's paths as it has, none is missing and none is looked for.
    """
    seen: set[str] = set()
    runs: list[str] = []
    known = 0  # paths seen that the baseline has (a walk sees each path once)
    found: list[Finding] = []
    for item in measured:
        if isinstance(item, SameRun):
            known += item.total
            runs.append(item.paths)
            continue
        seen.add(item.path)
        if isinstance(item, Same):
            known += 1
            continue
        before = baseline.get(item.path)
        known += before is not None
        finding = compare_entry(
            before, item, policy.decide(item.path), policy, first_boot=first_boot, root=root
        )
        if finding is not None:
            found.append(finding)
            if drifted is not None and finding.drift:
                drifted[item.path] = item
    if known != len(baseline):
        for run in runs:
            seen.update(run.split("\0"))
        hidden = tuple(p + "/" for p in skipped)
        for path in baseline.paths():
            if path not in seen and not (path in skipped or path.startswith(hidden)):
                finding = compare_entry(
                    baseline.get(path), None, policy.decide(path), policy, first_boot=first_boot
                )
                if finding is not None:
                    found.append(finding)
                    if drifted is not None and finding.drift:
                        drifted[path] = None
    found.sort(key=lambda f: order_key(f.path))
    yield from _renames(found)


def _renames(found: list[Finding]) -> list[Finding]:
    """``found`` with each removed file or symlink paired, in manifest order, with an added
    one that is the same but for its name (content or target, type, mode, owner): a rename,
    which stays a removal and an addition (each judged by its own path's rule) and says so."""
    gone: dict[tuple[Any, ...], list[int]] = {}
    for index, finding in enumerate(found):
        identity = _identity(finding.before) if finding.change == "removed" else None
        if identity is not None:
            gone.setdefault(identity, []).append(index)
    if not gone:
        return found
    out = list(found)
    for index, finding in enumerate(found):
        identity = _identity(finding.after) if finding.change == "added" else None
        candidates = gone.get(identity) if identity is not None else None
        if candidates:
            source = candidates.pop(0)
            out[index] = replace(finding, renamed_from=found[source].path)
            out[source] = replace(found[source], renamed_to=finding.path)
    return out


def _identity(entry: Entry | None) -> tuple[Any, ...] | None:
    """What a renamed file or symlink keeps; None for what is not paired (directories, a
    file whose content is not known)."""
    if entry is None or entry.state != "ok":
        return None
    if entry.type == "file" and entry.digest is not None:
        return ("file", entry.digest, entry.size, entry.mode, entry.uid, entry.gid)
    if entry.type == "symlink":
        return ("symlink", entry.target, entry.uid, entry.gid)
    return None
