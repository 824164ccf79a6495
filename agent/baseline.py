"""Placeholder: the baseline commands are being built."""

from __future__ import annotations

import argparse

from agent.errors import AgentError


def _todo(args: argparse.Namespace) -> int:
    raise AgentError(f"'{args.command}' is not available yet")


bake_command = _todo
check_command = _todo
