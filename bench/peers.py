"""The tools driftwarden is measured against, and the limits of the machine itself.

- **AIDE** (Debian's ``aide``): a configuration per tree with one sha256 rule over it that
  records what driftwarden records (permissions, type, inode, links, owner, size, link target,
  mtime, ctime, ACLs, xattrs, SELinux, capabilities), its database under the work directory.
  AIDE runs with its default of one hashing worker; a second row with ``num_workers=2`` shows
  what the same machine gives it with both cores.
- **sha256sum** over ``find -print0 | xargs -0 -P2``: the simple limit for hashing every file,
  and ``bench/walker.py``, the plainest two-thread Python sha256 walker.
- **debsums -s**: verify every installed package's files against the dpkg md5sums.
- **disk limits**: ``cat`` of every file (two readers, as the tools use two cores; cold, also
  sixteen, which keeps the disk as busy as it gets), ``dd`` of the files over 1 MiB (sequential
  bandwidth), and a bare ``find -printf`` stat walk.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Final

from bench.measure import Command, shell

AIDE_RULE: Final = "p+ftype+i+n+u+g+s+l+m+c+acl+xattrs+selinux+caps+sha256"
XARGS_BATCH: Final = 200  # arguments per command, so both workers of -P2 stay busy


class Aide:
    """One AIDE configuration over ``root``: ``init`` writes the database ``check`` reads."""

    def __init__(self, root: Path, workdir: Path, name: str, *, workers: int = 1) -> None:
        self.root = root
        self.config = workdir / f"aide-{name}.conf"
        self.database = workdir / f"aide-{name}.db"
        self.new_database = workdir / f"aide-{name}.db.new"
        self.workers = workers
        self.config.write_text(
            "# written by bench/peers.py\n"
            f"database_in=file:{self.database}\n"
            f"database_out=file:{self.new_database}\n"
            "gzip_dbout=no\n"
            "database_attrs=sha256\n"
            f"num_workers={workers}\n"
            "report_url=stdout\n"
            f"Bench = {AIDE_RULE}\n"
            f"{_aide_regex(root)} Bench\n"
        )

    def init(self) -> Command:
        label = "aide --init" if self.workers == 1 else f"aide --init (num_workers={self.workers})"
        return Command(label, ("aide", "--init", f"--config={self.config}"))

    def check(self) -> Command:
        return Command(
            "aide --check",
            ("aide", "--check", f"--config={self.config}"),
            before=self.adopt,
        )

    def adopt(self) -> None:
        """Make the database the last ``--init`` wrote the one ``--check`` compares with."""
        if self.new_database.exists():
            self.new_database.replace(self.database)


def sha256sum(root: Path) -> Command:
    return Command(
        "sha256sum (xargs -P2)",
        shell(
            f'find "$1" -type f -print0 | xargs -0 -P2 -n {XARGS_BATCH} sha256sum >/dev/null',
            root,
        ),
    )


def python_walker(root: Path) -> Command:
    walker = Path(__file__).resolve().parent / "walker.py"
    return Command("python sha256 walker (2 threads)", (sys.executable, str(walker), str(root)))


def read_all(root: Path, *, readers: int = 2) -> Command:
    """``cat`` of every file, ``readers`` at a time: two is what the targets compare with (the
    tools have two cores); many keep as many reads in flight as the disk takes."""
    batch = XARGS_BATCH if readers <= 2 else XARGS_BATCH // 4
    return Command(
        f"disk: cat every file (xargs -P{readers})",
        shell(f'find "$1" -type f -print0 | xargs -0 -P{readers} -n {batch} cat >/dev/null', root),
    )


def read_big(files: list[Path]) -> Command:
    return Command(
        "disk: dd the files over 1 MiB",
        shell(
            'for f in "$@"; do dd if="$f" of=/dev/null bs=1M status=none || exit 1; done', *files
        ),
    )


def stat_walk(root: Path) -> Command:
    return Command(
        "stat walk (find -printf)", shell('find "$1" -printf "%s %T@\\n" >/dev/null', root)
    )


def debsums() -> Command:
    # 2 means changed or missing package files: a finding, not a failure of the tool.
    return Command("debsums -s", ("debsums", "-s"), ok_exit=frozenset({0, 2}))


def _aide_regex(root: Path) -> str:
    """AIDE selection lines are regular expressions anchored at the start."""
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", str(root))
