"""The package manifest against real package databases: dpkg and rpm install into temporary
roots, this machine's own dpkg database, and debsums as the reference for verification."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.baseline import verify_vendor
from agent.errors import EXIT_DRIFT, EXIT_OK, PackageDbError
from agent.packages import (
    Package,
    PackageChange,
    PackageSet,
    UnsettledPackage,
    database_paths,
    detect_manager,
    diff_packages,
    read_packages,
    verify_package_files,
)
from agent.policy import parse_policy
from tests.agent.imagetree import bake
from tests.conftest import REPO

NATIVE = subprocess.run(
    ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
).stdout.strip()
FOREIGN = "i386" if NATIVE != "i386" else "amd64"


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# --- a real dpkg in a temporary root ---------------------------------------------------------


class DpkgRoot:
    """An image root whose packages are installed by the real dpkg (no maintainer scripts)."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root = root
        self.work = work
        for sub in ("info", "updates", "triggers"):
            (root / "var/lib/dpkg" / sub).mkdir(parents=True, exist_ok=True)
        (root / "var/lib/dpkg/status").touch()

    def dpkg(self, *args: str) -> None:
        subprocess.run(
            ["dpkg", f"--root={self.root}", "--force-not-root", "--force-bad-path", *args],
            check=True,
            capture_output=True,
        )

    def deb(
        self,
        name: str,
        version: str,
        files: dict[str, bytes],
        *,
        arch: str = "all",
        conffiles: tuple[str, ...] = (),
        extra: str = "",
    ) -> Path:
        tree = self.work / f"{name}_{version}_{arch}"
        (tree / "DEBIAN").mkdir(parents=True)
        for path, data in files.items():
            (tree / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (tree / path.lstrip("/")).write_bytes(data)
        (tree / "DEBIAN/control").write_text(
            f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
            f"Maintainer: Test <test@example.org>\n{extra}"
            "Description: a test package\n spanning\n .\n several lines\n"
        )
        sums = "".join(
            f"{md5(data)}  {path.lstrip('/')}\n"
            for path, data in files.items()
            if path not in conffiles
        )
        (tree / "DEBIAN/md5sums").write_text(sums)
        if conffiles:
            (tree / "DEBIAN/conffiles").write_text("".join(f"{c}\n" for c in conffiles))
        out = self.work / f"{tree.name}.deb"
        subprocess.run(
            ["dpkg-deb", "--build", "--root-owner-group", str(tree), str(out)],
            check=True,
            capture_output=True,
        )
        return out

    def install(self, *debs: Path, options: tuple[str, ...] = ()) -> None:
        self.dpkg(*options, "-i", *map(str, debs))


@pytest.fixture
def image(tmp_path: Path) -> DpkgRoot:
    (tmp_path / "work").mkdir()
    return DpkgRoot(tmp_path / "root", tmp_path / "work")


HELLO = {
    "/usr/bin/hello": b"#!/bin/sh\necho hello\n",
    "/usr/share/doc/hello/README": b"hello, world\n",
    "/etc/hello.conf": b"greeting = hello\n",
}


@pytest.fixture
def hello(image: DpkgRoot) -> DpkgRoot:
    image.install(image.deb("hello", "1.0-1", HELLO, conffiles=("/etc/hello.conf",)))
    return image


# --- reading the database --------------------------------------------------------------------


def dpkg_query(root: Path) -> set[Package]:
    out = subprocess.run(
        [
            "dpkg-query",
            f"--admindir={root}/var/lib/dpkg",
            "-W",
            "-f=${Package}\t${Version}\t${Architecture}\t${db:Status-Status}\n",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {
        Package(n, v, a)
        for n, v, a, s in (line.split("\t") for line in out.splitlines())
        if s not in ("not-installed", "config-files")
    }


def test_reads_what_real_dpkg_installed_including_multiarch(image: DpkgRoot) -> None:
    image.dpkg("--add-architecture", FOREIGN)
    lib = {arch: {f"/usr/lib/{arch}/libdw.so.1": arch.encode()} for arch in (NATIVE, FOREIGN)}
    image.install(
        image.deb("hello", "1:2.0~rc1-1", HELLO, conffiles=("/etc/hello.conf",)),
        *(
            image.deb("libdw", "3.1", lib[a], arch=a, extra="Multi-Arch: same\n")
            for a in (NATIVE, FOREIGN)
        ),
    )
    found = read_packages(image.root)
    assert found == PackageSet.build(
        "dpkg",
        [
            Package("hello", "1:2.0~rc1-1", "all"),
            Package("libdw", "3.1", FOREIGN),
            Package("libdw", "3.1", NATIVE),
        ],
    )
    assert len(found.packages) == 3
    assert set(found.packages) == dpkg_query(image.root)
    assert detect_manager(image.root) == "dpkg"
    assert database_paths(image.root) == [
        image.root / "var/lib/dpkg/status",
        image.root / "var/lib/dpkg/updates",
    ]


def test_diff_of_installed_removed_and_upgraded_packages(hello: DpkgRoot) -> None:
    image = hello
    image.install(image.deb("gone", "1", {"/usr/share/gone/x": b"x"}))
    image.install(image.deb("kept", "1", {"/usr/share/kept/x": b"x"}))
    before = read_packages(image.root)
    image.install(image.deb("hello", "1.1-1", HELLO, conffiles=("/etc/hello.conf",)))
    image.dpkg("--purge", "gone")
    image.install(image.deb("fresh", "0.1", {"/usr/share/fresh/x": b"x"}))
    after = read_packages(image.root)
    assert diff_packages(before, after) == [
        PackageChange("installed", "fresh", "all", None, "0.1"),
        PackageChange("removed", "gone", "all", "1", None),
        PackageChange("changed", "hello", "all", "1.0-1", "1.1-1"),
    ]
    assert diff_packages(after, after) == []
    image.dpkg("--remove", "hello")  # its conffile stays: config-files, which is not present
    assert "hello" not in {p.name for p in read_packages(image.root).packages}


def test_unpacked_but_unconfigured_package_is_present_and_unsettled(image: DpkgRoot) -> None:
    image.dpkg("--unpack", str(image.deb("half", "2", {"/usr/share/half/x": b"x"})))
    with capture_logs() as logs:
        found = read_packages(image.root)
    assert found.packages == (Package("half", "2", "all"),)
    assert found.unsettled == (UnsettledPackage("half", "all", "unpacked"),)
    assert {
        "event": "package_unsettled",
        "package": "half",
        "arch": "all",
        "state": "unpacked",
    } in [{k: v for k, v in e.items() if k != "log_level"} for e in logs]
    as_json = found.to_json()
    assert as_json == [{"name": "half", "version": "2", "arch": "all", "state": "unpacked"}]
    assert PackageSet.from_json(as_json, manager="dpkg") == found


def test_pending_journal_in_updates_is_applied_in_order(hello: DpkgRoot) -> None:
    updates = hello.root / "var/lib/dpkg/updates"
    stanza = "Package: hello\nStatus: install ok {}\nArchitecture: all\nVersion: {}\n"
    (updates / "0000000002").write_text(stanza.format("installed", "9.9"))
    (updates / "0000000001").write_text(stanza.format("half-configured", "5.0"))
    (updates / "tmp.i").write_text("garbage being written")
    found = read_packages(hello.root)
    assert found.packages == (Package("hello", "9.9", "all"),)
    assert found.unsettled == ()
    (updates / "0000000003").write_text(stanza.format("not-installed", "9.9"))
    assert read_packages(hello.root).packages == ()


STATUS = """\
Package: alpha
Status: install ok installed
Architecture: amd64
Version: 1.0
Description: first line
 continued
 .
 again

Package: beta
Status: deinstall ok config-files
Architecture: all
Version: 2.0
Conffiles:
 /etc/beta.conf 0123456789abcdef0123456789abcdef

Package: gamma
Status: hold ok triggers-pending
Architecture: all
Version: 3.0

Package: delta
Status: install reinstreq half-installed
Architecture: all
Version: 4.0

Package: epsilon
Status: purge ok not-installed
Architecture: all

Package: zeta
Status: deinstall ok installed
Architecture: all
Version: 6.0
"""


def write_status(root: Path, text: str | bytes) -> Path:
    status = root / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True, exist_ok=True)
    status.write_bytes(text.encode() if isinstance(text, str) else text)
    return status


def test_status_states(tmp_path: Path) -> None:
    write_status(tmp_path, STATUS)
    found = read_packages(tmp_path)
    assert [(p.name, p.version) for p in found.packages] == [
        ("alpha", "1.0"),
        ("delta", "4.0"),
        ("gamma", "3.0"),
        ("zeta", "6.0"),
    ]
    assert found.unsettled == (UnsettledPackage("delta", "all", "half-installed"),)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (STATUS[:40], 2, "Status"),  # cut inside a word
        (STATUS[:19], 2, "'Stat'"),  # cut inside a field name
        ("Package: ab\nStatus: install ok installed\nArchitecture: all\n", 1, "no Version"),
        (" leading continuation\n", 1, "continuation"),
        ("Package: ../../evil\nStatus: install ok installed\nVersion: 1\n", 1, "package name"),
        (STATUS + "\n" + STATUS[: STATUS.index("\n\n")] + "\n", 36, "twice"),
        ("Package: a\nPackage: b\n", 2, "twice"),
        ("Package: ab\nStatus: install ok sideways\nVersion: 1\n", 2, "Status"),
        (b"Package: a\nStatus: install ok installed\x00\nVersion: 1\n", 2, "NUL"),
        (b"\x7fELF\x02\x01\x01\xff\xfe\x80garbage\n", 1, "Field: value"),
    ],
)
def test_malformed_status_is_an_error_naming_file_and_line(
    tmp_path: Path, text: str | bytes, line: int, words: str
) -> None:
    write_status(tmp_path, text)
    with pytest.raises(PackageDbError) as caught:
        read_packages(tmp_path)
    message = str(caught.value)
    assert message.startswith("/var/lib/dpkg/status: "), message
    assert f"line {line}:" in message and words in message


def test_no_truncation_or_garbage_gets_past_package_db_error(tmp_path: Path) -> None:
    data = STATUS.encode()
    noise = random.Random(7)
    cases = [data[:cut] for cut in range(len(data))]
    cases += [bytes(noise.randrange(256) for _ in range(300)) for _ in range(200)]
    cases += [data[:cut] + bytes([noise.randrange(256)]) + data[cut + 1 :] for cut in range(300)]
    outcomes = {"parsed": 0, "refused": 0}
    for case in cases:
        write_status(tmp_path, case)
        try:
            read_packages(tmp_path)
            outcomes["parsed"] += 1
        except PackageDbError as exc:
            assert re.search(r"line \d+: ", str(exc)), exc
            outcomes["refused"] += 1
    assert outcomes["parsed"] and outcomes["refused"]


def test_status_that_is_a_fifo_is_refused_not_opened(tmp_path: Path) -> None:
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    os.mkfifo(tmp_path / "var/lib/dpkg/status")
    with pytest.raises(PackageDbError, match="is a fifo"):
        read_packages(tmp_path)


def test_database_symlinks_resolve_inside_the_root(tmp_path: Path) -> None:
    write_status(tmp_path / "real", STATUS)
    (tmp_path / "var/lib").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg").symlink_to("/real/var/lib/dpkg")  # absolute: the image's
    assert len(read_packages(tmp_path).packages) == 4
    assert database_paths(tmp_path)[0] == tmp_path / "real/var/lib/dpkg/status"


def test_empty_root_has_no_package_manager(tmp_path: Path) -> None:
    assert read_packages(tmp_path) == PackageSet("none", ())
    assert database_paths(tmp_path) == []
    assert verify_package_files(tmp_path) == []


# --- the model -------------------------------------------------------------------------------


def test_json_round_trip_digest_and_validation() -> None:
    found = PackageSet.build(
        "dpkg", [Package("b", "1", "all"), Package("a", "2", "amd64"), Package("a", "2", "i386")]
    )
    assert [p.arch for p in found.packages] == ["amd64", "i386", "all"]
    assert PackageSet.from_json(found.to_json(), manager="dpkg") == found
    bumped = PackageSet.build("dpkg", [*found.packages[:2], Package("b", "1.1", "all")])
    assert (
        bumped.digest()
        != found.digest()
        == PackageSet.from_json(found.to_json(), manager="dpkg").digest()
    )
    bad: object
    for bad in ({}, [{"name": "a"}], [{"name": "a", "version": 1, "arch": ""}], [1]):
        with pytest.raises(PackageDbError):
            PackageSet.from_json(bad, manager="dpkg")
    with pytest.raises(PackageDbError, match="twice"):
        PackageSet.from_json(found.to_json() * 2, manager="dpkg")
    with pytest.raises(ValueError, match="sorted"):
        PackageSet("dpkg", tuple(reversed(found.packages)))
    with pytest.raises(ValueError, match="unknown package manager"):
        PackageSet("pacman", ())


# --- verification ----------------------------------------------------------------------------


def test_clean_image_verifies_clean(hello: DpkgRoot) -> None:
    assert verify_package_files(hello.root) == []


def test_modified_file_and_conffile_are_reported_with_their_package(hello: DpkgRoot) -> None:
    image = hello
    image.install(image.deb("other", "1", {"/usr/share/other/data": b"data"}))
    (image.root / "usr/bin/hello").write_bytes(b"#!/bin/sh\nrm -rf /\n")
    (image.root / "etc/hello.conf").write_bytes(b"greeting = pwned\n")
    found = verify_package_files(image.root)
    assert [(m.package, m.path, m.reason, m.conffile) for m in found] == [
        ("hello", "/etc/hello.conf", "modified", True),
        ("hello", "/usr/bin/hello", "modified", False),
    ]
    assert found[1].expected == md5(HELLO["/usr/bin/hello"])
    assert found[1].actual == md5(b"#!/bin/sh\nrm -rf /\n")
    assert [m.path for m in verify_package_files(image.root, include_conffiles=False)] == [
        "/usr/bin/hello"
    ]
    assert verify_package_files(image.root, only=["other"]) == []


def test_missing_and_replaced_files(hello: DpkgRoot) -> None:
    root = hello.root
    (root / "usr/share/doc/hello/README").unlink()
    (root / "usr/bin/hello").unlink()
    os.mkfifo(root / "usr/bin/hello")  # would block an open(): it must never be opened
    (root / "etc/hello.conf").unlink()
    (root / "etc/hello.conf").symlink_to("/usr/bin/hello")
    found = {m.path: (m.reason, m.actual) for m in verify_package_files(root)}
    assert found == {
        "/etc/hello.conf": ("replaced", "symlink"),
        "/usr/bin/hello": ("replaced", "fifo"),
        "/usr/share/doc/hello/README": ("missing", None),
    }
    shutil.rmtree(root / "usr/share/doc")
    (root / "usr/share/doc").write_text("a file where a directory was")
    os.unlink(root / "usr/bin/hello")
    (root / "usr/bin/hello").mkdir()
    found = {m.path: (m.reason, m.actual) for m in verify_package_files(root)}
    assert found["/usr/share/doc/hello/README"] == ("missing", None)
    assert found["/usr/bin/hello"] == ("replaced", "directory")


def test_files_dpkg_was_told_to_exclude_may_be_absent(image: DpkgRoot) -> None:
    image.install(
        image.deb("hello", "1.0-1", HELLO, conffiles=("/etc/hello.conf",)),
        options=("--path-exclude=/usr/share/doc/*",),
    )
    assert not (image.root / "usr/share/doc/hello/README").exists()
    assert [m.reason for m in verify_package_files(image.root)] == ["missing"]
    config = image.root / "etc/dpkg/dpkg.cfg.d/excludes"
    config.parent.mkdir(parents=True)
    config.write_text("# as in slim images\npath-exclude=/usr/share/doc/*\n")
    assert verify_package_files(image.root) == []
    (image.root / "etc/dpkg/dpkg.cfg").write_text("path-include /usr/share/doc/hello/*\n")
    assert [m.reason for m in verify_package_files(image.root)] == ["missing"]


def test_diverted_file_is_checked_where_dpkg_put_it(hello: DpkgRoot) -> None:
    root = hello.root
    subprocess.run(
        [
            *("dpkg-divert", f"--root={root}", "--package", "wrapper", "--rename"),
            *("--divert", "/usr/bin/hello.real", "/usr/bin/hello"),
        ],
        check=True,
        capture_output=True,
    )
    (root / "usr/bin/hello").write_text("#!/bin/sh\nexec hello.real\n")
    assert verify_package_files(root) == []
    (root / "usr/bin/hello.real").write_text("tampered")
    assert [(m.package, m.path) for m in verify_package_files(root)] == [
        ("hello", "/usr/bin/hello.real")
    ]
    (root / "var/lib/dpkg/diversions").write_text("/usr/bin/hello\n/usr/bin/hello.real\n")
    with pytest.raises(PackageDbError, match=r"diversions: line 1: incomplete"):
        verify_package_files(root)


def test_multiarch_packages_are_named_with_their_architecture(image: DpkgRoot) -> None:
    image.dpkg("--add-architecture", FOREIGN)
    debs = [
        image.deb(
            "libdw", "3", {f"/usr/lib/{a}/libdw.so": a.encode()}, arch=a, extra="Multi-Arch: same\n"
        )
        for a in (NATIVE, FOREIGN)
    ]
    image.install(*debs)
    assert (image.root / f"var/lib/dpkg/info/libdw:{FOREIGN}.md5sums").exists()
    (image.root / f"usr/lib/{FOREIGN}/libdw.so").write_text("evil")
    assert [m.package for m in verify_package_files(image.root)] == [f"libdw:{FOREIGN}"]


def test_file_taken_over_by_another_package_is_not_held_against_the_first(
    image: DpkgRoot,
) -> None:
    image.install(image.deb("old", "1", {"/usr/share/common/f": b"old"}))
    new = image.deb("new", "1", {"/usr/share/common/f": b"new"}, extra="Replaces: old\n")
    image.install(new)
    assert verify_package_files(image.root) == []


def md5sums_root(tmp_path: Path, lines: bytes) -> Path:
    root = tmp_path / "root"
    write_status(
        root, "Package: pkg\nStatus: install ok installed\nArchitecture: all\nVersion: 1\n"
    )
    (root / "var/lib/dpkg/info").mkdir()
    (root / "var/lib/dpkg/info/pkg.md5sums").write_bytes(lines)
    return root


def test_hostile_names_in_md5sums(tmp_path: Path) -> None:
    odd = {
        "usr/share/pkg/with space": b"a",
        "usr/share/pkg/new\nline": b"b",
        "usr/share/pkg/back\\slash": b"c",
        "usr/share/pkg/latin1-\xe9": b"d",
    }
    lines = b""
    for name, data in odd.items():
        raw = (
            name.encode("utf-8", "surrogateescape")
            if "\xe9" not in name
            else name.encode("latin-1")
        )
        path = tmp_path / "root" / os.fsdecode(raw)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        escaped = raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")
        prefix = b"\\" if escaped != raw else b""
        lines += prefix + md5(data).encode() + b"  " + escaped + b"\n"
    outside = Path("/etc/passwd").read_bytes()
    (tmp_path / "root/escape").symlink_to("/etc")  # the image's /etc, not the host's
    lines += md5(outside).encode() + b"  escape/passwd\n"
    lines += md5(outside).encode() + b"  ../../../../etc/passwd\n"
    lines += b"not a digest line\n"
    root = md5sums_root(tmp_path, lines)
    with capture_logs() as logs:
        found = verify_package_files(root)
    assert [(m.path, m.reason) for m in found] == [("/escape/passwd", "missing")]
    invalid = [e["line"] for e in logs if e["event"] == "package_digest_line_invalid"]
    assert invalid == [6, 7]
    (tmp_path / "root/usr/share/pkg/new\nline").write_bytes(b"changed")
    assert [m.path for m in verify_package_files(root)] == [
        "/escape/passwd",
        "/usr/share/pkg/new\nline",
    ]


def test_symlinked_directories_resolve_inside_the_image(tmp_path: Path) -> None:
    root = md5sums_root(tmp_path, md5(b"so").encode() + b"  lib/libx.so\n")
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/libx.so").write_bytes(b"so")
    (root / "lib").symlink_to("/usr/lib")  # merged /usr, absolute
    assert verify_package_files(root) == []
    (root / "loop").symlink_to("loop")
    (root / "var/lib/dpkg/info/pkg.md5sums").write_bytes(md5(b"so").encode() + b"  loop/x\n")
    assert [m.reason for m in verify_package_files(root)] == ["missing"]


def test_package_without_md5sums_is_logged_not_reported(tmp_path: Path) -> None:
    root = md5sums_root(tmp_path, b"")
    (root / "var/lib/dpkg/info/pkg.md5sums").unlink()
    with capture_logs() as logs:
        assert verify_package_files(root) == []
    assert {"event": "package_digests_missing", "package": "pkg", "log_level": "info"} in logs


def as_nobody(root: Path) -> str:
    """``verify_package_files(root)`` in a child process that has dropped root."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            found = [(m.reason, m.actual) for m in verify_package_files(root)]
            os.write(write_end, repr(found).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    return out


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a check as another user")
def test_unreadable_file_is_reported_as_unreadable() -> None:
    with tempfile.TemporaryDirectory() as name:  # in /tmp, so that nobody can reach it
        top = Path(name)
        root = md5sums_root(top, md5(b"secret").encode() + b"  etc/secret\n")
        (root / "etc").mkdir()
        (root / "etc/secret").write_bytes(b"secret")
        (root / "etc/secret").chmod(0)
        for path in [top, *top.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        found = as_nobody(root)
    assert found == repr(
        [
            (
                "unreadable",
                "permission denied — the agent needs read access (run as root or with "
                "CAP_DAC_READ_SEARCH)",
            )
        ]
    )


# --- debsums as the reference ----------------------------------------------------------------


def debsums(*args: str) -> set[tuple[str, str, str]]:
    done = subprocess.run(
        ["debsums", "-a", "-s", *args], check=False, capture_output=True, text=True
    )
    assert done.returncode in (0, 2), done.stderr
    found = set()
    for line in done.stderr.splitlines():
        match = re.fullmatch(r"debsums: (changed|missing) file (.*) \(from (\S+) package\)", line)
        assert match, line
        found.add((match.group(2), match.group(3), match.group(1)))
    return found


def ours(root: Path, **kwargs: object) -> set[tuple[str, str, str]]:
    prefix = "" if root == Path("/") else str(root)
    return {
        (prefix + m.path, m.package, "changed" if m.reason == "modified" else m.reason)
        for m in verify_package_files(root, **kwargs)  # type: ignore[arg-type]
    }


needs_debsums = pytest.mark.skipif(shutil.which("debsums") is None, reason="debsums not installed")


@needs_debsums
def test_same_findings_as_debsums_in_a_tampered_image(hello: DpkgRoot) -> None:
    root = hello.root
    hello.install(hello.deb("other", "2", {"/usr/share/other/a": b"a", "/usr/share/other/b": b"b"}))
    (root / "usr/bin/hello").write_text("changed")
    (root / "etc/hello.conf").write_text("changed")
    (root / "usr/share/other/a").unlink()
    expected = debsums(f"--root={root}")
    assert len(expected) == 3
    assert ours(root) == expected


@needs_debsums
def test_same_findings_as_debsums_on_this_machine() -> None:
    installed = {p.name for p in read_packages(Path("/")).packages}
    sample = sorted(installed & {"bash", "coreutils", "dpkg", "debsums", "login", "passwd", "tar"})
    assert len(sample) >= 4
    assert ours(Path("/"), only=sample) == debsums(*sample)


def test_reads_this_machines_database_like_dpkg_query() -> None:
    found = read_packages(Path("/"))
    assert found.manager == "dpkg"
    assert set(found.packages) == dpkg_query(Path("/"))
    assert Package("dpkg", found_version("dpkg"), NATIVE) in found.packages


def found_version(name: str) -> str:
    return subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, check=True
    ).stdout


def test_real_files_of_real_packages_verify(tmp_path: Path) -> None:
    """A copy of real packages' files and database entries verifies clean, and a change to one
    real file is found under the right package."""
    root = tmp_path / "root"
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    stanzas = Path("/var/lib/dpkg/status").read_text().split("\n\n")
    keep = [s for s in stanzas if re.match(r"Package: (dpkg|tar|gzip)\n", s)]
    (root / "var/lib/dpkg/status").write_text("\n\n".join(keep) + "\n")
    for name in ("dpkg", "tar", "gzip"):
        for suffix in ("md5sums", "list"):
            shutil.copy(f"/var/lib/dpkg/info/{name}.{suffix}", info)
        for line in Path(f"/var/lib/dpkg/info/{name}.md5sums").read_text().splitlines():
            rel = line[34:]
            source = Path("/", rel)
            if source.is_file():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, root / rel)
    baseline = ours(Path("/"), only=["dpkg", "tar", "gzip"], include_conffiles=False)
    copied = ours(root, include_conffiles=False)
    assert {(p[len(str(root)) :], pkg, r) for p, pkg, r in copied} == baseline
    tar = next(p for p in (root / "usr/bin/tar", root / "bin/tar") if p.exists())
    tar.write_bytes(tar.read_bytes() + b"\0")
    assert (str(tar), "tar", "changed") in ours(root, include_conffiles=False) - copied


# --- rpm and apk -----------------------------------------------------------------------------


needs_rpm = pytest.mark.skipif(
    shutil.which("rpmbuild") is None or shutil.which("rpm") is None, reason="rpm not installed"
)


def build_rpm(work: Path, version: str, release: str) -> Path:
    spec = work / f"hello-{version}.spec"
    spec.write_text(
        f"Name: hello-rpm\nVersion: {version}\nRelease: {release}\nEpoch: 2\nSummary: t\n"
        "License: MIT\nBuildArch: noarch\n%description\nt\n%install\n"
        f"mkdir -p %{{buildroot}}/usr/share/hello-{version}\n"
        f"echo hi > %{{buildroot}}/usr/share/hello-{version}/README\n"
        f"%files\n/usr/share/hello-{version}/README\n"
    )
    subprocess.run(
        [
            "rpmbuild",
            "--define",
            f"_topdir {work}/top",
            "--define",
            f"_dbpath {work}/db",
            "-bb",
            str(spec),
        ],
        check=True,
        capture_output=True,
    )
    return next((work / "top/RPMS/noarch").glob(f"hello-rpm-{version}-*.rpm"))


@needs_rpm
def test_reads_a_real_rpm_database(tmp_path: Path) -> None:
    root, work = tmp_path / "root", tmp_path / "work"
    root.mkdir()
    work.mkdir()
    rpm = ["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm"]
    subprocess.run([*rpm, "--initdb"], check=True, capture_output=True)
    subprocess.run(
        [*rpm, "-i", "--nodeps", "--noscripts", str(build_rpm(work, "1.2", "3"))],
        check=True,
        capture_output=True,
    )
    assert detect_manager(root) == "rpm"
    before = read_packages(root)
    assert before == PackageSet("rpm", (Package("hello-rpm", "2:1.2-3", "noarch"),))
    assert database_paths(root) == [root / "var/lib/rpm"]
    subprocess.run(  # an install-only style second version beside the first
        [*rpm, "-i", "--nodeps", "--noscripts", str(build_rpm(work, "1.3", "1"))],
        check=True,
        capture_output=True,
    )
    after = read_packages(root)
    assert after.packages == (Package("hello-rpm", "2:1.2-3, 2:1.3-1", "noarch"),)
    assert diff_packages(before, after) == [
        PackageChange("changed", "hello-rpm", "noarch", "2:1.2-3", "2:1.2-3, 2:1.3-1")
    ]
    (root / "var/lib/rpm/rpmdb.sqlite").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(PackageDbError, match="rpm query"):
        read_packages(root)


APK = """\
C:Q1abc=
P:musl
V:1.2.4-r2
A:x86_64
F:lib
R:ld-musl-x86_64.so.1
Z:Q1xyz=

P:busybox
V:1.36.1-r5
A:x86_64
"""


def test_reads_an_apk_database(tmp_path: Path) -> None:
    installed = tmp_path / "lib/apk/db/installed"
    installed.parent.mkdir(parents=True)
    installed.write_text(APK)
    assert read_packages(tmp_path) == PackageSet(
        "apk", (Package("busybox", "1.36.1-r5", "x86_64"), Package("musl", "1.2.4-r2", "x86_64"))
    )
    assert database_paths(tmp_path) == [installed]
    installed.write_text(APK + "\nthis is not apk\n")
    with pytest.raises(PackageDbError, match=r"installed: line 13: expected"):
        read_packages(tmp_path)
    installed.write_text("V:1\nA:x86_64\n")
    with pytest.raises(PackageDbError, match="line 1: package stanza without P"):
        read_packages(tmp_path)


# --- check --verify-packages -----------------------------------------------------------------


def test_check_verify_packages_reports_files_that_are_not_the_vendors(
    hello: DpkgRoot, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    """The image ships package files that are not what the vendor shipped: a program (counted:
    the check fails), a conffile and a file under a mutable path (listed, allowed). Nothing
    changed since the bake, so there is no drift; only the vendor check fails."""
    image = hello
    image.install(image.deb("cache", "1", {"/var/cache/cache/data": b"vendor data\n"}))
    (image.root / "usr/bin/hello").write_bytes(b"#!/bin/sh\necho patched\n")
    (image.root / "etc/hello.conf").write_bytes(b"greeting = edited\n")
    (image.root / "var/cache/cache/data").write_bytes(b"rebuilt\n")
    manifest = image.work / "image.dwm"
    bake(image.root, REPO / "policies/minimal.toml", manifest)

    def check(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*agent_cmd, "check", "--root", str(image.root), "--baseline", str(manifest), *extra],
            env=subprocess_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    plain = check("--json")
    assert plain.returncode == EXIT_OK, plain.stderr
    assert "package_files" not in json.loads(plain.stdout)

    done = check("--json", "--verify-packages")
    assert done.returncode == EXIT_DRIFT, done.stderr
    report = json.loads(done.stdout)
    assert (report["drift"], report["failed"]) == (False, True)
    assert report["vendor"] == {"manager": "dpkg", "differ": 3, "counted": 1}
    files = {f["path"]: f for f in report["package_files"]}
    assert {p: (f["package"], f["reason"], f["counts"]) for p, f in files.items()} == {
        "/etc/hello.conf": ("hello", "modified", False),
        "/usr/bin/hello": ("hello", "modified", True),
        "/var/cache/cache/data": ("cache", "modified", False),
    }
    hello_bin = files["/usr/bin/hello"]
    assert (hello_bin["expected"], hello_bin["actual"]) == (
        md5(HELLO["/usr/bin/hello"]),
        md5(b"#!/bin/sh\necho patched\n"),
    )
    assert (hello_bin["kind"], hello_bin["severity"]) == ("immutable", "warning")
    assert files["/etc/hello.conf"]["conffile"] is True
    assert files["/var/cache/cache/data"]["kind"] == "mutable"

    text = check("--verify-packages")
    assert text.returncode == EXIT_DRIFT
    vendor_lines = [line for line in text.stdout.splitlines() if "not the vendor's" in line]
    assert len(vendor_lines) == 3
    assert [line.split()[0] for line in vendor_lines].count("VENDOR") == 1
    assert "3 files differ from the vendor's, 1 where the policy expects" in text.stdout
    assert "VENDOR: 0 drifted" in text.stdout

    (image.root / "usr/bin/hello").write_bytes(HELLO["/usr/bin/hello"])  # put back: now drift
    again = json.loads(check("--json", "--verify-packages").stdout)
    assert again["drift"] is True
    assert again["vendor"]["counted"] == 0


def test_a_package_file_outside_the_policys_roots_does_not_count(hello: DpkgRoot) -> None:
    (hello.root / "usr/bin/hello").write_bytes(b"#!/bin/sh\necho patched\n")
    etc_only = parse_policy({"policy": {"name": "etc", "roots": ["/etc"]}}, source="etc.toml")
    every = parse_policy({"policy": {"name": "all", "roots": ["/"]}}, source="all.toml")
    packages = read_packages(hello.root)
    [outside] = verify_vendor(hello.root, etc_only, packages, first_boot=False, workers=1).files
    assert (outside.mismatch.path, outside.kind, outside.counts) == (
        "/usr/bin/hello",
        "unmeasured",
        False,
    )
    [inside] = verify_vendor(hello.root, every, packages, first_boot=False, workers=1).files
    assert (inside.kind, inside.counts) == ("immutable", True)
