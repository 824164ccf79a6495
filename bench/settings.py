"""What a benchmark run was asked to do, shared by every suite."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.driftwarden import Agent
from bench.measure import Cache
from bench.treegen import Shape


@dataclass(frozen=True)
class Settings:
    repo: Path
    workdir: Path
    agent: Agent  # how driftwarden is run (``bench.driftwarden``)
    logs: Path
    shape: Shape
    seed: int
    runs: int
    cold_runs: int
    usr_copy: bool
    profile: bool
    cold_refusal: str | None  # why the page cache cannot be dropped, or None if it can

    def runs_for(self, cache: Cache) -> int:
        return self.runs if cache == "warm" else self.cold_runs
