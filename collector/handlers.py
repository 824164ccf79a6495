"""The job handlers the collector runs, by kind, in one registry (built-ins use it too)."""

from __future__ import annotations

from collector import silence
from collector.config import Config
from collector.jobs import Registry
from collector.response import runtime as response
from collector.store import Store


def default_registry(store: Store, config: Config) -> Registry:
    """The built-in handlers: the periodic silence sweep, and the response's alert and
    replacement handlers (kinds ``alert``, ``deliver``, ``replace``, ``replace_verify``)."""
    registry = Registry()
    registry.register(silence.SWEEP, silence.handler(store, config.verdicts))
    response.register(registry, store, config)
    return registry
