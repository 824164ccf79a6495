"""Plain-text tables for the CLI's read commands (``--json`` prints the API's answer).

Much of what is shown comes from hosts (hostname, pool, image ids, versions): every cell and
every line printed goes through ``printable``, so a host cannot send terminal escape sequences
(cursor moves, OSC 52 clipboard writes) to an SRE's terminal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def render(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Left-aligned columns under upper-case headers; ``None`` shows as ``-``."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    header = [c.upper() for c in columns]
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=False)]
    lines = [header, *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def pairs(items: Mapping[str, Any]) -> str:
    """``key: value`` lines, keys aligned."""
    width = max((len(k) for k in items), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in items.items())


def printable(text: str) -> str:
    """``text`` on one printable line: control and other non-printable characters (ESC, CR,
    newline, …) escaped as in Python literals, like ``wire.display_path``."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def lines(text: str) -> str:
    """Text of several lines, each made ``printable``."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return printable(str(value))
