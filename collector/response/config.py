"""The response's configuration: ``[[sink]]``, ``[[action]]``, ``[[pool]]``, ``[response]``
and ``[breakglass]`` in the collector's TOML file, validated before anything starts.

Every problem is a ``ConfigError`` (exit 78) naming the file, the table, the key and the
value. A pool's replacement budget is absolute (``budget``), a percentage of its desired
capacity (``budget_percent``), or both (the smaller wins); it is at least one and never
silently rounded to zero: a budget that computes to zero is refused at start, naming the key::

    collector.toml: [[pool]] 'web' budget_percent = 10 of desired_capacity = 5 computes to 0
    replacements in flight; raise it to at least 20, or set budget

``desired_capacity`` is a number, or ``desired_capacity_from`` says where to read it at run
time: ``hosts`` (the pool's live hosts the collector knows) or ``action`` (the action asks the
orchestrator: an Auto Scaling group's DesiredCapacity).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from collector.errors import ConfigError
from collector.sinks.config import NAME_RE, ConfigTable

if TYPE_CHECKING:
    from collector.actions import ReplacementAction
    from collector.sinks import ConfiguredSink

KEYS: Final = ("sink", "action", "pool", "response", "breakglass")
CAPACITY_SOURCES: Final = ("hosts", "action")
DEFAULT_BUDGET: Final = 1
_EPSILON: Final = 1e-9


@dataclass(frozen=True)
class PoolConfig:
    """One pool's rails. A pool without a ``[[pool]]`` table gets these defaults and no
    action: it is alerted on, never replaced."""

    name: str
    action: str | None = None
    desired_capacity: int | None = None
    desired_capacity_from: str | None = None
    budget: int | None = None
    budget_percent: float | None = None
    dry_run: bool = False
    storm_hosts: int = 5
    storm_window_s: float = 600.0
    storm_cooldown_s: float = 1800.0
    quarantine_hosts: int = 3
    quarantine_window_s: float = 3600.0

    @property
    def needs_capacity(self) -> bool:
        return self.budget_percent is not None

    def budget_limit(self, capacity: int | None) -> int:
        """How many replacements may be in flight at once, given the desired capacity.

        Zero only when a percentage of a capacity read at run time comes to nothing: the
        rails then refuse to replace, and say so.
        """
        limits: list[int] = []
        if self.budget is not None:
            limits.append(self.budget)
        if self.budget_percent is not None:
            limits.append(percent_of(self.budget_percent, capacity or 0))
        return min(limits) if limits else DEFAULT_BUDGET


def percent_of(percent: float, capacity: int) -> int:
    """``percent`` of ``capacity``, rounded down (a budget never exceeds its percentage)."""
    return math.floor(capacity * percent / 100.0 + _EPSILON)


@dataclass(frozen=True)
class ResponseSettings:
    """``[response]``: how replacements are re-checked and verified."""

    recheck_interval_s: float = 30.0
    verify_after_s: float = 300.0
    gone_after_s: float = 120.0
    max_requests: int = 3
    runbook_url: str | None = None


@dataclass(frozen=True)
class BreakglassSettings:
    """``[breakglass]``: announced SSH sessions."""

    grace_s: float = 900.0
    login_window_s: float = 600.0
    max_session_s: float = 14400.0


@dataclass(frozen=True)
class ResponseConfig:
    sinks: tuple[ConfiguredSink, ...] = ()
    actions: Mapping[str, ReplacementAction] = field(default_factory=dict)
    pools: Mapping[str, PoolConfig] = field(default_factory=dict)
    settings: ResponseSettings = field(default_factory=ResponseSettings)
    breakglass: BreakglassSettings = field(default_factory=BreakglassSettings)

    def pool(self, name: str | None) -> PoolConfig:
        """The pool's configuration, or the defaults (no action) for one without a table."""
        if name is not None and name in self.pools:
            return self.pools[name]
        return PoolConfig(name=name or "")

    def close(self) -> None:
        for action in self.actions.values():
            action.close()


def load(data: Mapping[str, Any], *, source: str) -> ResponseConfig:
    """Build the sinks and actions and read the pools; ``ConfigError`` on any problem."""
    from collector.actions import ActionError, build_actions
    from collector.sinks import SinkError, build_sinks

    try:
        sinks = build_sinks(data.get("sink", []), source=source)
        actions = build_actions(data.get("action", []), source=source)
    except (SinkError, ActionError) as exc:
        raise ConfigError(str(exc)) from None
    try:
        settings = _settings(data.get("response", {}), source)
        breakglass = _breakglass(data.get("breakglass", {}), source)
        pools = _pools(data.get("pool", []), actions, source)
    except ConfigError:
        for action in actions.values():
            action.close()
        raise
    return ResponseConfig(
        sinks=sinks,
        actions=MappingProxyType(dict(actions)),
        pools=MappingProxyType(pools),
        settings=settings,
        breakglass=breakglass,
    )


def _table(raw: Any, where: str) -> ConfigTable:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table, not {raw!r}")
    return ConfigTable(raw, where=where, error=ConfigError)


def _settings(raw: Any, source: str) -> ResponseSettings:
    table = _table(raw, f"{source}: [response]")
    settings = ResponseSettings(
        recheck_interval_s=table.number("recheck_interval_s", 30.0, minimum=0.01),
        verify_after_s=table.number("verify_after_s", 300.0, minimum=0.01),
        gone_after_s=table.number("gone_after_s", 120.0, minimum=0.01),
        max_requests=table.integer("max_requests", 3, minimum=1),
        runbook_url=table.optional_url("runbook_url"),
    )
    table.finish()
    return settings


def _breakglass(raw: Any, source: str) -> BreakglassSettings:
    table = _table(raw, f"{source}: [breakglass]")
    settings = BreakglassSettings(
        grace_s=table.number("grace_s", 900.0),
        login_window_s=table.number("login_window_s", 600.0, minimum=1.0),
        max_session_s=table.number("max_session_s", 14400.0, minimum=1.0),
    )
    table.finish()
    return settings


def _pools(
    raws: Any, actions: Mapping[str, ReplacementAction], source: str
) -> dict[str, PoolConfig]:
    if not isinstance(raws, list):
        raise ConfigError(f"{source}: 'pool' must be an array of tables ([[pool]])")
    pools: dict[str, PoolConfig] = {}
    for index, raw in enumerate(raws):
        table = _table(raw, f"{source}: [[pool]] #{index + 1}")
        name = table.string("name")
        if not NAME_RE.match(name):
            raise table.bad("name", name, "a name of letters, digits, '.', '_' and '-' (max 64)")
        table.where = f"{source}: [[pool]] {name!r}"
        if name in pools:
            raise ConfigError(f"{source}: two [[pool]] tables are named {name!r}")
        pools[name] = _pool(table, name, actions)
        table.finish()
    return pools


def _pool(table: ConfigTable, name: str, actions: Mapping[str, ReplacementAction]) -> PoolConfig:
    action = table.optional_string("action")
    if action is not None and action not in actions:
        raise table.bad("action", action, f"an [[action]] name; known: {sorted(actions)}")
    capacity = (
        table.integer("desired_capacity", minimum=1) if table.has("desired_capacity") else None
    )
    capacity_from = (
        table.choice("desired_capacity_from", CAPACITY_SOURCES)
        if table.has("desired_capacity_from")
        else None
    )
    pool = PoolConfig(
        name=name,
        action=action,
        desired_capacity=capacity,
        desired_capacity_from=capacity_from,
        budget=table.integer("budget", minimum=1) if table.has("budget") else None,
        budget_percent=table.optional_number("budget_percent", minimum=0.001),
        dry_run=table.boolean("dry_run", False),
        storm_hosts=table.integer("storm_hosts", 5, minimum=2),
        storm_window_s=table.number("storm_window_s", 600.0, minimum=1.0),
        storm_cooldown_s=table.number("storm_cooldown_s", 1800.0),
        quarantine_hosts=table.integer("quarantine_hosts", 3, minimum=1),
        quarantine_window_s=table.number("quarantine_window_s", 3600.0, minimum=1.0),
    )
    _check_budget(table, pool, actions)
    return pool


def _check_budget(
    table: ConfigTable, pool: PoolConfig, actions: Mapping[str, ReplacementAction]
) -> None:
    from collector.actions import CapacityReader

    if pool.budget_percent is not None and pool.budget_percent > 100:
        raise table.bad("budget_percent", pool.budget_percent, "a percentage up to 100")
    if pool.desired_capacity is not None and pool.desired_capacity_from is not None:
        raise table.fail("sets both desired_capacity and desired_capacity_from; choose one")
    if pool.desired_capacity_from == "action":
        reader: object = actions.get(pool.action or "")
        if not isinstance(reader, CapacityReader) or not reader.reads_capacity:
            raise table.bad(
                "desired_capacity_from",
                "action",
                "usable: the pool's action cannot read a desired capacity "
                "(an aws-autoscaling action with group set can)",
            )
    if pool.budget_percent is None:
        return
    if pool.desired_capacity is None and pool.desired_capacity_from is None:
        raise table.fail(
            f"budget_percent = {pool.budget_percent:g} needs desired_capacity or "
            f"desired_capacity_from ({' or '.join(CAPACITY_SOURCES)})"
        )
    if pool.desired_capacity is not None:
        computed = percent_of(pool.budget_percent, pool.desired_capacity)
        if computed < 1:
            least = math.ceil(100.0 / pool.desired_capacity)
            raise table.fail(
                f"budget_percent = {pool.budget_percent:g} of desired_capacity = "
                f"{pool.desired_capacity} computes to 0 replacements in flight; raise it to "
                f"at least {least}, or set budget"
            )
