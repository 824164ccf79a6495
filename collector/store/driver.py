"""Rows through the SQLite driver: what a group commit reads and writes most, without
SQLAlchemy's statement execution.

A group commit on SQLite holds the database's one write lock from its first read to its
commit, and every report waits for it; under a burst of drift the lock is held nearly all the
time. Through SQLAlchemy Core, building and binding the rows cost more than SQLite's work on
them: a group of 200 drift reports spent about 40 ms of its 60 in reading its host rows and
writing its appended rows, host rows, chain tips and jobs, of which the same statements through
the driver take 13 (docs/collector.md). So ``SqliteGroupTx`` sends those statements to the
``sqlite3`` cursor itself, with the values converted as SQLAlchemy's types convert them for
SQLite — the same text for a time and for JSON, 1 and 0 for a boolean — so that what it writes
reads back through SQLAlchemy unchanged, and what it reads is what SQLAlchemy would give.
Everything else in the transaction still goes through SQLAlchemy, on the same connection.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from sqlalchemy import JSON, Boolean, Connection, Table

from collector.errors import StoreError
from collector.store.schema import UtcDateTime

Convert = Callable[[Any], Any]
T = TypeVar("T")
# The most parameters SQLite takes in one statement (since 3.32; Debian 12 has 3.40): longer
# lists of rows are written in as many statements as they need.
MAX_PARAMETERS: Final = 32_766


def time_text(value: datetime | None) -> str | None:
    """A time as SQLAlchemy's DATETIME stores it on SQLite: naive UTC, with microseconds.
    Nearly every time a group writes is its transaction's ``now`` (a report's envelope,
    finding, transition, jobs and host row: about ten), so the last one converted is kept."""
    if value is None:
        return None
    last = _last_time[0]
    if last[0] is value:
        return last[1]
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the store")
    text = value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    _last_time[0] = (value, text)  # one assignment: a thread reading it sees either pair
    return text


_last_time: list[tuple[datetime | None, str]] = [(None, "")]


def text_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _bool(value: Any) -> int | None:
    return None if value is None else int(bool(value))


def _loaded_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _loaded_json(value: Any) -> Any:
    return None if value is None else json.loads(value)


def _binder(column_type: Any) -> Convert | None:
    if isinstance(column_type, UtcDateTime):
        return time_text
    if isinstance(column_type, JSON):
        return json.dumps  # None too: SQLAlchemy's JSON stores it as 'null' (none_as_null off)
    if isinstance(column_type, Boolean):
        return _bool
    return None


def _loader(column_type: Any) -> Convert | None:
    if isinstance(column_type, UtcDateTime):
        return text_time
    if isinstance(column_type, JSON):
        return _loaded_json
    if isinstance(column_type, Boolean):
        return _loaded_bool
    return None


class DriverTable:
    """One table's conversions, and its statements for a number of rows. The names in them
    are the schema's own (``collector.store.schema``), never a caller's; every value is a
    parameter."""

    def __init__(self, table: Table) -> None:
        self.name = table.name
        self._bind = {c.name: _binder(c.type) for c in table.columns}
        self._load = {c.name: _loader(c.type) for c in table.columns}

    def values(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        """The rows' values, converted, one row after another."""
        binds = [(name, self._bind[name]) for name in columns]
        out: list[Any] = []
        for row in rows:
            for name, convert in binds:
                value = row[name]
                out.append(value if convert is None else convert(value))
        return out

    def insert(self, columns: Sequence[str], count: int, suffix: str = "") -> str:
        row = "(" + ", ".join("?" * len(columns)) + ")"
        names = ", ".join(f'"{c}"' for c in columns)
        rows = ", ".join([row] * count)
        return f'INSERT INTO "{self.name}" ({names}) VALUES {rows}{suffix}'  # noqa: S608

    def update(self, columns: Sequence[str], where: Sequence[str], count: int) -> str:
        """One UPDATE of many rows: the new values are a table of their own (``WITH``), joined
        on the ``where`` columns."""
        row = "(" + ", ".join("?" * (len(where) + len(columns))) + ")"
        names = ", ".join(f'"{c}"' for c in (*where, *columns))
        sets = ", ".join(f'"{c}" = v."{c}"' for c in columns)
        test = " AND ".join(f'"{self.name}"."{c}" = v."{c}"' for c in where)
        values = f"WITH v({names}) AS (VALUES {', '.join([row] * count)})"
        return f'{values} UPDATE "{self.name}" SET {sets} FROM v WHERE {test}'  # noqa: S608

    def records(self, cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
        """The cursor's rows as mappings of column name to value, converted."""
        names = [d[0] for d in cursor.description]
        loads = [self._load[n] for n in names]
        pairs = list(zip(names, loads, strict=True))
        return [
            {
                n: v if load is None or v is None else load(v)
                for (n, load), v in zip(pairs, row, strict=True)
            }
            for row in cursor
        ]


class Driver:
    """The DB-API connection under a SQLAlchemy connection, inside its transaction.

    Each statement writes many rows at once (a multi-row ``INSERT``, an ``UPDATE ... FROM`` a
    table of values), not a step per row as ``executemany`` does: the driver lets go of the
    interpreter lock at every step, and the event loop writing the group, holding SQLite's
    write lock, would then wait for whichever thread took it (a read served in the thread
    pool) at every row."""

    def __init__(self, conn: Connection) -> None:
        raw = conn.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        self._raw = raw

    def insert(
        self, table: DriverTable, rows: Sequence[Mapping[str, Any]], *, suffix: str = ""
    ) -> None:
        """Rows that all name the same columns (the first row's)."""
        if rows:
            columns = tuple(rows[0])
            for chunk in _chunks(rows, len(columns)):
                sql = table.insert(columns, len(chunk), suffix)
                self._execute(sql, table.values(columns, chunk))

    def update(
        self, table: DriverTable, rows: Sequence[Mapping[str, Any]], where: tuple[str, ...]
    ) -> None:
        """Rows that all name the same columns: those in ``where`` pick the row, the others
        are set."""
        if rows:
            columns = tuple(c for c in rows[0] if c not in where)
            for chunk in _chunks(rows, len(columns) + len(where)):
                sql = table.update(columns, where, len(chunk))
                self._execute(sql, table.values((*where, *columns), chunk))

    def select_in(
        self, table: DriverTable, column: str, keys: Sequence[str]
    ) -> list[dict[str, Any]]:
        """The rows whose ``column`` is one of ``keys``."""
        out: list[dict[str, Any]] = []
        for chunk in _chunks(keys, 1):
            marks = ", ".join("?" * len(chunk))
            sql = f'SELECT * FROM "{table.name}" WHERE "{column}" IN ({marks})'  # noqa: S608
            out.extend(table.records(self._execute(sql, chunk)))
        return out

    def _execute(self, sql: str, values: Sequence[Any]) -> sqlite3.Cursor:
        try:
            return self._raw.execute(sql, values)
        except sqlite3.Error as exc:
            raise StoreError(f"database error: {exc}") from exc


def _chunks(rows: Sequence[T], width: int) -> Iterator[Sequence[T]]:
    """Slices of ``rows`` whose values (``width`` each) fit in one statement."""
    size = max(1, MAX_PARAMETERS // width)
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
