"""Break-glass against a real sshd on loopback: ``driftwarden breakglass`` (a real process)
announces the session to a real collector API, opens it through paramiko and runs a command;
the login sshd logged is fed through ingest as the agent sends it (a signed envelope); it is
attributed — a warning, not an intrusion page — and the host's replacement waits until the
session ends plus the grace period, then is requested. A login nobody announced stays
critical. Needs root (a system user for sshd)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from agent.logins.parse import LineParser
from collector.api import create_app
from collector.config import ServerConfig
from collector.model import HostState, Role
from collector.response import incidents, ledger, sessions
from collector.store import SqlStore
from tests.collector.clock import Clock
from tests.collector.fleet import Fleet, recording_action, replaced_by
from tests.collector.servers import REPO, free_port
from tests.sshd import Sshd, ssh_user, sshd, wait_until

__all__ = ["ssh_user", "sshd"]  # fixtures

GRACE_S = 600

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


class ApiServer:
    """The collector's API on a loopback port, in this process (uvicorn in a thread)."""

    def __init__(self, fleet: Fleet) -> None:
        config = fleet.config.replace(server=ServerConfig(workers=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(
                create_app(config, store=fleet.store),
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                access_log=False,
            )
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ApiServer:
        self._thread.start()
        wait_until(lambda: self._server.started, what="the API to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)


@pytest.fixture
def fleet(store: SqlStore, clock: Clock, tmp_path: Path) -> Iterator[Fleet]:
    made = Fleet(
        store,
        {
            "action": [recording_action(tmp_path / "replaced")],
            "pool": [{"name": "web", "action": "recorder", "budget": 5}],
            "breakglass": {"grace_s": GRACE_S},
        },
    )
    try:
        yield made
    finally:
        made.close()


def known_hosts(sshd: Sshd, path: Path) -> Path:
    key = (sshd.config_path.parent / "host_ed25519.pub").read_text().split()
    path.write_text(f"[{sshd.host}]:{sshd.port} {key[0]} {key[1]}\n")
    return path


def breakglass_argv(
    api: ApiServer, token: str, sshd: Sshd, host: str, reason: str, workdir: Path, *extra: str
) -> list[str]:
    """``driftwarden breakglass`` to the test sshd, as the test user with its key."""
    return [
        *(sys.executable, "-m", "collector", "breakglass", host, "--reason", reason),
        *("--user", sshd.user.name, "--address", sshd.host, "--port", str(sshd.port)),
        *("--identity", str(sshd.user.key_path)),
        *("--known-hosts", str(known_hosts(sshd, workdir / "known_hosts"))),
        *("--url", api.url, "--token", token),
        *extra,
    ]


def logins_since(sshd: Sshd, offset: int, user: str) -> list[dict[str, Any]]:
    """What the agent reports for sshd's log lines since ``offset``: login findings."""
    parser = LineParser("authlog")
    found = []
    for line in sshd.log_text()[offset:].splitlines():
        login = parser.parse_line(line)
        if login is not None and login.user == user:
            found.append({**login.to_wire(), "verdict": "taint", "severity": "critical"})
    return found


def test_an_announced_session_is_attributed_and_defers_replacement(
    fleet: Fleet, clock: Clock, sshd: Sshd, tmp_path: Path
) -> None:
    out = tmp_path / "replaced"
    [sim] = fleet.enroll("web-1")
    fleet.enroll("web-2")
    token = fleet.token(Role.OPERATOR, "alice")["Authorization"].split()[1]
    offset = len(sshd.log_text())
    with ApiServer(fleet) as api:
        command = ["--ticket", "INC-7", "--", "sh", "-c", "read line; echo got $line; exit 3"]
        cli = subprocess.Popen(
            breakglass_argv(
                api, token, sshd, "web-1", "disk full, clearing /var/tmp", tmp_path, *command
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        try:
            wait_until(
                lambda: (
                    any(
                        f["event"] == "accepted" for f in logins_since(sshd, offset, sshd.user.name)
                    )
                    or cli.poll() is not None
                ),
                timeout_s=30,
                what="sshd to accept the break-glass login",
            )
            assert cli.poll() is None, cli.communicate()
            # the agent reports the login, as it does: a signed envelope through ingest
            opened = logins_since(sshd, offset, sshd.user.name)
            fleet.send(sim, sim.finding(*opened, source="ssh"))
            fleet.run()
            host = fleet.host("web-1")
            assert (host.state, host.state_cause) == (HostState.TAINTED, "attributed_login")
            with ledger.transaction(fleet.store) as tx:
                [page] = incidents.firing_incidents(tx, "web-1")
            assert page.alert["severity"] == "warning"  # attributed: not an intrusion page
            assert "disk full" in page.alert["summary"]
            row = fleet.replacement("web-1")
            assert (row.state.value, row.blocked_by) == ("blocked", "breakglass")
            assert "is open" in (row.blocked_reason or "")
            assert not out.exists()

            stdout, stderr = cli.communicate(b"bye\n", timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.communicate()
        assert cli.returncode == 3, stderr  # the remote command's exit status
        assert stdout == b"got bye\n"

        with ledger.transaction(fleet.store) as tx:
            [session] = sessions.of_host(tx, "web-1")
        assert (session.login_user, session.ticket, session.ended_by) == (
            sshd.user.name,
            "INC-7",
            "client",
        )
        assert session.actor.endswith(":alice") and session.login["source_ip"] == "127.0.0.1"
        trail = [d.decision for d in fleet.decisions(host_id="web-1")]
        assert {"breakglass_announced", "breakglass_login", "breakglass_ended"} <= set(trail)

    clock.advance(GRACE_S - 1)
    fleet.run()
    assert not out.exists()  # still within the grace period
    assert "waits until" in (fleet.replacement("web-1").blocked_reason or "")
    clock.advance(2)
    fleet.run()
    assert replaced_by(out) == {"web-1": 1}
    assert fleet.host("web-1").state is HostState.REPLACING


def test_a_login_nobody_announced_stays_critical(fleet: Fleet, tmp_path: Path) -> None:
    [sim] = fleet.enroll("web-3")
    login = {
        "type": "login",
        "event": "accepted",
        "user": "mallory",
        "method": "password",
        "source_ip": "198.51.100.9",
        "source_port": 40022,
        "at": "2030-01-01T00:00:00.000000Z",
        "source": "authlog",
        "verdict": "taint",
        "severity": "critical",
    }
    fleet.send(sim, sim.finding(login, source="ssh"))
    fleet.run()
    tainted = [t for t in fleet.store.transitions("web-3") if t.to_state is HostState.TAINTED]
    assert [t.cause for t in tainted] == ["login"]
    with ledger.transaction(fleet.store) as tx:
        [page] = incidents.firing_incidents(tx, "web-3")
    assert page.alert["severity"] == "critical"
    assert "unannounced SSH login by mallory" in page.alert["summary"]
    assert replaced_by(tmp_path / "replaced") == {"web-3": 1}  # not deferred


def test_an_interactive_shell_gets_a_pty(fleet: Fleet, sshd: Sshd, tmp_path: Path) -> None:
    fleet.enroll("web-4")
    token = fleet.token(Role.OPERATOR, "alice")["Authorization"].split()[1]
    controller, terminal = pty.openpty()
    with ApiServer(fleet) as api:
        session = subprocess.Popen(
            breakglass_argv(api, token, sshd, "web-4", "look around", tmp_path),
            stdin=terminal,
            stdout=terminal,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(REPO), TERM="dumb"),
        )
        os.close(terminal)
        seen = bytearray()
        typed = False
        try:
            while session.poll() is None or select.select([controller], [], [], 0)[0]:
                if not typed and seen.rstrip().endswith(b"$"):  # the remote shell's prompt
                    os.write(controller, b"tty; exit 5\n")
                    typed = True
                ready, _, _ = select.select([controller], [], [], 10)
                assert ready, f"no output from the session: {bytes(seen)!r}"
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # the last writer closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
        finally:
            if session.poll() is None:
                session.kill()
            stderr = session.communicate(timeout=30)[1]
            os.close(controller)
    assert session.returncode == 5, stderr
    assert b"/dev/pts/" in seen  # the remote shell had a terminal
    with ledger.transaction(fleet.store) as tx:
        [session] = sessions.of_host(tx, "web-4")
    assert session.ended_by == "client"


def cli(api: ApiServer, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args, "--url", api.url, "--token", token],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def test_hold_and_release_from_the_command_line(fleet: Fleet) -> None:
    fleet.enroll("web-5")
    token = fleet.token(Role.OPERATOR, "carol")["Authorization"].split()[1]
    with ApiServer(fleet) as api:
        assert cli(api, token, "hold", "web-5", "--reason", "forensics").stdout == (
            "held host web-5: forensics\n"
        )
        assert cli(api, token, "hold", "--pool", "web", "--reason", "freeze").returncode == 0
        listed = cli(api, token, "holds").stdout
        assert "forensics" in listed and "freeze" in listed
        refused = cli(api, token, "hold", "--reason", "x")
        assert refused.returncode == 2 and "exactly one of HOST" in refused.stderr
        fleet.drift("web-5")
        fleet.run()
        shown = cli(api, token, "host", "web-5").stdout
        assert "replacement: blocked by hold: host held by token:" in shown
        released = cli(api, token, "release", "--pool", "web", "--reason", "thaw")
        assert released.stdout == "released pool web: operator hold 2\n"
        blocked = cli(api, token, "replacements", "--state", "blocked", "--json").stdout
        assert '"blocked_by": "hold"' in blocked
        assert "forensics" in cli(api, token, "decisions", "--host", "web-5").stdout
        assert "web" in cli(api, token, "pools").stdout
