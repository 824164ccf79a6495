"""rpm's and apk's file digests: a real rpm built and installed into a temporary root (and
``rpm -V`` as the reference), and an apk database whose checksums are those of real files."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.packages import verify_package_files

needs_rpm = pytest.mark.skipif(
    shutil.which("rpmbuild") is None or shutil.which("rpm") is None, reason="rpm not installed"
)

SPEC = """\
Name: demo
Version: 1.0
Release: 1
Summary: t
License: MIT
BuildArch: noarch
%description
t
%install
mkdir -p %{buildroot}/usr/share/demo %{buildroot}/etc/demo %{buildroot}/usr/share/doc/demo
echo hi > %{buildroot}/usr/share/demo/README
printf 'x' > "%{buildroot}/usr/share/demo/sp ace"
echo conf > %{buildroot}/etc/demo/demo.conf
echo docs > %{buildroot}/usr/share/doc/demo/NOTES
ln -s README %{buildroot}/usr/share/demo/link
%files
%dir /usr/share/demo
/usr/share/demo/README
"/usr/share/demo/sp ace"
/usr/share/demo/link
%config(noreplace) /etc/demo/demo.conf
%doc /usr/share/doc/demo/NOTES
%ghost /var/log/demo.log
"""


@pytest.fixture
def rpm_root(tmp_path: Path) -> Path:
    """A root with the demo package installed by rpm, its documentation excluded."""
    work, root = tmp_path / "work", tmp_path / "root"
    work.mkdir()
    root.mkdir()
    (work / "demo.spec").write_text(SPEC)
    subprocess.run(
        ["rpmbuild", "--define", f"_topdir {work}/top", "-bb", str(work / "demo.spec")],
        check=True,
        capture_output=True,
    )
    [package] = (work / "top/RPMS/noarch").glob("demo-1.0-1.*.rpm")
    rpm = ["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm"]
    subprocess.run([*rpm, "--initdb"], check=True, capture_output=True)
    subprocess.run(
        [*rpm, "-i", "--nodeps", "--noscripts", "--excludedocs", str(package)],
        check=True,
        capture_output=True,
    )
    return root


def rpm_verify(root: Path) -> set[str]:
    """The paths ``rpm -V`` reports with a changed digest (``5``) or missing."""
    done = subprocess.run(
        ["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "-V", "--nodeps", "-a"],
        capture_output=True,
        text=True,
        check=False,
    )
    out = set()
    for line in done.stdout.splitlines():
        flags, _, path = line.partition(" /")
        if flags.startswith("missing") or flags[2:3] == "5":
            out.add("/" + path)
    return out


@needs_rpm
def test_rpm_files_are_checked_against_the_package_digests(rpm_root: Path) -> None:
    root = rpm_root
    assert verify_package_files(root) == []  # ghost, excluded doc, dir and symlink: nothing
    (root / "usr/share/demo/README").write_text("patched\n")
    (root / "etc/demo/demo.conf").write_text("edited\n")
    (root / "usr/share/demo/sp ace").unlink()
    os.mkfifo(root / "usr/share/demo/sp ace")
    found = {m.path: (m.package, m.reason, m.conffile) for m in verify_package_files(root)}
    assert found == {
        "/etc/demo/demo.conf": ("demo.noarch", "modified", True),
        "/usr/share/demo/README": ("demo.noarch", "modified", False),
        "/usr/share/demo/sp ace": ("demo.noarch", "replaced", False),
    }
    readme = next(m for m in verify_package_files(root) if m.path.endswith("README"))
    assert readme.expected == hashlib.sha256(b"hi\n").hexdigest()  # the package's algorithm
    assert readme.actual == hashlib.sha256(b"patched\n").hexdigest()
    (root / "usr/share/demo/sp ace").unlink()
    reported = {m.path for m in verify_package_files(root)}
    assert reported == rpm_verify(root)  # the same paths rpm -V flags
    assert {m.path for m in verify_package_files(root, include_conffiles=False)} == {
        "/usr/share/demo/README",
        "/usr/share/demo/sp ace",
    }
    assert verify_package_files(root, only=["other"]) == []
    assert len(verify_package_files(root, only=["demo.noarch"])) == 3


def q1(data: bytes) -> str:
    return "Q1" + base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode()


def test_apk_files_are_checked_against_the_q1_checksums(tmp_path: Path) -> None:
    root = tmp_path
    (root / "bin").mkdir()
    (root / "etc").mkdir()
    busybox, motd = b"\x7fELF busybox", b"welcome\n"
    (root / "bin/busybox").write_bytes(busybox)
    (root / "bin/sh").symlink_to("/bin/busybox")
    (root / "etc/motd").write_bytes(motd)
    installed = root / "lib/apk/db/installed"
    installed.parent.mkdir(parents=True)
    installed.write_text(
        "P:busybox\nV:1.36.1-r5\nA:x86_64\n"
        f"F:bin\nR:busybox\nZ:{q1(busybox)}\n"
        f"R:sh\na:0:0:777\nZ:{q1(b'/bin/busybox')}\n"
        "R:nodigest\n"
        f"F:etc\nR:motd\nZ:{q1(motd)}\n"
        "R:hostname\nZ:Q1notbase64!!\n"
        f"R:../../escape\nZ:{q1(b'x')}\n"
        "\nP:musl\nV:1.2.4-r2\nA:x86_64\n"
        f"F:lib\nR:ld-musl-x86_64.so.1\nZ:{q1(b'musl')}\n"
    )
    with capture_logs() as logs:
        found = {m.path: (m.package, m.reason, m.conffile) for m in verify_package_files(root)}
    assert found == {"/lib/ld-musl-x86_64.so.1": ("musl", "missing", False)}
    assert [e["line"] for e in logs if e["event"] == "package_digest_line_invalid"] == [15, 16]
    (root / "bin/sh").unlink()
    (root / "bin/sh").symlink_to("/tmp/evil")  # a symlink is checked by its target's text
    (root / "etc/motd").write_text("owned\n")
    found = {m.path: (m.package, m.reason, m.conffile) for m in verify_package_files(root)}
    assert found == {
        "/bin/sh": ("busybox", "modified", False),
        "/etc/motd": ("busybox", "modified", True),
        "/lib/ld-musl-x86_64.so.1": ("musl", "missing", False),
    }
    assert {m.path for m in verify_package_files(root, include_conffiles=False)} == {
        "/bin/sh",
        "/lib/ld-musl-x86_64.so.1",
    }
    assert [m.path for m in verify_package_files(root, only=["busybox"])] == [
        "/bin/sh",
        "/etc/motd",
    ]
    (root / "bin/busybox").unlink()
    (root / "bin/busybox").mkdir()
    assert ("replaced", "directory") in {
        (m.reason, m.actual) for m in verify_package_files(root, only=["busybox"])
    }
