"""The baseline as the running agent keeps it: record lines in compressed blocks.

A loaded manifest (``manifest.Baseline``) keeps each record line as a string in a dict by
path: fast for one check, but about 350 bytes per path, which on a 100,000-file image is more
than the agent may use in all. ``CompactLines`` holds the same lines, in manifest order, as
zlib-compressed blocks of ``BLOCK_LINES`` lines (about 60 bytes per path), and finds a path
through a sorted array of 32-bit path hashes pointing at blocks (6 bytes per path). A lookup
decompresses one block (tens of microseconds) and keeps the last few in a small cache, so a
walk in manifest order decompresses each block about once. A hash collision costs one more
block; the path itself is always compared.

Read-only and thread-safe: the guard and the rescanner look up paths from their threads.
Picklable (the index and the blocks, not the cache): the boot check builds it in a child
process and hands it over.
"""

from __future__ import annotations

import threading
import zlib
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from agent import record

BLOCK_LINES: Final = 64
CACHED_BLOCKS: Final = 8
_LEVEL: Final = 6


def _key(path: str) -> int:
    """The 32-bit key a path is indexed by: its CRC-32, the same in every process (the
    index is built in the boot check's process and used in the daemon's, where ``hash()``
    of a string differs). A collision, about one in a 100,000-path image, costs one more
    block; the path itself is always compared."""
    return zlib.crc32(path.encode("utf-8", "surrogateescape"))


def _pack(lines: list[str]) -> bytes:
    return zlib.compress("\n".join(lines).encode("utf-8", "surrogateescape"), _LEVEL)


def _unpack(block: bytes) -> list[str]:
    return zlib.decompress(block).decode("utf-8", "surrogateescape").split("\n")


class CompactLines(Mapping[str, str]):
    """A read-only mapping of path to record line (see the module's docstring)."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        blocks: list[bytes] = []
        hashes = array("I")
        block_of = array("I")
        batch: list[str] = []
        for path, line in items:
            hashes.append(_key(path))
            block_of.append(len(blocks))
            batch.append(line)
            if len(batch) == BLOCK_LINES:
                blocks.append(_pack(batch))
                batch = []
        if batch:
            blocks.append(_pack(batch))
        order = sorted(range(len(hashes)), key=hashes.__getitem__)
        self._hashes = array("I", (hashes[i] for i in order))
        number = "H" if len(blocks) <= 1 << 16 else "I"  # a block number in 2 bytes if it fits
        self._block_of = array(number, (block_of[i] for i in order))
        del order, hashes, block_of
        self._blocks = blocks
        self._cache: OrderedDict[int, dict[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"hashes": self._hashes, "block_of": self._block_of, "blocks": self._blocks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._hashes = state["hashes"]
        self._block_of = state["block_of"]
        self._blocks = state["blocks"]
        self._cache = OrderedDict()
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        """Roughly what the index and the blocks take (without the cache)."""
        arrays = self._hashes.itemsize * len(self._hashes) + self._block_of.itemsize * len(
            self._block_of
        )
        return arrays + sum(len(b) + 33 for b in self._blocks)

    def __len__(self) -> int:
        return len(self._hashes)

    def __getitem__(self, path: str) -> str:
        line = self.get(path)
        if line is None:
            raise KeyError(path)
        return line

    def get(self, path: str, default: str | None = None) -> str | None:  # type: ignore[override]
        hashes = self._hashes
        key = _key(path)
        index = bisect_left(hashes, key)
        while index < len(hashes) and hashes[index] == key:
            line = self._block(self._block_of[index]).get(path)
            if line is not None:
                return line
            index += 1
        return default

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.get(path) is not None

    def __iter__(self) -> Iterator[str]:
        for path, _line in self.items():
            yield path

    def items(self) -> Iterator[tuple[str, str]]:  # type: ignore[override]
        """Every (path, line) in manifest order, a block at a time (the cache is not used)."""
        for block in self._blocks:
            for line in _unpack(block):
                yield record.line_path(line), line

    def values(self) -> Iterator[str]:  # type: ignore[override]
        for block in self._blocks:
            yield from _unpack(block)

    def _block(self, number: int) -> dict[str, str]:
        with self._lock:
            found = self._cache.get(number)
            if found is not None:
                self._cache.move_to_end(number)
                return found
        found = {record.line_path(line): line for line in _unpack(self._blocks[number])}
        with self._lock:
            self._cache[number] = found
            while len(self._cache) > CACHED_BLOCKS:
                self._cache.popitem(last=False)
        return found
