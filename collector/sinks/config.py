"""Reading one ``[[sink]]`` or ``[[action]]`` table: typed values, secrets, unknown keys.

A factory asks a ``ConfigTable`` for the keys it knows; when it is done, ``finish()`` refuses
any key nobody asked for. Every error names where the table came from, the key and the value:
``collector.toml: [[sink]] 'pager' timeout_s = 'ten' is not a number``.

A secret (a routing key, an HMAC key, a Slack webhook URL) is given in exactly one of three
ways: inline (``secret = "…"``), from a file (``secret_file = "/run/credentials/…"``, the way
systemd's ``LoadCredential=`` hands it over) or from the environment (``secret_env = "NAME"``).
It is held in a ``Secret``, whose repr and str never show the value, and error messages about
it never quote it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REQUIRED: Final = object()


@dataclass(frozen=True, repr=False)
class Secret:
    """A value that is never shown: ``repr`` and ``str`` print asterisks."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


class ConfigTable:
    """A parsed TOML table read key by key; ``error`` is the exception class to raise."""

    def __init__(self, table: Mapping[str, Any], *, where: str, error: type[Exception]) -> None:
        self._table = dict(table)
        self._used: set[str] = set()
        self.where = where
        self._error = error

    def fail(self, message: str) -> Exception:
        return self._error(f"{self.where} {message}")

    def bad(self, key: str, value: Any, expected: str) -> Exception:
        return self.fail(f"{key} = {value!r} is not {expected}")

    def _get(self, key: str, default: Any) -> Any:
        self._used.add(key)
        value = self._table.get(key, default)
        if value is _REQUIRED:
            raise self.fail(f"missing {key!r}")
        return value

    def has(self, key: str) -> bool:
        return key in self._table

    def string(self, key: str, default: Any = _REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or not value:
            raise self.bad(key, value, "a non-empty string")
        return value

    def optional_string(self, key: str) -> str | None:
        return None if self._get(key, None) is None else self.string(key)

    def name(self, key: str = "name") -> str:
        value = self.string(key)
        if not NAME_RE.match(value):
            raise self.bad(key, value, "a name of letters, digits, '.', '_' and '-' (max 64)")
        return value

    def choice(self, key: str, options: Iterable[str], default: Any = _REQUIRED) -> str:
        choices = tuple(options)
        value = self._get(key, default)
        if value not in choices:
            raise self.bad(key, value, f"one of {list(choices)}")
        return str(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.bad(key, value, "true or false")
        return value

    def number(self, key: str, default: Any = _REQUIRED, *, minimum: float = 0.0) -> float:
        value = self._get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < minimum
        ):
            raise self.bad(key, value, f"a number >= {minimum:g}")
        return float(value)

    def optional_number(self, key: str, *, minimum: float = 0.0) -> float | None:
        return None if self._get(key, None) is None else self.number(key, minimum=minimum)

    def integer(self, key: str, default: Any = _REQUIRED, *, minimum: int = 0) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.bad(key, value, f"a whole number >= {minimum}")
        return value

    def int_list(self, key: str, default: Iterable[int] = ()) -> tuple[int, ...]:
        value = self._get(key, list(default))
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise self.bad(key, value, "a list of whole numbers")
        return tuple(value)

    def str_list(self, key: str, default: Any = _REQUIRED) -> tuple[str, ...]:
        value = self._get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.bad(key, value, "a list of strings")
        return tuple(value)

    def str_table(self, key: str, *, secret_values: bool = False) -> dict[str, str]:
        """A table of string values; with ``secret_values`` the values are never quoted."""
        value = self._get(key, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            shown = sorted(value) if secret_values and isinstance(value, dict) else value
            raise self.bad(key, shown, "a table of strings")
        return dict(value)

    def url(self, key: str, default: Any = _REQUIRED) -> str:
        value = self.string(key, default)
        return _checked_url(value, lambda: self.bad(key, value, "an http(s) URL"))

    def optional_url(self, key: str) -> str | None:
        return None if self._get(key, None) is None else self.url(key)

    def secret(self, key: str, *, url: bool = False) -> Secret:
        """Exactly one of ``key``, ``key_file``, ``key_env``; the value is never quoted."""
        given = [k for k in (key, f"{key}_file", f"{key}_env") if k in self._table]
        self._used.update((key, f"{key}_file", f"{key}_env"))
        if len(given) != 1:
            raise self.fail(
                f"needs exactly one of {key!r}, '{key}_file' or '{key}_env' (got {given or 'none'})"
            )
        source = given[0]
        raw = self._table[source]
        if source == key:
            if not isinstance(raw, str) or not raw:
                raise self.fail(f"{key} is not a non-empty string (value not shown)")
            value = raw
        elif source.endswith("_file"):
            value = self._secret_file(source, raw)
        else:
            value = self._secret_env(source, raw)
        if url:
            _checked_url(value, lambda: self.fail(f"{source}: the secret is not an http(s) URL"))
        return Secret(value)

    def optional_secret(self, key: str, *, url: bool = False) -> Secret | None:
        given = any(k in self._table for k in (key, f"{key}_file", f"{key}_env"))
        if not given:
            self._used.update((key, f"{key}_file", f"{key}_env"))
            return None
        return self.secret(key, url=url)

    def _secret_file(self, key: str, raw: Any) -> str:
        if not isinstance(raw, str) or not raw.startswith("/"):
            raise self.bad(key, raw, "an absolute file path")
        try:
            value = Path(raw).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise self.fail(f"{key} = {raw!r} cannot be read: {reason}") from None
        if not value:
            raise self.fail(f"{key} = {raw!r} is empty")
        return value

    def _secret_env(self, key: str, raw: Any) -> str:
        if not isinstance(raw, str) or not raw:
            raise self.bad(key, raw, "an environment variable name")
        value = os.environ.get(raw, "")
        if not value:
            raise self.fail(f"{key} = {raw!r}: the environment variable is unset or empty")
        return value

    @property
    def keys_read(self) -> frozenset[str]:
        """Every key some reader asked for (documentation tests list them)."""
        return frozenset(self._used)

    def finish(self) -> None:
        """Refuse any key that no reader asked for."""
        unknown = set(self._table) - self._used
        if unknown:
            raise self.fail(f"unknown key(s) {sorted(unknown)}; known: {sorted(self._used)}")


def _checked_url(value: str, error: Callable[[], Exception]) -> str:
    try:
        parts = urlsplit(value)
    except ValueError:
        raise error() from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise error()
    return value
