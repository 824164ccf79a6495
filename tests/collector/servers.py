"""Real collector processes for tests: ``python -m collector serve`` on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
CONFIG = """
[images]
require_registered = false

[log]
level = "info"
json = true
"""


def send_at_once(
    urls: list[str], batches: list[dict[str, Any]]
) -> dict[tuple[str, int], list[str]]:
    """Every batch to every one of ``urls``, all at the same moment; each envelope's statuses
    (``accepted``, ``duplicate``), by host and sequence number."""
    statuses: dict[tuple[str, int], list[str]] = {}
    lock = threading.Lock()
    gate = threading.Barrier(len(urls) * len(batches))

    def post(url: str, batch: dict[str, Any]) -> None:
        gate.wait()
        answer = requests.post(url + "/v1/reports", json=batch, timeout=30)
        assert answer.status_code == 200, answer.text
        with lock:
            for ack in answer.json()["acks"]:
                statuses.setdefault((str(batch["host_id"]), ack["seq"]), []).append(ack["status"])

    threads = [
        threading.Thread(target=post, args=(url, batch)) for batch in batches for url in urls
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return statuses


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """One collector process; ``start`` returns once ``/readyz`` answers 200."""

    def __init__(
        self,
        db_url: str,
        workdir: Path,
        *,
        name: str = "collector",
        config: str = CONFIG,
        processes: int | None = None,
    ) -> None:
        self.db_url = db_url
        self.processes = processes
        self.config = config
        self.workdir = workdir
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> Server:
        config = self.workdir / f"{self.name}.toml"
        config.write_text(self.config)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "collector",
                    "serve",
                    "--config",
                    str(config),
                    "--db",
                    self.db_url,
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    *(() if self.processes is None else ("--processes", str(self.processes))),
                ],
                env=env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        with requests.Session() as session:
            while time.monotonic() < deadline:
                try:
                    if session.get(self.url + "/readyz", timeout=1).status_code == 200:
                        return
                except requests.ConnectionError:
                    pass
                try:
                    self.proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    continue
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()}")
        raise TimeoutError(f"{self.name} not ready in {timeout_s}s:\n{self.log.read_text()}")

    def workers(self) -> list[psutil.Process]:
        """The worker processes serving for this one (none when it serves alone)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return psutil.Process(self.proc.pid).children()

    def pids(self) -> set[int]:
        """Its process and its workers: the ones that may claim a job."""
        if self.proc is None:
            return set()
        return {self.proc.pid, *(w.pid for w in self.workers())}

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; what was committed must be all there is. Its
        workers die with it (the kernel kills them); wait until they are gone too."""
        if self.proc is not None and self.proc.poll() is None:
            workers = self.workers()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            psutil.wait_procs(workers, timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
