"""Replacement actions: how a drifted host is handed over to be replaced.

Built-in types: ``aws-autoscaling``, ``webhook``, ``command``; more register through
``ACTIONS.register(type_name, factory)``. An ``[[action]]`` table names its ``type`` and
``name`` and the keys of its type (see each module and docs/operations.md); pools refer to an
action by name::

    [[action]]
    type = "aws-autoscaling"
    name = "web-asg"
    region = "eu-west-1"
    mode = "set-unhealthy"       # or "terminate", "detach"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from collector.actions import aws, command, webhook
from collector.actions.errors import ActionConfigError, ActionError, MalformedRequestError
from collector.actions.request import (
    ActionOutcome,
    CapacityReader,
    Check,
    ReplacementAction,
    ReplacementRequest,
    Verifier,
)
from collector.sinks.registry import Registry

__all__ = [
    "ACTIONS",
    "ActionConfigError",
    "ActionError",
    "ActionOutcome",
    "CapacityReader",
    "Check",
    "MalformedRequestError",
    "ReplacementAction",
    "ReplacementRequest",
    "Verifier",
    "build_action",
    "build_actions",
]

log = structlog.get_logger(__name__)

ACTIONS: Registry[ReplacementAction] = Registry("action", error=ActionConfigError)
ACTIONS.register("aws-autoscaling", aws.from_config)
ACTIONS.register("webhook", webhook.from_config)
ACTIONS.register("command", command.from_config)


def build_action(raw: Any, *, source: str = "", index: int = 0) -> ReplacementAction:
    """The action a parsed ``[[action]]`` table describes; ``ActionConfigError`` if not."""
    table = ACTIONS.table(raw, source=source, index=index)
    type_name, action = ACTIONS.build(table)
    try:
        table.finish()
    except ActionConfigError:
        action.close()
        raise
    log.info("action_configured", action=action.name, type=type_name)
    return action


def build_actions(raws: Sequence[Any], *, source: str = "") -> dict[str, ReplacementAction]:
    """Every ``[[action]]`` of a configuration, by name; names must be unique."""
    if not isinstance(raws, list | tuple):
        raise ActionConfigError(f"{source}: 'action' must be an array of tables ([[action]])")
    actions: list[ReplacementAction] = []
    try:
        for index, raw in enumerate(raws):
            actions.append(build_action(raw, source=source, index=index))
        ACTIONS.check_unique([a.name for a in actions], source=source)
    except ActionConfigError:
        for action in actions:
            action.close()
        raise
    return {action.name: action for action in actions}
