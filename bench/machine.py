"""The machine the figures were taken on, and the peer tools it needs (installed with apt-get)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from bench.measure import BenchError

TOOLS: Final = {"aide": "aide", "debsums": "debsums"}  # command -> Debian package


def ensure_tools(commands: Sequence[str] = tuple(TOOLS)) -> list[str]:
    """Install the Debian packages of missing commands (``apt-get update`` first)."""
    missing = [TOOLS[c] for c in commands if shutil.which(c) is None]
    if not missing:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            f"{', '.join(missing)} missing; install them (apt-get install) or run as root"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        if subprocess.run(argv, env=env, check=False).returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed")
    return missing


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def facts(workdir: Path, driftwarden: str, python: str, *, load_at_start: str) -> dict[str, str]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": _memory(),
        "load average (1/5/15 min)": f"{load_at_start} at the start, {load()} at the end",
        "kernel": platform.release(),
        "OS": _os_release(),
        "virtualisation": _output(["systemd-detect-virt"]) or "unknown",
        "disk (work directory)": _disk(workdir),
        "Python (driftwarden's)": python,
        "driftwarden": driftwarden,
        "aide": _output(["aide", "--version"]).splitlines()[0] if shutil.which("aide") else "—",
        "debsums": _package_version("debsums"),
        "sha256sum": _output(["sha256sum", "--version"]).splitlines()[0],
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    return "unknown"


def _os_release() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "unknown")
    except OSError:
        return "unknown"


def _disk(path: Path) -> str:
    source_fs = _output(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(path)]) or "?"
    device = Path(source_fs.split()[0]).name
    block = Path("/sys/class/block") / device
    kind = ""
    rotational = block / "queue" / "rotational"
    if rotational.exists():
        kind = "rotational" if rotational.read_text().strip() == "1" else "non-rotational"
    model = block / "device" / "model"
    size = block / "size"
    parts = [source_fs]
    if size.exists():
        parts.append(f"{int(size.read_text()) * 512 / 1e9:.0f} GB")
    if model.exists():
        parts.append(model.read_text().strip())
    if kind:
        parts.append(f"reported {kind}")
    return ", ".join(parts)


def _package_version(package: str) -> str:
    return _output(["dpkg-query", "-W", "-f=${Version}", package]) or "not installed"


def _output(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()
