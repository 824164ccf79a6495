"""A real Prometheus Alertmanager (Debian's prometheus-alertmanager) on a loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import requests

BINARY = "/usr/bin/prometheus-alertmanager"
CONFIG = """\
route:
  receiver: "null"
receivers:
  - name: "null"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Alertmanager:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = workdir / "alertmanager.log"

    @staticmethod
    def available() -> bool:
        return shutil.which(BINARY) is not None

    def __enter__(self) -> Alertmanager:
        config = self.workdir / "alertmanager.yml"
        config.write_text(CONFIG)
        (self.workdir / "data").mkdir()
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    BINARY,
                    f"--config.file={config}",
                    f"--storage.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--cluster.listen-address=",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self, timeout_s: float = 30.0) -> None:
        assert self._process is not None
        gave_up = threading.Event()
        timer = threading.Timer(timeout_s, gave_up.set)
        timer.start()
        try:
            while not gave_up.is_set():
                if self._process.poll() is not None:
                    raise RuntimeError(f"alertmanager exited: {self._log.read_text()}")
                try:
                    if requests.get(self.url + "/-/ready", timeout=1).status_code == 200:
                        return
                except requests.ConnectionError:
                    pass
                gave_up.wait(0.05)
            raise TimeoutError(f"alertmanager not ready: {self._log.read_text()}")
        finally:
            timer.cancel()
            timer.join()

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds as active (GET /api/v2/alerts)."""
        response = requests.get(self.url + "/api/v2/alerts", timeout=5)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
