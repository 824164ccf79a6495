"""A small image root and policy for the baseline tests, and an in-process bake."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent import keys
from agent.bake import bake_command

POLICY = """
[policy]
name = "test-image"
roots = ["/"]
exclude = ["/proc", "/sys", "/dev", "/run", "/tmp"]
max_file_size_bytes = 1048576

[[rule]]
name = "identity"
kind = "first_boot"
paths = ["/etc/machine-id"]

[[rule]]
name = "credentials"
kind = "critical"
paths = ["/etc/shadow", "/etc/sudoers.d", "/etc/sudoers.d/**"]

[[rule]]
name = "app-log"
kind = "growth_only"
paths = ["/var/log/app.log"]

[[rule]]
name = "state"
kind = "mutable"
paths = ["/var/lib/app/**", "/var/log/**"]

[[sample]]
path = "/etc/shadow"
expect = "critical"
"""

# The same shapes in an immutable place and a mutable one: (file, symlink, directory).
AREAS = {
    "immutable": ("/usr/bin/tool", "/usr/lib/libx.so", "/usr/bin"),
    "mutable": ("/var/lib/app/tool", "/var/lib/app/lib.so", "/var/lib/app"),
}


def at(root: Path, path: str) -> Path:
    """The file on this machine for ``path`` inside the image at ``root``."""
    return root / path.lstrip("/")


def build(root: Path) -> Path:
    """Create the sample image under ``root``; return ``root``."""
    files = {
        "/etc/passwd": (b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
        "/etc/shadow": (b"root:*:19000:0:99999:7:::\n", 0o640),
        "/etc/machine-id": (b"", 0o444),
        "/etc/sudoers.d/base": (b"Defaults env_reset\n", 0o440),
        "/usr/bin/tool": (b"\x7fELF" + bytes(range(256)) * 40, 0o755),
        "/usr/lib/libx.so.1": (b"\x7fELF library", 0o644),
        "/usr/share/doc/readme": (b"read me\n", 0o644),
        "/var/log/app.log": (b"started\n", 0o640),
        "/var/lib/app/tool": (b"\x7fELF" + bytes(range(256)) * 40, 0o755),
        "/var/lib/app/lib.so.1": (b"\x7fELF library", 0o644),
    }
    for path, (data, mode) in files.items():
        file = at(root, path)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
        file.chmod(mode)
    os.symlink("libx.so.1", at(root, "/usr/lib/libx.so"))
    os.symlink("lib.so.1", at(root, "/var/lib/app/lib.so"))
    return root


def write_policy(directory: Path, text: str = POLICY) -> Path:
    path = directory / "policy.toml"
    path.write_text(text)
    return path


def make_key(directory: Path, name: str = "pipeline.key") -> Path:
    key = directory / name
    keys.generate(key)
    return key


def bake(
    root: Path, policy: Path, out: Path, *, key: Path | None = None, compress_level: int = 0
) -> None:
    """Bake in-process (the set-up of a test; the command itself is tested as a process)."""
    args = argparse.Namespace(
        root=root,
        policy=policy,
        out=out,
        key=key,
        build_id="test-build",
        workers=2,
        compress_level=compress_level,
    )
    assert bake_command(args) == 0
