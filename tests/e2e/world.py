"""A real fleet of one image for the end-to-end tests.

- ``Image``: a small image root baked with ``driftwarden-agent bake`` into a manifest signed by
  a pipeline key, under the shipped ``policies/minimal.toml``;
- ``World``: a collector process (``python -m collector serve``, SQLite in a temporary
  directory) that trusts the pipeline key, with the image registered, an admin token and an
  enrollment token, all made with the ``driftwarden`` command;
- ``Agent``: one host of that image: a copy of the image root with its own machine id, and a
  real ``python -m agent run`` process reporting to the collector.

Everything is asked through the SRE API or the ``driftwarden`` command, and waited for with a
deadline (``tests.sshd.wait_until``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.collector.servers import Server
from tests.sshd import wait_until

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "policies" / "minimal.toml"
BUILD_ID = "e2e-image-1"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
COMMAND_TIMEOUT_S = 120.0
STATE_TIMEOUT_S = 120.0  # a bound on waiting, not a speed test
STOP_TIMEOUT_S = 30.0

IMAGE_FILES = {
    "etc/machine-id": b"",
    "etc/hostname": b"image\n",
    "etc/hosts": b"127.0.0.1 localhost\n",
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/ssh/sshd_config": b"PermitRootLogin no\n",
    "usr/bin/app": b"\x7fELF" + bytes(range(256)) * 16,
    "usr/lib/app/lib.so": b"\x7fELF library\n",
    "var/log/app.log": b"started\n",
}


def command(program: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``python -m PROGRAM ARGS``; its stdout, or fail the test with its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", program, *args],
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, (
        f"{program} {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
    )
    return done.stdout


@dataclass(frozen=True)
class Image:
    root: Path
    manifest: Path
    pipeline_key: Path

    @property
    def pipeline_public_key(self) -> Path:
        return Path(str(self.pipeline_key) + ".pub")


def bake_image(directory: Path) -> Image:
    """An image root, a pipeline key, and the signed manifest baked from them."""
    root = directory / "image"
    for name, data in IMAGE_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "usr/bin/app").chmod(0o755)
    key = directory / "pipeline.key"
    command("agent", "keygen", "--out", str(key))
    manifest = directory / "image.dwm"
    command(
        "agent", "bake", "--root", str(root), "--policy", str(POLICY), "--out", str(manifest),
        "--key", str(key), "--build-id", BUILD_ID,
    )  # fmt: skip
    return Image(root, manifest, key)


class World:
    """A collector process, its tokens, and the API and CLI to ask it."""

    def __init__(self, directory: Path, image: Image) -> None:
        self.directory = directory
        self.image = image
        self.db_url = f"sqlite:///{directory / 'collector.db'}"
        config = (
            "[images]\n"
            f'pipeline_public_keys = ["{image.pipeline_public_key}"]\n'
            "require_registered = true\n"
            '[log]\nlevel = "info"\njson = true\n'
        )
        self.server = Server(self.db_url, directory, config=config)
        made = command(
            "collector", "token", "create", "--role", "admin", "--db", self.db_url, "--json"
        )
        self.admin_token: str = json.loads(made)["token"]
        made = command(
            "collector", "enroll-token", "create", "--db", self.db_url, "--uses", "100", "--json"
        )
        self.enroll_token: str = json.loads(made)["token"]
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {self.admin_token}"

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def cli_env(self) -> dict[str, str]:
        return {"DRIFTWARDEN_URL": self.url, "DRIFTWARDEN_TOKEN": self.admin_token}

    def start(self) -> World:
        self.server.start()
        return self

    def close(self) -> None:
        self.session.close()
        self.server.stop()

    def register_image(self) -> None:
        out = self.cli("images", "register", str(self.image.manifest))
        assert out.startswith(f"registered image {BUILD_ID} root "), out

    # --- asking --------------------------------------------------------------------------

    def cli(self, *args: str) -> str:
        """``driftwarden ARGS`` against this collector, as an SRE with an admin token."""
        return command("collector", *args, env=self.cli_env)

    def get(self, path: str, **params: Any) -> Any:
        answer = self.session.get(self.url + path, params=params, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def host(self, host_id: str) -> dict[str, Any] | None:
        answer = self.session.get(f"{self.url}/v1/hosts/{host_id}", timeout=10)
        if answer.status_code == 404:
            return None
        answer.raise_for_status()
        data: dict[str, Any] = answer.json()
        return data

    def events(self, host_id: str) -> list[dict[str, Any]]:
        """Every report and transition of the host, oldest first."""
        events: list[dict[str, Any]] = self.get(f"/v1/hosts/{host_id}/events", limit=1000)["events"]
        return events[::-1]

    def reports(self, host_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        found = [e for e in self.events(host_id) if e["type"] == "report"]
        return sorted(
            (e for e in found if kind is None or e["kind"] == kind), key=lambda e: e["seq"]
        )

    def wait_host(
        self, host_id: str, predicate: Callable[[dict[str, Any]], bool], *, what: str
    ) -> dict[str, Any]:
        """Poll the API until the host exists and ``predicate(host)``; return the host."""
        seen: list[dict[str, Any]] = []

        def check() -> bool:
            host = self.host(host_id)
            if host is None:
                return False
            seen[:] = [host]
            return predicate(host)

        wait_until(check, timeout_s=STATE_TIMEOUT_S, what=f"host {host_id}: {what}")
        return seen[0]

    def wait_state(self, host_id: str, state: str) -> dict[str, Any]:
        return self.wait_host(host_id, lambda h: h["state"] == state, what=f"state {state}")

    def wait_reports(
        self, host_id: str, predicate: Callable[[list[dict[str, Any]]], bool], *, what: str
    ) -> list[dict[str, Any]]:
        seen: list[list[dict[str, Any]]] = [[]]

        def check() -> bool:
            if self.host(host_id) is None:
                return False
            seen[0] = self.reports(host_id)
            return predicate(seen[0])

        wait_until(check, timeout_s=STATE_TIMEOUT_S, what=f"host {host_id}: {what}")
        return seen[0]


class Agent:
    """One host of the image: its own root (a copy of the image) and agent processes."""

    def __init__(self, world: World, directory: Path, *, auth_log: Path | None = None) -> None:
        self.world = world
        self.directory = directory
        self.host_id = uuid.uuid4().hex
        self.root = directory / "root"
        shutil.copytree(world.image.root, self.root, symlinks=True)
        (self.root / "etc/machine-id").write_text(self.host_id + "\n")
        self.state_dir = directory / "state"
        self.baseline: Path | None = world.image.manifest  # the manifest baked into the image
        self.auth_log = auth_log or directory / "auth.log"
        self.auth_log.touch()
        self.config = directory / "agent.toml"
        self.config.write_text(
            "[agent]\n"
            f'pipeline_public_key = "{world.image.pipeline_public_key}"\n'
            "heartbeat_interval_s = 1\n"
            "poll_interval_s = 0.05\n"
            "[collector]\n"
            "backoff_initial_s = 0.05\n"
            "backoff_max_s = 0.5\n"
            "stop_timeout_s = 10\n"
            "[packages]\nwatch = false\n"
            "[logins]\n"
            f'auth_logs = ["{self.auth_log}"]\n'
            "journal = false\nutmp = false\n"
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.procs[-1]

    def path(self, name: str) -> Path:
        """The file at ``name`` (as seen inside the image) on this host."""
        return self.root / name.lstrip("/")

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``agent run`` with the essentials as flags (and ``args``, e.g. --once)."""
        assert not self.procs or self.proc.poll() is not None, "the agent is already running"
        argv = [
            sys.executable, "-m", "agent", "--log-level", "info", "--log-json", "run",
            "--config", str(self.config), "--root", str(self.root),
            "--state-dir", str(self.state_dir),
            "--collector", self.world.url, "--enroll-token", self.world.enroll_token, *args,
        ]  # fmt: skip
        if self.baseline is not None:
            argv += ["--baseline", str(self.baseline)]
        with (self.directory / f"agent-{len(self.procs)}.log").open("wb") as log:
            self.procs.append(subprocess.Popen(argv, env=ENV, stdout=log, stderr=subprocess.STDOUT))
        return self.proc

    def start_clean(self) -> dict[str, Any]:
        """Start the agent and wait until the collector holds the host clean."""
        self.start()
        return self.world.wait_state(self.host_id, "clean")

    def stop(self) -> int:
        """SIGTERM: the clean stop. Returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL: no agent_stop, no flush."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT_S)

    def log(self) -> str:
        return "\n".join(
            (self.directory / f"agent-{i}.log").read_text(errors="replace")
            for i in range(len(self.procs))
        )

    def spooled(self) -> list[dict[str, Any]]:
        """The reports in the spool not yet acknowledged: queued bodies and sealed envelopes."""
        out = []
        spool = self.state_dir / "spool"
        for part in ("queue", "sealed"):
            for path in sorted((spool / part).glob("*.json")):
                try:
                    record = json.loads(path.read_text())
                except FileNotFoundError:  # acknowledged (or sealed) while we looked
                    continue
                record = record.get("envelope", record)
                out.append({"kind": record["kind"], "body": record["body"]})
        return out

    def rejected(self) -> list[Path]:
        return sorted((self.state_dir / "spool" / "rejected").glob("*"))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(STOP_TIMEOUT_S)


def logins(host: dict[str, Any] | list[dict[str, Any]], port: int) -> list[dict[str, Any]]:
    """The accepted-login findings for the client port ``port`` in reports or a host view."""
    found: list[dict[str, Any]] = []
    if isinstance(host, dict):
        found = [f["detail"] for f in host["findings"] if f["type"] == "login"]
    else:
        for report in host:
            if report["kind"] == "finding" and report["body"]["source"] == "ssh":
                found += report["body"]["findings"]
    return [f for f in found if f["event"] == "accepted" and f["source_port"] == port]


@contextlib.contextmanager
def agents(world: World, directory: Path) -> Iterator[Callable[..., Agent]]:
    """A factory of hosts in ``world``; every agent process is gone at the end."""
    made: list[Agent] = []

    def make(**kwargs: Any) -> Agent:
        agent = Agent(world, directory / f"host-{len(made)}", **kwargs)
        made.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in made:
            agent.close()
