"""Placeholder: the daemon commands are being built."""

from __future__ import annotations

import argparse

from agent.errors import AgentError


def _todo(args: argparse.Namespace) -> int:
    raise AgentError(f"'{args.command}' is not available yet")


run_command = _todo
check_config_command = _todo
