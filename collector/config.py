"""The collector's configuration: a frozen dataclass per section, loaded from TOML.

Everything is validated before anything starts. An unknown section or key, or a value of the
wrong type or range, is a ``ConfigError`` naming the file, the key and the value::

    collector.toml: [verdicts] silent_after_intervals = 'three' is not an integer

Nothing in the file is ever evaluated. ``docs/collector.md`` documents every key (a test
checks that it does).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from agent import wire
from collector.errors import ConfigError
from collector.keys import load_public_key
from collector.response import config as response_config
from collector.response.config import ResponseConfig

MIB: Final = 1 << 20


def default_db_url() -> str:
    """One SQLite file: in systemd's ``StateDirectory`` when there is one, else here."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    base = Path(state) if state else Path.cwd()
    return f"sqlite:///{base / 'driftwarden.db'}"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:8080"
    max_body_bytes: int = 4 * MIB
    metrics_public: bool = False
    workers: bool = True
    processes: int = 0  # 0: one per CPU core this process may run on
    # an idle connection is kept this long. Shorter than the agents' heartbeat interval: an
    # agent then connects anew for each report, and the kernel hands the connection to a
    # worker process that is free to accept it (docs/collector.md, Processes)
    keep_alive_s: int = 5

    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    def process_count(self) -> int:
        return self.processes or len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = field(default_factory=default_db_url, repr=False)
    pool_size: int = 10


@dataclass(frozen=True)
class VerdictConfig:
    heartbeat_interval_s: float = 30.0
    silent_after_intervals: float = 3.0
    fleet_silent_percent: float = 30.0
    fleet_silent_min_hosts: int = 5
    sweep_interval_s: float = 10.0

    @property
    def silent_after_s(self) -> float:
        return self.heartbeat_interval_s * self.silent_after_intervals


@dataclass(frozen=True)
class ImageConfig:
    pipeline_public_keys: tuple[str, ...] = ()
    require_registered: bool = True


@dataclass(frozen=True)
class JobConfig:
    lease_s: float = 60.0
    poll_interval_s: float = 1.0
    max_attempts: int = 12
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 600.0
    # a batch waits up to this long for the process's ingest to have nothing waiting
    ingest_first_s: float = 2.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    json: bool | None = None


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    verdicts: VerdictConfig = field(default_factory=VerdictConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    jobs: JobConfig = field(default_factory=JobConfig)
    log: LogConfig = field(default_factory=LogConfig)
    response: ResponseConfig = field(default_factory=ResponseConfig)
    source: str = "defaults"

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


SECTIONS: Final[dict[str, type[Any]]] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}
del SECTIONS["source"]
del SECTIONS["response"]  # [[sink]], [[action]], [[pool]], [response], [breakglass]

MAX_PROCESSES: Final = 256
_LIMITS: Final[dict[tuple[str, str], tuple[float, float]]] = {
    ("server", "max_body_bytes"): (1024, 64 * MIB),
    ("server", "processes"): (0, MAX_PROCESSES),
    ("server", "keep_alive_s"): (1, 3600),
    ("database", "pool_size"): (1, 200),
    ("verdicts", "heartbeat_interval_s"): (0.01, 86400),
    ("verdicts", "silent_after_intervals"): (1, 1000),
    ("verdicts", "fleet_silent_percent"): (0, 100),
    ("verdicts", "fleet_silent_min_hosts"): (1, 1_000_000),
    ("verdicts", "sweep_interval_s"): (0.01, 3600),
    ("jobs", "lease_s"): (0.1, 86400),
    ("jobs", "poll_interval_s"): (0.01, 60),
    ("jobs", "max_attempts"): (1, 1000),
    ("jobs", "backoff_base_s"): (0.01, 3600),
    ("jobs", "backoff_cap_s"): (0.01, 86400),
    ("jobs", "ingest_first_s"): (0, 60),
}
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def load(path: Path) -> Config:
    """Read and validate a TOML file; every problem names the file, key and value."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path=path) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from exc
    return from_mapping(data, source=path.name)


def from_mapping(data: dict[str, Any], *, source: str = "config") -> Config:
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name in response_config.KEYS:
            continue
        if name not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section [{name}]; known: {', '.join(sorted(SECTIONS))}"
                f" (and the response's: {', '.join(response_config.KEYS)})"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table, not {_shown(value)}")
        sections[name] = _section(source, name, SECTIONS[name], value)
    config = Config(**sections, source=source)
    _check(config, source)
    response = response_config.load(
        {k: v for k, v in data.items() if k in response_config.KEYS}, source=source
    )
    return config.replace(response=response)


def _shown(value: Any) -> str:
    """``value`` as an error message quotes it, a URL's password masked (``u:***@host``)."""
    return repr(wire.redact_urls(value))


def _section(source: str, name: str, cls: type[Any], values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{source}: [{name}] {key} = {_shown(value)}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key; known: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(where, hints[key], value)
        limits = _LIMITS.get((name, key))
        if limits and not limits[0] <= kwargs[key] <= limits[1]:
            raise ConfigError(f"{where} is out of range {limits[0]:g}..{limits[1]:g}")
    return cls(**kwargs)


def _coerce(where: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return _coerce(where, inner, value)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} is not a list of strings")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} is not true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} is not an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} is not a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} is not a string")
        return value
    raise ConfigError(f"{where}: unsupported setting type {hint!r}")  # pragma: no cover


def _check(config: Config, source: str) -> None:
    try:
        config.server.host_port()
    except ValueError as exc:
        raise ConfigError(f"{source}: [server] listen = {config.server.listen!r}: {exc}") from exc
    if config.log.level not in _LOG_LEVELS:
        raise ConfigError(
            f"{source}: [log] level = {config.log.level!r} is not one of {', '.join(_LOG_LEVELS)}"
        )
    for path in config.images.pipeline_public_keys:
        if not Path(path).is_file():
            raise ConfigError(
                f"{source}: [images] pipeline_public_keys has {path!r}, which is not a file"
            )
        try:
            load_public_key(Path(path))
        except ConfigError as exc:
            raise ConfigError(f"{source}: [images] pipeline_public_keys: {exc}") from exc
