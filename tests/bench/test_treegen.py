"""The benchmark tree is reproducible from its seed and has the /usr-like shape it promises."""

from __future__ import annotations

import hashlib
import os
import statistics
from pathlib import Path

import pytest

from bench.treegen import MIB, Shape, describe, generate, main, plan

SMALL = Shape().scaled(0.02)  # 1,000 files, 30 MB


def _survey(root: Path) -> tuple[list[tuple[str, str, int]], str]:
    """Every name with its kind and size, and one digest over names, links and contents."""
    listing: list[tuple[str, str, int]] = []
    digest = hashlib.sha256()
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if (Path(directory) / d).is_symlink()]):
            path = Path(directory) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if path.is_symlink():
                target = os.readlink(path)
                listing.append((rel, "symlink", len(target)))
                digest.update(f"{rel}\0->{target}\0".encode())
            else:
                listing.append((rel, "file", st.st_size))
                digest.update(f"{rel}\0{st.st_mode:o}\0{st.st_mtime_ns}\0".encode())
                digest.update(path.read_bytes())
    return listing, digest.hexdigest()


def test_same_seed_same_tree(tmp_path: Path) -> None:
    generate(tmp_path / "a", SMALL, seed=7)
    generate(tmp_path / "b", SMALL, seed=7)
    listing_a, digest_a = _survey(tmp_path / "a")
    listing_b, digest_b = _survey(tmp_path / "b")
    assert listing_a == listing_b
    assert digest_a == digest_b
    assert plan(SMALL, 7) == plan(SMALL, 7)


def test_another_seed_another_tree(tmp_path: Path) -> None:
    generate(tmp_path / "a", SMALL, seed=7)
    generate(tmp_path / "b", SMALL, seed=8)
    assert _survey(tmp_path / "a")[1] != _survey(tmp_path / "b")[1]


def test_tree_matches_the_requested_distribution(tmp_path: Path) -> None:
    shape = Shape().scaled(0.06)  # 3,000 files, 90 MB: enough files for the tail to count
    tree = generate(tmp_path / "t", shape, seed=3)
    listing, _ = _survey(tmp_path / "t")

    inodes: dict[tuple[int, int], int] = {}
    for rel, kind, _size in listing:
        if kind == "file":
            st = (tmp_path / "t" / rel).lstat()
            inodes[(st.st_dev, st.st_ino)] = st.st_size
    sizes = sorted(inodes.values())
    assert len(sizes) == shape.files == 3000
    assert sum(sizes) == shape.size_bytes  # exact, each inode counted once
    assert 1536 <= statistics.median(sizes) <= 3072
    big = [s for s in sizes if s > MIB]
    assert len(big) == round(shape.files * 0.003) == 9
    assert 0.65 <= sum(big) / sum(sizes) <= 0.75
    assert sizes.count(0) > 0

    names = [rel for rel, kind, _ in listing if kind == "file"]
    assert len(names) - len(sizes) == round(shape.files * shape.hardlink_fraction)
    symlinks = [rel for rel, kind, _ in listing if kind == "symlink"]
    assert len(symlinks) == round(shape.files * shape.symlink_fraction)
    dangling = [s for s in symlinks if not (tmp_path / "t" / s).exists()]
    assert 0 < len(dangling) < len(symlinks)

    depths = [d.count("/") + 1 for d in tree.dirs[1:]]
    assert max(depths) <= shape.max_depth
    assert statistics.median(depths) >= 4
    per_dir = statistics.mean(
        sum(1 for _ in (tmp_path / "t" / d).iterdir()) for d in (*tree.dirs[1:], "")
    )
    assert 4 <= per_dir <= 16
    assert "9 files over 1 MiB" in describe(tree)


def test_too_few_bytes_for_the_tail_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        plan(Shape(files=1000, size_bytes=1_000_000), seed=1)
    assert main([str(tmp_path / "t"), "--files", "1000", "--bytes", "1000000"]) == 2


def test_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("precious")
    with pytest.raises(FileExistsError):
        generate(tmp_path, SMALL, seed=1)
    assert (tmp_path / "keep").read_text() == "precious"
