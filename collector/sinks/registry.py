"""One registry per kind of plug-in (alert sinks, replacement actions), used by the built-ins
too. A factory takes the plug-in's name and its ``ConfigTable`` and reads the keys it knows;
the registry reads ``type`` and ``name`` first and refuses unknown keys after. An unknown
``type`` fails listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from collector.sinks.config import ConfigTable

T = TypeVar("T")
Factory = Callable[[str, ConfigTable], T]


class Registry(Generic[T]):
    def __init__(self, kind: str, *, error: type[Exception]) -> None:
        self.kind = kind  # "sink" or "action": the TOML array is [[sink]] / [[action]]
        self.error = error
        self._factories: dict[str, Factory[T]] = {}

    def register(self, type_name: str, factory: Factory[T], *, replace: bool = False) -> None:
        if type_name in self._factories and not replace:
            raise ValueError(f"{self.kind} type {type_name!r} is already registered")
        self._factories[type_name] = factory

    def known(self) -> tuple[str, ...]:
        return tuple(sorted(self._factories))

    def table(self, raw: Any, *, source: str = "", index: int = 0) -> ConfigTable:
        """Wrap the ``index``-th raw ``[[kind]]`` table, named for error messages."""
        prefix = f"{source}: " if source else ""
        where = f"{prefix}[[{self.kind}]] #{index + 1}"
        if not isinstance(raw, Mapping):
            raise self.error(f"{where} is not a table")
        table = ConfigTable(raw, where=where, error=self.error)
        name = table.name("name")
        table.where = f"{prefix}[[{self.kind}]] {name!r}"
        return table

    def build(self, table: ConfigTable) -> tuple[str, T]:
        """The plug-in described by ``table`` (after ``table()``), with its type name."""
        type_name = table.string("type")
        factory = self._factories.get(type_name)
        if factory is None:
            raise table.fail(f"type = {type_name!r} is unknown; known: {list(self.known())}")
        return type_name, factory(table.string("name"), table)

    def check_unique(self, names: list[str], *, source: str = "") -> None:
        seen: set[str] = set()
        for name in names:
            if name in seen:
                prefix = f"{source}: " if source else ""
                raise self.error(f"{prefix}two [[{self.kind}]] tables are named {name!r}")
            seen.add(name)
