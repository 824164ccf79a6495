"""Measuring files: one path (``measure_path``) or a whole tree in manifest order (``walk``).

A path is a ``str`` as seen inside the image (``/etc/passwd``), decoded from the file
system's bytes with ``surrogateescape``; ``root`` is where the image is mounted. Nothing is
ever followed: symlinks are read with ``readlink``, and only regular files are opened, with
``O_NOFOLLOW | O_NONBLOCK`` and (where permitted) ``O_NOATIME``; the open file is ``fstat``-ed
after reading, and a file that is not the one ``lstat`` saw, or that changed while it was
read, is measured again, and after a few attempts recorded as ``unstable``.

Entry states: ``ok``; ``unreadable`` (open, read or xattrs failed: metadata recorded, no
digest); ``too_large`` (over the policy's ``max_file_size_bytes``: metadata recorded, no
digest); ``unstable`` (kept changing while read: metadata of the last look, no digest). A path
that vanishes while it is measured yields no entry at all.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from agent.mounts import MountTable
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
_INLINE_BYTES: Final = 256 << 10  # smaller files are hashed by the walking thread itself
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NOATIME: Final = getattr(os, "O_NOATIME", 0)
_GONE: Final = (errno.ENOENT, errno.ENOTDIR)


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
    return _measure(full, path, st, policy, hash_content=hash_content)


def wants_content(policy: Policy, path: str) -> bool:
    decision = policy.decide(path)
    return "content" in decision.attributes or decision.kind == "growth_only"


def _measure(
    full: str, path: str, st: os.stat_result, policy: Policy, *, hash_content: bool
) -> Entry | None:
    """Measure a path that ``lstat`` showed as ``st``; None if it vanished meanwhile."""
    if stat.S_ISREG(st.st_mode) and hash_content and wants_content(policy, path):
        return _hashed_entry(full, path, st, policy.max_file_size_bytes)
    return _entry(full, path, st, None, "ok")


def _hashed_entry(full: str, path: str, st: os.stat_result, cap: int) -> Entry | None:
    for _attempt in range(_ATTEMPTS):
        if not stat.S_ISREG(st.st_mode):
            return _entry(full, path, st, None, "ok")
        if cap and st.st_size > cap:
            return _entry(full, path, st, None, "too_large")
        try:
            digest = _hash_stable(full, st)
        except OSError as exc:
            if exc.errno in _GONE:
                return None
            if exc.errno != errno.ELOOP:  # ELOOP: replaced by a symlink; look again
                return _entry(full, path, st, None, "unreadable")
            digest = None
        if digest is not None:
            return _entry(full, path, st, digest, "ok")
        try:
            st = os.lstat(full)
        except OSError as exc:
            if exc.errno in _GONE:
                return None
            return _entry(full, path, st, None, "unreadable")
    return _entry(full, path, st, None, "unstable")


def _open(full: str) -> int:
    if _NOATIME:
        try:
            return os.open(full, _OPEN_FLAGS | _NOATIME)
        except PermissionError:
            pass  # O_NOATIME needs ownership or CAP_FOWNER
    return os.open(full, _OPEN_FLAGS)


def _hash_stable(full: str, st: os.stat_result) -> str | None:
    """The digest of the file ``st`` describes, or None if it is not that file any more or
    changed while it was read (same inode, size, mtime and ctime after the read as before)."""
    fd = _open(full)
    try:
        if st.st_size <= _INLINE_BYTES:
            data = os.read(fd, st.st_size + 1)
            count = len(data)
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest, count = _read_hash(fd, None)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    same = (
        count == st.st_size
        and after.st_ino == st.st_ino
        and after.st_dev == st.st_dev
        and after.st_size == st.st_size
        and after.st_mtime_ns == st.st_mtime_ns
        and after.st_ctime_ns == st.st_ctime_ns
        and stat.S_ISREG(after.st_mode)
    )
    return digest if same else None


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


def _xattrs(full: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return ()
        raise
    if not names:
        return ()
    out = []
    for name in sorted(names, key=lambda n: n.encode("utf-8", "surrogateescape")):
        try:
            out.append((name, os.getxattr(full, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed between list and get
                raise
    return tuple(out)


def _entry(
    full: str, path: str, st: os.stat_result, digest: str | None, state: str
) -> Entry | None:
    """Build an entry from ``st``, reading the symlink target and the xattrs."""
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
    is_dir = kind == "dir"
    return Entry(
        path=path,
        type=kind,
        mode=stat.S_IMODE(mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=0 if is_dir else st.st_size,
        digest=digest,
        target=target,
        hardlink=None,
        xattrs=xattrs,
        rdev=st.st_rdev if kind in ("chardev", "blockdev") else 0,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        ino=st.st_ino,
        nlink=0 if is_dir else st.st_nlink,
        state=state,
    )


# --- the tree walk ---------------------------------------------------------------------------

Unchanged = Callable[[str, os.stat_result], bool]
"""``unchanged(path, st)``: True when the reference says this path is exactly as ``st`` shows
(same type, size, mtime, ctime, inode), so it need not be measured again."""


@dataclass(frozen=True, slots=True)
class Same:
    """A path the walk saw unchanged against its reference (see ``Unchanged``)."""

    path: str


def order_key(path: str) -> bytes:
    """The manifest order: path bytes, with '/' before every other byte (parents first, then
    each directory's whole subtree before its next sibling)."""
    return path.encode("utf-8", "surrogateescape").replace(b"/", b"\x00")


class Walk:
    """Every path under the policy's roots, in manifest order, measured.

    Iterating yields an ``Entry`` per path (or ``Same`` where ``unchanged`` says the path is
    as before). Excluded paths and mounts of excluded file system types (or, with
    ``one_filesystem``, any other file system) are not descended; ``skipped`` lists those
    mount points afterwards, ``count`` the paths seen and ``measured`` those measured (not
    ``Same``). Paths in ``ignore`` (the tool's own output) are passed over. Regular files of
    ``_INLINE_BYTES`` and more are hashed by ``workers`` threads while the walk goes on;
    entries still come out in order.
    """

    def __init__(
        self,
        root: Path,
        policy: Policy,
        *,
        workers: int = 0,
        unchanged: Unchanged | None = None,
        mounts: MountTable | None = None,
        ignore: frozenset[str] = frozenset(),
        window: int = 4096,
    ) -> None:
        self.root = root_prefix(root)
        self.policy = policy
        self.workers = workers or os.cpu_count() or 1
        self.unchanged = unchanged
        self.mounts = mounts if mounts is not None else MountTable.from_proc()
        self.ignore = ignore
        self.window = window
        self.skipped: list[str] = []
        self.count = 0
        self.measured = 0

    def __iter__(self) -> Iterator[Entry | Same]:
        pending: deque[Entry | Same | Future[Entry | None]] = deque()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hash")
        try:
            for item in self._items(pool):
                pending.append(item)
                while pending and (
                    len(pending) > self.window
                    or not isinstance(pending[0], Future)
                    or pending[0].done()
                ):
                    out = _resolve(pending.popleft())
                    if out is not None:
                        yield out
            while pending:
                out = _resolve(pending.popleft())
                if out is not None:
                    yield out
        finally:
            for item in pending:
                if isinstance(item, Future):
                    item.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _items(self, pool: ThreadPoolExecutor) -> Iterator[Entry | Same | Future[Entry | None]]:
        links: dict[tuple[int, int], tuple[str, Entry | Same | Future[Entry | None]]] = {}
        tops = _top_roots(self.policy.roots)
        root_dev: int | None = None
        for top in tops:
            if self.policy.excluded(top):
                continue
            full = full_path(self.root, top)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if root_dev is None:
                root_dev = st.st_dev
            item = self._visit(pool, links, top, full, st)
            if item is not None:
                yield item
            if not stat.S_ISDIR(st.st_mode):
                continue
            stack = [self._children(full, top)]
            while stack:
                child = next(stack[-1], None)
                if child is None:
                    stack.pop()
                    continue
                path, cfull, cst = child
                if stat.S_ISDIR(cst.st_mode) and self._skip_mount(path, cfull, cst, root_dev):
                    continue
                item = self._visit(pool, links, path, cfull, cst)
                if item is not None:
                    yield item
                if stat.S_ISDIR(cst.st_mode):
                    stack.append(self._children(cfull, path))

    def _children(self, full: str, path: str) -> Iterator[tuple[str, str, os.stat_result]]:
        try:
            with os.scandir(full) as it:
                names = sorted(
                    (e.name for e in it), key=lambda n: n.encode("utf-8", "surrogateescape")
                )
        except OSError as exc:
            if exc.errno in (*_GONE, errno.EACCES, errno.EPERM):
                return  # vanished, or unreadable (the directory's own entry still stands)
            raise
        prefix = path if path != "/" else ""
        excluded = self.policy.excluded
        ignore = self.ignore
        for name in names:
            child = prefix + "/" + name
            if excluded(child) or child in ignore:
                continue
            cfull = full + "/" + name if full != "/" else "/" + name
            try:
                yield child, cfull, os.lstat(cfull)
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise

    def _skip_mount(self, path: str, full: str, st: os.stat_result, root_dev: int) -> bool:
        if st.st_dev == root_dev:
            return False
        fstype = self.mounts.fstype(full)
        if self.policy.one_filesystem or fstype in self.policy.exclude_fstypes:
            self.skipped.append(path)
            return True
        return False

    def _visit(
        self,
        pool: ThreadPoolExecutor,
        links: dict[tuple[int, int], tuple[str, Entry | Same | Future[Entry | None]]],
        path: str,
        full: str,
        st: os.stat_result,
    ) -> Entry | Same | Future[Entry | None] | None:
        self.count += 1
        if self.unchanged is not None and self.unchanged(path, st):
            item: Entry | Same | Future[Entry | None] | None = Same(path)
        else:
            self.measured += 1
            item = None
        linked = not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1
        key = (st.st_dev, st.st_ino)
        first = links.get(key) if linked else None
        if item is not None:
            pass
        elif first is not None:
            item = _linked(full, path, st, first, self.policy)
        elif (
            stat.S_ISREG(st.st_mode)
            and st.st_size >= _INLINE_BYTES
            and wants_content(self.policy, path)
        ):
            item = pool.submit(_hashed_entry, full, path, st, self.policy.max_file_size_bytes)
        else:
            item = _measure(full, path, st, self.policy, hash_content=True)
        if item is not None and linked and first is None:
            links[key] = (path, item)
        return item


def _linked(
    full: str,
    path: str,
    st: os.stat_result,
    first: tuple[str, Entry | Same | Future[Entry | None]],
    policy: Policy,
) -> Entry | None:
    """A further name of a file already measured: reuse the first's digest, hash once."""
    first_path, first_item = first
    measured = first_item.result() if isinstance(first_item, Future) else first_item
    if (
        isinstance(measured, Entry)
        and measured.state == "ok"
        and (measured.size, measured.mtime_ns, measured.ctime_ns)
        == (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    ):
        entry = _entry(full, path, st, measured.digest, "ok")
        if entry is not None and not wants_content(policy, path):
            entry = replace(entry, digest=None)
    else:
        entry = _measure(full, path, st, policy, hash_content=True)
    return replace(entry, hardlink=first_path) if entry is not None else None


def _resolve(item: Entry | Same | Future[Entry | None]) -> Entry | Same | None:
    return item.result() if isinstance(item, Future) else item


def _top_roots(roots: tuple[str, ...]) -> list[str]:
    """The policy's roots in manifest order, without any that lies inside another."""
    out: list[str] = []
    for root in sorted(set(roots), key=order_key):
        if not any(r in (root, "/") or root.startswith(r + "/") for r in out):
            out.append(root)
    return out
