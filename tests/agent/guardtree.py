"""A small image root baked into a real manifest, and a findings recorder to wait on: what the
guard, fanotify, rescan and package watch tests share."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.judge import Judge
from agent.manifest import Baseline, ManifestWriter, load_baseline
from agent.policy import Policy, load_policy
from agent.walk import Walk

POLICY = """
[policy]
name = "guard-test"
roots = ["/"]
exclude = ["/proc", "/tmp"]

[[rule]]
name = "credentials"
kind = "critical"
paths = ["/etc/sudoers.d", "/etc/sudoers.d/**"]

[[rule]]
name = "state"
kind = "mutable"
paths = ["/var/log/**", "/var/cache/**"]
"""

FILES = {
    "etc/app.conf": b"listen = 8080\nworkers = 4\n",
    "etc/hostname": b"image\n",
    "etc/sudoers.d/admins": b"%admin ALL=(ALL) ALL\n",
    "usr/bin/tool": b"#!/bin/sh\necho tool\n",
    "usr/lib/libx.so": os.urandom(300_000),
    "usr/share/doc/readme": b"read me\n",
    "var/lib/app/data": b"state 1\n",
    "var/log/syslog": b"boot\n",
    "var/cache/apt/pkgcache": b"cache\n",
}


def make_image(root: Path) -> None:
    for name, data in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "usr/bin/tool").chmod(0o755)
    (root / "etc/alternatives").mkdir()
    os.symlink("/usr/bin/tool", root / "etc/alternatives/editor")
    for empty in ("proc", "tmp", "var/log/app"):
        (root / empty).mkdir(parents=True, exist_ok=True)


def bake(root: Path, work: Path) -> tuple[Policy, Baseline]:
    """Bake ``root`` with the test policy into ``work/manifest`` and load it back."""
    policy_path = work / "policy.toml"
    policy_path.write_text(POLICY)
    policy = load_policy(policy_path)
    out = work / "manifest"
    with (
        Walk(root, policy, workers=1) as walk,
        ManifestWriter(out, policy=policy, policy_text=POLICY, build_id="test") as writer,
    ):
        for path, line, is_dir in walk.records():
            writer.add_line(path, line, is_dir=is_dir)
        writer.finish()
    return policy, load_baseline(out)


@dataclass
class Image:
    root: Path
    policy: Policy
    baseline: Baseline

    def judge(self) -> Judge:
        return Judge(self.root, self.baseline, self.policy)


def image(tmp_path: Path) -> Image:
    root = tmp_path / "root"
    make_image(root)
    policy, baseline = bake(root, tmp_path)
    return Image(root, policy, baseline)


class Recorder:
    """An ``emit`` callback that keeps every (source, finding) and lets a test wait for one."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()

    def __call__(self, source: str, findings: list[dict[str, Any]]) -> None:
        with self._cond:
            self.items.extend((source, f) for f in findings)
            self._cond.notify_all()

    def wait_for(
        self, match: Callable[[str, dict[str, Any]], bool], timeout_s: float = 15.0
    ) -> tuple[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for item in self.items:
                    if match(*item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching finding within {timeout_s}s: {self.items}")
                self._cond.wait(left)

    def file(self, path: str, change: str | None = None, **want: Any) -> dict[str, Any]:
        """Wait for a file finding for ``path`` (and ``change``) and return it."""

        def match(_source: str, f: dict[str, Any]) -> bool:
            return (
                f.get("type") == "file"
                and f["path"] == path
                and (change is None or f["change"] == change)
                and all(f.get(k) == v for k, v in want.items())
            )

        return self.wait_for(match)[1]

    def paths(self) -> set[str]:
        with self._cond:
            return {f["path"] for _, f in self.items if f.get("type") == "file"}


def wait_until(check: Callable[[], bool], timeout_s: float = 15.0, what: str = "") -> None:
    """Poll a condition that has no event to wait on, up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    event = threading.Event()
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        event.wait(0.02)
