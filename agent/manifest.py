"""The manifest file: writing it as bake measures, reading and verifying it (``docs/manifest.md``).

A manifest is a gzip stream of JSON lines: the signed statement (``wire.STATEMENT_KEYS``),
the policy it was baked with, every entry record in manifest order (``record.py``), then one
line of packages. The statement's ``entries_digest`` is the SHA-256 of the entry records'
bytes and ``packages_digest`` covers the packages (``PackageSet.digest``), so verifying the
signature and recomputing those two (one hash each, at C speed) verifies every byte that
matters. The statement's ``root``, the Merkle root over the entries' content, names the
image's content; its subtree digests are computed only when asked for. A manifest baked
before ``entries_digest`` is verified by recomputing the root and ``hints_digest`` (the
fast-path hints) instead.

The writer streams: entries are compressed into a side file as they come, and the final file
is the statement's gzip member followed by those bytes (gzip members concatenate).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tomllib
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent import keys, record
from agent.compact import CompactLines
from agent.errors import ManifestError, PackageDbError, PolicyError, UntrustedError, advice
from agent.lines import OrderedLines, line_path
from agent.measure import HASH_ALG, Entry
from agent.measure import order_key as record_order
from agent.packages import PackageSet
from agent.policy import Policy, parse_policy
from agent.walk import Signature
from agent.wire import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    BadSignatureError,
    MalformedError,
    Verifier,
    check_statement,
    key_id,
    sign_statement,
    utc_now,
    verify_statement,
)

# Stored by default: level 1 makes the file a third of the size, but costs a bake 0.17 CPU s
# and every check 60 ms per 60,000 entries to decode; the file stays in the image and only the
# statement line ever leaves the host. ``bake --compress-level`` trades the other way.
COMPRESS_LEVEL: Final = 0
_FLUSH_LINES: Final = 2048
_TYPE_KEYS: Final = {code: f',"t":"{code}"' for code in record.TYPE_NAMES}


def tool_version() -> str:
    from importlib import metadata  # bake only: it costs a check more than it is worth

    try:
        return "driftwarden " + metadata.version("driftwarden")
    except metadata.PackageNotFoundError:
        return "driftwarden (source checkout)"


# --- the Merkle tree -------------------------------------------------------------------------


class MerkleTree:
    """Digests over entry records fed in manifest order (the format is in docs/manifest.md).

    leaf(e) = H(0x00 || content(e)); a directory's subtree digest is
    H(0x01 || leaf(d) || the digests of its children in order), a child being its leaf or,
    for a directory, its subtree digest; the root is H(0x02 || the top entries' digests).
    """

    def __init__(self, *, keep_subtrees: bool = False) -> None:
        self._stack: list[tuple[str, str, Any]] = []  # (path, path + "/", hasher)
        self._tops: list[bytes] = []
        self.subtrees: dict[str, str] | None = {} if keep_subtrees else None

    def add(self, path: str, content: bytes, is_dir: bool) -> None:
        self.add_leaves([path], bytes((is_dir,)), record.leaf_digest(content))

    def add_leaves(self, paths: list[str], dirs: bytes, leaves: bytes) -> None:
        """Add entries by their leaves (``record.leaf_digest``, 32 bytes each, one after
        another), ``dirs`` saying which are directories (``record.Block``)."""
        if len(paths) != len(dirs) or len(leaves) != 32 * len(paths):
            raise ValueError("a block's paths, directory flags and leaves differ in number")
        stack = self._stack
        at = 0
        for path, is_dir in zip(paths, dirs, strict=True):
            while stack and not path.startswith(stack[-1][1]):
                self._close()
            leaf = leaves[at : at + 32]
            at += 32
            if is_dir:
                prefix = "/" if path == "/" else path + "/"
                stack.append((path, prefix, hashlib.sha256(b"\x01" + leaf)))
            elif stack:
                stack[-1][2].update(leaf)
            else:
                self._tops.append(leaf)

    def _close(self) -> None:
        path, _prefix, hasher = self._stack.pop()
        digest = hasher.digest()
        if self.subtrees is not None:
            self.subtrees[path] = digest.hex()
        if self._stack:
            self._stack[-1][2].update(digest)
        else:
            self._tops.append(digest)

    def root(self) -> str:
        while self._stack:
            self._close()
        return hashlib.sha256(b"\x02" + b"".join(self._tops)).hexdigest()


def _package_line(packages: PackageSet) -> str:
    return _line({"manager": packages.manager, "packages": packages.to_json()})


# --- writing ---------------------------------------------------------------------------------


class ManifestWriter:
    """Write a manifest as entries arrive: ``add`` each entry in manifest order, then
    ``finish``. The file appears atomically at ``out``; nothing is left behind on error."""

    def __init__(
        self,
        out: Path,
        *,
        policy: Policy,
        policy_text: str,
        build_id: str,
        signer: Ed25519PrivateKey | None = None,
        compress_level: int = COMPRESS_LEVEL,
    ) -> None:
        if not 0 <= compress_level <= 9:
            raise ManifestError(f"compress level {compress_level} is not 0 to 9", path=out)
        self.out = out
        self.compress_level = compress_level
        self.policy = policy
        self.policy_text = policy_text
        self.build_id = build_id
        self.signer = signer
        # Looked up now, while a bake's walk is under way, not once it is done: it costs
        # about 10 ms, and every millisecond after the last entry is one the bake waits.
        self.tool_version = tool_version()
        self.count = 0
        self._merkle = MerkleTree()
        self._hints = hashlib.sha256()
        self._entries = hashlib.sha256()
        self._lines: list[str] = []
        self._packages = PackageSet("none", ())
        self._deflate = zlib.compressobj(compress_level, zlib.DEFLATED, 31)
        self._side = out.with_name(f".{out.name}.entries.tmp")
        self._tmp = out.with_name(f".{out.name}.tmp")
        try:
            self._fh: IO[bytes] = open(self._side, "wb")  # noqa: SIM115 (closed by finish/abort)
        except OSError as exc:
            raise ManifestError(f"cannot write manifest: {advice(exc)}", path=out) from exc

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, entry: Entry) -> None:
        self.add_line(entry.path, record.to_line(entry), is_dir=entry.type == "dir")

    def add_line(self, path: str, line: str, *, is_dir: bool) -> None:
        """Add the record ``line`` of ``path`` (the next in manifest order)."""
        content, hints = record.split_line(line)
        self._merkle.add(path, content.encode(), is_dir)
        self._hints.update(hints.encode())
        self._lines.append(line)
        self.count += 1
        if len(self._lines) >= _FLUSH_LINES:
            self._flush()

    def add_block(self, block: record.Block) -> None:
        """Add the records of ``block`` (the next in manifest order)."""
        self._flush()
        self._merkle.add_leaves(block.paths, block.dirs, block.leaves)
        self._hints.update(block.hints)
        self._entries.update(block.data)
        self._write(self._fh, self._deflate.compress(block.data))
        self.count += len(block.paths)

    def set_packages(self, packages: PackageSet) -> None:
        self._packages = packages

    def _flush(self) -> None:
        if self._lines:
            data = ("\n".join(self._lines) + "\n").encode("utf-8")
            self._lines.clear()
            self._entries.update(data)
            self._write(self._fh, self._deflate.compress(data))

    def _write(self, fh: IO[bytes], data: bytes) -> None:
        try:
            fh.write(data)
        except OSError as exc:
            raise ManifestError(f"cannot write manifest: {advice(exc)}", path=self.out) from exc

    def finish(self) -> dict[str, Any]:
        """Write the statement and the file; return the statement."""
        self._flush()
        packages = _package_line(self._packages).encode("utf-8")
        self._write(self._fh, self._deflate.compress(packages) + self._deflate.flush())
        self._fh.close()
        statement: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "v": MANIFEST_VERSION,
            "build_id": self.build_id,
            "policy_digest": self.policy.digest,
            "hash_alg": HASH_ALG,
            "created": utc_now(),
            "tool_version": self.tool_version,
            "root": self._merkle.root(),
            "entries": self.count,
            "hints_digest": self._hints.hexdigest(),
            "entries_digest": self._entries.hexdigest(),
            "packages_digest": self._packages.digest(),
        }
        if self.signer is not None:
            statement["key_id"] = key_id(keys.public_raw(self.signer.public_key()))
            statement = sign_statement(statement, self.signer)
        head = _line(statement) + _line({"policy": self.policy_text})
        try:
            with open(self._tmp, "wb") as out, open(self._side, "rb") as side:
                out.write(gzip.compress(head.encode("utf-8"), self.compress_level, mtime=0))
                while chunk := side.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(self._tmp, self.out)
        except OSError as exc:
            self.abort()
            raise ManifestError(f"cannot write manifest: {advice(exc)}", path=self.out) from exc
        self._side.unlink(missing_ok=True)
        return statement

    def abort(self) -> None:
        self._fh.close()
        self._side.unlink(missing_ok=True)
        self._tmp.unlink(missing_ok=True)


def _line(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=True) + "\n"


# --- reading ---------------------------------------------------------------------------------


class Baseline:
    """A loaded, verified manifest. Entries stay as their record lines until asked for: in
    manifest order as read (``agent.lines``), or in compressed blocks once compacted."""

    def __init__(
        self,
        statement: dict[str, Any],
        policy: Policy,
        lines: Mapping[str, str],
        packages: PackageSet,
        subtrees: dict[str, str] | None = None,
    ) -> None:
        """``subtrees``: the Merkle subtree digests by directory; None: computed from the
        lines when first asked for (and checked against the statement's root then)."""
        self.statement = statement
        self.policy = policy
        self.packages = packages
        self._lines = lines
        self._subtrees = subtrees

    def compact(self) -> Baseline:
        """The same baseline with its lines in compressed blocks (``agent.compact``): what
        the running agent keeps, at a sixth of the memory, for slower lookups. Subtree
        digests are left out (``subtree_digest`` is None): nothing running needs them, and
        each, made while the manifest was read, would pin that read's memory."""
        if isinstance(self._lines, CompactLines):
            return self  # compacted already (by the boot check's process)
        return Baseline(
            self.statement, self.policy, CompactLines(self._lines.items()), self.packages, {}
        )

    def __len__(self) -> int:
        return len(self._lines)

    def __iter__(self) -> Iterator[Entry]:
        for line in self._lines.values():
            yield record.from_line(line)

    def __contains__(self, path: object) -> bool:
        return path in self._lines

    def paths(self) -> Iterator[str]:
        return iter(self._lines)

    def get(self, path: str) -> Entry | None:
        line = self._lines.get(path)
        return record.from_line(line) if line is not None else None

    def subtree_digest(self, path: str) -> str | None:
        """The Merkle digest of the directory ``path`` and everything below it."""
        if self._subtrees is None:
            merkle = _merkle(self._lines.values())
            if merkle.root() != self.statement["root"]:
                raise UntrustedError("manifest was altered: the Merkle root does not match")
            self._subtrees = merkle.subtrees or {}
        return self._subtrees.get(path)

    def unchanged(self, path: str, signature: Signature) -> bool:
        """True when ``path`` was recorded in state ok with this signature (type, size, mtime,
        ctime, inode): the fast path, where its content is not read again."""
        code, size, hints = signature
        line = self._lines.get(path)
        if line is None or not line.endswith(hints) or ',"st":' in line:
            return False
        if _TYPE_KEYS.get(code, "?") not in line:
            return False
        if code == "d":
            return True
        return f',"s":{size},' in line if size else ',"s":' not in line

    def same_line(self, path: str, line: str) -> bool:
        """True when ``path`` was recorded exactly as ``line``."""
        return self._lines.get(path) == line

    def measured_root(self, drifted: Mapping[str, Entry | None]) -> str:
        """The Merkle root of this image as a host measured it: the recorded entries with the
        ``drifted`` ones in their places (an entry: added, or replacing the recorded one;
        None: removed). Allowed changes (mutable paths, first-boot allowances) are not in
        ``drifted``, so a host with no drift has the image's root, and hosts that drifted the
        same way share a root. Without drift it is the statement's root, computed from
        nothing. (A drifted file with other hard links is taken as measured, without the
        ``hardlink`` a bake's walk would give it: still the same on every such host.)"""
        if not drifted:
            return str(self.statement["root"])
        added = sorted((p for p in drifted if p not in self._lines), key=record_order)
        return _merkle(_merged(self._lines.items(), drifted, added)).root()


def _merged(
    recorded: Iterable[tuple[str, str]], drifted: Mapping[str, Entry | None], added: list[str]
) -> Iterator[str]:
    """The record lines of ``recorded`` (in manifest order) with ``drifted`` applied, the
    ``added`` paths (sorted in manifest order) put in their places."""
    new = iter(added)
    pending = next(new, None)
    for path, line in recorded:
        if pending is not None:
            key = record_order(path)
            while pending is not None and record_order(pending) < key:
                yield _drifted_line(drifted[pending])
                pending = next(new, None)
        if path in drifted:
            entry = drifted[path]
            if entry is not None:
                yield _drifted_line(entry)
        else:
            yield line
    while pending is not None:
        yield _drifted_line(drifted[pending])
        pending = next(new, None)


def _drifted_line(entry: Entry | None) -> str:
    assert entry is not None, "an added path has its entry"
    return record.to_line(entry)


def _merkle(lines: Iterable[str]) -> MerkleTree:
    """The Merkle tree over record lines in manifest order, with its subtree digests."""
    merkle = MerkleTree(keep_subtrees=True)
    for line in lines:
        stop = line.find('","t":"', 6)
        content = line[: line.rfind(record.HINTS_MARK)]
        merkle.add(line_path(line), content.encode("utf-8"), line[stop + 7] == "d")
    return merkle


@dataclass(frozen=True)
class Head:
    """A manifest's first two lines: its statement and the policy it was baked with."""

    statement: dict[str, Any]
    policy: Policy


def read_head(path: Path, *, public_key: Verifier | None = None) -> Head:
    """Read and check only the statement (and its signature, given a key) and the policy:
    enough to start measuring while ``load_baseline`` reads the rest."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed below; open errors are reported apart)
    except OSError as exc:
        raise ManifestError(f"cannot read manifest: {advice(exc)}", path=path) from exc
    with fh, gzip.GzipFile(fileobj=fh, mode="rb") as unzipped:
        try:
            first = unzipped.readline().decode("utf-8")
            second = unzipped.readline().decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ManifestError(
                f"not a readable manifest (gzip of JSON lines): {exc}", path=path
            ) from exc
    return _head(first, second, public_key, path)


def _head(first: str, second: str, public_key: Verifier | None, path: Path) -> Head:
    try:
        statement = check_statement(json.loads(first))
        if public_key is not None:
            _verify(statement, public_key)
    except (ValueError, MalformedError) as exc:
        raise ManifestError(f"bad manifest statement: {exc}", path=path) from exc
    except BadSignatureError as exc:
        raise UntrustedError(str(exc), path=path) from exc
    if statement["hash_alg"] != HASH_ALG:
        raise ManifestError(f"unsupported hash algorithm {statement['hash_alg']!r}", path=path)
    return Head(statement, _embedded_policy(second, statement, path))


def load_baseline(path: Path, *, public_key: Verifier | None = None) -> Baseline:
    """Read and verify a manifest. With ``public_key`` the statement must be signed by it;
    in every case the entries and package digests must match the statement (for a manifest
    baked before ``entries_digest``: the Merkle root, hints and package digests), or
    ``UntrustedError`` says what does not."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read manifest: {advice(exc)}", path=path) from exc
    try:
        data = _gunzip(raw)
        del raw
        text = data.decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ManifestError(
            f"not a readable manifest (gzip of JSON lines): {exc}", path=path
        ) from exc
    lines = text.split("\n")
    if len(lines) < 3 or lines[-1] != "":
        raise ManifestError("manifest is truncated", path=path)
    head = _head(lines[0], lines[1], public_key, path)
    statement = head.statement
    digest = statement.get("entries_digest")
    if digest is None:  # baked before entries_digest: the Merkle tree says it all
        return _read_body(lines, data.split(b"\n"), statement, head.policy, path)
    # The entry records are every line between the policy and the last (the packages).
    start = data.index(b"\n", data.index(b"\n") + 1) + 1
    end = data.rindex(b"\n", 0, len(data) - 1) + 1
    if len(lines) < 4 or hashlib.sha256(memoryview(data)[start:end]).hexdigest() != digest:
        # Say what was altered where the Merkle tree can tell, else that the bytes differ.
        _read_body(lines, data.split(b"\n"), statement, head.policy, path)
        raise UntrustedError(
            "manifest was altered: the entry records do not match the statement", path=path
        )
    del lines[-1]
    packages = _parse_packages([lines.pop()], path)
    del lines[:2]
    problems = []
    if len(lines) != statement["entries"]:
        problems.append(f"{len(lines)} entries where the statement says {statement['entries']}")
    if packages.digest() != statement.get("packages_digest"):
        problems.append("the package section does not match the statement")
    if problems:
        raise UntrustedError("manifest was altered: " + "; ".join(problems), path=path)
    return Baseline(statement, head.policy, OrderedLines(lines), packages)


def _gunzip(raw: bytes) -> bytes:
    """``gzip.decompress`` without its copies of the input (a stored manifest is as large on
    disk as decompressed): every member, its CRC and length checked by zlib."""
    view = memoryview(raw)
    parts = []
    while view:
        member = zlib.decompressobj(31)  # a gzip header and trailer
        parts.append(member.decompress(view))
        if not member.eof:
            raise EOFError("the gzip stream is truncated")
        view = view[len(view) - len(member.unused_data) :]
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _verify(statement: dict[str, Any], public_key: Verifier) -> None:
    if isinstance(public_key, Ed25519PublicKey):
        expected = key_id(keys.public_raw(public_key))
        signed_by = statement.get("key_id")
        if "sig" in statement and signed_by not in (None, expected):
            raise BadSignatureError(
                f"manifest was signed by {signed_by}, not by the configured key {expected}"
            )
    verify_statement(statement, public_key)


def _embedded_policy(line: str, statement: dict[str, Any], path: Path) -> Policy:
    try:
        obj = json.loads(line)
        text = obj["policy"]
        if not isinstance(text, str):
            raise TypeError("policy is not a string")
        policy = parse_policy(tomllib.loads(text), source=f"{path.name}:policy")
    except (ValueError, KeyError, TypeError, PolicyError) as exc:
        raise ManifestError(f"the embedded policy cannot be read: {exc}", path=path) from exc
    if policy.digest != statement["policy_digest"]:
        raise UntrustedError("the embedded policy does not match the statement", path=path)
    return policy


def _read_body(
    lines: list[str], raw_lines: list[bytes], statement: dict[str, Any], policy: Policy, path: Path
) -> Baseline:
    """Index the entry records by path and recompute the statement's Merkle root and hints
    digest over them: how a manifest baked before ``entries_digest`` is verified, and how a
    newer one that fails its ``entries_digest`` is told what was altered.

    It reads each record's path, type and hints straight from the line's bytes
    (``docs/manifest.md``: inside a JSON string every quote is escaped, so ``","t":"`` and
    ``,"z":`` can only be the record's own keys) and decodes nothing else.
    """
    merkle = MerkleTree(keep_subtrees=True)
    add = merkle.add
    hints: list[bytes] = []
    entries: dict[str, str] = {}  # a reordered or repeated entry changes the root or count
    index = 2
    end = len(lines) - 1
    while index < end and raw_lines[index].startswith(b'{"p":"'):
        raw = raw_lines[index]
        stop = raw.find(b'","t":"', 6)
        cut = raw.rfind(b',"z":')
        if stop < 0 or cut < stop:
            raise ManifestError(f"malformed entry record on line {index + 1}", path=path)
        name = raw[6:stop]
        if b"\\" in name or name.startswith(b"b64:"):
            entry_path = record.line_path(lines[index])
        else:
            entry_path = name.decode("utf-8")
        add(entry_path, raw[:cut], raw[stop + 7] == 0x64)  # type "d"
        hints.append(raw[cut:])
        entries[entry_path] = lines[index]
        index += 1
    packages = _parse_packages(lines[index:end], path)
    problems = []
    count = index - 2
    if count != statement["entries"]:
        problems.append(f"{count} entries where the statement says {statement['entries']}")
    if count != len(entries):
        problems.append(f"{count - len(entries)} paths are repeated")
    if merkle.root() != statement["root"]:
        problems.append("the Merkle root does not match the entries")
    if hashlib.sha256(b"".join(hints)).hexdigest() != statement.get("hints_digest"):
        problems.append("the fast-path hints do not match the statement")
    if packages.digest() != statement.get("packages_digest"):
        problems.append("the package section does not match the statement")
    if problems:
        raise UntrustedError("manifest was altered: " + "; ".join(problems), path=path)
    return Baseline(statement, policy, entries, packages, merkle.subtrees or {})


def _parse_packages(lines: list[str], path: Path) -> PackageSet:
    if len(lines) != 1:
        raise UntrustedError(
            f"expected one package line after the entries, found {len(lines)}", path=path
        )
    try:
        obj = json.loads(lines[0])
        return PackageSet.from_json(obj["packages"], manager=obj["manager"])
    except (ValueError, KeyError, TypeError, PackageDbError) as exc:
        raise ManifestError(f"bad package section: {exc}", path=path) from exc
