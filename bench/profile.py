"""Where driftwarden's time goes: py-spy samples of ``bake``, ``check`` and ``check --full``.

py-spy samples every thread of the process (the hashing workers too, which cProfile would not
see) at 100 Hz, idle threads left out. The collapsed stacks are kept under the logs directory;
the report shows, per command, the functions with the most samples on top of the stack (self)
and anywhere in it (inclusive).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Final

from bench.driftwarden import Agent
from bench.report import Section

TOP: Final = 12
# Frames every sample passes through (entry points, thread plumbing): left out of the
# inclusive ranking, which is about where the work is.
PLUMBING: Final = ("(<frozen runpy>)", "(agent/__main__.py)", "(threading.py)", "(agent/cli.py)")


def profile_section(agent: Agent, root: Path, slug: str, logs: Path) -> Section:
    intro = (
        f"py-spy samples (100 Hz, all threads, idle ones left out) of the warm runs on the "
        f"{slug} subject. Collapsed stacks: `{logs}/profile-*.txt`."
    )
    spy = shutil.which("py-spy")
    if spy is None:
        note = "py-spy is not installed (`pip install py-spy`); no profile taken."
        return Section("Profile", intro, (), (), (note,))
    blocks: list[str] = []
    for command in (
        agent.bake(root, slug),
        agent.check(root, slug, full=False),
        agent.check(root, slug, full=True),
    ):
        name = command.label.replace("driftwarden ", "").replace(" ", "").replace("--", "-")
        out = logs / f"profile-{name}.txt"
        done = subprocess.run(
            [spy, "record", "--format", "raw", "--nolineno", "-o", str(out), "--", *command.argv],
            env=dict(command.env or {}),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not out.exists():
            blocks.append(f"**{command.label}**: py-spy failed: {done.stderr.strip()[-300:]}")
            continue
        blocks.append(summarise(command.label, out.read_text()))
    return Section("Profile", intro, (), (), (), tuple(blocks))


def summarise(label: str, collapsed: str) -> str:
    """Top functions by self and inclusive samples from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if not any(part in frame for part in PLUMBING):
                inclusive[frame] += count
    if not total:
        return f"**{label}**: no samples (the run was too short or idle)."
    lines = [
        f"**{label}** — {total} samples ({total / 100:.1f} s of busy thread time)",
        "",
        "| self % | function | | inclusive % | function |",
        "| ---: | --- | --- | ---: | --- |",
    ]
    top_own = own.most_common(TOP)
    top_incl = inclusive.most_common(TOP)
    for index in range(max(len(top_own), len(top_incl))):
        left = top_own[index] if index < len(top_own) else ("", 0)
        right = top_incl[index] if index < len(top_incl) else ("", 0)
        lines.append(f"| {_cells(*left, total)} | | {_cells(*right, total)} |")
    return "\n".join(lines)


def _cells(frame: str, count: int, total: int) -> str:
    if not count:
        return " | "
    return f"{100 * count / total:.1f} | `{frame}`"
