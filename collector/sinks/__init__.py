"""Alert sinks: where on-call hears about drift.

Built-in types: ``alertmanager``, ``pagerduty``, ``slack``, ``webhook``; more register through
``SINKS.register(type_name, factory)``. A ``[[sink]]`` table names its ``type`` and ``name``,
the common keys below, and the keys of its type (see each module and docs/operations.md)::

    [[sink]]
    type = "pagerduty"
    name = "oncall"
    routing_key_file = "/run/credentials/driftwarden-collector.service/pagerduty"
    min_severity = "warning"        # info | warning | critical; default info
    rate_limit_per_minute = 30      # optional; per collector process
    rate_limit_burst = 10           # default 1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from collector.sinks import alertmanager, pagerduty, slack, webhook
from collector.sinks.alert import (
    SEVERITIES,
    SEVERITY_RANK,
    Alert,
    AlertLink,
    AlertSink,
    Severity,
    dedup_key,
)
from collector.sinks.delivery import Backoff, RateLimiter, deliver_with_retries
from collector.sinks.errors import (
    DeliveryError,
    DeliveryInterrupted,
    MalformedAlertError,
    SignatureError,
    SinkConfigError,
    SinkError,
)
from collector.sinks.registry import Registry

__all__ = [
    "SINKS",
    "Alert",
    "AlertLink",
    "AlertSink",
    "Backoff",
    "ConfiguredSink",
    "DeliveryError",
    "DeliveryInterrupted",
    "MalformedAlertError",
    "RateLimiter",
    "SignatureError",
    "SinkConfigError",
    "SinkError",
    "build_sink",
    "build_sinks",
    "dedup_key",
    "deliver_with_retries",
]

log = structlog.get_logger(__name__)

SINKS: Registry[AlertSink] = Registry("sink", error=SinkConfigError)
SINKS.register("alertmanager", alertmanager.from_config)
SINKS.register("pagerduty", pagerduty.from_config)
SINKS.register("slack", slack.from_config)
SINKS.register("webhook", webhook.from_config)


@dataclass(frozen=True)
class ConfiguredSink:
    """A sink with the settings every sink shares: its severity filter and rate limit."""

    name: str
    type: str
    sink: AlertSink
    min_severity: Severity = "info"
    limiter: RateLimiter | None = field(default=None, compare=False)

    def wants(self, alert: Alert) -> bool:
        """Whether this sink takes ``alert`` (a resolution follows its firing alert)."""
        return SEVERITY_RANK[alert.severity] >= SEVERITY_RANK[self.min_severity]


def build_sink(raw: Any, *, source: str = "", index: int = 0) -> ConfiguredSink:
    """The sink a parsed ``[[sink]]`` table describes; ``SinkConfigError`` if it cannot be."""
    table = SINKS.table(raw, source=source, index=index)
    min_severity = cast(Severity, table.choice("min_severity", SEVERITIES, "info"))
    per_minute = table.optional_number("rate_limit_per_minute", minimum=0.001)
    burst = table.integer("rate_limit_burst", 1, minimum=1)
    type_name, sink = SINKS.build(table)
    table.finish()
    limiter = RateLimiter(per_minute, burst=burst) if per_minute is not None else None
    log.info("sink_configured", sink=sink.name, type=type_name, min_severity=min_severity)
    return ConfiguredSink(sink.name, type_name, sink, min_severity, limiter)


def build_sinks(raws: Sequence[Any], *, source: str = "") -> tuple[ConfiguredSink, ...]:
    """Every ``[[sink]]`` of a configuration; names must be unique."""
    if not isinstance(raws, list | tuple):
        raise SinkConfigError(f"{source}: 'sink' must be an array of tables ([[sink]])")
    sinks = tuple(build_sink(raw, source=source, index=i) for i, raw in enumerate(raws))
    SINKS.check_unique([s.name for s in sinks], source=source)
    return sinks
