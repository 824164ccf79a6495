"""The collector's storage, chosen by the database URL's scheme.

``sqlite:///PATH`` (the default: one file, zero set-up) or ``postgresql+psycopg://...`` (several
replicas sharing one database). An unknown scheme fails, listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import structlog
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from collector.errors import ConfigError
from collector.store import postgres, sqlite
from collector.store.base import Store, Tx
from collector.store.sql import SqlStore

__all__ = ["BACKENDS", "SqlStore", "Store", "Tx", "open_store"]

BACKENDS: Final[dict[str, Callable[..., SqlStore]]] = {
    "sqlite": sqlite.open_store,
    "postgresql": postgres.open_store,
    "postgres": postgres.open_store,
}
EXAMPLES: Final = "sqlite:///PATH, postgresql+psycopg://USER@HOST:PORT/DB"


def open_store(url: str, *, pool_size: int = 10, migrate: bool = True) -> SqlStore:
    """Open the store for ``url``; bring its schema up to date unless ``migrate`` is False."""
    try:
        parsed: URL = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"not a database URL ({exc}); valid forms: {EXAMPLES}") from exc
    scheme = parsed.get_backend_name()
    if scheme not in BACKENDS:
        raise ConfigError(f"unknown database URL scheme {scheme!r}; valid: {EXAMPLES}")
    store = BACKENDS[scheme](parsed, pool_size=pool_size)
    structlog.get_logger(__name__).info(
        "store_opened", backend=store.backend, url=store.display_url
    )
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store
