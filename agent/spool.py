"""The durable spool: every report waits here, on disk, until the collector acknowledges it.

Layout under the spool directory, one file per record, each written whole or not at all
(``agent.durable``: temporary file, fsync, rename, fsync of the directory)::

    queue/<q>.json      a report not yet signed: {"q", "kind", "boot_id", "time", "body"}
    sealed/<seq>.json   a signed envelope of the chain, not yet acknowledged: {"q", "envelope"}
    rejected/<seq>.json an envelope the collector refused: kept, counted, never dropped

Reports are queued unsigned and signed (sealed) in order only when a batch is about to be sent
(``agent.reporter``), so compaction never tears a hole in the signed chain: when the spool is
full, queued heartbeats are dropped but the newest, and findings are always kept.

A full disk is a health state, not a crash: a report that cannot be written is kept in memory
(heartbeats compacted there too), the event ``spool_disk_full`` says what to do, and the
memory backlog is written, in order, as soon as space returns.
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from agent import durable
from agent.errors import SpoolError, advice
from agent.wire import utc_now

HEARTBEAT: Final = "heartbeat"
_DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Record:
    """A report waiting to be signed; ``q`` orders the queue."""

    q: int
    kind: str
    boot_id: str
    time: str
    body: Mapping[str, Any]

    def encode(self) -> bytes:
        obj = {"q": self.q, "kind": self.kind, "boot_id": self.boot_id, "time": self.time}
        obj["body"] = dict(self.body)
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> Record:
        obj = json.loads(data)
        return cls(obj["q"], obj["kind"], obj["boot_id"], obj["time"], obj["body"])


@dataclass(frozen=True)
class Sealed:
    """A signed envelope in the spool, in chain order."""

    seq: int
    q: int
    envelope: dict[str, Any]
    size_bytes: int


@dataclass(frozen=True)
class SpoolHealth:
    state: str  # "ok" | "over_limit" | "disk_full" | "unwritable"
    depth: int  # reports not yet acknowledged: queued + sealed + in memory
    size_bytes: int
    in_memory: int
    rejected: int
    compacted: int  # heartbeats dropped by compaction since start


def _name(number: int) -> str:
    return f"{number:016d}.json"


def _number(path: Path) -> int | None:
    stem = path.name.removesuffix(".json")
    return int(stem) if path.name.endswith(".json") and stem.isdigit() else None


class Spool:
    """Queue, sealed and rejected areas; thread-safe (the main loop puts, the sender drains)."""

    def __init__(self, directory: Path, *, max_bytes: int, max_records: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_records = max_records
        self._lock = threading.Lock()
        self._queue: dict[int, tuple[str, int]] = {}  # q -> (kind, size), ascending
        self._sealed: dict[int, int] = {}  # seq -> size, ascending
        self._memory: list[Record] = []
        self._rejected = 0
        self._compacted = 0
        self._state = "ok"
        self._next_q = 1
        try:
            for area in ("queue", "sealed", "rejected"):
                (directory / area).mkdir(parents=True, exist_ok=True, mode=0o700)
                durable.clean_temporaries(directory / area)
            self._scan()
        except OSError as exc:
            raise SpoolError(f"cannot open the spool: {advice(exc)}", path=directory) from exc

    def _scan(self) -> None:
        for path in sorted((self.directory / "queue").iterdir()):
            q = _number(path)
            if q is None:
                continue
            try:
                data = path.read_bytes()
                record = Record.decode(data)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._quarantine(path, f"unreadable queue record: {exc}")
                continue
            self._queue[q] = (record.kind, len(data))
        for path in sorted((self.directory / "sealed").iterdir()):
            seq = _number(path)
            if seq is not None:
                self._sealed[seq] = path.stat().st_size
        self._rejected = sum(1 for p in (self.directory / "rejected").glob("*.json"))
        self._next_q = max(self._queue, default=0) + 1

    def _quarantine(self, path: Path, why: str) -> None:
        log.error("spool_record_corrupt", path=str(path), error=why)
        path.rename(self.directory / "rejected" / ("corrupt-" + path.name))
        self._rejected += 1

    # --- the queue -------------------------------------------------------------------------

    def resume(self, last_sealed_q: int) -> None:
        """Drop queue records already sealed before a crash; number new ones after them."""
        with self._lock:
            stale = [q for q in self._queue if q <= last_sealed_q]
            for q in stale:
                (self.directory / "queue" / _name(q)).unlink(missing_ok=True)
                del self._queue[q]
            if stale:
                durable.fsync_dir(self.directory / "queue")
                log.info("spool_resumed", already_sealed=len(stale))
            self._next_q = max(self._next_q, last_sealed_q + 1)

    @property
    def next_q(self) -> int:
        """The queue number the next ``put`` gets: every record numbered below it was written
        (or, on a full disk, kept in memory)."""
        with self._lock:
            return self._next_q

    def put(self, kind: str, body: Mapping[str, Any], *, boot_id: str, time: str = "") -> None:
        """Queue a report durably; on a full disk keep it in memory (never raises for that)."""
        with self._lock:
            record = Record(self._next_q, kind, boot_id, time or utc_now(), dict(body))
            self._next_q += 1
            self._memory.append(record)
            self._flush_memory()

    def retry(self) -> None:
        """Write the memory backlog, if any, now that there may be space again."""
        with self._lock:
            if self._memory:
                self._flush_memory()

    def _flush_memory(self) -> None:
        while self._memory:
            record = self._memory[0]
            data = record.encode()
            self._make_room(record.kind, len(data))
            try:
                durable.write_atomic(self.directory / "queue" / _name(record.q), data)
            except OSError as exc:
                self._write_failed(exc)
                self._compact_memory()
                return
            self._memory.pop(0)
            self._queue[record.q] = (record.kind, len(data))
        if self._state in ("disk_full", "unwritable"):
            log.warning("spool_writable_again")
        self._state = "over_limit" if self._over(0, 0) else "ok"

    def _write_failed(self, exc: OSError) -> None:
        state = "disk_full" if exc.errno in _DISK_FULL else "unwritable"
        if self._state != state:
            log.error(
                "spool_disk_full" if state == "disk_full" else "spool_unwritable",
                path=str(self.directory),
                error=advice(exc),
                advice="free space on the file system of the state directory; reports are "
                "kept in memory meanwhile and written when space returns",
                in_memory=len(self._memory),
            )
        self._state = state

    def _compact_memory(self) -> None:
        """In memory, keep every finding but only the newest heartbeat."""
        heartbeats = [r for r in self._memory if r.kind == HEARTBEAT]
        if len(heartbeats) > 1:
            newest = heartbeats[-1]
            self._memory = [r for r in self._memory if r.kind != HEARTBEAT or r is newest]
            self._compacted += len(heartbeats) - 1

    def _over(self, extra_records: int, extra_bytes: int) -> bool:
        count = len(self._queue) + len(self._sealed) + extra_records
        size = self._bytes() + extra_bytes
        return count > self.max_records or size > self.max_bytes

    def _bytes(self) -> int:
        return sum(size for _, size in self._queue.values()) + sum(self._sealed.values())

    def _make_room(self, kind: str, size: int) -> None:
        """When full, drop queued heartbeats but the newest (all of them if one comes now)."""
        if not self._over(1, size):
            return
        heartbeats = [q for q, (k, _) in self._queue.items() if k == HEARTBEAT]
        doomed = heartbeats if kind == HEARTBEAT else heartbeats[:-1]
        for q in doomed:
            try:
                (self.directory / "queue" / _name(q)).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("spool_compaction_failed", error=advice(exc))
                break
            del self._queue[q]
            self._compacted += 1
        if doomed:
            log.warning("spool_compacted", heartbeats_dropped=len(doomed), limit=self.max_records)

    def queued(self, limit: int) -> list[Record]:
        """The oldest queued records on disk, in order (memory ones wait until written)."""
        with self._lock:
            numbers = list(self._queue)[:limit]
        out = []
        for q in numbers:
            path = self.directory / "queue" / _name(q)
            try:
                out.append(Record.decode(path.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                with self._lock:
                    self._queue.pop(q, None)
                    self._quarantine(path, str(exc))
                break
        return out

    # --- sealed envelopes ------------------------------------------------------------------

    def store_sealed(self, q: int, envelope: Mapping[str, Any]) -> None:
        """Persist a signed envelope, then forget the queue record it came from."""
        seq = int(envelope["seq"])
        data = json.dumps({"q": q, "envelope": dict(envelope)}, separators=(",", ":")).encode()
        try:
            durable.write_atomic(self.directory / "sealed" / _name(seq), data)
        except OSError as exc:
            raise SpoolError(f"cannot write a sealed envelope: {advice(exc)}") from exc
        with self._lock:
            self._sealed[seq] = len(data)
            self._queue.pop(q, None)
        try:
            durable.remove(self.directory / "queue" / _name(q))
        except OSError as exc:  # harmless: resume() drops it at the next start
            log.warning("spool_unlink_failed", q=q, error=advice(exc))

    def sealed(self, limit: int | None = None) -> list[Sealed]:
        """Sealed envelopes not yet acknowledged, in chain order."""
        with self._lock:
            numbers = list(self._sealed)[:limit]
        out = []
        for seq in numbers:
            path = self.directory / "sealed" / _name(seq)
            try:
                data = path.read_bytes()
                obj = json.loads(data)
                out.append(Sealed(seq, int(obj["q"]), obj["envelope"], len(data)))
            except FileNotFoundError:
                continue  # acknowledged meanwhile
            except (OSError, ValueError, KeyError, TypeError) as exc:
                with self._lock:
                    self._sealed.pop(seq, None)
                    self._quarantine(path, str(exc))
        return out

    def ack(self, seqs: Iterable[int]) -> int:
        """Forget acknowledged envelopes; return how many were in the spool."""
        done = 0
        for seq in seqs:
            with self._lock:
                if self._sealed.pop(seq, None) is None:
                    continue
            (self.directory / "sealed" / _name(seq)).unlink(missing_ok=True)
            done += 1
        if done:
            durable.fsync_dir(self.directory / "sealed")
        return done

    def reject(self, seq: int, error: Mapping[str, Any]) -> None:
        """Move a refused envelope to ``rejected/`` with the collector's answer."""
        source = self.directory / "sealed" / _name(seq)
        try:
            obj = json.loads(source.read_bytes())
            obj["error"] = dict(error)
            obj["rejected_at"] = utc_now()
            durable.write_json(self.directory / "rejected" / _name(seq), obj)
            durable.remove(source)
        except (OSError, ValueError) as exc:
            raise SpoolError(f"cannot move envelope {seq} to rejected/: {exc}") from exc
        with self._lock:
            self._sealed.pop(seq, None)
            self._rejected += 1

    # --- state -----------------------------------------------------------------------------

    def health(self) -> SpoolHealth:
        with self._lock:
            return SpoolHealth(
                state=self._state,
                depth=len(self._queue) + len(self._sealed) + len(self._memory),
                size_bytes=self._bytes(),
                in_memory=len(self._memory),
                rejected=self._rejected,
                compacted=self._compacted,
            )

    def empty(self) -> bool:
        with self._lock:
            return not (self._queue or self._sealed or self._memory)

    def has_sealed(self) -> bool:
        with self._lock:
            return bool(self._sealed)
