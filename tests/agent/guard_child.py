"""Run a guard in this process with a given inotify watch limit (inside a user namespace of
its own, so the limit binds nothing else); print each finding as a JSON line ``[source,
finding]``; when stdin closes, stop and print ``["health", {...}]``.

    guard_child.py ROOT MANIFEST MAX_INOTIFY_WATCHES
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from pathlib import Path
from typing import Any

import structlog

from agent.guard import Guard, GuardConfig
from agent.judge import Judge
from agent.manifest import load_baseline
from agent.rescan import RescanConfig, Rescanner


def main() -> int:
    root, manifest, limit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    Path("/proc/sys/user/max_inotify_watches").write_text(limit)
    baseline = load_baseline(manifest)
    judge = Judge(root, baseline, baseline.policy)
    lock = threading.Lock()

    def emit(source: str, findings: list[dict[str, Any]]) -> None:
        with lock:
            for finding in findings:
                print(json.dumps([source, finding]), flush=True)

    config = RescanConfig(
        metadata_interval_s=3600, fallback_interval_s=0.3, full_rehash_period_s=1e9
    )
    rescanner = Rescanner(judge, emit, config=config)
    guard = Guard(judge, emit, rescanner, config=GuardConfig(backend="inotify"))
    rescanner.start()
    guard.start()
    sys.stdin.read()
    health = guard.health()
    stopped = guard.stop() and rescanner.stop()
    emit("health", [dataclasses.asdict(health)])
    return 0 if stopped else 1


if __name__ == "__main__":
    sys.exit(main())
