"""The one benchmark command: generate the tree, run the suites, write the report.

``python3 bench/run.py`` measures, on a 50,000-file 1.5 GB tree and a copy of ``/usr``,
driftwarden against AIDE, sha256sum, debsums and the disk, warm and cold, and writes
``docs/performance.md``. ``--quick`` shrinks the tree tenfold, runs everything once, skips the
``/usr`` copy and writes ``bench/out/performance.md`` instead, for trying the harness out.
Logs of every command go to ``bench/out/logs/``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from bench.driftwarden import Agent, packaged_venv
from bench.machine import ensure_tools, facts, load
from bench.measure import BenchError, cold_cache_refusal
from bench.report import render
from bench.settings import Settings
from bench.suites import chosen
from bench.treegen import Shape

REPO: Final = Path(__file__).resolve().parents[1]
OUT: Final = REPO / "bench" / "out"
HOW: Final = """\
Every command is spawned directly and reaped with `os.wait4`: wall time is measured around
spawn and reap, CPU time and peak RSS (`ru_maxrss`, the largest single process of a
pipeline) come from its rusage. **Warm**: one warm-up run, then the median of the measured
runs. **Cold**: `sync; echo 3 > /proc/sys/vm/drop_caches` before every measured run. MB/s is
the tree's bytes (each inode once) over the wall time; files/s its regular-file names over
the wall time; "speed vs" is the reference's wall time over this row's. The disk's limits
are `cat` of every file with two readers (the tools have two cores; what the targets compare
with) and, cold, with sixteen (as many reads in flight as the disk takes), and `dd` of the
files over 1 MiB. driftwarden is this checkout installed as its Debian package installs it
(a virtual environment on `/usr/bin/python3`, which the harness makes in the work directory),
run as `driftwarden-agent`, `--workers 0` (one per core); with `--python` it runs from the
checkout instead. The table above names the interpreter."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--files", type=int, help="regular files in the tree (default 50,000)")
    parser.add_argument("--bytes", type=int, dest="size_bytes", help="bytes (default 1.5 GB)")
    parser.add_argument("--scale", type=float, help="multiply files and bytes (--quick: 0.1)")
    parser.add_argument("--seed", type=int, default=1, help="tree generator seed (default 1)")
    parser.add_argument("--quick", action="store_true", help="small tree, one run, no /usr")
    parser.add_argument("--runs", type=int, help="measured warm runs (default 3)")
    parser.add_argument("--cold-runs", type=int, help="measured cold runs (default 1; 0: none)")
    parser.add_argument("--no-usr", action="store_true", help="skip the copy of /usr")
    parser.add_argument("--profile", action="store_true", help="py-spy profile of bake/check")
    parser.add_argument(
        "--suite", action="append", default=[], help="run only this suite (repeatable)"
    )
    parser.add_argument("--workdir", type=Path, help="keep trees here between runs")
    parser.add_argument("--out", type=Path, help="report file (default docs/performance.md)")
    parser.add_argument(
        "--python",
        help="run driftwarden from the checkout on this interpreter ('current': the harness's);"
        " by default it is installed as its Debian package installs it, on /usr/bin/python3",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command_line = shlex.join(
        ["python3", "bench/run.py", *(sys.argv[1:] if argv is None else argv)]
    )
    quick = args.quick
    shape = Shape(
        files=args.files or Shape.files, size_bytes=args.size_bytes or Shape.size_bytes
    ).scaled(args.scale or (0.1 if quick else 1.0))
    out = args.out or (OUT / "performance.md" if quick else REPO / "docs" / "performance.md")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="driftwarden-bench-", dir="/var/tmp"))
    logs = OUT / "logs"
    load_at_start = load()
    try:
        suites = chosen(args.suite)
        installed = ensure_tools()
        if installed:
            print(f"installed {', '.join(installed)} with apt-get", file=sys.stderr)
        if logs.exists():
            shutil.rmtree(logs)
        logs.mkdir(parents=True)
        workdir.mkdir(parents=True, exist_ok=True)
        agent = _agent(args.python, workdir)
        agent.compile()
        settings = Settings(
            repo=REPO,
            workdir=workdir,
            agent=agent,
            logs=logs,
            shape=shape,
            seed=args.seed,
            runs=args.runs if args.runs is not None else (1 if quick else 3),
            cold_runs=args.cold_runs if args.cold_runs is not None else 1,
            usr_copy=not (quick or args.no_usr),
            profile=args.profile,
            cold_refusal=cold_cache_refusal(),
        )
        sections = [section for _, suite in suites for section in suite(settings)]
        text = render(
            sections,
            facts=facts(workdir, agent.version(), agent.interpreter(), load_at_start=load_at_start),
            command_line=command_line,
            how=HOW,
        )
    except (BenchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + kept_sections(out))
    print(text)
    print(f"wrote {out}; logs in {logs}", file=sys.stderr)
    return 0


def _agent(python: str | None, workdir: Path) -> Agent:
    if python in (None, "packaged"):
        return Agent(REPO, workdir, venv=packaged_venv(REPO, workdir))
    return Agent(REPO, workdir, python=None if python == "current" else Path(str(python)))


_SECTION = re.compile(r"^<!-- (\w+):begin -->$.*?^<!-- \1:end -->$", re.MULTILINE | re.DOTALL)


def kept_sections(report: Path) -> str:
    """The sections other benchmarks own in an existing report (between ``<!-- NAME:begin -->``
    and ``<!-- NAME:end -->``), to be carried over when this harness rewrites the file."""
    try:
        old = report.read_text()
    except FileNotFoundError:
        return ""
    return "".join("\n" + m.group(0) + "\n" for m in _SECTION.finditer(old))
