"""Durable small files: written whole or not at all, and still there after a power cut.

A file is written to a temporary name in the same directory, fsync'd, renamed over the target
and the directory fsync'd, so a reader sees the old bytes or the new ones, never a torn mix.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` durably; raises ``OSError`` (the caller adds advice).

    The temporary file has a unique name and is created new (``O_EXCL``, never following a
    link), so a leftover or planted file can neither lend it its mode nor redirect the write."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def read_json(path: Path) -> Any:
    """The decoded file, or None when it does not exist; ``ValueError`` when it is not JSON."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return json.loads(data)


def remove(path: Path) -> None:
    """Remove ``path`` durably (missing is fine)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def clean_temporaries(directory: Path) -> int:
    """Delete temporaries a crash left behind; return how many."""
    count = 0
    for entry in directory.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            _unlink_quietly(entry)
            count += 1
    return count


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        return
