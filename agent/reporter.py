"""Sequencing and chaining: turns queued reports into the host's signed envelope chain.

Every envelope carries ``seq`` (1, 2, 3, …) and ``prev``, the digest of the envelope before it,
so the collector can tell a gap, a replay or a fork. The tip of the chain (seq, digest, and the
queue number of the last report sealed) is kept in ``chain.json`` in the state directory and
reconciled with the spool's sealed envelopes at start, so a restart — even after ``kill -9``
between two writes — continues the chain exactly where it stopped: no seq is used twice and
no report is sealed twice.

Reports are sealed lazily, when the sender asks for a batch (see ``agent.spool``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from agent import durable, wire
from agent.errors import SpoolError, advice
from agent.spool import Sealed, Spool

CHAIN_FILE: Final = "chain.json"
MAX_BODY_BYTES: Final = wire.MAX_ENVELOPE_BYTES - (64 << 10)  # room for the envelope around it
BATCH_OVERHEAD_BYTES: Final = 256

log = structlog.get_logger(__name__)


@dataclass
class Tip:
    seq: int = 0
    digest: str = ""
    q: int = 0  # queue number of the last report sealed


class Reporter:
    def __init__(
        self,
        spool: Spool,
        signer: wire.Signer,
        *,
        host_id: str,
        key_id: str,
        boot_id: str,
        state_dir: Path,
    ) -> None:
        self.spool = spool
        self.host_id = host_id
        self.boot_id = boot_id
        self._signer = signer
        self._key_id = key_id
        self._path = state_dir / CHAIN_FILE
        self._lock = threading.Lock()
        self._saved = False
        self._wake: Callable[[], None] = lambda: None
        self.tip = self._load()
        self._reconcile()
        self._save()
        spool.resume(self.tip.q)

    def on_report(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` after each report is queued (the sender waits on it)."""
        self._wake = wake

    # --- chain state -----------------------------------------------------------------------

    def _load(self) -> Tip:
        try:
            obj = durable.read_json(self._path)
        except (OSError, ValueError) as exc:
            raise SpoolError(f"chain state is unreadable: {exc}", path=self._path) from exc
        if obj is None:
            return Tip()
        if obj.get("host_id") != self.host_id or obj.get("key_id") != self._key_id:
            log.warning(
                "chain_restarted",
                reason="new host id or key",
                old_host_id=obj.get("host_id"),
                old_key_id=obj.get("key_id"),
            )
            for sealed in self.spool.sealed():
                self.spool.reject(sealed.seq, {"code": "key_replaced", "message": "old key"})
            return Tip(q=int(obj.get("q", 0)))
        return Tip(int(obj["seq"]), str(obj["digest"]), int(obj["q"]))

    def _reconcile(self) -> None:
        """Sealed envelopes newer than the saved tip were written just before a crash."""
        for sealed in self.spool.sealed():
            if sealed.seq <= self.tip.seq:
                continue
            envelope = wire.parse_envelope(sealed.envelope)
            if sealed.seq != self.tip.seq + 1 or (
                self.tip.seq and envelope.prev != self.tip.digest
            ):
                log.error("chain_reconcile_mismatch", seq=sealed.seq, tip=self.tip.seq)
            self.tip = Tip(sealed.seq, envelope.digest, sealed.q)
            self._saved = False

    def _save(self) -> bool:
        obj = {
            "host_id": self.host_id,
            "key_id": self._key_id,
            "seq": self.tip.seq,
            "digest": self.tip.digest,
            "q": self.tip.q,
        }
        try:
            durable.write_json(self._path, obj)
        except OSError as exc:
            log.error("chain_state_unwritable", path=str(self._path), error=advice(exc))
            self._saved = False
            return False
        self._saved = True
        return True

    # --- reporting -------------------------------------------------------------------------

    def report(
        self,
        kind: str,
        body: Mapping[str, Any],
        *,
        staged: Callable[[int], None] | None = None,
    ) -> None:
        """Queue a report (split when its findings do not fit one envelope). ``staged`` is
        called first with the queue number of the report's last record (only the loop thread
        queues reports, so the numbers are known before they are written)."""
        parts = list(split_findings(kind, body))
        if staged is not None:
            staged(self.spool.next_q + len(parts) - 1)
        for part_kind, part in parts:
            self.spool.put(part_kind, part, boot_id=self.boot_id)
        self._wake()

    def batch(self, *, max_envelopes: int, max_bytes: int) -> list[Sealed]:
        """The next envelopes to send, in seq order: unacknowledged ones first, then new ones.

        Returns nothing while the chain state cannot be written (the envelopes stay sealed on
        disk and are offered again once it can).
        """
        with self._lock:
            self.spool.retry()
            if not self._saved and not self._save():
                return []
            out = self.spool.sealed(max_envelopes)
            wanted = max_envelopes - len(out)
            if wanted > 0:
                out.extend(self._seal(self.spool.queued(wanted)))
                if not self._save():
                    return []
        return _fit(out, max_bytes)

    def _seal(self, records: list[Any]) -> Iterator[Sealed]:
        for record in records:
            envelope = wire.make_envelope(
                self._signer,
                host_id=self.host_id,
                boot_id=record.boot_id,
                seq=self.tip.seq + 1,
                prev=self.tip.digest,
                kind=record.kind,
                body=record.body,
                time=record.time,
            )
            obj = envelope.to_json()
            try:
                self.spool.store_sealed(record.q, obj)
            except SpoolError as exc:
                log.error("spool_seal_failed", error=str(exc))
                return
            self.tip = Tip(envelope.seq, envelope.digest, record.q)
            self._saved = False
            yield Sealed(envelope.seq, record.q, obj, len(wire.canonical(obj)))


def _fit(batch: list[Sealed], max_bytes: int) -> list[Sealed]:
    """The longest prefix under ``max_bytes`` (always at least one envelope)."""
    total = BATCH_OVERHEAD_BYTES
    for index, sealed in enumerate(batch):
        total += sealed.size_bytes + 1
        if total > max_bytes and index:
            return batch[:index]
    return batch


def split_findings(kind: str, body: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """One body, or — when its findings do not fit one envelope — several.

    The first part keeps ``kind`` and every other field with the findings that fit; the rest
    follow as ``finding`` envelopes (source: the body's own, or "rescan" for a boot check),
    each marked ``"continues": <kind>``.
    """
    findings = body.get("findings")
    if not isinstance(findings, list) or len(wire.canonical(dict(body))) <= MAX_BODY_BYTES:
        yield kind, dict(body)
        return
    head = {k: v for k, v in body.items() if k != "findings"}
    base = len(wire.canonical(head)) + 64
    parts: list[list[Any]] = [[]]
    size = base
    for finding in findings:
        grow = len(wire.canonical(finding)) + 1
        if parts[-1] and size + grow > MAX_BODY_BYTES:
            parts.append([])
            size = base
        parts[-1].append(finding)
        size += grow
    yield kind, {**head, "findings": parts[0]}
    source = body.get("source", "rescan")
    for part in parts[1:]:
        yield "finding", {"source": source, "continues": kind, "findings": part}
