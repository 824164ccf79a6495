"""Package-owned files checked against the package database's digests, as ``debsums`` does.

Each distinct path is looked at once, however many packages claim it, by a pool of threads:
``hashlib`` releases the GIL while it digests a large buffer, so two cores hash two files at
once, and on a cold cache the extra threads keep the disk's queue full.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.errors import advice
from agent.logs import get_logger
from agent.packages.image import ImageRoot, NotRegularError
from agent.packages.model import PackageFileMismatch

_CHUNK_BYTES: Final = 1 << 20
_BATCH_FILES: Final = 64
_ABSENT_ERRNOS: Final = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class FileDigest:
    """What the package database says one file must hash to."""

    package: str
    path: str  # inside the image, normalized: "/usr/bin/ls"
    algorithm: str  # a hashlib name: "md5", "sha256"
    digest: str  # lowercase hex
    conffile: bool = False
    optional: bool = False  # may be absent (dpkg was told not to unpack it)
    link_digest: bool = False  # a symlink here is checked by the digest of its target (apk)


@dataclass(frozen=True, slots=True)
class _Seen:
    """What is at a path: digests of a regular file, or a reason it has none."""

    digests: dict[str, str]
    reason: str | None = None
    actual: str | None = None


class _Hasher:
    def __init__(self, image: ImageRoot) -> None:
        self._image = image
        self._local = threading.local()

    def _buffer(self) -> bytearray:
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(_CHUNK_BYTES)
        return buf

    def look(self, path: str, algorithms: Sequence[str], *, links: bool = False) -> _Seen:
        try:
            fd = self._image.open_regular(path)
        except NotRegularError as exc:
            if links and exc.kind == "symlink":
                return self._link(path, algorithms)
            return _Seen({}, "replaced", exc.kind)
        except OSError as exc:
            return _failed(exc)
        try:
            hashes = [hashlib.new(name, usedforsecurity=False) for name in algorithms]
            buf = self._buffer()
            view = memoryview(buf)
            while count := os.readv(fd, [buf]):
                for h in hashes:
                    h.update(view[:count])
        except OSError as exc:
            return _failed(exc)
        finally:
            os.close(fd)
        return _Seen({name: h.hexdigest() for name, h in zip(algorithms, hashes, strict=True)})

    def _link(self, path: str, algorithms: Sequence[str]) -> _Seen:
        """The digests of a symlink's target text (never followed)."""
        try:
            target = os.readlink(self._image.host(self._image.locate(path)))
        except OSError as exc:
            return _failed(exc)
        raw = os.fsencode(target)
        digests = {n: hashlib.new(n, raw, usedforsecurity=False).hexdigest() for n in algorithms}
        return _Seen(digests)


def _failed(exc: OSError) -> _Seen:
    if exc.errno in _ABSENT_ERRNOS:
        return _Seen({}, "missing", None)
    return _Seen({}, "unreadable", advice(exc))


def default_workers() -> int:
    return min(8, 2 * (os.cpu_count() or 1))


def verify_digests(
    root: Path, expected: Iterable[FileDigest], *, workers: int = 0
) -> list[PackageFileMismatch]:
    """Every file of ``expected`` whose content is not the vendor's, sorted by path."""
    claims: dict[str, list[FileDigest]] = {}
    for item in expected:
        claims.setdefault(item.path, []).append(item)
    paths = sorted(claims)
    hasher = _Hasher(ImageRoot(root))

    def look(path: str) -> _Seen:
        algorithms = sorted({c.algorithm for c in claims[path]})
        return hasher.look(path, algorithms, links=any(c.link_digest for c in claims[path]))

    def run(batch: list[str]) -> list[tuple[str, _Seen]]:
        return [(path, look(path)) for path in batch]

    batches = [paths[i : i + _BATCH_FILES] for i in range(0, len(paths), _BATCH_FILES)]
    mismatches: list[PackageFileMismatch] = []
    with ThreadPoolExecutor(workers or default_workers(), "package-verify") as pool:
        for results in pool.map(run, batches):
            for path, seen in results:
                mismatches.extend(_compare(path, seen, claims[path]))
    log.debug("package_files_verified", files=len(paths), mismatches=len(mismatches))
    return mismatches


def _compare(path: str, seen: _Seen, claims: list[FileDigest]) -> list[PackageFileMismatch]:
    out: list[PackageFileMismatch] = []
    for claim in sorted(claims, key=lambda c: c.package):
        if seen.reason == "missing" and claim.optional:
            continue
        if seen.reason is not None:
            out.append(
                PackageFileMismatch(
                    claim.package, path, seen.reason, claim.digest, seen.actual, claim.conffile
                )
            )
        elif seen.digests[claim.algorithm] != claim.digest:
            actual = seen.digests[claim.algorithm]
            out.append(
                PackageFileMismatch(
                    claim.package, path, "modified", claim.digest, actual, claim.conffile
                )
            )
    return out
