"""A reproducible, /usr-like file tree to benchmark against: same seed, same tree.

The default tree has 50,000 regular files holding 1.5 GB, shaped like a Debian ``/usr``:

- sizes: a log-normal body with a median of 2 KiB (about 1 % empty files), and a heavy tail in
  which 0.3 % of the files are over 1 MiB and hold about 70 % of the bytes;
- directories: a random recursive tree (depth up to 10, about 8 files per directory on
  average) whose directories get files with a Pareto skew, so a few hold thousands of files
  (``/usr/lib/x86_64-linux-gnu``) and most a handful;
- links: symlinks (relative, absolute inside the image, a few dangling) and extra hardlinks to
  files in other directories, which add names but no bytes;
- metadata: modes 0644/0755 and fixed mtimes drawn from the seed.

Everything is drawn from ``random.Random(seed)``; file content is sliced from a seeded 16 MiB
pool behind a per-file header, so every file has its own digest and generation runs at disk
speed. ``size_bytes`` counts each inode once (hardlinks are free), and is met exactly.

``python3 bench/treegen.py DIR [--seed N] [--files N] [--bytes B] [--scale F]``
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal

MIB: Final = 1 << 20
POOL_BYTES: Final = 16 * MIB
EPOCH_S: Final = 1_704_067_200  # 2024-01-01T00:00:00Z: mtimes are drawn from the year after
_SYLLABLES: Final = (
    "lib", "gnu", "x86", "core", "net", "util", "py", "gtk", "sys", "ssl", "xml", "dbus",
    "perl", "font", "mod", "auth", "cfg", "io", "zlib", "log", "kit", "std", "gl", "cache",
)  # fmt: skip
_EXTENSIONS: Final = (
    "", "", "", ".so", ".so.1", ".py", ".pyc", ".h", ".gz", ".txt", ".pm", ".conf", ".json",
    ".mo", ".png", ".svg", ".html", ".a", ".pc", ".sh",
)  # fmt: skip

EntryKind = Literal["file", "hardlink", "symlink"]


@dataclass(frozen=True)
class Shape:
    """What the tree looks like; ``scaled`` shrinks or grows it keeping the proportions."""

    files: int = 50_000
    size_bytes: int = 1_500_000_000
    median_bytes: int = 2048
    big_fraction: float = 0.003
    big_share: float = 0.70
    big_threshold_bytes: int = MIB
    empty_fraction: float = 0.01
    symlink_fraction: float = 0.05
    hardlink_fraction: float = 0.01
    files_per_dir: float = 8.0
    max_depth: int = 10

    def scaled(self, scale: float) -> Shape:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, not {scale}")
        return replace(
            self,
            files=max(1, round(self.files * scale)),
            size_bytes=max(0, round(self.size_bytes * scale)),
        )

    @property
    def big_files(self) -> int:
        if self.big_share <= 0:
            return 0
        return max(1, round(self.files * self.big_fraction))


@dataclass(frozen=True)
class Entry:
    """One name in the tree: ``path`` is relative with ``/`` separators.

    ``target`` is the symlink's target, or for a hardlink the path of the file it names again.
    """

    path: str
    kind: EntryKind
    size_bytes: int = 0
    mode: int = 0o644
    mtime_s: int = EPOCH_S
    target: str = ""


@dataclass(frozen=True)
class Plan:
    seed: int
    shape: Shape
    dirs: tuple[str, ...]
    entries: tuple[Entry, ...]

    @property
    def files(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.kind == "file")

    @property
    def size_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries if e.kind == "file")


def plan(shape: Shape, seed: int) -> Plan:
    """Decide every directory, name, size, mode and link of the tree, without touching disk."""
    rng = random.Random(seed)
    sizes = _sizes(shape, rng)
    taken: set[str] = set()
    dirs = _directories(shape, rng, taken)
    weights = [rng.paretovariate(1.1) for _ in dirs]
    homes = rng.choices(range(len(dirs)), weights=weights, k=len(sizes))
    files: list[Entry] = []
    for size, home in zip(sizes, homes, strict=True):
        path = _unique(taken, dirs[home], _name(rng, file=True))
        mode = 0o755 if rng.random() < 0.12 else 0o644
        files.append(Entry(path, "file", size, mode, _mtime(rng)))
    links: list[Entry] = []
    for _ in range(round(shape.files * shape.hardlink_fraction)):
        source = rng.choice(files).path
        home = rng.randrange(len(dirs))
        path = _unique(taken, dirs[home], _name(rng, file=True))
        links.append(Entry(path, "hardlink", target=source))
    for _ in range(round(shape.files * shape.symlink_fraction)):
        home = rng.randrange(len(dirs))
        path = _unique(taken, dirs[home], _name(rng, file=True))
        target = _link_target(rng, path, files)
        links.append(Entry(path, "symlink", mtime_s=_mtime(rng), target=target))
    return Plan(seed, shape, tuple(dirs), tuple(files + links))


def generate(root: Path, shape: Shape, seed: int) -> Plan:
    """Write the planned tree under ``root`` (which must not exist or be empty)."""
    tree = plan(shape, seed)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root}: not empty; the tree is generated into an empty directory")
    for directory in tree.dirs[1:]:
        (root / directory).mkdir()
    pool = _pool(seed)
    rng = random.Random(seed ^ 0x5EED)
    for index, entry in enumerate(tree.entries):
        path = root / entry.path
        if entry.kind == "file":
            _write(path, index, entry.size_bytes, pool, rng.randrange(POOL_BYTES))
            path.chmod(entry.mode)
            os.utime(path, (entry.mtime_s, entry.mtime_s))
        elif entry.kind == "hardlink":
            os.link(root / entry.target, path)
        else:
            path.symlink_to(entry.target)
            os.utime(path, (entry.mtime_s, entry.mtime_s), follow_symlinks=False)
    for directory in reversed(tree.dirs):
        os.utime(root / directory, (EPOCH_S, EPOCH_S))
    return tree


def _sizes(shape: Shape, rng: random.Random) -> list[int]:
    """File sizes in plan order: big files first, then the log-normal body (with empties)."""
    n_big = shape.big_files
    big_total = round(shape.size_bytes * shape.big_share) if n_big else 0
    if big_total < n_big * shape.big_threshold_bytes:
        raise ValueError(
            f"{shape.size_bytes} bytes over {shape.files} files is too small for {n_big} "
            f"file(s) over {shape.big_threshold_bytes} bytes; raise --bytes or lower --files"
        )
    n_small = shape.files - n_big
    n_empty = min(n_small, round(n_small * shape.empty_fraction))
    body = _lognormal_body(
        n_small - n_empty,
        total=shape.size_bytes - big_total,
        median=shape.median_bytes,
        ceiling=shape.big_threshold_bytes,
        rng=rng,
    )
    if n_big:
        weights = [math.exp(rng.gauss(0.0, 1.0)) for _ in range(n_big)]
        spare = big_total - n_big * shape.big_threshold_bytes
        big = [shape.big_threshold_bytes + int(spare * w / sum(weights)) for w in weights]
        big[big.index(max(big))] += shape.size_bytes - sum(big) - sum(body)
    else:
        big = []
        if body:
            body[body.index(max(body))] += shape.size_bytes - sum(body)
    sizes = big + body + [0] * n_empty
    rng.shuffle(sizes)
    return sizes


def _lognormal_body(
    count: int, *, total: int, median: int, ceiling: int, rng: random.Random
) -> list[int]:
    """``count`` sizes in [1, ceiling) around ``median`` whose sum is close to ``total``.

    The spread (sigma) is found by bisection over the same normal draws, so the median stays
    put while the mean is fitted to the bytes the body must hold.
    """
    if count == 0:
        return []
    draws = [rng.gauss(0.0, 1.0) for _ in range(count)]

    def sized(sigma: float) -> list[int]:
        return [min(ceiling - 1, max(1, round(median * math.exp(sigma * z)))) for z in draws]

    low, high = 0.0, 6.0
    if sum(sized(low)) >= total:
        scale = total / (median * count)
        return [max(1, round(median * scale)) for _ in draws]
    for _ in range(40):
        middle = (low + high) / 2
        if sum(sized(middle)) < total:
            low = middle
        else:
            high = middle
    return sized(low)


def _directories(shape: Shape, rng: random.Random, taken: set[str]) -> list[str]:
    """A random recursive tree: each new directory hangs under a random shallower one."""
    count = max(1, round(shape.files / shape.files_per_dir))
    dirs, depth = [""], [0]
    for _ in range(count - 1):
        while True:
            parent = rng.randrange(len(dirs))
            if depth[parent] < shape.max_depth:
                break
        dirs.append(_unique(taken, dirs[parent], _name(rng, file=False)))
        depth.append(depth[parent] + 1)
    return dirs


def _name(rng: random.Random, *, file: bool) -> str:
    stem = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
    if rng.random() < 0.3:
        stem += f"-{rng.randint(0, 99)}"
    return stem + (rng.choice(_EXTENSIONS) if file else "")


def _unique(taken: set[str], directory: str, name: str) -> str:
    path = f"{directory}/{name}" if directory else name
    suffix = 1
    candidate = path
    while candidate in taken:
        suffix += 1
        candidate = f"{path}.{suffix}"
    taken.add(candidate)
    return candidate


def _mtime(rng: random.Random) -> int:
    return EPOCH_S + rng.randrange(365 * 86_400)


def _link_target(rng: random.Random, path: str, files: Sequence[Entry]) -> str:
    roll = rng.random()
    if roll < 0.05:
        return "missing-" + _name(rng, file=True)  # dangling, as left behind by removals
    target = rng.choice(files).path
    if roll < 0.15:
        return "/" + target  # absolute inside the image
    return os.path.relpath(target, os.path.dirname(path) or ".")


def _pool(seed: int) -> bytes:
    rng = random.Random(seed ^ 0xC0FFEE)
    return b"".join(rng.randbytes(MIB) for _ in range(POOL_BYTES // MIB))


def _write(path: Path, index: int, size_bytes: int, pool: bytes, offset: int) -> None:
    header = f"driftwarden bench file {index}\n".encode()[:size_bytes]
    view = memoryview(pool)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, header)
        left = size_bytes - len(header)
        while left > 0:
            chunk = view[offset : offset + min(left, POOL_BYTES - offset)]
            written = os.write(fd, chunk)
            left -= written
            offset = (offset + written) % POOL_BYTES
    finally:
        os.close(fd)


def describe(tree: Plan) -> str:
    files = tree.files
    sizes = sorted(e.size_bytes for e in files)
    big = [s for s in sizes if s > tree.shape.big_threshold_bytes]
    kinds = {k: sum(1 for e in tree.entries if e.kind == k) for k in ("hardlink", "symlink")}
    return (
        f"{len(files)} files, {tree.size_bytes} bytes, {len(tree.dirs)} directories, "
        f"{kinds['symlink']} symlinks, {kinds['hardlink']} extra hardlinks; median "
        f"{statistics.median(sizes):.0f} B; {len(big)} files over 1 MiB hold "
        f"{sum(big) / max(1, tree.size_bytes):.1%} of the bytes"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory to create the tree in (empty)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--files", type=int, default=Shape.files)
    parser.add_argument("--bytes", type=int, default=Shape.size_bytes, dest="size_bytes")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply files and bytes")
    args = parser.parse_args(argv)
    shape = Shape(files=args.files, size_bytes=args.size_bytes).scaled(args.scale)
    try:
        tree = generate(args.root, shape, args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.root}: {describe(tree)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
