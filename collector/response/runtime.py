"""Wiring the response into the collector's job registry."""

from __future__ import annotations

from collector.config import Config
from collector.jobs import Registry
from collector.response.alerts import Alerts
from collector.response.replace import Replacer
from collector.store import Store


def register(registry: Registry, store: Store, config: Config) -> None:
    """Register the ``alert``, ``deliver``, ``replace`` and ``replace_verify`` handlers."""
    Alerts(store, config.response).register(registry)
    for kind, handler in Replacer(store, config.response).handlers().items():
        registry.register(kind, handler)
