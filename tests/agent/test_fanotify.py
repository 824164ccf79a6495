"""The fanotify backend for real: filesystem marks on the test file system, the process behind
a change named by pid, executable, command line, uid, login uid and SSH session, and a forced
queue overflow. Skipped, with the kernel's reason, only where fanotify cannot run."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent import fanotify
from agent.fanotify import describe_process, fsid_key, parse_events
from tests.agent.test_guard import Guarded, guarding, overflowed

pytestmark = pytest.mark.root

WRITER = (
    "import sys\n"
    "open(sys.argv[1], 'w').write('planted')\n"
    "print('written', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Guarded]:
    usable, why = fanotify.available()
    if not usable:
        pytest.skip(why)
    with guarding(tmp_path, "fanotify") as g:
        yield g


def _loginuid(pid: int) -> int | None:
    value = int(Path(f"/proc/{pid}/loginuid").read_text())
    return None if value == 0xFFFFFFFF else value


def test_available_here_or_says_why() -> None:
    usable, why = fanotify.available()
    if os.geteuid() == 0:
        assert usable, why  # root on a 6.x kernel: the backend must run
    else:
        assert not usable and "CAP_SYS_ADMIN" in why


@contextmanager
def wrote(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    """Run ``argv``, whose last process writes and then waits; yield once it has written."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "written\n"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait()
        proc.stdout.close()


def test_names_the_child_process_that_wrote(guarded: Guarded) -> None:
    target = guarded.root / "etc/planted.conf"
    with wrote([sys.executable, "-c", WRITER, str(target), "--marker=fanotify-test"]) as child:
        process = guarded.found.file("/etc/planted.conf", "added")["process"]
        assert process["pid"] == child.pid
        assert process["exited"] is False
        assert process["exe"] == os.path.realpath(sys.executable)
        assert process["cmdline"][-1] == "--marker=fanotify-test"
        assert process["uid"] == os.getuid()
        assert process["loginuid"] == _loginuid(child.pid)
        assert process["ssh_session"] is None


def test_names_the_ssh_session_a_process_descends_from(guarded: Guarded) -> None:
    """A process chain under a parent titled as OpenSSH titles its per-session process."""
    target = guarded.root / "usr/bin/implant"
    script = shlex.join([sys.executable, "-c", WRITER, str(target)]) + "; true"
    title = shlex.quote("sshd-session: alice@pts/7")
    with wrote(["bash", "-c", f"exec -a {title} bash -c {shlex.quote(script)}"]) as session:
        process = guarded.found.file("/usr/bin/implant", "added")["process"]
        assert process["pid"] != session.pid
        assert process["ssh_session"] == {"pid": session.pid, "user": "alice", "tty": "pts/7"}


def test_process_that_is_gone_is_said_to_have_exited() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert describe_process(child.pid) == {"pid": child.pid, "exited": True}


def test_forced_overflow_is_reported_and_answered_by_a_rescan(tmp_path: Path) -> None:
    usable, why = fanotify.available()
    if not usable:
        pytest.skip(why)
    with overflowed(tmp_path, "fanotify") as (_img, found, _guard, _rescanner):
        _s, integrity = found.wait_for(lambda s, f: f.get("reason") == "fanotify_overflow")
        assert integrity["severity"] == "warning"


def test_parse_events_stops_at_a_truncated_event() -> None:
    # one event header claiming more bytes than were read: nothing is made up
    header = fanotify._META.pack(64, fanotify.METADATA_VERSION, 0, 24, fanotify.FAN_CREATE, -1, 1)
    assert list(parse_events(header)) == []


@pytest.fixture
def ext4_with_high_fsid(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted ext4 whose first fsid word has its top bit set (ext4's fsid is the
    XOR of its UUID's halves; about half of all file systems have such a word)."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is missing")
    image = tmp_path / "fs.img"
    with image.open("wb") as fh:
        fh.truncate(32 << 20)
    uuid = "21436587-7856-3412-0000-000000000000"  # fsid 0x12345678_87654321
    subprocess.run(["mkfs.ext4", "-q", "-U", uuid, str(image)], check=True, capture_output=True)
    mount = tmp_path / "fs"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mount)], check=False, capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount here: {mounted.stderr!r}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_events_on_a_file_system_whose_fsid_word_has_its_top_bit_set(
    ext4_with_high_fsid: Path,
) -> None:
    usable, why = fanotify.available()
    if not usable:
        pytest.skip(why)
    assert os.statvfs(ext4_with_high_fsid).f_fsid == fsid_key(0x87654321, 0x12345678)
    with guarding(ext4_with_high_fsid, "fanotify") as g:
        assert g.guard.health().backend == "fanotify"
        (g.root / "etc/app.conf").write_text("listen = 6666\n")
        finding = g.found.file("/etc/app.conf", "modified")
        assert finding["process"]["pid"] == os.getpid()
