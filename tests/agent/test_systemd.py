"""The systemd unit (verified by systemd-analyze) and the notify protocol over a real socket."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import EXIT_CONFIG
from agent.sdnotify import Notifier

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "driftwarden-agent.service"
EXEC = "/opt/driftwarden/bin/driftwarden-agent"
FANOTIFY_DROP_IN = UNIT.with_name("driftwarden-agent-fanotify.conf")


def _service(path: Path = UNIT) -> dict[str, list[str]]:
    """Every ``Section.Key`` with all its values (systemd allows a key more than once)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key}", []).append(value)
    return values


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("fanotify", [False, True], ids=["unit", "unit+fanotify-drop-in"])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, fanotify: bool) -> None:
    binary = tmp_path / "driftwarden-agent"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    text = UNIT.read_text()
    assert EXEC in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(EXEC, str(binary)))
    if fanotify:  # verify reads drop-ins beside the unit
        dropins = tmp_path / f"{UNIT.name}.d"
        dropins.mkdir()
        shutil.copy(FANOTIFY_DROP_IN, dropins / "fanotify.conf")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""  # unknown keys are only warnings: allow none


def test_unit_is_notify_watchdog_restart_and_sandboxed() -> None:
    unit = _service()
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.WatchdogSec"]
    assert one["Service.Restart"] == "always"
    assert str(EXIT_CONFIG) in one["Service.RestartPreventExitStatus"].split()
    assert one["Service.StateDirectory"] == "driftwarden"
    assert one["Service.ExecStart"] == f"{EXEC} run --config /etc/driftwarden/agent.toml"
    assert one["Service.ProtectSystem"] == "strict"
    assert one["Service.ProtectHome"] == "read-only"
    assert one["Service.NoNewPrivileges"] == "yes"
    assert one["Service.CapabilityBoundingSet"] == "CAP_DAC_READ_SEARCH"
    for key in ("PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules", "PrivateDevices"):
        assert one[f"Service.{key}"] == "yes", key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_fanotify_drop_in_allows_what_the_unit_denies_the_backend() -> None:
    """The unit denies @privileged; the drop-in must allow back every call fanotify.py makes
    that is in it, and add the capabilities, while the unit alone keeps the tightest set."""
    listed = subprocess.run(
        ["systemd-analyze", "syscall-filter", "@privileged"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    source = (UNIT.parents[1] / "agent" / "fanotify.py").read_text()
    called = {name for name in re.findall(r"getattr\(_libc, \"(\w+)\"", source)}
    assert called == {"fanotify_init", "fanotify_mark", "open_by_handle_at"}
    denied = called & set(listed)
    assert denied  # otherwise the drop-in would not be needed
    unit = _service()
    assert "~@privileged" in unit["Service.SystemCallFilter"]
    drop_in = _service(FANOTIFY_DROP_IN)
    (allowed,) = drop_in["Service.SystemCallFilter"]
    assert denied <= set(allowed.split())
    (caps,) = drop_in["Service.CapabilityBoundingSet"]
    assert {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"} == set(caps.split())
    assert unit["Service.CapabilityBoundingSet"] == ["CAP_DAC_READ_SEARCH"]


# --- sd_notify over a real AF_UNIX datagram socket -------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(30)
    yield sock, path
    sock.close()


def _receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_notifier_sends_ready_watchdog_stopping(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert notifier.watchdog_interval_s == 4.0
    assert notifier.ready(status="guarding")
    assert _receive(sock) == "READY=1\nSTATUS=guarding"
    assert notifier.watchdog()
    assert _receive(sock) == "WATCHDOG=1"
    assert notifier.stopping()
    assert _receive(sock) == "STOPPING=1"
    notifier.close()


def test_notifier_abstract_socket_and_outside_systemd() -> None:
    name = f"driftwarden-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(100) == b"READY=1"
        notifier.close()
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready() and quiet.watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None


def test_daemon_notifies_ready_pings_the_watchdog_and_says_stopping(
    notify_socket: tuple[socket.socket, str],
    agent_cmd: list[str],
    subprocess_env: dict[str, str],
    tmp_path: Path,
) -> None:
    sock, path = notify_socket
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "machine-id").write_text("ab" * 16 + "\n")
    env = {**subprocess_env, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}
    proc = subprocess.Popen(
        [*agent_cmd, "run", "--root", str(root), "--state-dir", str(tmp_path / "state")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        messages = [_receive(sock)]
        while messages.count("WATCHDOG=1") < 3:
            messages.append(_receive(sock))
        assert messages[0] == "READY=1\nSTATUS=guarding"
        proc.send_signal(signal.SIGTERM)
        while messages[-1] != "STOPPING=1":
            messages.append(_receive(sock))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
