"""The image root that ``bake`` and ``check`` measure: a directory, and the tool's own files
inside it (the manifest being written or read, the agent's state), which are not measured."""

from __future__ import annotations

import os
from pathlib import Path

from agent.errors import AgentError


def root_dir(root: Path) -> Path:
    if not root.is_dir():
        raise AgentError("the root to measure is not a directory", path=root)
    return root


def own_paths(root: Path, *files: Path) -> frozenset[str]:
    """The image paths of ``files`` that lie inside ``root`` (the tool's own files)."""
    base = os.path.realpath(root)
    out = set()
    for file in files:
        real = os.path.join(os.path.realpath(file.parent), file.name)
        rel = os.path.relpath(real, base)
        if not rel.startswith(".."):
            out.add("/" + rel)
    return frozenset(out)
