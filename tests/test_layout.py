"""The dependency direction of DESIGN.md: collector imports only agent.wire; agent never
imports collector; agent.wire uses the standard library only."""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_agent_never_imports_collector() -> None:
    for path in (REPO / "agent").rglob("*.py"):
        bad = {n for n in _imports(path) if n == "collector" or n.startswith("collector.")}
        assert not bad, f"{path} imports {bad}"


def test_collector_imports_only_wire_from_agent() -> None:
    for path in (REPO / "collector").rglob("*.py"):
        used = {n for n in _imports(path) if n == "agent" or n.startswith("agent.")}
        assert used <= {"agent", "agent.wire"} | {n for n in used if n.startswith("agent.wire.")}, (
            f"{path} imports {used}"
        )


def test_wire_is_stdlib_only() -> None:
    roots = {n.split(".")[0] for n in _imports(REPO / "agent" / "wire.py")}
    assert roots <= set(sys.stdlib_module_names) | {"__future__"}


def test_agent_package_init_is_empty() -> None:
    assert (REPO / "agent" / "__init__.py").read_text().strip() == ""


def test_every_agent_command_is_documented() -> None:
    from agent.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    readme = (REPO / "README.md").read_text()
    missing = [name for name in commands if f"driftwarden-agent {name}" not in readme]
    assert not missing, f"README.md does not document: {missing}"


def _options(parser: argparse.ArgumentParser, command: str = "") -> Iterator[tuple[str, str]]:
    """(command, --option) for every option of ``parser`` and its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{command} {name}".strip())
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                yield command, option


def test_every_option_is_documented() -> None:
    from agent.cli import build_parser as agent_parser
    from collector.cli import build_parser as collector_parser

    docs = "".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")])
    tools = (("driftwarden-agent", agent_parser()), ("driftwarden", collector_parser()))
    missing = [
        f"{tool} {command} {option}"
        for tool, parser in tools
        for command, option in _options(parser)
        if not re.search(re.escape(option) + r"(?![\w-])", docs)
    ]
    assert not missing, f"options no document names: {missing}"
