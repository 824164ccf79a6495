"""The manifest file: writing it as bake measures, reading and verifying it (``docs/manifest.md``).

A manifest is a gzip stream of JSON lines: the signed statement (``wire.STATEMENT_KEYS``),
the policy it was baked with, every entry record in manifest order (``record.py``), then the
package section. The statement's ``root`` is the Merkle root over the entries' content,
``hints_digest`` covers their fast-path hints and ``packages_digest`` the package section, so
verifying the signature and recomputing those three verifies every byte that matters.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent import keys, record
from agent.errors import ManifestError, PolicyError, UntrustedError, advice
from agent.measure import HASH_ALG, TYPES, Entry, order_key
from agent.policy import Policy, parse_policy
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

COMPRESS_LEVEL: Final = 6
_FLUSH_LINES: Final = 2048
_FMT_CODES: Final = {fmt: record.TYPE_CODES[name] for fmt, name in TYPES.items()}


def tool_version() -> str:
    try:
        return "driftwarden " + metadata.version("driftwarden")
    except metadata.PackageNotFoundError:
        return "driftwarden (source checkout)"


@dataclass(frozen=True, slots=True)
class Package:
    name: str
    version: str
    arch: str


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

    def add(self, path: str, content: bytes, *, is_dir: bool) -> None:
        stack = self._stack
        while stack and not path.startswith(stack[-1][1]):
            self._close()
        leaf = hashlib.sha256(b"\x00" + content).digest()
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


def _package_section(manager: str, packages: Sequence[Package]) -> str:
    lines = [json.dumps({"packages": manager, "count": len(packages)}, separators=(",", ":"))]
    lines += [
        json.dumps({"n": p.name, "v": p.version, "a": p.arch}, separators=(",", ":"))
        for p in packages
    ]
    return "".join(line + "\n" for line in lines)


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
    ) -> None:
        self.out = out
        self.policy = policy
        self.policy_text = policy_text
        self.build_id = build_id
        self.signer = signer
        self.count = 0
        self._merkle = MerkleTree()
        self._hints = hashlib.sha256()
        self._lines: list[str] = []
        self._packages = _package_section("none", ())
        self._deflate = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 31)
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
        line = record.to_line(entry)
        content, hints = record.split_line(line)
        self._merkle.add(entry.path, content.encode(), is_dir=entry.type == "dir")
        self._hints.update(hints.encode())
        self._lines.append(line)
        self.count += 1
        if len(self._lines) >= _FLUSH_LINES:
            self._flush()

    def set_packages(self, manager: str, packages: Sequence[Package]) -> None:
        self._packages = _package_section(manager, packages)

    def _flush(self) -> None:
        if self._lines:
            data = ("\n".join(self._lines) + "\n").encode("utf-8")
            self._lines.clear()
            self._write(self._fh, self._deflate.compress(data))

    def _write(self, fh: IO[bytes], data: bytes) -> None:
        try:
            fh.write(data)
        except OSError as exc:
            raise ManifestError(f"cannot write manifest: {advice(exc)}", path=self.out) from exc

    def finish(self) -> dict[str, Any]:
        """Write the statement and the file; return the statement."""
        self._flush()
        packages = self._packages.encode("utf-8")
        self._write(self._fh, self._deflate.compress(packages) + self._deflate.flush())
        self._fh.close()
        statement: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "v": MANIFEST_VERSION,
            "build_id": self.build_id,
            "policy_digest": self.policy.digest,
            "hash_alg": HASH_ALG,
            "created": utc_now(),
            "tool_version": tool_version(),
            "root": self._merkle.root(),
            "entries": self.count,
            "hints_digest": self._hints.hexdigest(),
            "packages_digest": hashlib.sha256(packages).hexdigest(),
        }
        if self.signer is not None:
            statement["key_id"] = key_id(keys.public_raw(self.signer.public_key()))
            statement = sign_statement(statement, self.signer)
        head = _line(statement) + _line({"policy": self.policy_text})
        try:
            with open(self._tmp, "wb") as out, open(self._side, "rb") as side:
                out.write(gzip.compress(head.encode("utf-8"), COMPRESS_LEVEL, mtime=0))
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
    """A loaded, verified manifest. Entries stay as their record lines until asked for."""

    def __init__(
        self,
        statement: dict[str, Any],
        policy: Policy,
        lines: dict[str, str],
        manager: str,
        packages: tuple[Package, ...],
        subtrees: dict[str, str],
    ) -> None:
        self.statement = statement
        self.policy = policy
        self.manager = manager
        self.packages = packages
        self._lines = lines
        self._subtrees = subtrees

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
        return self._subtrees.get(path)

    def unchanged(self, path: str, st: os.stat_result) -> bool:
        """True when ``path`` was recorded in state ok with the type, size, mtime, ctime and
        inode that ``st`` shows: the fast path (its content is then not read again)."""
        line = self._lines.get(path)
        if line is None or not line.endswith(
            record.hints_suffix(st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        ):
            return False
        code = _FMT_CODES.get(st.st_mode & 0o170000)
        if code is None or f',"t":"{code}"' not in line or ',"st":' in line:
            return False
        if code == "d":
            return True
        size = st.st_size
        return f',"s":{size},' in line if size else ',"s":' not in line


def load_baseline(path: Path, *, public_key: Verifier | None = None) -> Baseline:
    """Read and verify a manifest. With ``public_key`` the statement must be signed by it;
    in every case the Merkle root, hints and package digests must match the statement, or
    ``UntrustedError`` says what does not."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read manifest: {advice(exc)}", path=path) from exc
    try:
        text = gzip.decompress(raw).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ManifestError(
            f"not a readable manifest (gzip of JSON lines): {exc}", path=path
        ) from exc
    lines = text.split("\n")
    if len(lines) < 3 or lines[-1] != "":
        raise ManifestError("manifest is truncated", path=path)
    try:
        statement = check_statement(json.loads(lines[0]))
        if public_key is not None:
            _verify(statement, public_key)
    except (ValueError, MalformedError) as exc:
        raise ManifestError(f"bad manifest statement: {exc}", path=path) from exc
    except BadSignatureError as exc:
        raise UntrustedError(str(exc), path=path) from exc
    if statement["hash_alg"] != HASH_ALG:
        raise ManifestError(f"unsupported hash algorithm {statement['hash_alg']!r}", path=path)
    policy = _embedded_policy(lines[1], statement, path)
    return _read_body(lines, statement, policy, path)


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


def _read_body(lines: list[str], statement: dict[str, Any], policy: Policy, path: Path) -> Baseline:
    merkle = MerkleTree(keep_subtrees=True)
    hints = hashlib.sha256()
    entries: dict[str, str] = {}
    last = b""
    index = 2
    end = len(lines) - 1
    while index < end and lines[index].startswith('{"p":'):
        line = lines[index]
        entry_path = record.line_path(line)
        key = order_key(entry_path)
        if key <= last and entries:
            raise UntrustedError(f"entries out of order at {entry_path!r}", path=path)
        last = key
        content, hint = record.split_line(line)
        cut = content.find(',"t":"')
        merkle.add(entry_path, content.encode(), is_dir=content[cut + 6 : cut + 7] == "d")
        hints.update(hint.encode())
        entries[entry_path] = line
        index += 1
    section = "".join(line + "\n" for line in lines[index:end])
    manager, packages = _parse_packages(lines[index:end], path)
    problems = []
    if len(entries) != statement["entries"]:
        problems.append(f"{len(entries)} entries where the statement says {statement['entries']}")
    if merkle.root() != statement["root"]:
        problems.append("the Merkle root does not match the entries")
    if hints.hexdigest() != statement.get("hints_digest"):
        problems.append("the fast-path hints do not match the statement")
    if hashlib.sha256(section.encode("utf-8")).hexdigest() != statement.get("packages_digest"):
        problems.append("the package section does not match the statement")
    if problems:
        raise UntrustedError("manifest was altered: " + "; ".join(problems), path=path)
    return Baseline(statement, policy, entries, manager, packages, merkle.subtrees or {})


def _parse_packages(lines: list[str], path: Path) -> tuple[str, tuple[Package, ...]]:
    try:
        head = json.loads(lines[0])
        manager, count = head["packages"], head["count"]
        packages = tuple(
            Package(obj["n"], obj["v"], obj["a"]) for obj in map(json.loads, lines[1:])
        )
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"bad package section: {exc}", path=path) from exc
    if count != len(packages) or not isinstance(manager, str):
        raise UntrustedError("package section is truncated", path=path)
    return manager, packages
