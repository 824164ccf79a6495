"""The agent's configuration: one TOML file, fully validated before anything starts.

Each section is a frozen dataclass; unknown sections and keys are errors, and every message
names the file, the key and the value (``agent.toml: [collector] read_timeout_s = 'ten' is not
a number``). The enrollment token is a ``Secret``: it never appears in a repr or a log line.
``docs/agent.md`` documents every key. Command-line flags of ``run`` override the file, so the
agent also runs without one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from agent import wire
from agent.errors import ConfigError
from agent.guard import BACKENDS, GuardConfig
from agent.pkgwatch import PackageWatchConfig
from agent.policy import GLOB_CHARS
from agent.rescan import RescanConfig

DEFAULT_CONFIG: Final = Path("/etc/driftwarden/agent.toml")
MAX_BATCH_BODY_BYTES: Final = 4 << 20  # protocol.md: a report body is at most 4 MiB
GUARD_BACKENDS: Final = (*BACKENDS, "none")
MAX_NICE: Final = 19
_GUARD: Final = GuardConfig()
_RESCAN: Final = RescanConfig()
_PACKAGES: Final = PackageWatchConfig()


@dataclass(frozen=True)
class Secret:
    """A value that must never be printed; ``reveal()`` is the one way to read it."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True)
class AgentSection:
    root: Path = Path("/")
    state_dir: Path = Path("/var/lib/driftwarden")
    baseline: Path | None = None
    pipeline_public_key: Path | None = None
    policy: Path | None = None
    pool: str = ""
    heartbeat_interval_s: float = 30.0
    poll_interval_s: float = 0.5


@dataclass(frozen=True)
class CollectorSection:
    url: str = ""
    enroll_token: Secret = Secret("")
    enroll_token_file: Path | None = None
    ca_bundle: Path | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    batch_max_envelopes: int = 100
    batch_max_bytes: int = MAX_BATCH_BODY_BYTES
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    stop_timeout_s: float = 10.0


@dataclass(frozen=True)
class SpoolSection:
    max_bytes: int = 64 << 20
    max_envelopes: int = 100_000


@dataclass(frozen=True)
class PackagesSection:
    watch: bool = True
    settle_s: float = _PACKAGES.settle_s
    retry_s: float = _PACKAGES.retry_s


@dataclass(frozen=True)
class GuardSection:
    backend: str = "auto"
    coalesce_s: float = _GUARD.coalesce_s


@dataclass(frozen=True)
class RescanSection:
    metadata_interval_s: float = _RESCAN.metadata_interval_s
    fallback_interval_s: float = _RESCAN.fallback_interval_s
    full_rehash_period_s: float = _RESCAN.full_rehash_period_s
    io_budget_mb_s: float = _RESCAN.io_budget_mb_s
    nice: int = _RESCAN.nice


@dataclass(frozen=True)
class LoginsSection:
    watch: bool = True
    auth_logs: tuple[Path, ...] = ()
    journal: bool = True
    utmp: bool = True


@dataclass(frozen=True)
class AgentConfig:
    source: str = "<defaults>"
    agent: AgentSection = AgentSection()
    collector: CollectorSection = CollectorSection()
    spool: SpoolSection = SpoolSection()
    packages: PackagesSection = PackagesSection()
    logins: LoginsSection = LoginsSection()
    guard: GuardSection = GuardSection()
    rescan: RescanSection = RescanSection()

    def token(self, environ: Mapping[str, str] | None = None) -> Secret:
        """The enrollment token: ``enroll_token`` (or ``--enroll-token``), else
        ``$DRIFTWARDEN_ENROLL_TOKEN``, else the first line of ``enroll_token_file``."""
        if self.collector.enroll_token:
            return self.collector.enroll_token
        from_env = (os.environ if environ is None else environ).get(ENROLL_TOKEN_ENV, "")
        if from_env.strip():
            return Secret(from_env.strip())
        path = self.collector.enroll_token_file
        if path is None:
            return Secret("")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"[collector] enroll_token_file cannot be read: {exc.strerror}", path=path
            ) from exc
        return Secret(text.strip())


SECTIONS: Final[dict[str, type[Any]]] = {
    "agent": AgentSection,
    "collector": CollectorSection,
    "spool": SpoolSection,
    "packages": PackagesSection,
    "logins": LoginsSection,
    "guard": GuardSection,
    "rescan": RescanSection,
}

# Flags of `driftwarden-agent run` and the key each one overrides.
FLAG_KEYS: Final = {
    "root": ("agent", "root"),
    "baseline": ("agent", "baseline"),
    "state_dir": ("agent", "state_dir"),
    "collector": ("collector", "url"),
    "enroll_token": ("collector", "enroll_token"),
    "enroll_token_file": ("collector", "enroll_token_file"),
}
ENROLL_TOKEN_ENV: Final = "DRIFTWARDEN_ENROLL_TOKEN"  # noqa: S105 (a variable name, not a token)


def config_keys() -> list[str]:
    """Every configuration key as ``section.key`` (the documentation test walks this)."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def load_config(
    path: Path | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    check_files: bool = True,
) -> AgentConfig:
    """Read ``path`` (or only defaults when None), apply flag overrides, validate everything.

    ``check_files=False`` skips checking that the files named exist (to lint a config for
    another machine, such as the packaged example).
    """
    data: dict[str, Any] = {}
    where = "<flags>"
    if path is not None:
        where = path.name
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError("configuration file not found", path=path) from exc
        except OSError as exc:
            raise ConfigError(f"cannot read configuration: {exc.strerror}", path=path) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"not valid TOML: {exc}", path=path) from exc
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown section(s) {sorted(unknown)}; known: {sorted(SECTIONS)}"
        )
    for flag, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = FLAG_KEYS[flag]
        table = data.setdefault(section, {})
        table[key] = str(value) if isinstance(value, Path) else value
    sections = {
        name: _section(cls, data.get(name, {}), where, name) for name, cls in SECTIONS.items()
    }
    config = AgentConfig(source=str(path) if path else where, **sections)
    _check(config, where, check_files=check_files)
    return config


def _section(cls: type[Any], table: Any, where: str, name: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(table) - set(fields)
    if unknown:
        raise ConfigError(
            f"{where}: [{name}] unknown key(s) {sorted(unknown)}; known: {sorted(fields)}"
        )
    values = {
        key: _value(fields[key], raw, f"{where}: [{name}] {key}") for key, raw in table.items()
    }
    return cls(**values)


def _shown(value: Any) -> str:
    """``value`` as an error message quotes it, a URL's password masked (``u:***@host``)."""
    return repr(wire.redact_urls(value))


def _value(spec: dataclasses.Field[Any], raw: Any, ctx: str) -> Any:
    kind = spec.type if isinstance(spec.type, str) else str(spec.type)
    shown = "'***'" if kind == "Secret" else _shown(raw)
    if kind == "Secret":
        if not isinstance(raw, str):
            raise ConfigError(f"{ctx} = {shown} is not a string")
        return Secret(raw)
    if kind in ("Path", "Path | None"):
        if not isinstance(raw, str) or "\x00" in raw:
            raise ConfigError(f"{ctx} = {shown} is not a path")
        if kind.endswith("None") and raw == "":
            return None
        if not raw.startswith("/"):
            raise ConfigError(f"{ctx} = {shown} is not an absolute path")
        return Path(raw)
    if kind == "str":
        if not isinstance(raw, str):
            raise ConfigError(f"{ctx} = {shown} is not a string")
        return raw
    if kind == "tuple[Path, ...]":
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            raise ConfigError(f"{ctx} = {shown} is not a list of paths")
        bad = [v for v in raw if not v.startswith("/") or "\x00" in v]
        if bad:
            raise ConfigError(f"{ctx} has {bad[0]!r}: paths must be absolute")
        return tuple(Path(v) for v in raw)
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ConfigError(f"{ctx} = {shown} is not true or false")
        return raw
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise ConfigError(f"{ctx} = {shown} is not a whole number >= 1")
        return raw
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not raw > 0:
            raise ConfigError(f"{ctx} = {shown} is not a number > 0")
        return float(raw)
    raise AssertionError(f"no parser for {kind}")  # pragma: no cover - a new field type


def _check(config: AgentConfig, where: str, *, check_files: bool) -> None:
    """Checks across keys, and that the files named exist."""
    agent, collector = config.agent, config.collector
    files = (
        ("[agent] baseline", agent.baseline),
        ("[agent] pipeline_public_key", agent.pipeline_public_key),
        ("[agent] policy", agent.policy),
        ("[collector] ca_bundle", collector.ca_bundle),
    )  # not enroll_token_file: read (and checked) only while the host is not enrolled
    for key, path in files if check_files else ():
        if path is not None and not path.is_file():
            raise ConfigError(f"{where}: {key} = '{path}' is not a readable file")
    if check_files and not agent.root.is_dir():
        raise ConfigError(f"{where}: [agent] root = '{agent.root}' is not a directory")
    if config.guard.backend not in GUARD_BACKENDS:
        raise ConfigError(
            f"{where}: [guard] backend = {config.guard.backend!r} is not one of "
            f"{list(GUARD_BACKENDS)}"
        )
    if config.rescan.nice > MAX_NICE:
        raise ConfigError(f"{where}: [rescan] nice = {config.rescan.nice} is above {MAX_NICE}")
    for key, own in (("state_dir", agent.state_dir), ("baseline", agent.baseline)):
        if own is not None and GLOB_CHARS.intersection(str(own)):
            raise ConfigError(
                f"{where}: [agent] {key} = '{own}' has one of * ? [ (the guard excludes the "
                "agent's own files by path)"
            )
    if collector.enroll_token and collector.enroll_token_file is not None:
        raise ConfigError(f"{where}: [collector] set enroll_token or enroll_token_file, not both")
    if collector.url:
        _check_url(collector.url, where)
    if collector.batch_max_envelopes > 500:
        raise ConfigError(
            f"{where}: [collector] batch_max_envelopes = {collector.batch_max_envelopes} "
            "is above the protocol's 500"
        )
    if collector.batch_max_bytes > MAX_BATCH_BODY_BYTES:
        raise ConfigError(
            f"{where}: [collector] batch_max_bytes = {collector.batch_max_bytes} "
            f"is above the protocol's {MAX_BATCH_BODY_BYTES}"
        )
    if collector.backoff_max_s < collector.backoff_initial_s:
        raise ConfigError(
            f"{where}: [collector] backoff_max_s = {collector.backoff_max_s} "
            f"is below backoff_initial_s = {collector.backoff_initial_s}"
        )


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigError(f"{where}: [collector] url = {_shown(url)} is not an http(s) URL")
    if parts.scheme == "http" and not _loopback(host):
        raise ConfigError(
            f"{where}: [collector] url = {_shown(url)}: plain http is allowed only to a loopback "
            "address; use https"
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
