"""The records of the package manifest: what is installed, how that changed, which files differ.

These are what the rest of the agent and the manifest speak. The readers (``dpkg``, ``rpm``,
``apk``) build them; ``agent.packages`` is the public face.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from agent.errors import PackageDbError
from agent.wire import canonical, sha256_hex

MANAGERS: Final = ("dpkg", "rpm", "apk", "none")
CHANGE_KINDS: Final = ("installed", "removed", "changed")
MISMATCH_REASONS: Final = ("modified", "missing", "unreadable", "replaced")
_JSON_KEYS: Final = frozenset({"name", "version", "arch", "state"})


@dataclass(frozen=True, slots=True, order=True)
class Package:
    """One installed package as the package manager records it."""

    name: str
    version: str
    arch: str

    @property
    def key(self) -> tuple[str, str]:
        """What identifies a package across versions: two architectures are two packages."""
        return (self.name, self.arch)


@dataclass(frozen=True, slots=True, order=True)
class UnsettledPackage:
    """A package the manager left half-done (dpkg: ``half-installed``, ``unpacked``,
    ``half-configured``, or flagged ``reinstreq``). Its files are on disk, so it is also in
    ``PackageSet.packages``; this record says it is not a finished installation."""

    name: str
    arch: str
    state: str


@dataclass(frozen=True, slots=True)
class PackageSet:
    """Every package present under a root, sorted, unique by ``(name, arch)``."""

    manager: str  # "dpkg" | "rpm" | "apk" | "none"
    packages: tuple[Package, ...]
    unsettled: tuple[UnsettledPackage, ...] = ()

    def __post_init__(self) -> None:
        if self.manager not in MANAGERS:
            raise ValueError(f"unknown package manager {self.manager!r}; known: {MANAGERS}")
        if list(self.packages) != sorted(self.packages):
            raise ValueError("packages must be sorted")
        if len({p.key for p in self.packages}) != len(self.packages):
            raise ValueError("packages must be unique by (name, arch)")
        if list(self.unsettled) != sorted(self.unsettled):
            raise ValueError("unsettled packages must be sorted")

    @classmethod
    def build(
        cls,
        manager: str,
        packages: Iterable[Package],
        unsettled: Iterable[UnsettledPackage] = (),
    ) -> PackageSet:
        """Sort the records into a set (the caller has made them unique)."""
        return cls(manager, tuple(sorted(packages)), tuple(sorted(unsettled)))

    def to_json(self) -> list[dict[str, str]]:
        """The manifest form: ``[{"name", "version", "arch"}, …]``, plus ``"state"`` on the
        packages that are unsettled."""
        states = {(u.name, u.arch): u.state for u in self.unsettled}
        out: list[dict[str, str]] = []
        for p in self.packages:
            item = {"name": p.name, "version": p.version, "arch": p.arch}
            if p.key in states:
                item["state"] = states[p.key]
            out.append(item)
        return out

    @classmethod
    def from_json(cls, data: Any, *, manager: str) -> PackageSet:
        """Read back what ``to_json`` wrote; anything else raises ``PackageDbError``."""
        if manager not in MANAGERS:
            raise PackageDbError(f"unknown package manager {manager!r}; known: {MANAGERS}")
        if not isinstance(data, list):
            raise PackageDbError("package list is not a JSON array")
        packages: list[Package] = []
        unsettled: list[UnsettledPackage] = []
        for index, item in enumerate(data):
            if (
                not isinstance(item, dict)
                or not {"name", "version", "arch"} <= item.keys() <= _JSON_KEYS
                or not all(isinstance(v, str) for v in item.values())
            ):
                raise PackageDbError(
                    f"package list item {index} is not "
                    '{"name": str, "version": str, "arch": str[, "state": str]}'
                )
            packages.append(Package(item["name"], item["version"], item["arch"]))
            if "state" in item:
                unsettled.append(UnsettledPackage(item["name"], item["arch"], item["state"]))
        if len({p.key for p in packages}) != len(packages):
            raise PackageDbError("package list names a (name, arch) twice")
        return cls.build(manager, packages, unsettled)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the manager and the list (the manifest's
        ``packages_digest``)."""
        return sha256_hex(canonical({"manager": self.manager, "packages": self.to_json()}))


@dataclass(frozen=True, slots=True)
class PackageChange:
    """A difference between two package sets; ``before``/``after`` are versions."""

    change: str  # "installed" | "removed" | "changed"
    name: str
    arch: str
    before: str | None
    after: str | None


def diff_packages(before: PackageSet, after: PackageSet) -> list[PackageChange]:
    """Packages installed, removed, or changed in version, sorted by name and architecture."""
    old = {p.key: p.version for p in before.packages}
    new = {p.key: p.version for p in after.packages}
    changes: list[PackageChange] = []
    for name, arch in sorted(old.keys() | new.keys()):
        was, now = old.get((name, arch)), new.get((name, arch))
        if was is None:
            changes.append(PackageChange("installed", name, arch, None, now))
        elif now is None:
            changes.append(PackageChange("removed", name, arch, was, None))
        elif was != now:
            changes.append(PackageChange("changed", name, arch, was, now))
    return changes


@dataclass(frozen=True, slots=True)
class PackageFileMismatch:
    """A package-owned file that is not what the vendor shipped.

    ``path`` is where the file is inside the image (after dpkg diversions). ``expected`` is the
    vendor's digest (hex); ``actual`` is the file's digest when ``modified``, what is there
    instead when ``replaced`` ("directory", "symlink", "fifo", …), the error when
    ``unreadable``, and ``None`` when ``missing``. ``conffile`` marks a configuration file
    (digest from dpkg's ``Conffiles``), which an administrator may have edited on purpose.
    """

    package: str
    path: str
    reason: str  # "modified" | "missing" | "unreadable" | "replaced"
    expected: str
    actual: str | None
    conffile: bool = False
