"""Benchmark suites: one module per issue's targets, registered by name.

A suite is a function ``run(settings) -> list[Section]``: it prepares what it measures under
``settings.workdir``, measures it (``bench.measure``), judges the issue's targets
(``bench.targets``) and returns sections for the report. A new benchmark is a new module here
plus one line in ``SUITES``; ``bench/run.py --suite NAME`` runs a subset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from bench.measure import BenchError
from bench.report import Section
from bench.settings import Settings
from bench.suites import baseline, packages

Suite = Callable[[Settings], list[Section]]

SUITES: Final[dict[str, Suite]] = {
    "baseline": baseline.run,
    "packages": packages.run,
}


def chosen(names: list[str]) -> list[tuple[str, Suite]]:
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise BenchError(f"unknown suite {unknown}; valid: {', '.join(SUITES)}")
    return [(name, SUITES[name]) for name in names or SUITES]
