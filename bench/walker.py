"""The plainest Python sha256 walker, two hashing threads: what Python alone reaches here.

A reference row, not a competitor: it records nothing but each file's digest. Issue 2 quotes
it (about 735 MB/s warm on the issue's machine) beside AIDE.

``python3 bench/walker.py ROOT [--threads N]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor


def regular_files(root: str) -> Iterator[str]:
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as it:
            for entry in it:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    pending.append(entry.path)
                elif stat.S_ISREG(mode):
                    yield entry.path


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with ThreadPoolExecutor(args.threads) as pool:
        count = sum(1 for _ in pool.map(digest, regular_files(args.root)))
    print(f"{count} files hashed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
