"""``bake`` and ``check`` end to end, run as processes on real trees."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from agent.errors import EXIT_DRIFT, EXIT_ERROR, EXIT_OK, EXIT_UNTRUSTED
from agent.manifest import read_head
from agent.wire import decode_path
from tests.agent.imagetree import AREAS, POLICY, at, bake, build, make_key, write_policy

CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # vfs cap v2, +ep
ANY_ID = 0xFFFFFFFF  # a POSIX ACL entry's id where it names no user or group


@dataclass
class Image:
    root: Path
    policy: Path
    manifest: Path
    key: Path
    work: Path


@pytest.fixture
def image(tmp_path: Path) -> Image:
    root = build(tmp_path / "root")
    policy = write_policy(tmp_path)
    key = make_key(tmp_path)
    manifest = tmp_path / "manifest.gz"
    bake(root, policy, manifest, key=key)
    return Image(root, policy, manifest, key, tmp_path)


def run(agent_cmd: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*agent_cmd, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def check(
    agent_cmd: list[str], env: dict[str, str], image: Image, *extra: str
) -> tuple[int, dict[str, Any]]:
    proc = run(
        agent_cmd,
        env,
        "check",
        "--root",
        str(image.root),
        "--baseline",
        str(image.manifest),
        "--pubkey",
        str(image.key) + ".pub",
        "--json",
        *extra,
    )
    assert proc.returncode in (EXIT_OK, EXIT_DRIFT), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def by_path(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {decode_path(f["path"]): f for f in report["findings"] if f["type"] == "file"}


# --- every kind of mutation ------------------------------------------------------------------


def _content_restored(root: Path, file: str, link: str, directory: str) -> None:
    target = at(root, file)
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[10] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))


def _mode(root: Path, file: str, link: str, directory: str) -> None:
    at(root, file).chmod(0o777)


def _owner(root: Path, file: str, link: str, directory: str) -> None:
    os.chown(at(root, file), 1234, 1234)


def _setuid(root: Path, file: str, link: str, directory: str) -> None:
    at(root, file).chmod(0o4755)


def _capability(root: Path, file: str, link: str, directory: str) -> None:
    os.setxattr(at(root, file), "security.capability", CAP_NET_RAW)


def _acl(root: Path, file: str, link: str, directory: str) -> None:
    # setfacl -m u:nobody:r FILE, as the kernel stores it (version 2; tag, permissions, id)
    entries = [(0x01, 6, ANY_ID), (0x02, 4, 65534), (0x04, 4, ANY_ID), (0x10, 4, ANY_ID)]
    entries.append((0x20, 4, ANY_ID))
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(at(root, file), "system.posix_acl_access", acl)


def _selinux_label(root: Path, file: str, link: str, directory: str) -> None:
    os.setxattr(at(root, file), "security.selinux", b"system_u:object_r:shell_exec_t:s0\0")


def _retarget(root: Path, file: str, link: str, directory: str) -> None:
    at(root, link).unlink()
    os.symlink("/etc/shadow", at(root, link))


def _hardlink(root: Path, file: str, link: str, directory: str) -> None:
    os.link(at(root, file), at(root, directory + "/extra-name"))


def _replaced_by_dir(root: Path, file: str, link: str, directory: str) -> None:
    at(root, file).unlink()
    at(root, file).mkdir()


def _rename(root: Path, file: str, link: str, directory: str) -> None:
    at(root, file).rename(at(root, file + ".moved"))


def _new_file(root: Path, file: str, link: str, directory: str) -> None:
    at(root, directory + "/new-file").write_text("new\n")


def _delete(root: Path, file: str, link: str, directory: str) -> None:
    at(root, file).unlink()


def _fifo(root: Path, file: str, link: str, directory: str) -> None:
    os.mkfifo(at(root, directory + "/new-fifo"))


Mutation = Callable[[Path, str, str, str], None]
# name: (mutate, {path-template: (change, fields that must be reported)})
MUTATIONS: dict[str, tuple[Mutation, dict[str, tuple[str, set[str]]]]] = {
    "content-size-mtime-restored": (_content_restored, {"F": ("modified", {"content"})}),
    "mode": (_mode, {"F": ("modified", {"mode"})}),
    "owner": (_owner, {"F": ("modified", {"uid", "gid"})}),
    "setuid": (_setuid, {"F": ("modified", {"mode"})}),
    "capability": (_capability, {"F": ("modified", {"xattrs"})}),
    "posix-acl": (_acl, {"F": ("modified", {"xattrs"})}),
    "selinux-label": (_selinux_label, {"F": ("modified", {"xattrs"})}),
    "symlink-retargeted": (_retarget, {"L": ("modified", {"target"})}),
    "hardlink-added": (
        _hardlink,
        {"F": ("modified", {"hardlinks"}), "D/extra-name": ("added", set())},
    ),
    "file-replaced-by-directory": (_replaced_by_dir, {"F": ("modified", {"type", "size"})}),
    "rename": (_rename, {"F": ("removed", set()), "F.moved": ("added", set())}),
    "symlink-renamed": (
        lambda root, file, link, directory: at(root, link).rename(at(root, link + ".moved")),
        {"L": ("removed", set()), "L.moved": ("added", set())},
    ),
    "new-file": (_new_file, {"D/new-file": ("added", set())}),
    "deletion": (_delete, {"F": ("removed", set())}),
    "new-fifo": (_fifo, {"D/new-fifo": ("added", set())}),
}


def _expected(area: str, name: str) -> dict[str, tuple[str, set[str]]]:
    file, link, directory = AREAS[area]
    out = {}
    for template, expect in MUTATIONS[name][1].items():
        path = template.replace("F", file, 1) if template.startswith("F") else template
        path = path.replace("L", link, 1) if path.startswith("L") else path
        path = path.replace("D", directory, 1) if path.startswith("D") else path
        out[path] = expect
    return out


@pytest.mark.root
@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutation_is_drift_in_an_immutable_tree(
    name: str, image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    MUTATIONS[name][0](image.root, *AREAS["immutable"])
    status, report = check(agent_cmd, subprocess_env, image)
    assert status == EXIT_DRIFT
    found = by_path(report)
    for path, (change, fields) in _expected("immutable", name).items():
        assert path in found, f"{path} not reported; got {sorted(found)}"
        finding = found[path]
        assert finding["change"] == change
        assert fields <= set(finding["fields"]), finding
        assert finding["drift"] is True
        assert finding["class"] == "immutable"
        assert finding["severity"] == "warning"
        assert finding["rule"] == "default"
    assert report["drift"] is True
    if name in ("rename", "symlink-renamed"):  # paired: the same file, by another name
        old, new = _expected("immutable", name)
        assert new == old + ".moved"
        assert (found[new]["renamed_from"], found[old]["renamed_to"]) == (old, new)
    else:
        assert not any("renamed_from" in f or "renamed_to" in f for f in report["findings"])


@pytest.mark.root
@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_same_mutation_under_a_mutable_path_is_not_drift(
    name: str, image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    MUTATIONS[name][0](image.root, *AREAS["mutable"])
    status, report = check(agent_cmd, subprocess_env, image)
    assert status == EXIT_OK
    assert report["drift"] is False
    assert not any(f["drift"] for f in report["findings"])
    found = by_path(report)
    for path, (change, _fields) in _expected("mutable", name).items():
        if change != "modified":  # a mutable rule looks at no attribute: only the name counts
            assert (found[path]["change"], found[path]["class"]) == (change, "mutable")


def test_new_file_in_a_critical_directory_is_critical(
    image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    at(image.root, "/etc/sudoers.d/evil").write_text("ALL ALL=(ALL) NOPASSWD: ALL\n")
    status, report = check(agent_cmd, subprocess_env, image)
    assert status == EXIT_DRIFT
    finding = by_path(report)["/etc/sudoers.d/evil"]
    assert (finding["change"], finding["class"], finding["severity"], finding["rule"]) == (
        "added",
        "critical",
        "critical",
        "credentials",
    )
    assert finding["before"] is None
    assert finding["after"]["h"]  # the new file's content digest is reported


def test_unchanged_tree_is_clean_and_nothing_is_hashed_again(
    image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    status, report = check(agent_cmd, subprocess_env, image)
    assert (status, report["findings"], report["measured"]) == (EXIT_OK, [], 0)
    assert report["baseline"]["verified"] is True
    assert report["paths"] == report["baseline"]["entries"]


def test_only_changed_metadata_is_measured_again_without_full(
    image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    os.utime(at(image.root, "/usr/share/doc/readme"), ns=(1, 1))
    status, report = check(agent_cmd, subprocess_env, image)
    assert (status, report["measured"]) == (EXIT_OK, 1)
    assert report["findings"] == []  # mtime is not an attribute the default rule looks at
    os.chmod(at(image.root, "/usr/share/doc/readme"), 0o600)
    _status, report = check(agent_cmd, subprocess_env, image)
    assert report["measured"] == 1
    assert [f["fields"] for f in report["findings"]] == [["mode", "mtime"]]
    _status, full = check(agent_cmd, subprocess_env, image, "--full")
    assert full["measured"] == full["paths"]
    assert full["findings"] == report["findings"]


def test_first_boot_allowances_apply_only_with_first_boot(
    image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    at(image.root, "/etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    status, report = check(agent_cmd, subprocess_env, image)
    assert status == EXIT_DRIFT
    assert by_path(report)["/etc/machine-id"]["class"] == "first_boot"
    status, report = check(agent_cmd, subprocess_env, image, "--first-boot")
    assert status == EXIT_OK
    assert by_path(report)["/etc/machine-id"]["drift"] is False


def test_growth_only_log_may_grow_but_not_be_rewritten(
    image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    log = at(image.root, "/var/log/app.log")
    with log.open("ab") as fh:
        fh.write(b"more lines\n")
    status, report = check(agent_cmd, subprocess_env, image)
    assert status == EXIT_OK
    assert by_path(report)["/var/log/app.log"]["reason"].startswith("log grew")
    log.write_bytes(b"rewritten history\n")
    status, report = check(agent_cmd, subprocess_env, image)
    assert status == EXIT_DRIFT
    assert by_path(report)["/var/log/app.log"]["class"] == "growth_only"


def test_text_output_has_one_line_per_finding(
    image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    at(image.root, "/etc/shadow").chmod(0o644)
    at(image.root, "/usr/share/doc/readme").unlink()
    text_check = ("check", "--root", str(image.root), "--baseline", str(image.manifest))
    proc = run(agent_cmd, subprocess_env, *text_check)
    assert proc.returncode == EXIT_DRIFT
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["DRIFT", "critical", "modified", "/etc/shadow"]
    assert "[mode]" in lines[0] and "'credentials'" in lines[0]
    assert lines[1].split()[:4] == ["DRIFT", "warning", "removed", "/usr/share/doc/readme"]
    assert lines[2].startswith("DRIFT: 2 drifted")
    assert len(lines) == 3
    assert "baseline_unverified" in proc.stderr  # no --pubkey: said, not silent
    # a rename reads as one: each side names the other
    at(image.root, "/usr/bin/tool").rename(at(image.root, "/usr/bin/tool2"))
    text = run(agent_cmd, subprocess_env, *text_check).stdout
    assert "added     /usr/bin/tool2 (renamed from /usr/bin/tool)" in text
    assert "removed   /usr/bin/tool (renamed to /usr/bin/tool2)" in text


def test_hostile_names_round_trip(
    image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    names = [b"bad\xff\xfename", b"new\nline", b"b64:looks-encoded", b"caf\xc3\xa9"]
    directory = os.fsencode(at(image.root, "/usr/share"))
    for name in names:
        with open(os.path.join(directory, name), "wb") as fh:
            fh.write(name)
    os.symlink(b"\xff-target", os.path.join(directory, b"link\xff"))
    bake(image.root, image.policy, image.manifest, key=image.key)
    assert check(agent_cmd, subprocess_env, image)[0] == EXIT_OK
    for name in names:
        os.unlink(os.path.join(directory, name))
    status, report = check(agent_cmd, subprocess_env, image)
    assert status == EXIT_DRIFT
    removed = {os.fsencode(path) for path in by_path(report)}
    assert removed == {b"/usr/share/" + name for name in names}
    proc = run(
        agent_cmd, subprocess_env, "check", "--root", str(image.root), "--baseline",
        str(image.manifest),
    )  # fmt: skip
    assert len(proc.stdout.splitlines()) == len(names) + 1  # newlines in names are escaped
    assert "new\\nline" in proc.stdout


@pytest.mark.root
def test_special_files_and_loops_are_measured_without_being_opened(
    image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    dev = at(image.root, "/usr/share/zero")
    os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 5))  # /dev/zero: reading it never ends
    os.mkfifo(at(image.root, "/usr/share/fifo"))  # opening it for reading would block
    os.symlink("loop-b", at(image.root, "/usr/share/loop-a"))
    os.symlink("loop-a", at(image.root, "/usr/share/loop-b"))
    os.symlink("/", at(image.root, "/usr/share/to-root"))
    bake(image.root, image.policy, image.manifest, key=image.key)
    assert check(agent_cmd, subprocess_env, image, "--full")[0] == EXIT_OK
    with gzip.open(image.manifest, "rt") as fh:
        records = {r["p"]: r for r in map(json.loads, fh) if "p" in r}
    assert records["/usr/share/zero"]["t"] == "c"
    assert records["/usr/share/zero"]["r"] == os.makedev(1, 5)
    assert records["/usr/share/fifo"]["t"] == "p"
    assert records["/usr/share/loop-a"]["l"] == "loop-b"
    assert not any(p.startswith("/usr/share/to-root/") for p in records)


@pytest.mark.root
def test_virtual_file_systems_are_not_descended(
    image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    mount_point = at(image.root, "/var/cache/shm")
    mount_point.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mount_point)], check=True)
    try:
        (mount_point / "inside").write_text("volatile")
        bake(image.root, image.policy, image.manifest, key=image.key)
        with gzip.open(image.manifest, "rt") as fh:
            paths = [r["p"] for r in map(json.loads, fh) if "p" in r]
        assert "/var/cache" in paths
        assert not any(p.startswith("/var/cache/shm") for p in paths)
        (mount_point / "more").write_text("volatile")
        assert check(agent_cmd, subprocess_env, image)[0] == EXIT_OK
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


# --- trust -----------------------------------------------------------------------------------


def _rewrite(manifest: Path, edit: Callable[[list[str]], None]) -> None:
    with gzip.open(manifest, "rt") as fh:
        lines = fh.read().split("\n")
    edit(lines)
    with gzip.open(manifest, "wt") as fh:
        fh.write("\n".join(lines))


def _flip_digest(lines: list[str]) -> None:
    index = next(i for i, line in enumerate(lines) if '"/usr/bin/tool"' in line)
    record = json.loads(lines[index])
    record["h"] = "0" * 64
    lines[index] = json.dumps(record, separators=(",", ":"))


def _forge_hint(lines: list[str]) -> None:
    index = next(i for i, line in enumerate(lines) if '"/usr/bin/tool"' in line)
    lines[index] = lines[index].replace('"z":[', '"z":[1', 1)


def _drop_entry(lines: list[str]) -> None:
    del lines[next(i for i, line in enumerate(lines) if '"/etc/shadow"' in line)]


def _edit_statement(lines: list[str]) -> None:
    statement = json.loads(lines[0])
    statement["build_id"] = "someone-else"
    lines[0] = json.dumps(statement)


@pytest.mark.parametrize(
    "edit", [_flip_digest, _forge_hint, _drop_entry, _edit_statement], ids=lambda f: f.__name__
)
def test_tampered_manifest_is_refused(
    edit: Callable[[list[str]], None],
    image: Image,
    agent_cmd: list[str],
    subprocess_env: dict[str, str],
) -> None:
    _rewrite(image.manifest, edit)
    proc = run(
        agent_cmd, subprocess_env, "check", "--root", str(image.root), "--baseline",
        str(image.manifest), "--pubkey", str(image.key) + ".pub",
    )  # fmt: skip
    assert proc.returncode == EXIT_UNTRUSTED, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert proc.stdout == ""


def test_wrong_key_and_missing_signature_are_refused(
    image: Image, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    other = make_key(image.work, "other.key")
    args = ["check", "--root", str(image.root), "--baseline", str(image.manifest)]
    proc = run(agent_cmd, subprocess_env, *args, "--pubkey", str(other) + ".pub")
    assert proc.returncode == EXIT_UNTRUSTED
    assert "not by the configured key" in proc.stderr
    unsigned = image.work / "unsigned.gz"
    bake(image.root, image.policy, unsigned)
    args = ["check", "--root", str(image.root), "--baseline", str(unsigned)]
    proc = run(agent_cmd, subprocess_env, *args, "--pubkey", str(image.key) + ".pub")
    assert proc.returncode == EXIT_UNTRUSTED
    assert "not signed" in proc.stderr


# --- the commands themselves -----------------------------------------------------------------


def test_bake_command_writes_a_signed_manifest(
    tmp_path: Path, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    root = build(tmp_path / "root")
    key = make_key(tmp_path)
    out = tmp_path / "m.gz"
    args = ["bake", "--root", str(root), "--policy", str(write_policy(tmp_path))]
    proc = run(agent_cmd, subprocess_env, *args, "--out", str(out), "--key", str(key),
               "--build-id", "ami-build-7")  # fmt: skip
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "signed by ed25519:" in proc.stdout
    with gzip.open(out, "rt") as fh:
        statement = json.loads(fh.readline())
    assert statement["build_id"] == "ami-build-7"
    assert statement["sig"] and statement["hash_alg"] == "sha256"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["root", "policy.toml", "pipeline.key", "pipeline.key.pub", "m.gz"]
    )  # no temporary files left behind


def test_manifest_inside_the_root_is_not_measured(
    tmp_path: Path, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    root = build(tmp_path / "root")
    out = at(root, "/var/lib/driftwarden/manifest.gz")
    out.parent.mkdir(parents=True)
    bake(root, write_policy(tmp_path), out)
    proc = run(agent_cmd, subprocess_env, "check", "--root", str(root), "--baseline", str(out))
    assert proc.returncode == EXIT_OK, proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--baseline", "/nonexistent/manifest.gz"], "cannot read manifest"),
        (["--baseline", "/etc/hostname"], "not a readable manifest"),
        (["--baseline", "MANIFEST", "--pubkey", "/nonexistent.pub"], "cannot read public key"),
    ],
)
def test_check_errors_exit_2_with_a_clear_message(
    args: list[str],
    message: str,
    image: Image,
    agent_cmd: list[str],
    subprocess_env: dict[str, str],
) -> None:
    args = [str(image.manifest) if a == "MANIFEST" else a for a in args]
    proc = run(agent_cmd, subprocess_env, "check", "--root", str(image.root), *args)
    assert proc.returncode == EXIT_ERROR
    assert proc.stderr.startswith("error: ") and message in proc.stderr


def test_bake_refuses_a_root_that_is_not_a_directory(
    tmp_path: Path, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    args = ["bake", "--root", str(tmp_path / "missing"), "--policy", str(write_policy(tmp_path))]
    proc = run(agent_cmd, subprocess_env, *args, "--out", str(tmp_path / "m.gz"))
    assert proc.returncode == EXIT_ERROR
    assert "not a directory" in proc.stderr
    assert not (tmp_path / "m.gz").exists()


@pytest.mark.parametrize("command", ["bake", "check"])
def test_commands_have_help(
    command: str, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    proc = run(agent_cmd, subprocess_env, command, "--help")
    assert proc.returncode == 0 and "--root" in proc.stdout


def _dpkg_status(root: Path, packages: dict[str, str]) -> None:
    status = at(root, "/var/lib/dpkg/status")
    status.parent.mkdir(parents=True, exist_ok=True)
    status.write_text(
        "".join(
            f"Package: {name}\nStatus: install ok installed\nArchitecture: amd64\n"
            f"Version: {version}\n\n"
            for name, version in packages.items()
        )
    )


@pytest.mark.parametrize(("mode", "status"), [("drift", EXIT_DRIFT), ("alert", EXIT_OK)])
def test_package_changes_are_reported(
    mode: str, status: int, tmp_path: Path, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    root = build(tmp_path / "root")
    _dpkg_status(root, {"bash": "5.2.15-2", "openssl": "3.0.11-1"})
    text = POLICY.replace('name = "test-image"', f'package_change = "{mode}"')
    text = text.replace('"/var/log/**"]', '"/var/log/**", "/var/lib/dpkg/**"]')  # files apart
    manifest = tmp_path / "m.gz"
    bake(root, write_policy(tmp_path, text), manifest)
    base = ["check", "--root", str(root), "--baseline", str(manifest)]
    assert run(agent_cmd, subprocess_env, *base).returncode == EXIT_OK
    _dpkg_status(root, {"bash": "5.2.15-2", "openssl": "3.0.13-1", "netcat": "1.10-47"})
    proc = run(agent_cmd, subprocess_env, *base, "--json")
    assert proc.returncode == status, proc.stderr
    report = json.loads(proc.stdout)
    packages = [f for f in report["findings"] if f["type"] == "package"]
    assert [(f["change"], f["name"], f["before"], f["after"]) for f in packages] == [
        ("installed", "netcat", None, "1.10-47"),
        ("changed", "openssl", "3.0.11-1", "3.0.13-1"),
    ]
    assert all(f["drift"] is (mode == "drift") and f["arch"] == "amd64" for f in packages)
    text = run(agent_cmd, subprocess_env, *base).stdout
    assert "package openssl:amd64 3.0.11-1 -> 3.0.13-1" in text


# --- start-up cost ---------------------------------------------------------------------------

_IMPORTS_AFTER = """\
import sys
from agent.cli import main
code = main(sys.argv[1:])
print(" ".join(m for m in ("structlog", "importlib.metadata") if m in sys.modules))
sys.exit(code)
"""


def test_check_logs_without_loading_structlog_until_an_event_passes(
    image: Image, subprocess_env: dict[str, str]
) -> None:
    """A clean, verified check logs nothing at the default level, so it never imports
    structlog; at ``--log-level info`` its events are still written, as JSON lines."""
    base = ["check", "--root", str(image.root), "--baseline", str(image.manifest)]
    base += ["--pubkey", str(image.key) + ".pub"]
    quiet = run([sys.executable, "-c", _IMPORTS_AFTER], subprocess_env, "--log-json", *base)
    assert quiet.returncode == EXIT_OK, quiet.stderr
    assert quiet.stdout.splitlines()[-1] == ""
    assert quiet.stderr == ""
    chatty = run(
        [sys.executable, "-c", _IMPORTS_AFTER],
        subprocess_env,
        *("--log-json", "--log-level", "info", *base),
    )
    assert chatty.returncode == EXIT_OK, chatty.stderr
    assert "structlog" in chatty.stdout.splitlines()[-1]
    events = [json.loads(line) for line in chatty.stderr.splitlines()]
    finished = [e for e in events if e["event"] == "check_finished"]
    assert finished and finished[0]["service"] == "driftwarden-agent"
    assert finished[0]["level"] == "info"


def test_measured_root_is_the_images_root_with_the_drift_in_it(
    agent_cmd: list[str], subprocess_env: dict[str, str], image: Image
) -> None:
    """What the boot report sends as ``measured_root``: the image's root while nothing
    drifted (allowed changes aside), else the root a bake of the drifted tree would have, the
    same on every host that drifted the same way."""
    _, clean = check(agent_cmd, subprocess_env, image)
    image_root = clean["baseline"]["root"]
    assert clean["measured_root"] == image_root
    at(image.root, "/var/lib/app/new").write_text("state")  # mutable: allowed
    _, allowed = check(agent_cmd, subprocess_env, image)
    assert allowed["drift"] is False and allowed["measured_root"] == image_root

    twin = replace(image, root=image.work / "twin")
    shutil.copytree(image.root, twin.root, symlinks=True)
    for root in (image.root, twin.root):
        at(root, "/usr/bin/tool").write_bytes(b"\x7fELF patched")  # modified
        at(root, "/usr/bin/extra").write_bytes(b"\x7fELF new")  # added
        at(root, "/usr/share/doc/readme").unlink()  # removed
        at(root, "/var/lib/app/new").unlink()
    _, first = check(agent_cmd, subprocess_env, image)
    _, second = check(agent_cmd, subprocess_env, twin)
    assert first["drift"] is True and first["measured_root"] != image_root
    assert second["measured_root"] == first["measured_root"]
    rebaked = image.work / "rebaked.dwm"
    bake(twin.root, image.policy, rebaked)
    assert read_head(rebaked).statement["root"] == first["measured_root"]
