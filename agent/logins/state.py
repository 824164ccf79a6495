"""The login sources' positions (journal cursor, log file inode and offset) in one JSON file.

Written atomically (temporary file, fsync, rename, fsync of the directory), so a crash leaves
either the old positions or the new ones, never a torn file. A file that cannot be read is
logged and set aside as ``NAME.bad``; the sources then start from their beginnings, which may
repeat lines but never loses one.

Positions that have read past logins not yet queued are saved *pending* on the spool record
that will carry them (its queue number ``q``), with the positions before them. After a crash,
``load`` keeps the new positions only if that record was written (the spool's next number is
past ``q``), else the previous ones: a kill between queueing the logins and saving the
positions neither repeats nor loses a login.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import structlog

from agent.errors import SpoolError, advice

STATE_VERSION: Final = 1
log = structlog.get_logger("agent.logins")


def load(path: Path, *, written: Callable[[int], bool] | None = None) -> dict[str, dict[str, Any]]:
    """Each source's saved position by source name; empty when there is none. ``written(q)``
    says whether spool record ``q`` exists, to settle pending positions (without it, the
    previous positions are taken: a login may repeat, never be lost)."""
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
    pending = data.get("pending")
    if isinstance(pending, dict) and isinstance(pending.get("previous"), dict):
        q = pending.get("q")
        if not (isinstance(q, int) and written is not None and written(q)):
            log.info("login_positions_rolled_back", path=str(path), pending_q=q)
            sources = pending["previous"]
        settled = {name: pos for name, pos in sources.items() if isinstance(pos, dict)}
        try:  # settled now: record q's number is given to another report from here on
            save(path, settled)
        except SpoolError as exc:
            log.warning("login_state_unwritable", path=str(path), error=str(exc))
        return settled
    return {name: pos for name, pos in sources.items() if isinstance(pos, dict)}


def save(
    path: Path,
    positions: dict[str, dict[str, Any]],
    *,
    pending_q: int | None = None,
    previous: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Replace the state file atomically and durably; with ``pending_q``, the positions hold
    only once spool record ``pending_q`` is written, else ``previous`` do (see above)."""
    obj: dict[str, Any] = {"version": STATE_VERSION, "sources": positions}
    if pending_q is not None:
        obj["pending"] = {"q": pending_q, "previous": previous or {}}
    data = json.dumps(obj, sort_keys=True)
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
