"""Issue 2 item 4: verifying package-owned files, driftwarden against ``debsums -s``.

Both verify this machine's real installed packages against the dpkg database's digests
(``/var/lib/dpkg/info/*.md5sums``), conffiles left out as ``debsums -s`` leaves them out, and
both report only what differs. The issue sets no number here; the table gives the ratio.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from bench import peers
from bench.measure import Cache, Command, Measurement, measure
from bench.report import Row, Section, Table
from bench.settings import Settings

DPKG_INFO: Final = Path("/var/lib/dpkg/info")
INTRO: Final = (
    "Both verify this machine's installed packages against the dpkg database's digests "
    "(`/var/lib/dpkg/info/*.md5sums`), conffiles left out as `debsums -s` leaves them out, "
    "and both print only what differs. The issue sets no number here; the table gives the ratio."
)
PACKAGE_RUNS: Final = 1  # debsums alone takes minutes over a whole machine's packages


def run(settings: Settings) -> list[Section]:
    files, size_bytes = _packaged_files(Path("/"))
    agent = settings.agent
    debsums = peers.debsums()
    ours = agent.verify_packages(Path("/"))
    available = (settings.repo / "agent" / "packages.py").exists() or (
        settings.repo / "agent" / "packages"
    ).is_dir()
    log = settings.logs / "packages.log"

    def timed(command: Command, cache: Cache) -> Measurement:
        runs = min(settings.runs_for(cache), PACKAGE_RUNS)
        return measure(command, cache=cache, runs=runs, files=files, size_bytes=size_bytes, log=log)

    caches: list[Cache] = ["warm"]
    if settings.cold_runs and settings.cold_refusal is None:
        caches.append("cold")
    tables = []
    for cache in caches:
        theirs = timed(debsums, cache)
        rows = [Row(theirs)]
        if available:
            rows.insert(0, Row(timed(ours, cache), theirs))
        tables.append(Table(f"{cache.capitalize()} cache — installed packages", tuple(rows)))

    notes = [
        f"{files:,} package-owned files holding {size_bytes / 1e9:.2f} GB, from "
        f"{DPKG_INFO}/*.md5sums. Exit 2 from either means it found files that differ from "
        "the vendor's (expected on a machine that has been used).",
        f"At most {PACKAGE_RUNS} measured run per cache state (after the warm-up run): "
        "debsums alone takes minutes here.",
    ]
    if not available:
        notes.append("driftwarden's agent/packages.py is not in this checkout: not measured.")
    if len(caches) == 1:
        notes.append(f"Cold cache not measured: {settings.cold_refusal or '--cold-runs 0'}.")
    return [
        Section(
            title="Packages: verify_package_files vs debsums -s",
            intro=INTRO,
            tables=tuple(tables),
            verdicts=(),
            notes=tuple(notes),
        )
    ]


def _packaged_files(root: Path) -> tuple[int, int]:
    """How many files the md5sums lists name, and the bytes of those that exist."""
    files = size_bytes = 0
    for listing in sorted((root / DPKG_INFO.relative_to("/")).glob("*.md5sums")):
        for line in listing.read_bytes().splitlines():
            _, _, name = line.partition(b"  ")
            if not name:
                continue
            files += 1
            try:
                size_bytes += os.lstat(root / os.fsdecode(name)).st_size
            except OSError:
                continue  # a missing file is what debsums reports, not an error here
    return files, size_bytes
