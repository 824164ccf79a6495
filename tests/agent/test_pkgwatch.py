"""The package watch on real dpkg databases under temporary roots: a status file rewritten the
way dpkg does it, and a package installed by the real dpkg, each yield package findings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.pkgwatch import PackageWatch, PackageWatchConfig
from agent.policy import parse_policy
from tests.agent.guardtree import Recorder, wait_until
from tests.agent.test_packages import DpkgRoot

FAST = PackageWatchConfig(settle_s=0.1, retry_s=0.2)


def stanza(name: str, version: str, arch: str = "amd64") -> str:
    return (
        f"Package: {name}\nStatus: install ok installed\nPriority: optional\n"
        f"Architecture: {arch}\nVersion: {version}\nDescription: {name}\n"
    )


def write_status(root: Path, text: str) -> None:
    """As dpkg writes it: a new file, synced, renamed over the old one."""
    status = root / "var/lib/dpkg/status"
    new = status.with_name("status-new")
    new.write_text(text)
    with open(new, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(new, status)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "var/lib/dpkg/updates").mkdir(parents=True)
    write_status(
        root, "\n".join([stanza("alpha", "1.0"), stanza("bravo", "2.0"), stanza("charlie", "1.0")])
    )
    return root


@contextmanager
def watching(root: Path, mode: str = "drift") -> Iterator[tuple[PackageWatch, Recorder]]:
    found = Recorder()
    policy = parse_policy({"policy": {"name": "t", "package_change": mode}}, source="t.toml")
    watch = PackageWatch(root, found, policy, config=FAST)
    watch.start()
    try:
        yield watch, found
    finally:
        assert watch.stop()


def packages(found: Recorder, count: int) -> list[dict[str, Any]]:
    found.wait_for(lambda s, f: sum(1 for s2, _ in found.items if s2 == "packages") >= count)
    return sorted((f for s, f in found.items if s == "packages"), key=lambda f: f["name"])


def test_status_rewritten_yields_package_findings(root: Path) -> None:
    with watching(root) as (watch, found):
        assert watch.known is not None and len(watch.known.packages) == 3
        write_status(
            root,
            "\n".join([stanza("alpha", "1.0"), stanza("bravo", "2.1"), stanza("delta", "0.9")]),
        )
        got = packages(found, 3)
    assert got == [
        {"type": "package", "change": "changed", "name": "bravo", "arch": "amd64",
         "before": "2.0", "after": "2.1", "drift": True, "severity": "warning"},
        {"type": "package", "change": "removed", "name": "charlie", "arch": "amd64",
         "before": "1.0", "after": None, "drift": True, "severity": "warning"},
        {"type": "package", "change": "installed", "name": "delta", "arch": "amd64",
         "before": None, "after": "0.9", "drift": True, "severity": "warning"},
    ]  # fmt: skip


def test_policy_alert_mode_is_not_drift(root: Path) -> None:
    with watching(root, "alert") as (_watch, found):
        write_status(root, stanza("alpha", "1.0"))
        got = packages(found, 2)
    assert {(f["name"], f["change"], f["drift"], f["severity"]) for f in got} == {
        ("bravo", "removed", False, "warning"),
        ("charlie", "removed", False, "warning"),
    }


def test_half_written_database_is_read_again_not_reported(root: Path) -> None:
    with capture_logs() as logs, watching(root) as (watch, found):
        reads = watch.reads
        write_status(root, "Package: alpha\nStatus: install ok installed\nVersion")  # torn
        wait_until(lambda: any(e["event"] == "package_db_unreadable" for e in logs))
        assert not found.items and watch.reads == reads
        write_status(
            root,
            "\n".join(
                [
                    stanza("alpha", "1.0"),
                    stanza("bravo", "2.0"),
                    stanza("charlie", "1.0"),
                    stanza("echo", "5"),
                ]
            ),
        )
        got = packages(found, 1)
    assert [(f["name"], f["change"]) for f in got] == [("echo", "installed")]


def test_package_installed_by_real_dpkg(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    image = DpkgRoot(tmp_path / "root", tmp_path / "work")
    deb = image.deb("hello", "1.0-1", {"/usr/bin/hello": b"#!/bin/sh\necho hello\n"})
    with watching(image.root) as (_watch, found):
        image.install(deb)
        got = packages(found, 1)
    assert [(f["name"], f["change"], f["after"]) for f in got] == [("hello", "installed", "1.0-1")]


def test_no_database_means_nothing_to_watch(tmp_path: Path) -> None:
    with capture_logs() as logs, watching(tmp_path) as (watch, _found):
        assert watch.known is not None and watch.known.manager == "none"
    assert any(e["event"] == "package_db_absent" for e in logs)
