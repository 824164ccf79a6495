"""Database rows into the collector's records: columns map to fields by name, and enum, bytes
and JSON fields are converted by their declared type."""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from sqlalchemy import Row

from collector.model import (
    ApiToken,
    EnrollToken,
    Finding,
    FleetEvent,
    Host,
    Image,
    Job,
    Report,
    Role,
    Transition,
)

T = TypeVar("T")
_CACHE: dict[type[Any], tuple[tuple[str, str, Any], ...]] = {}

_RENAMED: dict[type[Any], dict[str, str]] = {
    Job: {"job_id": "id"},
    ApiToken: {"token_id": "id"},
    EnrollToken: {"token_id": "id"},
    FleetEvent: {"event_id": "id"},
}


def _converters(cls: type[Any], id_field: str | None) -> tuple[tuple[str, str, Any], ...]:
    if cls in _CACHE:
        return _CACHE[cls]
    hints = typing.get_type_hints(cls)
    renamed = {id_field: "id"} if id_field else _RENAMED.get(cls, {})
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        convert: Any = None
        if base is Role:
            convert = Role.parse
        elif isinstance(base, type) and issubclass(base, enum.Enum):
            convert = base
        elif base is bytes:
            convert = bytes
        elif base is bool:
            convert = bool
        elif typing.get_origin(base) is Mapping or base is Mapping:
            convert = dict
        out.append((f.name, renamed.get(f.name, f.name), convert))
    _CACHE[cls] = tuple(out)
    return _CACHE[cls]


def record(cls: type[T], row: Row[Any] | Mapping[str, Any], *, id_field: str | None = None) -> T:
    """A record from a row, or from a mapping of its columns by name; ``id_field`` names the
    record's field that holds the row's ``id`` column."""
    values = row._mapping if isinstance(row, Row) else row
    kwargs: dict[str, Any] = {}
    for name, column, convert in _converters(cls, id_field):
        value = values[column]
        if convert is dict:
            value = dict(value or {})
        elif convert is not None and value is not None:
            value = convert(value)
        kwargs[name] = value
    return cls(**kwargs)


def host(row: Row[Any]) -> Host:
    return record(Host, row)


def transition(row: Row[Any]) -> Transition:
    return record(Transition, row)


def finding(row: Row[Any]) -> Finding:
    return record(Finding, row)


def report(row: Row[Any]) -> Report:
    return record(Report, row)


def job(row: Row[Any]) -> Job:
    return record(Job, row)


def api_token(row: Row[Any]) -> ApiToken:
    return record(ApiToken, row)


def enroll_token(row: Row[Any]) -> EnrollToken:
    return record(EnrollToken, row)


def image(row: Row[Any]) -> Image:
    return record(Image, row)


def fleet_event(row: Row[Any]) -> FleetEvent:
    return record(FleetEvent, row)
