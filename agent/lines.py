"""A loaded manifest's entry record lines, in manifest order, found by path without an index.

``check`` asks about every path of the tree once, in manifest order (its walk's order), so
each path's line is the one right after the line found last: ``OrderedLines`` keeps that place
and checks the line there first, and builds nothing. Other lookups bisect the lines (manifest
order is sorted by ``measure.order_key`` of the path); after ``BISECTS`` of them an index by
path is built once, the cheaper choice for many lookups in no order.

Read-only and safe to share between threads: the place of the last find is only a hint,
always checked against the line before it is used. Picklable (a walk's worker processes get a
copy).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import Final

from agent import record
from agent.measure import order_key

BISECTS: Final = 256
_HEAD: Final = '{"p":"'
_PATH_END: Final = '","t":"'  # inside a JSON string every quote is escaped: the path ends here


def line_path(line: str) -> str:
    """The path of a record line (``record.line_path``), without decoding the common case: a
    path whose JSON string has no escape and that is not in ``b64:`` form."""
    stop = line.find(_PATH_END, 6)
    name = line[6:stop]
    if stop < 0 or "\\" in name or name.startswith("b64:"):
        return record.line_path(line)
    return name


def _line_order(line: str) -> bytes:
    return order_key(line_path(line))


class OrderedLines(Mapping[str, str]):
    """A read-only mapping of path to record line over lines in manifest order (see the
    module's docstring). The lines must all be entry records, each path once."""

    def __init__(self, lines: list[str]) -> None:
        self._lines = lines
        self._next = 0  # where the line after the last one found is
        self._bisects = 0
        self._index: dict[str, int] | None = None

    def get(self, path: str, default: str | None = None) -> str | None:  # type: ignore[override]
        lines = self._lines
        at = self._next
        if at < len(lines):
            line = lines[at]
            # The line of ``path`` starts {"p":"PATH"," when PATH needs no escape in JSON;
            # a path with a backslash might match another path's escaped form: looked up.
            if (
                line.startswith(path, 6)
                and line.startswith(_PATH_END, 6 + len(path))
                and "\\" not in path
            ):
                self._next = at + 1
                return line
        found = self.position(path)
        return default if found is None else lines[found]

    def position(self, path: str) -> int | None:
        """The place of ``path``'s line in manifest order, or None."""
        lines = self._lines
        index = self._index
        if index is None and self._bisects >= BISECTS:
            index = self._indexed()
        if index is not None:
            found = index.get(path)
        else:
            self._bisects += 1
            at = bisect_left(lines, order_key(path), key=_line_order)
            found = at if at < len(lines) and line_path(lines[at]) == path else None
        if found is not None:
            self._next = found + 1
        return found

    def _indexed(self) -> dict[str, int]:
        index = self._index
        if index is None:
            index = self._index = {line_path(line): at for at, line in enumerate(self._lines)}
        return index

    def __getitem__(self, path: str) -> str:
        line = self.get(path)
        if line is None:
            raise KeyError(path)
        return line

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.get(path) is not None

    def __len__(self) -> int:
        return len(self._lines)

    def __iter__(self) -> Iterator[str]:
        return iter(self._indexed())

    def items(self) -> Iterator[tuple[str, str]]:  # type: ignore[override]
        """Every (path, line) in manifest order."""
        lines = self._lines
        for path, at in self._indexed().items():
            yield path, lines[at]

    def values(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self._lines)
