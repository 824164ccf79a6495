"""Measuring paths and walking trees: what is recorded, and what is never done."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent import measure, record
from agent import walk as walk_module
from agent.measure import Entry, measure_path, order_key
from agent.mounts import MountTable
from agent.policy import Policy, parse_policy
from agent.record import Block
from agent.walk import Walk
from tests.agent.imagetree import at, build

POLICY_TEXT = '[policy]\nname = "t"\nroots = ["/"]\n'  # what policy() makes, as a file


def policy(**head: Any) -> Policy:
    data: dict[str, Any] = {"policy": {"name": "t", "roots": ["/"], **head}}
    return parse_policy(data, source="t.toml")


def walk_entries(root: Path, pol: Policy, *, workers: int = 1) -> list[Entry]:
    from agent import record

    with Walk(root, pol, workers=workers) as walk:
        return [record.from_line(line) for _path, line, _is_dir in walk.records()]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build(tmp_path / "root")


def test_regular_file_is_fully_described(root: Path) -> None:
    file = at(root, "/usr/bin/tool")
    os.chown(file, 12, 34)
    file.chmod(0o4755)
    entry = measure_path(root, "/usr/bin/tool", policy())
    assert entry is not None
    st = file.lstat()
    assert entry.path == "/usr/bin/tool"
    assert (entry.type, entry.mode, entry.uid, entry.gid) == ("file", 0o4755, 12, 34)
    assert entry.mode & stat.S_ISUID
    assert (entry.size, entry.nlink, entry.state) == (st.st_size, 1, "ok")
    assert entry.digest == hashlib.sha256(file.read_bytes()).hexdigest()
    assert (entry.mtime_ns, entry.ctime_ns, entry.ino) == (
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
    )


def test_xattrs_are_recorded(root: Path) -> None:
    file = at(root, "/usr/bin/tool")
    os.setxattr(file, "user.origin", b"image-build")
    os.setxattr(file, "security.capability", bytes.fromhex("0100000200200000" + "00" * 12))
    entry = measure_path(root, "/usr/bin/tool", policy())
    assert entry is not None
    assert dict(entry.xattrs) == {
        "security.capability": bytes.fromhex("0100000200200000" + "00" * 12),
        "user.origin": b"image-build",
    }
    assert [name for name, _ in entry.xattrs] == sorted(name for name, _ in entry.xattrs)


def test_symlink_is_read_never_followed(root: Path) -> None:
    os.symlink("/etc/shadow", at(root, "/usr/bin/sneaky"))
    entry = measure_path(root, "/usr/bin/sneaky", policy())
    assert entry is not None
    assert (entry.type, entry.target, entry.digest) == ("symlink", "/etc/shadow", None)


def test_special_files_are_never_opened(root: Path) -> None:
    at(root, "/dev").mkdir()
    os.mknod(at(root, "/dev/zero"), 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    os.mknod(at(root, "/dev/sda"), 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    os.mkfifo(at(root, "/dev/fifo"))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(at(root, "/dev/sock")))
        pol = policy(exclude=[])
        found = {path: measure_path(root, path, pol) for path in ("/dev/zero", "/dev/sda",
                 "/dev/fifo", "/dev/sock")}  # fmt: skip
    kinds = {path: (e.type, e.rdev, e.digest) for path, e in found.items() if e is not None}
    assert kinds == {
        "/dev/zero": ("chardev", os.makedev(1, 5), None),
        "/dev/sda": ("blockdev", os.makedev(8, 0), None),
        "/dev/fifo": ("fifo", 0, None),
        "/dev/sock": ("socket", 0, None),
    }


def test_missing_and_excluded_paths_yield_no_entry(root: Path) -> None:
    assert measure_path(root, "/no/such/file", policy()) is None
    at(root, "/proc").mkdir()
    assert measure_path(root, "/proc", policy()) is None


def test_file_over_the_size_cap_is_too_large(root: Path) -> None:
    entry = measure_path(root, "/usr/bin/tool", policy(max_file_size_bytes=100))
    assert entry is not None
    assert (entry.state, entry.digest, entry.size) == ("too_large", None, 10244)


def test_mutable_content_is_not_hashed(root: Path) -> None:
    data = {
        "policy": {"name": "t"},
        "rule": [{"name": "m", "kind": "mutable", "paths": ["/var/**"]}],
    }
    entry = measure_path(root, "/var/log/app.log", parse_policy(data, source="t.toml"))
    assert entry is not None and entry.digest is None and entry.state == "ok"


@pytest.mark.root
def test_unreadable_file_gets_a_state_not_a_skip() -> None:
    # root reads everything, so measure as nobody, in a tree that nobody can reach.
    with tempfile.TemporaryDirectory(dir="/tmp") as public:
        os.chmod(public, 0o755)
        _measure_shadow_as_nobody(build(Path(public) / "root"))


def _measure_shadow_as_nobody(root: Path) -> None:
    secret = at(root, "/etc/shadow")
    secret.chmod(0o600)
    at(root, "/root").mkdir(mode=0o700)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops to nobody, measures, reports through the pipe, and exits
        try:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            entries = [measure_path(root, p, policy()) for p in ("/etc/shadow", "/root")]
            report = json.dumps([[e.state, e.digest, e.size] for e in entries if e is not None])
            os.write(write_end, report.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        report = fh.read()
    assert os.waitpid(pid, 0)[1] == 0
    assert json.loads(report) == [
        ["unreadable", None, secret.stat().st_size],
        ["unreadable", None, 0],
    ]


# --- files that change while they are read ---------------------------------------------------


@pytest.fixture
def appending_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path, int], None]]:
    """Make the next ``times`` reads of ``file`` append to it first, as a writer would."""
    real_read = os.read
    plan: dict[str, Any] = {}

    def read(fd: int, n: int) -> bytes:
        if plan.get("times", 0) > 0 and os.fstat(fd).st_ino == plan["ino"]:
            plan["times"] -= 1
            with open(plan["file"], "ab") as fh:
                fh.write(b"appended while read\n")
        return real_read(fd, n)

    def arm(file: Path, times: int) -> None:
        plan.update(file=file, ino=file.stat().st_ino, times=times)

    monkeypatch.setattr(measure.os, "read", read)
    yield arm


def test_file_changing_once_is_read_again(
    root: Path, appending_reads: Callable[[Path, int], None]
) -> None:
    file = at(root, "/etc/passwd")
    appending_reads(file, 1)
    entry = measure_path(root, "/etc/passwd", policy())
    assert entry is not None and entry.state == "ok"
    assert entry.digest == hashlib.sha256(file.read_bytes()).hexdigest()
    assert entry.size == file.stat().st_size


def test_file_that_keeps_changing_is_unstable(
    root: Path, appending_reads: Callable[[Path, int], None]
) -> None:
    file = at(root, "/etc/passwd")
    appending_reads(file, 100)
    entry = measure_path(root, "/etc/passwd", policy())
    assert entry is not None
    assert (entry.state, entry.digest) == ("unstable", None)


def test_file_that_vanishes_while_measured_yields_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def vanishing_open(
        path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        if path.endswith("/etc/passwd"):
            os.unlink(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(measure.os, "open", vanishing_open)
    assert measure_path(root, "/etc/passwd", policy()) is None


def test_file_replaced_by_a_symlink_while_measured_is_the_symlink(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def swapping_open(
        path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        if path.endswith("/etc/passwd") and not os.path.islink(path):
            os.unlink(path)
            os.symlink("/etc/shadow", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(measure.os, "open", swapping_open)
    entry = measure_path(root, "/etc/passwd", policy())
    assert entry is not None
    assert (entry.type, entry.target, entry.digest) == ("symlink", "/etc/shadow", None)


# --- the walk --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_walk_is_in_manifest_order_and_matches_measure_path(root: Path, workers: int) -> None:
    for index in range(40):  # enough directories to be split among several tasks
        directory = at(root, f"/opt/pkg{index:02d}/sub")
        directory.mkdir(parents=True)
        (directory / "file").write_text(str(index))
    pol = policy()
    entries = walk_entries(root, pol, workers=workers)
    paths = [e.path for e in entries]
    assert paths == sorted(paths, key=order_key)
    assert paths[0] == "/" and "/opt/pkg39/sub/file" in paths
    assert len(paths) == len(set(paths))
    assert all(e == measure_path(root, e.path, pol) for e in entries)


def test_walk_makes_the_records_measure_path_makes(root: Path) -> None:
    """A walk writes a regular file's record straight from its look (``record.file_parts``),
    and its Merkle leaves in blocks: the same bytes as the record of ``measure_path``'s entry,
    for files with owners, set-id bits, xattrs, several links and names JSON must escape."""
    tool = at(root, "/usr/bin/tool")
    os.chown(tool, 12, 34)
    tool.chmod(0o4755)
    os.setxattr(tool, "user.origin", b"image-build")
    os.setxattr(tool, "security.capability", bytes.fromhex("0100000200200000" + "00" * 12))
    odd = at(root, "/usr/bin")
    (odd / 'quote"back\\slash\nnewline').write_bytes(b"escaped\n")
    (odd / "caf\u00e9-\u2603").write_bytes(b"utf-8\n")
    (odd / os.fsdecode(b"latin-\xe9")).write_bytes(b"not utf-8\n")
    (odd / "empty").write_bytes(b"")
    os.link(odd / "empty", odd / "empty-again")
    pol = policy()
    with Walk(root, pol, workers=1) as walk:
        blocks = list(walk.blocks())
    records = [r for block in blocks for r in block.records()]
    assert len(records) > 10
    for path, line, is_dir in records:
        entry = measure_path(root, path, pol)
        assert entry is not None
        assert line == record.to_line(replace(entry, hardlink=record.from_line(line).hardlink))
        assert is_dir == (entry.type == "dir")
    for block in blocks:
        assert block == Block.of(block.records())  # the leaves and hints of the lines sent


@pytest.mark.parametrize("workers", [1, 2])
def test_a_walk_given_its_reference_compares_in_its_workers(root: Path, workers: int) -> None:
    """The same paths are unchanged whether the caller or the workers compare; the workers
    send them as runs, and measure the others."""
    from agent import manifest
    from agent.walk import Same, SameRun

    for index in range(40):  # enough directories to be split among several tasks
        directory = at(root, f"/opt/pkg{index:02d}/sub")
        directory.mkdir(parents=True)
        (directory / "file").write_text(str(index))
    pol = policy()
    baked = root.parent / "m.gz"
    with (
        Walk(root, pol, workers=workers) as walk,
        manifest.ManifestWriter(baked, policy=pol, policy_text=POLICY_TEXT, build_id="") as writer,
    ):
        for path, line, is_dir in walk.records():
            writer.add_line(path, line, is_dir=is_dir)
        writer.finish()
    at(root, "/opt/pkg03/sub/file").write_text("changed")
    at(root, "/opt/pkg07/sub/new").write_text("new")
    at(root, "/opt/pkg09/sub/file").unlink()
    base = manifest.load_baseline(baked)

    with Walk(root, pol, workers=workers, fast=True) as walk:
        by_caller = list(walk.compared(base))
        count = walk.count
    with Walk(root, pol, workers=workers, fast=True, reference=base) as walk:
        by_workers = list(walk.changes())
        assert walk.count == count
    same = [item.path for item in by_caller if isinstance(item, Same)]
    runs = [item for item in by_workers if isinstance(item, SameRun)]
    assert sorted(p for run in runs for p in run.paths.split("\0")) == sorted(same)
    measured = [item for item in by_workers if isinstance(item, Entry)]
    assert sum(run.total for run in runs) == len(same) == count - len(measured)
    assert measured == [item for item in by_caller if isinstance(item, Entry)]
    assert [e.path for e in measured] == [
        "/opt/pkg03/sub/file",
        "/opt/pkg07/sub",  # a name added: its directory's times changed
        "/opt/pkg07/sub/new",
        "/opt/pkg09/sub",
    ]


def _open_ahead_then(
    monkeypatch: pytest.MonkeyPatch, name: str, act: Callable[[Path], None]
) -> list[str]:
    """Run ``act(file)`` on the file called ``name`` just after the walk opened it ahead of
    hashing it; return every path opened ahead."""
    real = walk_module.open_ahead
    opened: list[str] = []

    def opening(path: str, size: int, dir_fd: int | None = None) -> int | None:
        fd = real(path, size, dir_fd)
        full = path if dir_fd is None else f"{os.readlink(f'/proc/self/fd/{dir_fd}')}/{path}"
        opened.append(full)
        if full.endswith("/" + name):
            act(Path(full))
        return fd

    monkeypatch.setattr(walk_module, "open_ahead", opening)
    return opened


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_file_that_grows_after_it_was_opened_ahead_is_read_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def grow(file: Path) -> None:
        with open(file, "ab") as fh:
            fh.write(b"written after the walk opened the file\n")

    opened = _open_ahead_then(monkeypatch, "passwd", grow)
    before = _open_fds()
    entries = {e.path: e for e in walk_entries(root, policy())}
    file = at(root, "/etc/passwd")
    assert any(full.endswith("/etc/passwd") for full in opened)
    assert entries["/etc/passwd"].state == "ok"
    assert entries["/etc/passwd"].digest == hashlib.sha256(file.read_bytes()).hexdigest()
    assert entries["/etc/passwd"].size == file.stat().st_size
    assert _open_fds() == before


def test_file_removed_after_it_was_opened_ahead_yields_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk holds the file open, but its content is not the image's any more."""
    _open_ahead_then(monkeypatch, "passwd", Path.unlink)
    before = _open_fds()
    paths = {e.path for e in walk_entries(root, policy())}
    assert "/etc/passwd" not in paths and "/etc" in paths
    assert _open_fds() == before


def test_walk_closes_every_file_it_opened_ahead(root: Path) -> None:
    os.link(at(root, "/usr/bin/tool"), at(root, "/usr/bin/tool-again"))
    before = _open_fds()
    entries = {e.path: e for e in walk_entries(root, policy(max_file_size_bytes=100))}
    assert entries["/usr/bin/tool"].state == "too_large"
    assert entries["/usr/bin/tool-again"].hardlink == "/usr/bin/tool"
    assert _open_fds() == before


def test_hardlinks_are_hashed_once_and_named(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    os.link(at(root, "/usr/bin/tool"), at(root, "/usr/bin/tool-again"))
    os.link(at(root, "/usr/bin/tool"), at(root, "/usr/share/tool-third"))
    hashed: list[str] = []
    real = measure._hash_stable

    def counting(full: str, st: os.stat_result, fd: int | None = None) -> str | None:
        hashed.append(full)
        return real(full, st, fd)

    monkeypatch.setattr(measure, "_hash_stable", counting)
    entries = {e.path: e for e in walk_entries(root, policy())}
    tool = entries["/usr/bin/tool"]
    assert sum(1 for full in hashed if os.path.samefile(full, at(root, "/usr/bin/tool"))) == 1
    assert tool.hardlink is None and tool.nlink == 3
    for other in ("/usr/bin/tool-again", "/usr/share/tool-third"):
        assert entries[other].hardlink == "/usr/bin/tool"
        assert entries[other].digest == tool.digest


def test_invalid_utf8_and_newline_names_survive(root: Path) -> None:
    raw = os.fsencode(at(root, "/usr/share"))
    for name in (b"\xff\xfe", b"line\nbreak", b"tab\tand space"):
        with open(os.path.join(raw, name), "wb") as fh:
            fh.write(name)
    paths = {os.fsencode(e.path) for e in walk_entries(root, policy())}
    assert {
        b"/usr/share/\xff\xfe",
        b"/usr/share/line\nbreak",
        b"/usr/share/tab\tand space",
    } <= paths


def test_symlink_loops_and_links_to_directories_are_harmless(root: Path) -> None:
    os.symlink("b", at(root, "/usr/a"))
    os.symlink("a", at(root, "/usr/b"))
    os.symlink("..", at(root, "/usr/up"))
    entries = {e.path: e for e in walk_entries(root, policy())}
    assert entries["/usr/a"].target == "b" and entries["/usr/up"].type == "symlink"
    assert not any(p.startswith("/usr/up/") for p in entries)


def test_excluded_paths_are_never_descended(root: Path) -> None:
    for path in ("/proc/1/status", "/srv/cache/blob", "/srv/keep"):
        at(root, path).parent.mkdir(parents=True, exist_ok=True)
        at(root, path).write_text("x")
    paths = {e.path for e in walk_entries(root, policy(exclude=["/proc", "/srv/cache"]))}
    assert "/srv/keep" in paths
    assert not {p for p in paths if p.startswith(("/proc", "/srv/cache"))}


def test_policy_roots_limit_the_walk(root: Path) -> None:
    paths = [e.path for e in walk_entries(root, policy(roots=["/usr/lib", "/etc", "/etc/x"]))]
    assert paths[0] == "/etc" and "/usr/lib/libx.so" in paths
    assert not any(p.startswith(("/var", "/usr/bin")) for p in paths)


@pytest.mark.root
@pytest.mark.parametrize("head", [{}, {"one_filesystem": True, "exclude_fstypes": []}])
def test_other_file_systems_are_not_descended(root: Path, head: dict[str, Any]) -> None:
    mount_point = at(root, "/var/volatile")
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mount_point)], check=True)
    try:
        (mount_point / "inside").write_text("x")
        with Walk(root, policy(**head), workers=1) as walk:
            paths = [path for path, _line, _is_dir in walk.records()]
        assert walk.skipped == ["/var/volatile"]
        assert not any(p.startswith("/var/volatile") for p in paths)
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_mount_table_parses_escaped_mount_points() -> None:
    table = MountTable.parse(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "40 1 0:35 / /mnt/with\\040space rw shared:1 - tmpfs none rw\n"
        "41 1 8:1 / / rw - ext4 /dev/vda rw\n"
    )
    assert table.fstype("/mnt/with space") == "tmpfs"
    assert table.fstype("/proc") == "proc"
    assert table.fstype("/srv/data") == "ext4"  # the mount above it


def test_walk_from_a_threaded_process_gives_the_same_records(root: Path) -> None:
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="busy-elsewhere")
    other.start()  # a daemon with threads must not fork them: workers come from a forkserver
    try:
        with Walk(root, policy(), workers=2) as walk:
            threaded = list(walk.records())
    finally:
        stop.set()
        other.join()
    with Walk(root, policy(), workers=1) as walk:
        assert threaded == list(walk.records())
