"""The README's commands are real: the quick start's two commands exist (and
``test_quickstart.py`` runs the first), and every command in the README's tables is a command
of its program with the options the README gives it."""

from __future__ import annotations

import argparse
import os
import re

from agent.cli import build_parser as agent_parser
from collector.cli import build_parser as collector_parser
from tests.e2e.world import REPO

README = (REPO / "README.md").read_text()
PROGRAMS = {"driftwarden-agent": agent_parser, "driftwarden": collector_parser}


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def _subcommand(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The parser of the (nested) subcommand ``words``; fails naming the unknown word."""
    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            break
        assert word in actions[0].choices, f"{parser.prog}: no command {word!r}"
        parser = actions[0].choices[word]
    return parser


def test_the_quick_start_is_two_commands_that_exist() -> None:
    block = re.search(r"```sh\n(.*?)```", _section("Quick start"), re.DOTALL)
    assert block is not None
    commands = [line.split()[0] for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["scripts/quickstart.sh", "scripts/test.sh"]
    for command in commands:
        assert os.access(REPO / command, os.X_OK), command
    assert "scripts/quickstart.sh stop" in _section("Quick start")


def test_every_command_in_the_tables_is_a_command_with_those_options() -> None:
    rows = re.findall(r"^\| `((?:driftwarden-agent|driftwarden) [^`]+)`", README, re.MULTILINE)
    commands = [part.strip() for row in rows for part in row.split("` / `")]
    assert len(commands) >= 15
    for command in commands:
        program, *words = command.split()
        subcommand = [w for w in words if re.fullmatch(r"[a-z][a-z-]*", w)]
        parser = _subcommand(PROGRAMS[program](), subcommand)
        known = {s for a in parser._actions for s in a.option_strings}
        for option in re.findall(r"--[a-z][a-z-]*", command):
            assert option in known, f"{command}: {parser.prog} has no {option}"
