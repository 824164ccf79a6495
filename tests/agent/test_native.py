"""``agent._native``, the per-file measurement in C: built where the suite runs, and giving
exactly what ``agent.measure``'s own Python code gives, file by file and record by record."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import measure, record
from agent.measure import read_open
from agent.policy import parse_policy
from agent.walk import Walk

SIZES = (0, 1, 2040, (256 << 10) - 1, 256 << 10, (256 << 10) + 1, (1 << 20) + 7, 3 << 20)


@pytest.fixture(params=["native", "python"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test once through ``agent._native`` and once through the Python code."""
    monkeypatch.setattr(measure, "NATIVE", request.param == "native")
    yield request.param


def test_native_measurement_is_built() -> None:
    assert measure.NATIVE, (
        "agent._native was not built: install a C compiler, Python's headers and libssl-dev,"
        " then pip install -e . again"
    )


def _tree(root: Path) -> Path:
    """Files of every size class the reads treat differently, and xattrs of every kind."""
    data = root / "data"
    data.mkdir(parents=True)
    for size in SIZES:
        (data / f"f{size}").write_bytes(os.urandom(size))
    tagged = data / "tagged"
    tagged.write_bytes(b"tagged")
    os.setxattr(tagged, "user.z", b"last")
    os.setxattr(tagged, "user.\u00e9t\u00e9", b"\x00\xff binary")
    os.setxattr(tagged, "user.a", b"")
    os.setxattr(tagged, "security.capability", bytes.fromhex("0100000200200000" + "00" * 12))
    many = data / "many"
    many.write_bytes(b"many")
    for i in range(30):  # names longer in all than the first flistxattr buffer (1 KiB)
        os.setxattr(many, f"user.{i:03d}-{'x' * 32}", b"v" * (i % 3))
    os.setxattr(many, "user.big", os.urandom(1000))
    os.link(tagged, data / "tagged-link")
    os.mkfifo(data / "fifo")
    os.symlink("f1", data / "link")
    return root


def _records(root: Path, workers: int) -> list[tuple[str, str, bool]]:
    pol = parse_policy({"policy": {"name": "t", "roots": ["/"]}}, source="t.toml")
    with Walk(root, pol, workers=workers) as walk:
        return list(walk.records())


@pytest.mark.parametrize("workers", [1, 2])
def test_a_walk_makes_the_same_records_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    if not measure.NATIVE:
        pytest.fail("agent._native was not built")
    root = _tree(tmp_path / "root")
    native = _records(root, workers)
    monkeypatch.setattr(measure, "NATIVE", False)
    assert _records(root, workers) == native
    entries = {e.path: e for e in (record.from_line(line) for _p, line, _d in native)}
    for size in SIZES:
        file = root / "data" / f"f{size}"
        assert entries[f"/data/f{size}"].digest == hashlib.sha256(file.read_bytes()).hexdigest()
    names = [name for name, _value in entries["/data/many"].xattrs]
    assert len(names) == 31 and names == sorted(names, key=lambda n: n.encode())
    assert entries["/data/tagged"].xattrs == (
        ("security.capability", bytes.fromhex("0100000200200000" + "00" * 12)),
        ("user.a", b""),
        ("user.z", b"last"),
        ("user.\u00e9t\u00e9", b"\x00\xff binary"),
    )


def _look(path: Path) -> tuple[os.stat_result, int]:
    st = os.lstat(path)
    fd = measure.open_ahead(str(path), st.st_size)
    assert fd is not None
    return st, fd


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_read_open_hashes_and_closes(tmp_path: Path, mode: str) -> None:
    file = tmp_path / "f"
    file.write_bytes(b"content" * 1000)
    st, fd = _look(file)
    assert read_open(st, fd) == (hashlib.sha256(file.read_bytes()).hexdigest(), ())
    assert _closed(fd)


@pytest.mark.parametrize("size", [10, 3 << 20])
def test_read_open_refuses_a_file_changed_since_its_lstat(
    tmp_path: Path, mode: str, size: int
) -> None:
    file = tmp_path / "f"
    file.write_bytes(b"x" * size)
    st, fd = _look(file)
    with file.open("ab") as out:  # grew after lstat saw it
        out.write(b"more")
    assert read_open(st, fd) is None
    assert _closed(fd)


def test_read_open_refuses_a_file_rewritten_to_the_same_size(tmp_path: Path, mode: str) -> None:
    file = tmp_path / "f"
    file.write_bytes(b"before")
    st, fd = _look(file)
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # mtime moved
    assert read_open(st, fd) is None
    assert _closed(fd)


def test_read_open_never_blocks_on_a_fifo(tmp_path: Path, mode: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    st = os.lstat(fifo)
    # What a walk could be handed if a file were swapped for a FIFO after its lstat: the
    # open does not block (O_NONBLOCK) and the read finds no regular file.
    fd = measure.open_ahead(str(fifo), 100)
    assert fd is not None
    assert read_open(st, fd) is None
    assert _closed(fd)


def test_open_ahead_relative_to_a_directory_and_of_nothing(tmp_path: Path, mode: str) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = measure.open_ahead("f", 3, dir_fd)
        assert fd is not None
        assert os.read(fd, 10) == b"abc"
        os.close(fd)
        assert measure.open_ahead("missing", 3, dir_fd) is None
    finally:
        os.close(dir_fd)
    os.symlink(tmp_path / "f", tmp_path / "link")
    assert measure.open_ahead(str(tmp_path / "link"), 3) is None  # never followed


def _look_like(st: os.stat_result, **changed: int) -> os.stat_result:
    """``st`` with some fields changed (what a file could have looked like to ``lstat``)."""
    visible = list(st)
    order = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size")
    for name, value in changed.items():
        if name in order:
            visible[order.index(name)] = value
    hidden = {n: getattr(st, n) for n in dir(st) if n.startswith("st_") and n not in order}
    hidden.update({k: v for k, v in changed.items() if k not in order})
    return os.stat_result(visible, hidden)


def test_read_open_never_reads_past_one_byte_more_than_the_size(mode: str) -> None:
    # A file swapped for an endless one after lstat (here /dev/zero, opened by the test): the
    # read stops one byte past the size it was told, and the look is refused.
    fd = os.open("/dev/zero", os.O_RDONLY)
    st = _look_like(os.stat(__file__), st_size=3 << 20)
    assert read_open(st, fd) is None
    assert _closed(fd)


def test_read_open_takes_any_value_a_stat_can_hold(tmp_path: Path, mode: str) -> None:
    # An inode number past 2**63 (overlayfs, NFS, FUSE) and a negative size are no file this
    # one: refused, the file closed, nothing raised.
    file = tmp_path / "f"
    file.write_bytes(b"content")
    for changed in ({"st_ino": 2**64 - 1}, {"st_size": -1}):
        st = os.lstat(file)
        fd = measure.open_ahead(str(file), st.st_size)
        assert fd is not None
        assert read_open(_look_like(st, **changed), fd) is None
        assert _closed(fd)


def test_a_file_dated_past_2262_is_measured_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its mtime in nanoseconds does not fit 64 bits (touch -d 2300-01-01 needs no privilege):
    # the C code leaves it to the careful path, which records it as the Python code does.
    if not measure.NATIVE:
        pytest.fail("agent._native was not built")
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    file = root / "data" / "future"
    file.write_bytes(b"from the future")
    far = 10_413_792_000 * 10**9  # 2300-01-01
    os.utime(file, ns=(far, far))
    assert os.lstat(file).st_mtime_ns == far
    st, fd = _look(file)
    assert measure.read_open(st, fd) is None  # the C code: not for it to judge
    assert _closed(fd)
    native = _records(root, 1)
    monkeypatch.setattr(measure, "NATIVE", False)
    assert _records(root, 1) == native
    entry = record.from_line(native[-1][1])
    assert entry.path == "/data/future" and entry.mtime_ns == far
    assert entry.digest == hashlib.sha256(b"from the future").hexdigest()
