"""The manifest: record encoding, Merkle tree, determinism, and refusing what was altered."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import keys, record
from agent import manifest as manifest_module
from agent.errors import ManifestError, UntrustedError
from agent.manifest import Baseline, load_baseline, read_head
from agent.measure import Entry
from agent.wire import key_id, read_statement, sign_statement
from tests.agent.imagetree import at, bake, build, make_key, write_policy

WEIRD = Entry(
    path="/etc/b64:odd\udcff\nname",
    type="file",
    mode=0o4755,
    uid=0,
    gid=7,
    size=12,
    digest="ab" * 32,
    target=None,
    hardlink="/etc/\udcfeother",
    xattrs=(("security.capability", b"\x01\x00\x00\x02"), ("user.\udcff", b"")),
    rdev=0,
    mtime_ns=-5,
    ctime_ns=1_700_000_000_000_000_001,
    ino=42,
    nlink=2,
    state="ok",
)


@pytest.mark.parametrize(
    "entry",
    [
        WEIRD,
        Entry("/", "dir", 0o1777, 0, 0, 0, None, None, None, (), 0, 1, 2, 3, 0),
        Entry("/l", "symlink", 0o777, 0, 0, 4, None, "b64:x", None, (), 0, 1, 2, 3, 1),
        Entry("/d", "chardev", 0o600, 0, 6, 0, None, None, None, (), 1285, 1, 2, 3, 1),
        Entry("/u", "file", 0o600, 0, 0, 9, None, None, None, (), 0, 1, 2, 3, 1, "unstable"),
    ],
    ids=["weird-file", "dir", "symlink", "device", "unstable"],
)
def test_record_round_trips(entry: Entry) -> None:
    line = record.to_line(entry)
    assert "\n" not in line
    assert record.from_line(line) == entry
    assert record.line_path(line) == entry.path
    assert record.from_json(json.loads(line)) == entry


@pytest.mark.parametrize(
    "broken",
    [
        '{"p":"/x","t":"f","m":"644","zz":1,"z":[1,2,3]}',
        '{"p":"/x","t":"q","m":"644","z":[1,2,3]}',
        '{"p":"/x","t":"f","m":"644","h":"xyz","z":[1,2,3]}',
        '{"p":"/x","t":"f","m":"644","u":-1,"z":[1,2,3]}',
        '{"p":"/x","t":"f","m":"644","z":[1,2]}',
        '{"p":"/x","t":"f","m":"644","st":"odd","z":[1,2,3]}',
        '["not an object"]',
    ],
)
def test_malformed_records_are_refused(broken: str) -> None:
    with pytest.raises(ManifestError):
        record.from_line(broken)


@pytest.fixture
def baked(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = build(tmp_path / "root")
    key = make_key(tmp_path)
    out = tmp_path / "m.gz"
    bake(root, write_policy(tmp_path), out, key=key)
    return root, out, key


def _load(out: Path, key: Path) -> Baseline:
    return load_baseline(out, public_key=keys.load_public(keys.public_path(key)))


def test_baseline_loads_every_entry_in_order(baked: tuple[Path, Path, Path]) -> None:
    _root, out, key = baked
    base = _load(out, key)
    paths = list(base.paths())
    assert paths[:3] == ["/", "/etc", "/etc/machine-id"]
    assert len(base) == base.statement["entries"] == len(paths)
    assert [e.path for e in base] == paths
    assert base.get("/usr/lib/libx.so") is not None
    assert base.get("/usr/lib/libx.so").target == "libx.so.1"  # type: ignore[union-attr]
    assert base.get("/nope") is None and "/etc/shadow" in base
    assert base.policy.name == "test-image"
    assert base.statement["key_id"] == key_id(keys.public_raw(keys.load_private(key).public_key()))
    assert read_head(out).statement == base.statement
    assert read_statement(out) == base.statement  # the wire module reads the same first line


def test_baking_twice_gives_the_same_bytes_but_the_time(baked: tuple[Path, Path, Path]) -> None:
    root, out, key = baked
    again = out.with_name("again.gz")
    bake(root, write_policy(out.parent), again, key=key)
    first, second = (gzip.decompress(p.read_bytes()).split(b"\n") for p in (out, again))
    assert first[1:] == second[1:]
    one, two = json.loads(first[0]), json.loads(second[0])
    assert {k for k in one if one[k] != two[k]} <= {"created", "sig"}
    raw = again.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip header mtime 0


def test_merkle_root_ignores_hints_and_subtrees_point_at_changes(
    baked: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, out, key = baked
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(root), str(copy)], check=True)  # new inodes and ctimes
    copied = tmp_path / "copy.gz"
    bake(copy, write_policy(tmp_path), copied, key=key)
    base, other = _load(out, key), _load(copied, key)
    assert base.statement["root"] == other.statement["root"]
    assert base.statement["hints_digest"] != other.statement["hints_digest"]

    at(copy, "/usr/share/doc/readme").write_text("changed\n")
    bake(copy, write_policy(tmp_path), copied, key=key)
    changed = _load(copied, key)
    assert changed.statement["root"] != base.statement["root"]
    differ = [p for p in base.paths() if base.subtree_digest(p) != changed.subtree_digest(p)]
    assert differ == ["/", "/usr", "/usr/share", "/usr/share/doc"]  # descend to the change


def _rewrite(out: Path, edit: object) -> None:
    lines = gzip.decompress(out.read_bytes()).decode().split("\n")
    assert callable(edit)
    edit(lines)
    out.write_bytes(gzip.compress("\n".join(lines).encode()))


def _swap_two_entries(lines: list[str]) -> None:
    lines[3], lines[4] = lines[4], lines[3]


def _duplicate_entry(lines: list[str]) -> None:
    lines.insert(3, lines[3])


def _change_policy(lines: list[str]) -> None:
    lines[1] = json.dumps({"policy": json.loads(lines[1])["policy"].replace("critical", "mutable")})


def _add_package(lines: list[str]) -> None:
    section = json.loads(lines[-2])
    section["packages"].append({"name": "evil", "version": "1", "arch": "all"})
    lines[-2] = json.dumps(section)


def _add_line(lines: list[str]) -> None:
    lines.insert(len(lines) - 1, '{"injected": true}')


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_swap_two_entries, "Merkle root"),
        (_duplicate_entry, "entries where the statement says"),
        (_change_policy, "embedded policy does not match"),
        (_add_package, "package section does not match"),
        (_add_line, "expected one package line"),
    ],
)
def test_altered_manifest_is_untrusted_even_without_a_key(
    baked: tuple[Path, Path, Path], edit: object, message: str
) -> None:
    _root, out, _key = baked
    _rewrite(out, edit)
    with pytest.raises(UntrustedError, match=message):
        load_baseline(out)


def test_wrong_key_unsigned_and_forged_statement_are_untrusted(
    baked: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, out, key = baked
    other = make_key(tmp_path, "other.key")
    with pytest.raises(UntrustedError, match="not by the configured key"):
        _load(out, other)
    unsigned = tmp_path / "unsigned.gz"
    bake(root, write_policy(tmp_path), unsigned)
    with pytest.raises(UntrustedError, match="not signed"):
        _load(unsigned, key)
    load_baseline(unsigned)  # without a key an unsigned manifest is read (and said so by check)

    def forge(lines: list[str]) -> None:
        statement = json.loads(lines[0])
        statement["created"] = "2000-01-01T00:00:00.000000Z"
        lines[0] = json.dumps(statement)

    _rewrite(out, forge)
    with pytest.raises(UntrustedError, match="does not verify"):
        _load(out, key)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "truncated|not a readable"),
        (b"plain text, not gzip", "not a readable manifest"),
        (gzip.compress(b'{"format":"something-else"}\n{}\n'), "not a driftwarden manifest"),
    ],
)
def test_unreadable_manifests_are_errors(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "bad.gz"
    bad.write_bytes(content)
    with pytest.raises(ManifestError, match=message):
        load_baseline(bad)


def test_truncated_manifest_is_refused(baked: tuple[Path, Path, Path]) -> None:
    _root, out, _key = baked
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError):
        load_baseline(out)


@pytest.mark.parametrize("damage", ["crc", "length", "trailing bytes"])
def test_a_stored_manifest_is_checked_like_a_compressed_one(
    baked: tuple[Path, Path, Path], damage: str
) -> None:
    """Bake writes the gzip members stored; a flipped byte in the last member's CRC or length,
    or bytes after it, still make the file unreadable, not silently accepted."""
    _root, out, _key = baked
    data = bytearray(out.read_bytes())
    if damage == "trailing bytes":
        data += b"\x1f"
    else:
        data[-8 if damage == "crc" else -1] ^= 0x01
    out.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="not a readable manifest"):
        load_baseline(out)


def test_manifests_written_at_any_gzip_level_are_read(baked: tuple[Path, Path, Path]) -> None:
    """Manifests baked before members were stored (level 1) read the same."""
    _root, out, _key = baked
    stored = load_baseline(out)
    compressed = out.with_name("compressed.gz")
    compressed.write_bytes(gzip.compress(gzip.decompress(out.read_bytes()), 1))
    again = load_baseline(compressed)
    assert again.statement == stored.statement
    assert list(again.paths()) == list(stored.paths())


def test_bake_compresses_on_request_to_the_same_manifest(
    baked: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """``bake --compress-level`` makes a smaller file that says the same, verified by the same
    key; a level outside 0 to 9 is refused before anything is written."""
    root, stored_out, key = baked
    small = tmp_path / "small.gz"
    bake(root, write_policy(tmp_path), small, key=key, compress_level=6)
    assert small.stat().st_size < stored_out.stat().st_size / 2
    stored, compressed = _load(stored_out, key), _load(small, key)
    assert compressed.statement["root"] == stored.statement["root"]
    assert list(compressed.paths()) == list(stored.paths())
    with pytest.raises(ManifestError, match="compress level 10 is not 0 to 9"):
        bake(root, write_policy(tmp_path), tmp_path / "bad.gz", key=key, compress_level=10)
    assert not (tmp_path / "bad.gz").exists()


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    root = build(tmp_path / "root")
    shutil.rmtree(at(root, "/usr"))
    missing = tmp_path / "no-such-dir" / "m.gz"
    with pytest.raises(ManifestError, match="cannot write manifest"):
        bake(root, write_policy(tmp_path), missing)
    assert not missing.parent.exists()


def _flip_hint_byte(lines: list[str]) -> None:
    """One byte of an entry's hints (the last digit of its inode number) changed."""
    line = lines[3]
    cut = line.rindex("]")
    digit = line[cut - 1]
    lines[3] = line[: cut - 1] + ("1" if digit != "1" else "2") + line[cut:]


def test_a_flipped_byte_in_the_entries_is_refused_with_what_was_altered(
    baked: tuple[Path, Path, Path],
) -> None:
    _root, out, key = baked
    _rewrite(out, _flip_hint_byte)
    with pytest.raises(UntrustedError, match="fast-path hints do not match"):
        _load(out, key)
    with pytest.raises(UntrustedError, match="fast-path hints do not match"):
        load_baseline(out)


def test_entries_that_match_the_root_and_hints_but_not_the_entries_digest_are_refused(
    baked: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Whoever edits an entry and recomputes the Merkle root and the hints digest (as a
    reader before ``entries_digest`` would check them) still fails the entries digest."""
    root, _out, _key = baked
    unsigned = tmp_path / "unsigned.gz"
    bake(root, write_policy(tmp_path), unsigned)

    def forge(lines: list[str]) -> None:
        _flip_hint_byte(lines)
        entries = lines[2:-2]
        merkle = manifest_module._merkle(entries)
        hints = "".join(record.split_line(line)[1] for line in entries)
        statement = json.loads(lines[0])
        statement["root"] = merkle.root()
        statement["hints_digest"] = hashlib.sha256(hints.encode()).hexdigest()
        lines[0] = json.dumps(statement)

    _rewrite(unsigned, forge)
    with pytest.raises(UntrustedError, match="entry records do not match the statement"):
        load_baseline(unsigned)


def _as_baked_before_entries_digest(out: Path, key: Path | None) -> None:
    def drop(lines: list[str]) -> None:
        statement = json.loads(lines[0])
        del statement["entries_digest"], statement["sig"]
        if key is not None:
            statement = sign_statement(statement, keys.load_private(key))
        lines[0] = json.dumps(statement)

    _rewrite(out, drop)


def test_a_manifest_baked_before_entries_digest_is_read_and_verified(
    baked: tuple[Path, Path, Path],
) -> None:
    _root, out, key = baked
    current = _load(out, key)
    _as_baked_before_entries_digest(out, key)
    older = _load(out, key)
    assert "entries_digest" not in older.statement
    assert older.statement["root"] == current.statement["root"]
    assert list(older.paths()) == list(current.paths())
    assert [older.subtree_digest(p) for p in older.paths()] == [
        current.subtree_digest(p) for p in current.paths()
    ]
    _rewrite(out, _flip_hint_byte)
    with pytest.raises(UntrustedError, match="fast-path hints do not match"):
        _load(out, key)
    _rewrite(out, _swap_two_entries)
    with pytest.raises(UntrustedError, match="Merkle root"):
        load_baseline(out)


def test_the_merkle_root_is_checked_when_subtrees_are_first_asked_for(
    baked: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Reading trusts the signed root once the entries digest matches; descending by subtree
    recomputes it, so a root that does not belong to the entries is refused then."""
    root, _out, _key = baked
    unsigned = tmp_path / "unsigned.gz"
    bake(root, write_policy(tmp_path), unsigned)

    def forge(lines: list[str]) -> None:
        statement = json.loads(lines[0])
        statement["root"] = "00" * 32
        lines[0] = json.dumps(statement)

    _rewrite(unsigned, forge)
    base = load_baseline(unsigned)
    with pytest.raises(UntrustedError, match="Merkle root does not match"):
        base.subtree_digest("/")


def _random_tree(rng: random.Random, with_root: bool) -> list[tuple[str, bool]]:
    """(path, is_dir) in manifest order: a directory, then its names sorted, depth first."""
    out: list[tuple[str, bool]] = []

    def fill(directory: str, depth: int) -> None:
        names = sorted({f"{rng.choice('abcxyz')}{rng.randrange(40)}" for _ in range(6)})
        for name in names:
            path = directory.rstrip("/") + "/" + name
            is_dir = depth < 4 and rng.random() < 0.3
            out.append((path, is_dir))
            if is_dir:
                fill(path, depth + 1)

    if with_root:
        out.append(("/", True))
    fill("/", 0)
    return out


def _reference_root(entries: list[tuple[str, bool]], leaves: list[bytes]) -> str:
    """docs/manifest.md's formula, computed over the tree rather than in a stream."""
    children: dict[str, list[int]] = {}
    tops: list[int] = []
    parents: list[str] = []  # the open directories, as in the stream
    for index, (path, is_dir) in enumerate(entries):
        while parents and not path.startswith("/" if parents[-1] == "/" else parents[-1] + "/"):
            parents.pop()
        (children.setdefault(parents[-1], []) if parents else tops).append(index)
        if is_dir:
            parents.append(path)

    def digest(index: int) -> bytes:
        path, is_dir = entries[index]
        if not is_dir:
            return leaves[index]
        inner = b"".join(digest(child) for child in children.get(path, []))
        return hashlib.sha256(b"\x01" + leaves[index] + inner).digest()

    return hashlib.sha256(b"\x02" + b"".join(digest(i) for i in tops)).hexdigest()


@pytest.mark.parametrize("seed", range(12))
def test_merkle_tree_fed_in_blocks_of_any_size_gives_the_reference_root(seed: int) -> None:
    """Fed one entry at a time or in blocks of any size (a block may end or begin anywhere
    in a directory), the streamed root is the one the documented formula gives."""
    rng = random.Random(seed)
    entries = _random_tree(rng, with_root=seed % 3 != 0)
    leaves = [record.leaf_digest(f"{path} {rng.random()}".encode()) for path, _ in entries]
    expected = _reference_root(entries, leaves)
    one_by_one = manifest_module.MerkleTree()
    for (path, is_dir), leaf in zip(entries, leaves, strict=True):
        one_by_one.add_leaves([path], bytes((is_dir,)), leaf)
    assert one_by_one.root() == expected
    blocks = manifest_module.MerkleTree()
    start = 0
    while start < len(entries):
        end = min(len(entries), start + rng.choice((1, 2, 3, 7, 50, 1000)))
        part = entries[start:end]
        blocks.add_leaves(
            [path for path, _ in part], bytes(d for _, d in part), b"".join(leaves[start:end])
        )
        start = end
    assert blocks.root() == expected


def test_merkle_tree_refuses_a_block_whose_parts_differ_in_number() -> None:
    tree = manifest_module.MerkleTree()
    with pytest.raises(ValueError, match="differ in number"):
        tree.add_leaves(["/a", "/b"], b"\x00\x00", b"\x00" * 32)
