"""The realtime guard on real temporary trees: every mutation kind caught and judged, with
inotify and (where the kernel allows) fanotify; mutable paths are not drift; a forced queue
overflow and an exhausted watch limit are reported and answered by rescans."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent import fanotify
from agent.guard import Guard, GuardConfig, Intake
from agent.inotify import may_lie_below, mutable_below
from agent.policy import parse_policy
from agent.rescan import RescanConfig, Rescanner
from tests.agent.guardtree import POLICY, Image, Recorder, image, wait_until

QUIET = RescanConfig(metadata_interval_s=3600, full_rehash_period_s=1e9)
HERE = Path(__file__).resolve().parent


@dataclass
class Guarded:
    image: Image
    found: Recorder
    guard: Guard
    rescanner: Rescanner

    @property
    def root(self) -> Path:
        return self.image.root


@contextmanager
def guarding(
    tmp_path: Path,
    backend: str,
    config: RescanConfig = QUIET,
    guard_config: GuardConfig | None = None,
) -> Iterator[Guarded]:
    img = image(tmp_path)
    found = Recorder()
    judge = img.judge()
    rescanner = Rescanner(judge, found, config=config)
    guard = Guard(judge, found, rescanner, config=guard_config or GuardConfig(backend=backend))
    guard.start()
    try:
        yield Guarded(img, found, guard, rescanner)
    finally:
        guard.stop()
        rescanner.stop()


@pytest.fixture(params=["inotify", pytest.param("fanotify", marks=pytest.mark.root)])
def guarded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Guarded]:
    if request.param == "fanotify":
        usable, why = fanotify.available()
        if not usable:
            pytest.skip(why)
    with guarding(tmp_path, request.param) as g:
        assert g.guard.health().backend == request.param
        yield g


def test_content_changed_with_size_and_mtime_restored(guarded: Guarded) -> None:
    path = guarded.root / "etc/app.conf"
    st = path.stat()
    path.write_bytes(b"listen = 6666\nworkers = 4\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    _source, f = guarded.found.wait_for(
        lambda s, f: f["path"] == "/etc/app.conf" and "content" in f["fields"]
    )
    assert f["change"] == "modified" and f["drift"] is True and f["severity"] == "warning"
    assert f["before"]["h"] != f["after"]["h"]
    if guarded.guard.health().backend == "fanotify":
        assert f["process"]["pid"] == os.getpid()


def test_mode_owner_setuid_and_capability(guarded: Guarded) -> None:
    root = guarded.root
    os.chmod(root / "etc/app.conf", 0o600)
    assert "mode" in guarded.found.file("/etc/app.conf")["fields"]
    os.chown(root / "etc/hostname", 1234, 1234)
    assert {"uid", "gid"} <= set(guarded.found.file("/etc/hostname")["fields"])
    os.chmod(root / "usr/bin/tool", 0o4755)
    f = guarded.found.file("/usr/bin/tool")
    assert f["fields"] == ["mode"] and f["after"]["m"] == "4755"
    capability = struct.pack("<IIIII", 0x02000001, 1 << 12, 0, 0, 0)  # cap_net_admin+ep
    os.setxattr(root / "usr/lib/libx.so", "security.capability", capability)
    f = guarded.found.file("/usr/lib/libx.so")
    assert "xattrs" in f["fields"] and "security.capability" in f["after"]["x"]


def test_symlink_retargeted(guarded: Guarded) -> None:
    link = guarded.root / "etc/alternatives/editor"
    temp = link.with_name(".editor.new")
    os.symlink("/usr/bin/evil", temp)
    os.rename(temp, link)
    f = guarded.found.file("/etc/alternatives/editor", "modified")
    assert "target" in f["fields"] and f["after"]["l"] == "/usr/bin/evil"


def test_hardlink_added(guarded: Guarded) -> None:
    os.link(guarded.root / "usr/bin/tool", guarded.root / "usr/bin/tool2")
    assert guarded.found.file("/usr/bin/tool2", "added")["drift"] is True
    assert "hardlinks" in guarded.found.file("/usr/bin/tool", "modified")["fields"]


def test_file_replaced_by_directory(guarded: Guarded) -> None:
    path = guarded.root / "etc/hostname"
    path.unlink()
    path.mkdir()
    f = guarded.found.file("/etc/hostname", "modified")
    assert "type" in f["fields"] and f["after"]["t"] == "d"


def test_rename_file_and_directory(guarded: Guarded) -> None:
    root = guarded.root
    os.rename(root / "etc/app.conf", root / "etc/app.conf.bak")
    guarded.found.file("/etc/app.conf", "removed")
    guarded.found.file("/etc/app.conf.bak", "added")
    os.rename(root / "usr/share/doc", root / "usr/share/doc2")
    guarded.found.file("/usr/share/doc/readme", "removed")
    guarded.found.file("/usr/share/doc2/readme", "added")


def test_new_file_in_critical_directory(guarded: Guarded) -> None:
    (guarded.root / "etc/sudoers.d/backdoor").write_text("mallory ALL=(ALL) NOPASSWD: ALL\n")
    f = guarded.found.file("/etc/sudoers.d/backdoor", "added")
    assert f["severity"] == "critical" and f["rule"] == "credentials" and f["drift"] is True


def test_deletion_and_new_fifo(guarded: Guarded) -> None:
    (guarded.root / "usr/bin/tool").unlink()
    guarded.found.file("/usr/bin/tool", "removed", drift=True)
    os.mkfifo(guarded.root / "etc/control")
    assert guarded.found.file("/etc/control", "added")["after"]["t"] == "p"


def test_changes_inside_new_directories(guarded: Guarded) -> None:
    deep = guarded.root / "usr/lib/new/a/b/c"
    os.makedirs(deep)
    (deep / "f").write_bytes(b"planted")
    os.mkfifo(deep / "p")
    os.symlink("/etc/shadow", deep / "l")
    guarded.found.file("/usr/lib/new/a/b/c/f", "added")
    guarded.found.file("/usr/lib/new/a/b/c/p", "added")
    assert guarded.found.file("/usr/lib/new/a/b/c/l", "added")["after"]["l"] == "/etc/shadow"
    guarded.found.file("/usr/lib/new", "added")
    # and a file written into the new tree later is seen too
    (deep / "later").write_bytes(b"x")
    guarded.found.file("/usr/lib/new/a/b/c/later", "added")


def test_mutable_paths_are_not_drift(guarded: Guarded) -> None:
    root = guarded.root
    with open(root / "var/log/syslog", "ab") as log:
        log.write(b"more\n")
    (root / "var/log/app/new.log").write_text("x")
    os.makedirs(root / "var/log/app/x/y")
    (root / "var/log/app/x/y/z").write_text("z")
    os.chmod(root / "var/cache/apt/pkgcache", 0o600)
    (root / "var/cache/apt/pkgcache").unlink()
    (root / "var/lib/app/data").write_text("state 2\n")  # the sentinel, after all of the above
    guarded.found.file("/var/lib/app/data", "modified")
    assert not {p for p in guarded.found.paths() if p.startswith(("/var/log", "/var/cache"))}


def test_reverted_change_is_forgotten_and_a_new_one_reported(guarded: Guarded) -> None:
    path = guarded.root / "etc/app.conf"
    os.chmod(path, 0o600)
    guarded.found.file("/etc/app.conf", "modified")
    os.chmod(path, 0o644)
    wait_until(lambda: guarded.guard.judge.drifted == 0, what="the revert to be seen")
    os.chmod(path, 0o640)
    guarded.found.wait_for(lambda s, f: f["path"] == "/etc/app.conf" and f["after"]["m"] == "640")


def test_backend_is_logged_and_exposed(tmp_path: Path) -> None:
    with capture_logs() as logs, guarding(tmp_path, "inotify") as g:
        health = g.guard.health()
    assert health.backend == "inotify" and health.watches >= 5 and health.overflows == 0
    assert any(e["event"] == "guard_backend" and e["backend"] == "inotify" for e in logs)


def test_auto_prefers_fanotify_where_it_runs(tmp_path: Path) -> None:
    usable, why = fanotify.available()
    with guarding(tmp_path, "auto") as g:
        assert g.guard.health().backend == ("fanotify" if usable else "inotify"), why


def test_watch_plan_keeps_out_of_excluded_and_mutable_trees() -> None:
    assert may_lie_below("/var/tmp", "/var") and may_lie_below("/proc", "/")
    assert not may_lie_below("/var/tmp", "/etc") and not may_lie_below("/var", "/var")
    assert may_lie_below("/home/*/cache", "/home/alice")
    img_policy = parse_policy(tomllib.loads(POLICY), source="guard-test.toml")
    assert mutable_below(img_policy, "/var/log") and mutable_below(img_policy, "/var/log/app")
    assert not mutable_below(img_policy, "/var") and not mutable_below(img_policy, "/etc")


def test_intake_merges_a_burst() -> None:
    intake = Intake()
    for name in ("/r/a/b/c", "/r/a/b", "/r/x", "/r/a/b/c/d"):
        intake.changed(name, tree=name == "/r/a/b", process=None)
    intake.changed("/r/x", tree=False, process={"pid": 7})
    batch = intake.take(threading.Event(), 0)
    assert set(batch.changes) == {"/r/a/b", "/r/x"}
    assert batch.changes["/r/a/b"].tree and batch.changes["/r/x"].process == {"pid": 7}


# --- overflow and the watch limit --------------------------------------------------------------


@contextmanager
def sysctl(path: str, value: str) -> Iterator[None]:
    """Set a kernel tunable for the duration (root only); always restored."""
    proc = Path(path)
    old = proc.read_text()
    proc.write_text(value)
    try:
        yield
    finally:
        proc.write_text(old)


@contextmanager
def overflowed(
    tmp_path: Path, backend: str, *, also: str = ""
) -> Iterator[tuple[Image, Recorder, Guard, Rescanner]]:
    """A guard whose kernel event queue holds 8 events, flooded until it overflows, then
    the metadata pass that must follow. ``also``: a shell command run inside the burst."""
    img = image(tmp_path)
    found = Recorder()
    judge = img.judge()
    rescanner = Rescanner(judge, found, config=QUIET)
    guard = Guard(judge, found, rescanner, config=GuardConfig(backend=backend))
    rescanner.start()
    # The queue length is fixed when the instance is made: make ours tiny, then put the
    # tunable back at once, so nothing else on the machine is affected.
    with sysctl(f"/proc/sys/fs/{backend}/max_queued_events", "8"):
        guard.start()
    burst = img.root / "var/log/app"
    try:
        for attempt in range(20):
            create = f"for i in $(seq 1 500); do : > f{attempt}_$i; done"
            remove = f"for i in $(seq 1 500); do rm f{attempt}_$i; done"
            command = f"cd {burst} && {create} && {also or 'true'} && {remove}"
            subprocess.run(["sh", "-c", command], check=True)
            if guard.health().overflows:
                break
        assert guard.health().overflows >= 1
        wait_until(lambda: rescanner.passes >= 1, what="the metadata pass after the overflow")
        assert guard.health().last_rescan is not None
        yield img, found, guard, rescanner
    finally:
        guard.stop()
        rescanner.stop()


@pytest.mark.root
def test_forced_overflow_is_reported_and_answered_by_a_rescan(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("lowering fs.inotify.max_queued_events needs root")
    readme = tmp_path / "root/usr/share/doc/readme"
    with overflowed(tmp_path, "inotify", also=f"chmod 600 {readme}") as (_img, found, _g, _r):
        _s, integrity = found.wait_for(lambda s, f: f.get("reason") == "inotify_overflow")
        assert integrity["type"] == "integrity" and "integrity unknown" in integrity["detail"]
        # the chmod is reported once, by whichever saw it first
        found.file("/usr/share/doc/readme", "modified")
        assert [s for s, f in found.items if f.get("path") == "/usr/share/doc/readme"] in (
            ["realtime"],
            ["rescan"],
        )


@pytest.mark.root
def test_watch_limit_is_reported_with_advice_and_rescans_take_over(tmp_path: Path) -> None:
    """Run in a user namespace of its own, whose inotify watch limit (1) binds only it."""
    if os.geteuid() != 0:
        pytest.skip("a user namespace mapped to root needs root here")
    img = image(tmp_path)
    child = subprocess.Popen(
        [
            "unshare",
            "--user",
            "--map-root-user",
            sys.executable,
            str(HERE / "guard_child.py"),
            str(img.root),
            str(tmp_path / "manifest"),
            "1",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parents[1])},
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        seen: list[tuple[str, dict[str, Any]]] = []

        def read_until(match: Any) -> dict[str, Any]:
            assert child.stdout is not None
            for line in child.stdout:
                source, finding = json.loads(line)
                seen.append((source, finding))
                if match(source, finding):
                    return dict(finding)
            raise AssertionError(f"child ended; saw {seen}")

        limit = read_until(lambda s, f: f.get("reason") == "watch_limit")
        assert "inotify watch limit reached — raise fs.inotify.max_user_watches" in limit["detail"]
        assert "rescans" in limit["detail"]
        os.chmod(img.root / "usr/bin/tool", 0o4755)  # in a directory left unwatched
        source_and = read_until(lambda s, f: f.get("path") == "/usr/bin/tool")
        assert source_and["change"] == "modified"
        assert ("rescan", source_and) in seen
        child.stdin.close()
        health = read_until(lambda s, f: s == "health")
        assert health["backend"] == "inotify" and health["watches"] <= 1 and health["unwatched"]
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


# --- a backend that dies -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["inotify", pytest.param("fanotify", marks=pytest.mark.root)])
def test_a_backend_whose_reader_dies_is_reported_and_rescans_take_over(
    tmp_path: Path, backend: str
) -> None:
    if backend == "fanotify":
        usable, why = fanotify.available()
        if not usable:
            pytest.skip(why)
    rescans = RescanConfig(
        metadata_interval_s=3600, full_rehash_period_s=1e9, fallback_interval_s=0.2
    )
    with guarding(tmp_path, backend, rescans) as g:
        guard, found, img = g.guard, g.found, g.image
        g.rescanner.start()
        assert guard.backend is not None and guard.health().backend == backend
        # The reader's descriptor becomes a directory's: its next read fails (EISDIR).
        reader_fd = guard.backend._fd if backend == "fanotify" else guard.backend._fd._inotify_fd  # type: ignore[attr-defined]
        directory = os.open(img.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with capture_logs():
                os.dup2(directory, reader_fd)
                (img.root / "etc" / "hostname").write_text("woken\n")  # something to read
                source, finding = found.wait_for(lambda _s, f: f.get("type") == "integrity")
        finally:
            os.close(directory)
        assert (source, finding["reason"], finding["severity"]) == (
            "integrity",
            f"{backend}_failed",
            "warning",
        )
        assert f"the {backend} reader failed" in finding["detail"]
        assert "falling back to frequent rescans" in finding["detail"]
        wait_until(lambda: guard.health().backend == "polling", what="the guard to fall back")
        assert g.rescanner.health().degraded == f"{backend}_failed"
        # Nothing watches in realtime any more, and still a change is found: by a rescan.
        (img.root / "etc" / "passwd").write_text("mallory:x:0:0::/:/bin/sh\n")
        source, _ = found.wait_for(lambda s, f: f.get("path") == "/etc/passwd")
        assert source == "rescan"
        assert guard.running


@pytest.mark.root
def test_a_reader_thread_that_ends_without_a_word_is_noticed(tmp_path: Path) -> None:
    usable, why = fanotify.available()
    if not usable:
        pytest.skip(why)
    quick = GuardConfig(backend="fanotify", check_interval_s=0.05)
    with guarding(tmp_path, "fanotify", guard_config=quick) as g:
        guard, found = g.guard, g.found
        backend = guard.backend
        assert isinstance(backend, fanotify.FanotifyBackend)
        backend._stopping.set()  # its reader ends, and nobody told the guard
        os.write(backend._wake_w, b"x")
        with capture_logs() as logs:
            _, finding = found.wait_for(lambda _s, f: f.get("type") == "integrity")
        assert finding["reason"] == "fanotify_failed"
        assert finding["detail"].startswith("the fanotify reader thread has ended")
        assert [e["failure"] for e in logs if e["event"] == "guard_backend_died"] == [
            "the fanotify reader thread has ended"
        ]
        assert guard.health().backend == "polling" and guard.running
