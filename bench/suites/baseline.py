"""Issue 2: ``bake``, ``check`` and ``check --full`` against AIDE, sha256sum and the disk.

On the seeded bench tree and (unless skipped) a ``cp -a`` copy of this machine's ``/usr``:
warm cache (a warm-up run, then the median of ``runs``) and cold cache (caches dropped before
each of ``cold_runs``), each with the limits of the machine beside them.

Targets (warm cache, this machine): bake ≥ 5x the throughput of ``aide --init`` with a peak RSS
no higher than AIDE's; ``check`` ≥ 40x and ``check --full`` ≥ 10x faster than ``aide --check``;
cold cache: within 10 % of what the disk delivers (``cat`` of every file, cold).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench import peers
from bench.driftwarden import POLICY, Agent
from bench.measure import Cache, Command, Measurement, measure
from bench.profile import profile_section
from bench.report import Row, Section, Table, Verdict
from bench.settings import Settings
from bench.subject import Subject, bench_tree, usr_copy
from bench.targets import faster, leaner, not_measured, within

DISK_TOLERANCE = 0.10
DISK_READERS = 16  # cold, the disk's own limit: enough reads in flight to keep it busy


def run(settings: Settings) -> list[Section]:
    agent = settings.agent
    agent.keygen()
    tree = bench_tree(settings.workdir, settings.shape, settings.seed)
    sections = [_section(tree, "tree", agent, settings)]
    if settings.profile:
        sections.append(profile_section(agent, tree.root, "tree", settings.logs))
    if settings.usr_copy:
        sections.append(_section(usr_copy(settings.workdir), "usr", agent, settings))
    return sections


def _section(subject: Subject, slug: str, agent: Agent, settings: Settings) -> Section:
    log = settings.logs / f"baseline-{slug}.log"
    root = subject.root
    aide = peers.Aide(root, settings.workdir, slug)
    aide_two = peers.Aide(root, settings.workdir, f"{slug}-2", workers=2)
    bake = agent.bake(root, slug)
    check = agent.check(root, slug, full=False)
    full = agent.check(root, slug, full=True)

    def timed(command: Command, cache: Cache, *, files: int = -1, size: int = -1) -> Measurement:
        return measure(
            command,
            cache=cache,
            runs=settings.runs_for(cache),
            files=subject.files if files < 0 else files,
            size_bytes=subject.size_bytes if size < 0 else size,
            log=log,
        )

    warm = _by_label(
        [timed(c, "warm") for c in (bake, check, full, aide.init(), aide_two.init(), aide.check())]
        + [timed(peers.sha256sum(root), "warm"), timed(peers.python_walker(root), "warm")]
        + [timed(peers.read_all(root), "warm")]
        + [timed(peers.stat_walk(root), "warm", size=0)]
    )
    cold: dict[str, Measurement] = {}
    if settings.cold_runs and settings.cold_refusal is None:
        big = list(subject.big_files)
        cold = _by_label(
            [timed(c, "cold") for c in (bake, check, full, aide.init(), aide.check())]
            + [timed(peers.sha256sum(root), "cold"), timed(peers.read_all(root), "cold")]
            + [timed(peers.read_all(root, readers=DISK_READERS), "cold")]
            + [timed(peers.stat_walk(root), "cold", size=0)]
            + [timed(peers.read_big(big), "cold", files=len(big), size=_total_size(big))]
        )

    tables = [Table(f"Warm cache — {subject.name}", _rows(warm))]
    if cold:
        tables.append(Table(f"Cold cache — {subject.name}", _rows(cold)))
    notes = [
        f"Tree: {subject.summary}; {subject.detail}.",
        f"driftwarden: `bake --policy {POLICY.relative_to(settings.repo)}` signed with a "
        "pipeline key; `check` verifies the signature; manifests and AIDE databases live in the "
        "work directory, on the same disk as the tree.",
        f"AIDE rule: `{peers.AIDE_RULE}`; default `num_workers=1` unless the row says otherwise.",
    ]
    if cold:
        notes.append(DISK_NOTE)
    else:
        notes.append(_cold_skipped(settings))
    return Section(
        title=f"Baseline: bake and check — {subject.name}",
        intro=f"Issue 2 targets on {subject.summary}.",
        tables=tuple(tables),
        verdicts=tuple(_verdicts(warm, cold, settings)),
        notes=tuple(notes),
    )


DISK_NOTE = (
    "The disk's limit, cold: `cat` with two readers keeps two reads in flight, so it waits "
    f"for each file in turn; with {DISK_READERS} readers the disk has as many requests as it "
    "can take, the nearest to what it can deliver for these files; `dd` of the files over "
    "1 MiB is its sequential bandwidth, one file at a time. Cold, every tool also pays in CPU "
    "for each page read (the sys time: on a virtual disk, a large part of the cost). "
    "driftwarden's workers keep up to 32 files each announced ahead of the one they hash "
    "(`POSIX_FADV_WILLNEED`), so they can be faster than `cat` with two readers. The targets "
    "compare with two readers, as the issue sets them."
)


def _rows(found: dict[str, Measurement]) -> tuple[Row, ...]:
    versus = {
        "driftwarden bake": "aide --init",
        "aide --init (num_workers=2)": "aide --init",
        "sha256sum (xargs -P2)": "aide --init",
        "python sha256 walker (2 threads)": "aide --init",
        "driftwarden check": "aide --check",
        "driftwarden check --full": "aide --check",
    }
    return tuple(Row(m, found.get(versus.get(label, ""))) for label, m in found.items())


def _verdicts(
    warm: dict[str, Measurement], cold: dict[str, Measurement], settings: Settings
) -> list[Verdict]:
    get = warm.get
    verdicts = [
        faster("bake ≥ 5x aide --init throughput (warm)", get("driftwarden bake"),
               get("aide --init"), at_least=5),
        leaner("bake peak RSS ≤ aide --init's (warm)", get("driftwarden bake"),
               get("aide --init")),
        faster("check, nothing changed, ≥ 40x faster than aide --check (warm)",
               get("driftwarden check"), get("aide --check"), at_least=40),
        faster("check --full ≥ 10x faster than aide --check (warm)",
               get("driftwarden check --full"), get("aide --check"), at_least=10),
    ]  # fmt: skip
    disk_targets = (
        ("cold bake within 10 % of the disk (cat of every file, cold)", "driftwarden bake"),
        ("cold check --full within 10 % of the disk", "driftwarden check --full"),
    )
    for target, label in disk_targets:
        if cold:
            disk = cold.get("disk: cat every file (xargs -P2)")
            verdicts.append(within(target, cold.get(label), disk, tolerance=DISK_TOLERANCE))
        else:
            verdicts.append(not_measured(target, _cold_skipped(settings)))
    return verdicts


def _cold_skipped(settings: Settings) -> str:
    if settings.cold_refusal is not None:
        return f"Cold cache not measured: {settings.cold_refusal}."
    return "Cold cache not measured: --cold-runs 0."


def _by_label(measurements: Sequence[Measurement]) -> dict[str, Measurement]:
    return {m.label: m for m in measurements}


def _total_size(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths)
