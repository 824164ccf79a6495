"""Measuring one path: ``Entry`` and ``measure_path`` (the tree walk is ``agent.walk``).

A path is a ``str`` as seen inside the image (``/etc/passwd``), decoded from the file
system's bytes with ``surrogateescape``; ``root`` is where the image is mounted. Nothing is
ever followed: symlinks are read with ``readlink``, and only regular files are opened, with
``O_NOFOLLOW | O_NONBLOCK`` and (where permitted) ``O_NOATIME``; the open file is ``fstat``-ed
after reading, and a file that is not the one ``lstat`` saw, or that changed while it was
read, is measured again, and after a few attempts recorded as ``unstable``.

Entry states: ``ok``; ``unreadable`` (open, read or xattrs failed, or a directory that
cannot be listed: metadata recorded, no digest, no contents); ``too_large`` (over the
policy's ``max_file_size_bytes``: metadata recorded, no digest); ``unstable`` (kept changing
while read: metadata of the last look, no digest). A path that vanishes while it is measured
yields no entry at all.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.policy import Policy

HASH_ALG: Final = "sha256"
STATES: Final = ("ok", "unreadable", "too_large", "unstable")
TYPES: Final = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
}
_ATTEMPTS: Final = 3
_CHUNK_BYTES: Final = 1 << 20
_INLINE_BYTES: Final = 256 << 10  # smaller files are read in one call
AHEAD_FILE_BYTES: Final = 4 << 20
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NOATIME: Final = getattr(os, "O_NOATIME", 0)
_GONE: Final = (errno.ENOENT, errno.ENOTDIR)
_NO_XATTRS: Final = (errno.ENOTSUP, errno.ENODATA)  # a file system without them
_sha256: Final = hashlib.sha256

try:  # the per-file work in one call (agent/_native.c); this module's own code where not built
    from agent._native import open_ahead as _native_open_ahead
    from agent._native import read_open as _native_read_open

    NATIVE = True
except ImportError:  # the suite requires it built (tests/agent/test_native.py)
    NATIVE = False


@dataclass(frozen=True, slots=True)
class Entry:
    """One measured path. ``size`` and ``nlink`` are 0 for directories (they depend on the
    file system, not on the image); ``rdev`` is 0 except for devices; ``digest`` is the hex
    SHA-256 of a regular file's content when ``state`` is ``ok`` and the policy looks at
    content, else None. ``hardlink`` is the first path (in manifest order) that is the same
    file, set by a tree walk only. ``mtime_ns``, ``ctime_ns`` and ``ino`` are the fast-path
    hints: while they (and size and type) are unchanged the content is not read again."""

    path: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    digest: str | None
    target: str | None
    hardlink: str | None
    xattrs: tuple[tuple[str, bytes], ...]
    rdev: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    nlink: int
    state: str = "ok"


Fields = tuple[
    str,
    str,
    int,
    int,
    int,
    int,
    str | None,
    str | None,
    str | None,
    tuple[tuple[str, bytes], ...],
    int,
    int,
    int,
    int,
    int,
    str,
]
"""An ``Entry``'s fields in order: ``Entry(*fields)`` is the entry, ``record.fields_parts``
its record's two parts (a walk makes the line straight from the fields)."""


def full_path(root: str, path: str) -> str:
    """``path`` inside the image as a path on this machine (``root`` without a trailing /)."""
    return root + path if path != "/" else (root or "/")


def root_prefix(root: Path) -> str:
    text = os.fsdecode(os.path.abspath(root))
    return "" if text == "/" else text.rstrip("/")


def hash_file(full: str, size: int | None = None) -> str | None:
    """SHA-256 of a regular file's first ``size`` bytes (all of it when None), or None when it
    is shorter, unreadable or not a regular file. Growth-only rules use it for the prefix."""
    try:
        fd = _open(full)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest, count = _read_hash(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)
    return digest if size is None or count == size else None


def measure_path(
    root: Path, path: str, policy: Policy, *, hash_content: bool = True
) -> Entry | None:
    """Measure one path; None if it does not exist (or is excluded by the policy)."""
    if policy.excluded(path):
        return None
    full = full_path(root_prefix(root), path)
    try:
        st = os.lstat(full)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise
    fields = measure_fields(full, path, st, policy, hash_content=hash_content)
    return Entry(*fields) if fields is not None else None


def measure_fields(
    full: str,
    path: str,
    st: os.stat_result,
    policy: Policy,
    *,
    hash_content: bool,
    opened: int | None = None,
) -> Fields | None:
    """Measure the path that ``lstat`` showed as ``st`` (``full`` on this machine, ``path``
    inside the image): the entry's fields (``Entry(*fields)`` is the entry; a walk makes the
    record line from them without it), or None if it vanished meanwhile. ``opened``: the file,
    already opened by ``open_ahead`` for this measurement (it is closed here, used or not)."""
    if stat.S_ISREG(st.st_mode) and hash_content and policy.wants_content(path):
        return _hashed(full, path, st, policy.max_file_size_bytes, opened)
    if opened is not None:
        os.close(opened)
    if stat.S_ISDIR(st.st_mode) and not _listable(full):
        return stat_fields(full, path, st, None, "unreadable")  # its contents cannot be seen
    return stat_fields(full, path, st, None, "ok")


def _listable(directory: str) -> bool:
    try:
        os.close(os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC))
    except PermissionError:
        return False
    except OSError:
        return True  # vanished or replaced: the caller's next look tells
    return True


def _hashed(
    full: str, path: str, st: os.stat_result, cap: int, opened: int | None
) -> Fields | None:
    for _attempt in range(_ATTEMPTS):
        if not stat.S_ISREG(st.st_mode):
            return stat_fields(full, path, st, None, "ok")
        if cap and st.st_size > cap:
            if opened is not None:
                os.close(opened)
            return stat_fields(full, path, st, None, "too_large")
        try:
            digest = _hash_stable(full, st, opened)
        except OSError as exc:
            if exc.errno in _GONE:
                return None
            if exc.errno != errno.ELOOP:  # ELOOP: replaced by a symlink; look again
                return stat_fields(full, path, st, None, "unreadable")
            digest = None
        opened = None  # used (and closed) by the first attempt; the next ones open again
        if digest is not None:
            return stat_fields(full, path, st, digest, "ok")
        try:
            st = os.lstat(full)
        except OSError as exc:
            if exc.errno in _GONE:
                return None
            return stat_fields(full, path, st, None, "unreadable")
    return stat_fields(full, path, st, None, "unstable")


def open_ahead(path: str, size: int, dir_fd: int | None = None) -> int | None:
    """Open the regular file ``path`` (relative to the directory ``dir_fd`` when given, as
    ``os.open`` takes it; as measuring does: no symlink followed, never blocking) and ask the
    kernel to start reading it (``POSIX_FADV_WILLNEED``, at most ``AHEAD_FILE_BYTES`` of it:
    the kernel's own readahead follows the reads of the rest), so that a walk keeps the disk
    busy with the files it will hash next. None if it cannot be opened now: measuring it
    opens it again and records why."""
    if NATIVE:
        return _native_open_ahead(path, size, AHEAD_FILE_BYTES, -1 if dir_fd is None else dir_fd)
    try:
        fd = _open(path, dir_fd)
    except OSError:
        return None
    if size > 0:  # (a length of 0 would announce the whole file, whatever it is now)
        try:  # noqa: SIM105 (once per file: contextlib.suppress costs more than the call)
            os.posix_fadvise(fd, 0, min(size, AHEAD_FILE_BYTES), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # not a regular file any more (the measurement sees it), or no page cache
    return fd


def _open(path: str, dir_fd: int | None = None) -> int:
    if _NOATIME:
        try:
            return os.open(path, _OPEN_FLAGS | _NOATIME, dir_fd=dir_fd)
        except PermissionError:
            pass  # O_NOATIME needs ownership or CAP_FOWNER
    return os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)


def _hash_stable(full: str, st: os.stat_result, fd: int | None = None) -> str | None:
    """The digest of the file ``st`` describes, or None if it is not that file any more or
    changed while it was read (same inode, size, mtime and ctime after the read as before).
    ``fd``: ``full``, opened already (closed here)."""
    if fd is None:
        fd = _open(full)
    try:
        digest, count = _read_small(fd, st.st_size)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    return digest if _unchanged(st, after, count) else None


def read_open(st: os.stat_result, fd: int) -> tuple[str, tuple[tuple[str, bytes], ...]] | None:
    """The digest and xattrs of the regular file that ``lstat`` showed as ``st``, read
    through ``fd`` (opened by ``open_ahead``; closed here): one look, all through the open
    file. None when it was not that look's file throughout or an error came up:
    ``measure_fields`` then measures it the careful way (again, and with a state).
    (A walk calls this for nearly every file: ``_read_small`` and ``_xattrs`` inline, or all of
    it in ``agent._native`` where that is built.)"""
    if NATIVE:
        return _native_read_open(
            fd, st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns
        )
    size = st.st_size
    try:
        try:
            if size > _INLINE_BYTES:  # (one byte past the size says it grew: no more)
                digest, count = _read_hash(fd, size + 1)
            else:
                data = os.read(fd, size + 1)
                digest, count = _sha256(data).hexdigest(), len(data)
            after = os.fstat(fd)
            try:
                names = os.listxattr(fd)
            except OSError as exc:
                if exc.errno not in _NO_XATTRS:
                    raise
                names = []
            xattrs = _named_xattrs(fd, names) if names else ()
        finally:
            os.close(fd)
    except OSError:
        return None
    if not _unchanged(st, after, count):
        return None
    return digest, xattrs


def _read_small(fd: int, size: int) -> tuple[str, int]:
    """(digest, bytes read) of the open file ``fd`` that ``lstat`` said has ``size`` bytes:
    a small one in one read (one byte more, to see it grew), a larger one in chunks."""
    if size > _INLINE_BYTES:
        return _read_hash(fd, size + 1)
    data = os.read(fd, size + 1)
    return hashlib.sha256(data).hexdigest(), len(data)


def _unchanged(st: os.stat_result, after: os.stat_result, count: int) -> bool:
    """Whether ``count`` bytes read, and ``fstat`` after the read, show the file ``st``
    described: the same inode, size, mtime and ctime, still a regular file."""
    return (
        count == st.st_size
        and after.st_ino == st.st_ino
        and after.st_dev == st.st_dev
        and after.st_size == st.st_size
        and after.st_mtime_ns == st.st_mtime_ns
        and after.st_ctime_ns == st.st_ctime_ns
        and stat.S_ISREG(after.st_mode)
    )


_buffers = threading.local()


def _read_hash(fd: int, limit: int | None) -> tuple[str, int]:
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(_CHUNK_BYTES)
    view = memoryview(buf)
    hasher = hashlib.sha256()
    count = 0
    while limit is None or count < limit:
        want = _CHUNK_BYTES if limit is None else min(_CHUNK_BYTES, limit - count)
        got = os.readv(fd, [view[:want]])
        if not got:
            break
        hasher.update(view[:got])
        count += got
    return hasher.hexdigest(), count


def _xattrs(target: str | int) -> tuple[tuple[str, bytes], ...]:
    """The extended attributes of the path ``target`` (never following a symlink) or of the
    open file ``target``, sorted by name."""
    try:
        if isinstance(target, str):
            names = os.listxattr(target, follow_symlinks=False)
        else:  # an open file has nothing to follow
            names = os.listxattr(target)
    except OSError as exc:
        if exc.errno in _NO_XATTRS:
            return ()
        raise
    return _named_xattrs(target, names) if names else ()


def _named_xattrs(target: str | int, names: list[str]) -> tuple[tuple[str, bytes], ...]:
    """The extended attributes called ``names`` of ``target`` (as ``_xattrs`` takes it),
    sorted by name; those removed since they were listed left out."""
    follow = not isinstance(target, str)
    out = []
    for name in sorted(names, key=lambda n: n.encode("utf-8", "surrogateescape")):
        try:
            out.append((name, os.getxattr(target, name, follow_symlinks=follow)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed between list and get
                raise
    return tuple(out)


def stat_fields(
    full: str, path: str, st: os.stat_result, digest: str | None, state: str
) -> Fields | None:
    """The fields of an entry made from ``st``, reading the symlink target and the xattrs;
    None if the path vanished."""
    mode = st.st_mode
    kind = TYPES.get(stat.S_IFMT(mode), "unknown")
    target = None
    try:
        if kind == "symlink":
            target = os.readlink(full)
        xattrs = _xattrs(full)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        xattrs, state, digest = (), "unreadable", None
    return _fields(path, st, kind, digest, target, xattrs, state)


def _fields(
    path: str,
    st: os.stat_result,
    kind: str,
    digest: str | None,
    target: str | None,
    xattrs: tuple[tuple[str, bytes], ...],
    state: str,
) -> Fields:
    """The fields of an entry of ``kind`` that ``lstat`` showed as ``st``."""
    if kind == "dir":
        size = nlink = 0
    else:
        size, nlink = st.st_size, st.st_nlink
    rdev = st.st_rdev if kind in ("chardev", "blockdev") else 0
    return (
        path,
        kind,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        size,
        digest,
        target,
        None,  # hardlink: set by a walk
        xattrs,
        rdev,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
        nlink,
        state,
    )


def order_key(path: str) -> bytes:
    """The manifest order: path bytes, with '/' before every other byte (parents first, then
    each directory's whole subtree before its next sibling)."""
    return path.encode("utf-8", "surrogateescape").replace(b"/", b"\x00")
