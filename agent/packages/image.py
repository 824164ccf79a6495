"""Paths as the image sees them, resolved inside the image root and never outside it.

``--root`` may be a mounted image whose symlinks are absolute (``/lib -> /usr/lib``): they
mean the image's ``/usr/lib``, not the host's. ``ImageRoot`` follows symlinks itself, confined
to the root, and opens only regular files (a FIFO or a device node is never opened).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Final

_MAX_SYMLINKS: Final = 40  # as the kernel's path walk
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY
_TYPE_NAMES: Final = {
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


class NotRegularError(Exception):
    """The path names something other than a regular file; ``kind`` says what."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def type_name(mode: int) -> str:
    return _TYPE_NAMES.get(stat.S_IFMT(mode), "unknown file type")


def normalize(raw: str) -> str | None:
    """``usr/bin/x``, ``./usr/bin/x`` or ``/usr/bin/x`` as ``/usr/bin/x``; ``None`` for a path
    that could leave the root (``..``), is empty, or holds a NUL."""
    if "\0" in raw:
        return None
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/" + "/".join(parts)


class ImageRoot:
    """Resolves and opens image paths (``/etc/passwd``) under ``root``; safe to share between
    threads (the directory cache only ever gains equal answers)."""

    def __init__(self, root: Path) -> None:
        text = os.path.abspath(os.fsdecode(root))
        self._prefix = "" if text == "/" else text.rstrip("/")
        self._dirs: dict[str, str | tuple[int, str]] = {"/": "/"}
        self._proc_fd = os.path.isdir("/proc/self/fd")

    def host(self, image_path: str) -> str:
        """The host path of an already resolved image path."""
        return self._prefix + image_path

    def resolve_dir(self, image_dir: str) -> str:
        """The symlink-free image path of directory ``image_dir`` (normalized); ``OSError``
        when it does not resolve to a directory inside the root."""
        found = self._dirs.get(image_dir)
        if found is None:
            parent, _, name = image_dir.rpartition("/")
            try:
                found = self._follow(self.resolve_dir(parent or "/"), [name])
            except OSError as exc:
                found = (exc.errno or errno.EIO, exc.strerror or str(exc))
            self._dirs[image_dir] = found
        if isinstance(found, tuple):
            raise OSError(*found)
        return found

    def locate(self, image_path: str) -> str:
        """The image path of a file: its directory resolved, its last component as it is."""
        parent, _, name = image_path.rpartition("/")
        return self.resolve_dir(parent or "/").rstrip("/") + "/" + name

    def _follow(self, current: str, names: list[str], *, file_ok: bool = False) -> str:
        pending = list(reversed(names))
        hops = 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                current = current.rpartition("/")[0] or "/"
                continue
            candidate = current.rstrip("/") + "/" + name
            mode = os.lstat(self.host(candidate)).st_mode
            if stat.S_ISLNK(mode):
                hops += 1
                if hops > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                target = os.readlink(self.host(candidate))
                if target.startswith("/"):
                    current = "/"
                pending.extend(reversed(target.split("/")))
            elif stat.S_ISDIR(mode) or (file_ok and not pending):
                current = candidate
            else:
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return current

    def open_regular(self, image_path: str, *, follow: bool = False) -> int:
        """Open a regular file for reading and return the descriptor.

        Raises ``NotRegularError`` for anything else (a symlink too, unless ``follow``), which
        is then never opened for reading: the path is pinned with ``O_PATH``, checked with
        ``fstat``, and only that inode is reopened through ``/proc/self/fd``.
        """
        located = self.locate(image_path)
        if follow:
            parent, _, name = located.rpartition("/")
            located = self._follow(parent or "/", [name], file_ok=True)
        host = self.host(located)
        if not self._proc_fd:  # no /proc: a short race, but a FIFO still cannot block us
            mode = os.lstat(host).st_mode
            if not stat.S_ISREG(mode):
                raise NotRegularError(type_name(mode))
            fd = os.open(host, _OPEN_FLAGS | os.O_NOFOLLOW | os.O_NONBLOCK)
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                os.close(fd)
                raise NotRegularError(type_name(mode))
            return fd
        pinned = os.open(host, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            mode = os.fstat(pinned).st_mode
            if not stat.S_ISREG(mode):
                raise NotRegularError(type_name(mode))
            return os.open(f"/proc/self/fd/{pinned}", _OPEN_FLAGS)
        finally:
            os.close(pinned)

    def read_bytes(self, image_path: str) -> bytes:
        """The whole content of a regular file (symlinks followed inside the root)."""
        fd = self.open_regular(image_path, follow=True)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
