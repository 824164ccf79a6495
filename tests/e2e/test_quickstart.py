"""The README's quick start, run for real: ``scripts/quickstart.sh`` installs driftwarden into a
virtual environment, starts a collector and an agent, shows the fleet, does it all again without
making anything twice, and ``scripts/quickstart.sh stop`` stops both.

Scaled so that it stays quick: the machine root is a small tree (``DRIFTWARDEN_ROOT``), and the
virtual environment is made beforehand with this machine's site packages (and pip), so the
script's own ``pip install -e`` into it needs no download of driftwarden's dependencies.
Everything else is the script as a user runs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.collector.servers import free_port
from tests.e2e.world import REPO

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "quickstart.sh"
HOST_ID = "5eed0000000000000000000000000001"
SCRIPT_TIMEOUT_S = 600


@pytest.fixture
def quickstart(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The script's environment; whatever it started is stopped afterwards."""
    root = tmp_path / "machine"
    for name, data in {
        "etc/machine-id": HOST_ID + "\n",
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
        "etc/ssh/sshd_config": "PermitRootLogin no\n",
        "usr/bin/tool": "#!/bin/sh\necho tool\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(data)
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    env = {
        **os.environ,
        "DRIFTWARDEN_HOME": str(tmp_path / "home"),
        "DRIFTWARDEN_VENV": str(venv),
        "DRIFTWARDEN_ROOT": str(root),
        "DRIFTWARDEN_LISTEN": f"127.0.0.1:{free_port()}",
    }
    for name in ("DRIFTWARDEN_URL", "DRIFTWARDEN_TOKEN", "DRIFTWARDEN_CONFIG", "PYTHONPATH"):
        env.pop(name, None)
    try:
        yield env
    finally:
        home = Path(env["DRIFTWARDEN_HOME"])
        pids = [int(p.read_text()) for p in home.glob("*.pid")]
        subprocess.run([str(SCRIPT), "stop"], env=env, check=False, timeout=SCRIPT_TIMEOUT_S)
        for pid in pids:  # never leave a daemon behind, even if the script failed
            if pid_alive(pid) and str(home) in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def run(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def test_the_quick_start_runs_the_main_job_again_and_again_then_stops(
    quickstart: dict[str, str],
) -> None:
    home = Path(quickstart["DRIFTWARDEN_HOME"])
    url = "http://" + quickstart["DRIFTWARDEN_LISTEN"]

    first = run(quickstart)
    assert "installing driftwarden" in first and "baking a signed baseline" in first
    assert re.search(r"^hosts: 1$", first, re.MULTILINE), first
    assert re.search(rf"^{HOST_ID}\s+clean\s+boot_clean\s", first, re.MULTILINE), first
    assert re.search(r"^quickstart-\S+\s+1\s+yes$", first, re.MULTILINE), first  # registered
    assert f"web page is {url}/" in first and "scripts/quickstart.sh stop" in first

    made = {name: (home / name).read_bytes() for name in ("admin.token", "enroll.token")}
    baseline = (home / "baseline.dwm").stat()
    pids = {name: int((home / f"{name}.pid").read_text()) for name in ("collector", "agent")}
    assert all(pid_alive(pid) for pid in pids.values())

    again = run(quickstart)  # reuses everything: nothing installed, made or started twice
    for step in ("installing", "making", "creating", "baking", "starting"):
        assert step not in again, again
    assert re.search(rf"^{HOST_ID}\s+clean\s", again, re.MULTILINE), again
    assert {name: (home / name).read_bytes() for name in made} == made
    assert (home / "baseline.dwm").stat().st_ino == baseline.st_ino
    assert {n: int((home / f"{n}.pid").read_text()) for n in pids} == pids

    # As the README says: add a file under /etc, stop, start again: the host is drifted.
    cron = Path(quickstart["DRIFTWARDEN_ROOT"]) / "etc/cron.d/example"
    cron.parent.mkdir()
    cron.write_text("* * * * * root /usr/bin/tool\n")
    stopped = run(quickstart, "stop")
    assert "stopping the agent" in stopped and "stopping the collector" in stopped
    assert not any(pid_alive(pid) for pid in pids.values())
    assert "agent_stopped" in (home / "agent.log").read_text()  # a clean stop, not a kill

    drifted = run(quickstart)
    assert "starting the collector" in drifted and "starting the agent" in drifted
    assert "baking" not in drifted
    assert re.search(rf"^{HOST_ID}\s+drifted\s+drift\s", drifted, re.MULTILINE), drifted
    pids = {name: int((home / f"{name}.pid").read_text()) for name in pids}
    run(quickstart, "stop")
    assert not any(pid_alive(pid) for pid in pids.values())
