"""The login sources' positions (journal cursor, log file inode and offset) in one JSON file.

Written atomically (temporary file, fsync, rename, fsync of the directory), so a crash leaves
either the old positions or the new ones, never a torn file. A file that cannot be read is
logged and set aside as ``NAME.bad``; the sources then start from their beginnings, which may
repeat lines but never loses one.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Final

import structlog

from agent.errors import SpoolError, advice

STATE_VERSION: Final = 1
log = structlog.get_logger("agent.logins")


def load(path: Path) -> dict[str, dict[str, Any]]:
    """Each source's saved position by source name; empty when there is none."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("login_state_unreadable", path=str(path), error=str(exc))
        _set_aside(path)
        return {}
    sources = data.get("sources") if isinstance(data, dict) else None
    if data.get("version") != STATE_VERSION or not isinstance(sources, dict):
        log.warning("login_state_unreadable", path=str(path), error="unknown shape or version")
        _set_aside(path)
        return {}
    return {name: pos for name, pos in sources.items() if isinstance(pos, dict)}


def save(path: Path, positions: dict[str, dict[str, Any]]) -> None:
    """Replace the state file atomically and durably."""
    data = json.dumps({"version": STATE_VERSION, "sources": positions}, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise SpoolError(f"cannot save login positions: {advice(exc)}", path=path) from exc


def _set_aside(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.replace(path, path.with_name(path.name + ".bad"))
