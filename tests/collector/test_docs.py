"""The documentation keeps up with the code: every config key, CLI command, route and
state-machine edge is documented; the systemd unit verifies."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collector import config
from collector.cli import build_parser
from collector.verdicts import edges
from tests.collector.apptest import ROUTES

DOCS = Path(__file__).resolve().parents[2] / "docs"
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "driftwarden-collector.service"


def test_every_config_key_is_documented() -> None:
    text = (DOCS / "collector.md").read_text()
    for section, cls in config.SECTIONS.items():
        for field in dataclasses.fields(cls):
            assert f"| `[{section}]` | `{field.name}` |" in text, f"[{section}] {field.name}"


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(f"{prefix}{name}")
                out += _commands(sub, f"{prefix}{name} ")
    return out


def test_every_cli_command_is_documented() -> None:
    text = (DOCS / "collector.md").read_text()
    commands = _commands(build_parser())
    assert "images register" in commands and "token create" in commands
    for command in commands:
        assert f"`driftwarden {command}" in text, command


def test_every_route_is_documented() -> None:
    text = (DOCS / "api.md").read_text()
    for method, path in ROUTES:
        assert f"| {method} | `{path}` |" in text, (method, path)


def test_the_drawing_has_exactly_the_edges_of_the_code() -> None:
    text = (DOCS / "host-states.md").read_text()
    drawn = set()
    for src, dst, signals in re.findall(r"^\s+(\w+) --> (\w+) : (.+)$", text, re.MULTILINE):
        drawn |= {(src, s.strip(), dst) for s in signals.split(",")}
    code = {(src.value, signal.value, dst.value) for src, signal, dst in edges()}
    assert drawn == code


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for line in (
        "DynamicUser=yes",
        "StateDirectory=driftwarden-collector",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestartPreventExitStatus=78",
    ):
        assert line in text.splitlines(), line
    # verify checks that ExecStart exists; the installed path is /opt/driftwarden/bin
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/driftwarden/bin/driftwarden", sys.executable))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def _syscalls(name: str) -> set[str]:
    """A system call, or every call of a ``@group`` (its nested groups too)."""
    if not name.startswith("@"):
        return {name}
    listed = subprocess.run(
        ["systemd-analyze", "syscall-filter", name],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.splitlines()[1:]  # the first line is the group's own name
    calls: set[str] = set()
    for line in listed:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            calls |= _syscalls(entry)
    return calls


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_allows_what_the_collector_calls() -> None:
    """The unit's system call filter, applied line by line as systemd does (an allow list,
    then what ``~`` takes away, then what is given back), lets through the calls
    ``collector.serve`` makes about resources: a denied one kills the process (SIGSYS), and
    the collector with it."""
    allowed: set[str] = set()
    for line in UNIT.read_text().splitlines():
        if line.startswith("SystemCallFilter="):
            value = line.removeprefix("SystemCallFilter=")
            names = {c for n in value.removeprefix("~").split() for c in _syscalls(n)}
            allowed = allowed - names if value.startswith("~") else allowed | names
    # os.nice (the job process), resource.setrlimit (the open-files limit)
    assert {"setpriority", "getpriority", "prlimit64"} <= allowed
    assert not {"mount", "setrlimit", "sched_setscheduler", "reboot"} & allowed


def test_collector_and_agent_units_never_share_a_state_directory() -> None:
    def state_directories(unit: Path) -> set[str]:
        lines = unit.read_text().splitlines()
        return {
            v for line in lines if line.startswith("StateDirectory=") for v in line[15:].split()
        }

    agent = state_directories(UNIT.with_name("driftwarden-agent.service"))
    collector = state_directories(UNIT)
    assert agent and collector and not agent & collector, (agent, collector)
