"""Ingest: enrollment, and batches of signed envelopes (docs/protocol.md).

A batch is parsed and its signatures verified first, then its chain checked and everything it
causes (envelopes, findings, transitions, jobs) written in ONE transaction; the answer is sent
only after that commits, so an acknowledged envelope is never lost. Any refusal writes nothing
of the batch and names the envelope (``index``, ``seq``) and the chain tip the collector holds.
Concurrent requests share their transaction and its commit (``collector.groupcommit``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import structlog

from agent import wire
from collector import bodies, transitions, verdicts
from collector.auth import token_hash
from collector.config import Config
from collector.errors import Refused
from collector.groupcommit import GroupCommitter
from collector.hostkeys import HostKey
from collector.metrics import Metrics
from collector.model import EnrollToken, Finding, Host, HostState
from collector.response import breakglass
from collector.store import Store, Tx
from collector.verdicts import Observation, Signal

log = structlog.get_logger(__name__)

MAX_REMEMBERED_KEYS: Final = 100_000
NOT_LIVE: Final = "unknown, expired, used up or revoked enrollment token"


@dataclass(frozen=True)
class Enrolled:
    status: int
    body: dict[str, Any]


class Ingestor:
    """Enrollment and reports. Checks that need no database (shape, signatures) run in the
    caller's thread, many at once; what is written goes through the process's one writer
    (``GroupCommitter``), which commits concurrent requests together and answers each only
    after its commit."""

    def __init__(
        self,
        store: Store,
        config: Config,
        metrics: Metrics,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        group_window_s: float = 0.0,
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        # on the server's event loop (SQLite), or a thread that gathers groups for
        # ``group_window_s`` (the server on PostgreSQL)
        self.committer = GroupCommitter(store, loop=loop, window_s=group_window_s)
        self._keys: dict[str, tuple[str, HostKey]] = {}
        # the fleet's keys, read in one query when the first report comes and loaded into
        # ``_keys`` as their hosts report: a report seldom waits for the database to learn
        # its host's key (a host enrolled since then, through another process)
        self._enrolled: dict[str, tuple[str, bytes]] | None = None

    def close(self) -> None:
        """Finish what is waiting to be written, then stop the writer."""
        self.committer.close()

    # --- enrollment ------------------------------------------------------------------------

    def enroll(self, request: Any) -> Enrolled:
        return self.submit_enroll(request).result()

    def submit_enroll(self, request: Any) -> Future[Enrolled]:
        """Check the request and its proof of key; the future is answered after the commit."""
        try:
            host_id, raw_key, facts = wire.verify_enrollment(request, HostKey)
            bodies.short("host_id", host_id)
            values = _facts(facts)
        except wire.WireError as exc:
            raise self._refuse(400, exc.code, str(exc)) from exc
        key_id = wire.key_id(raw_key)
        spent = token_hash(request["token"])
        return self.committer.submit(
            lambda tx: self._enroll(tx, host_id, key_id, raw_key, values, spent),
            locks=(host_id,),
        )

    def _enroll(
        self,
        tx: Tx,
        host_id: str,
        key_id: str,
        raw_key: bytes,
        values: Mapping[str, Any],
        spent: str,
    ) -> Enrolled:
        host = tx.lock_host(host_id)
        if host is not None and host.key_id == key_id:
            # the same key again: idempotent, the token is not spent again; the pool stays
            tx.update_host(host_id, {k: v for k, v in values.items() if k != "pool"})
            status = 200
        else:
            token = tx.live_enroll_token(spent)
            if token is None:
                raise self._refuse(401, "bad_token", NOT_LIVE)
            if host is not None and host.rekey_allowed_by is None:
                raise self._key_mismatch(tx, host, key_id, token)
            if not tx.use_enroll_token(spent):  # pragma: no cover - live a moment ago, locked
                raise self._refuse(401, "bad_token", NOT_LIVE)
            tx.add_key(host_id, key_id, raw_key)
            if host is None:
                self._new_host(tx, host_id, key_id, raw_key, _bind_pool(host_id, values, token))
            else:
                self._rekeyed(tx, host, key_id, raw_key, values)
            self._keys.pop(host_id, None)
            if self._enrolled is not None:
                self._enrolled.pop(host_id, None)
            status = 201
        tip = tx.key_tip(host_id, key_id) or wire.ChainState()
        log.info("host_enrolled", host_id=host_id, key_id=key_id, status=status)
        return Enrolled(
            status, {"host_id": host_id, "last_seq": tip.last_seq, "last_digest": tip.last_digest}
        )

    def _new_host(
        self, tx: Tx, host_id: str, key_id: str, raw_key: bytes, values: Mapping[str, Any]
    ) -> None:
        tx.insert_host(
            host_id,
            {
                "state": HostState.ENROLLED.value,
                "state_since": tx.now,
                "state_cause": "enrolled",
                "key_id": key_id,
                "public_key": raw_key,
                "enrolled_at": tx.now,
                "envelopes": 0,
                "health": {},
                **values,
            },
        )
        host = tx.lock_host(host_id)
        assert host is not None
        evidence = {"key_id": key_id, "image": host.image_build_id}
        transitions.record(
            tx, host, HostState.ENROLLED, "enrolled", evidence, actor="enrollment", initial=True
        )

    def _key_mismatch(self, tx: Tx, host: Host, key_id: str, token: EnrollToken) -> Refused:
        """A new key for a known host, not allowed by an operator: refused, and the attempt is
        evidence of tampering (the host's state was wiped or cloned, or someone poses as it):
        once per new key, a finding, and the host becomes suspect — when the token could have
        enrolled it (a token bound to another pool could not: a warning page then, so a
        token leaked from one pool cannot condemn another's hosts). A host past suspect gets
        the warning page too. Its key, pool and facts stay as they are, so holding a token is
        not enough to take a host over, and the real host goes on reporting under its key."""
        evidence = {
            "reason": "key_mismatch",
            "enrolled_key_id": host.key_id,
            "refused_key_id": key_id,
            "enroll_token_id": token.token_id,
        }
        log.warning("host_key_refused", host_id=host.host_id, **evidence)
        if host.refused_key_id != key_id:
            tx.update_host(host.host_id, {"refused_key_id": key_id})
            tx.add_findings([_integrity(host.host_id, tx.now, "warning", evidence)])
            moved = host
            if token.pool is None or token.pool == host.pool:
                observation = Observation(Signal.SUSPECT, "key_mismatch", evidence)
                moved = transitions.apply(tx, host, observation)
            if moved.state is host.state:  # another pool's token, suspect already, replacing
                tx.enqueue(verdicts.warning(host, "key_mismatch", evidence))
        return self._refuse(
            409,
            "key_mismatch",
            f"host {host.host_id!r} is enrolled with key {host.key_id}, not {key_id}; an "
            f"operator must allow a new key (driftwarden rekey {host.host_id} --reason ...)",
        )

    def _rekeyed(
        self, tx: Tx, host: Host, key_id: str, raw_key: bytes, values: Mapping[str, Any]
    ) -> None:
        """A new key an operator allowed: the chain restarts under it; the pool stays."""
        update = {k: v for k, v in values.items() if k != "pool"}
        tx.update_host(
            host.host_id,
            {
                **update,
                "key_id": key_id,
                "public_key": raw_key,
                "rekey_allowed_by": None,
                "refused_key_id": None,
            },
        )
        evidence = {
            "old_key_id": host.key_id,
            "new_key_id": key_id,
            "allowed_by": host.rekey_allowed_by,
        }
        log.warning("host_key_changed", host_id=host.host_id, **evidence)
        tx.add_findings(
            [_integrity(host.host_id, tx.now, "info", {"reason": "rekeyed", **evidence})]
        )

    # --- reports -----------------------------------------------------------------------------

    def reports(self, request: Any) -> dict[str, Any]:
        return self.submit_reports(request).result()

    def submit_reports(self, request: Any) -> Future[dict[str, Any]]:
        """Parse the batch and verify its signatures here; the future is answered with the
        acknowledgements after the batch is committed (or with its refusal)."""
        host_id, batch = self._parse(request)
        key_id = self._signed_by(host_id, batch)
        future = self.committer.submit(
            lambda tx: self._ingest(tx, host_id, key_id, batch), locks=(host_id,)
        )
        future.add_done_callback(lambda done: self._count(batch, done))
        return future

    def _signed_by(self, host_id: str, batch: list[tuple[wire.Envelope, bodies.Reading]]) -> str:
        """The id of the host's key, which signed every envelope of the batch. A remembered key
        that does not verify is read again first: the host may have been re-keyed through
        another process or replica since."""
        key_id, key = self._host_key(host_id)
        if _first_bad(key, batch) is None:
            return key_id
        self._keys.pop(host_id, None)
        current = self.store.current_keys(host_id=host_id).get(host_id)
        if current is not None and current[0] != key_id:
            key_id, key = self._remember(host_id, *current)
        self._verify(key, batch)
        return key_id

    def _host_key(self, host_id: str) -> tuple[str, HostKey]:
        """The host's enrolled key (remembered: the commit checks it is still the one)."""
        known = self._keys.get(host_id)
        if known is not None:
            return known
        if self._enrolled is None:
            self._enrolled = self.store.current_keys(limit=MAX_REMEMBERED_KEYS)
        enrolled = self._enrolled.pop(host_id, None) or self.store.current_keys(
            host_id=host_id
        ).get(host_id)
        if enrolled is None:
            raise self._refuse(404, "unknown_host", f"host {host_id!r} is not enrolled; enroll")
        return self._remember(host_id, *enrolled)

    def _remember(self, host_id: str, key_id: str, raw: bytes) -> tuple[str, HostKey]:
        if len(self._keys) >= MAX_REMEMBERED_KEYS:
            self._keys.clear()
        known = (key_id, HostKey(raw))
        self._keys[host_id] = known
        return known

    def _ingest(
        self, tx: Tx, host_id: str, key_id: str, batch: list[tuple[wire.Envelope, bodies.Reading]]
    ) -> dict[str, Any]:
        host = tx.lock_host(host_id)
        if host is None:
            raise self._refuse(404, "unknown_host", f"host {host_id!r} is not enrolled; enroll")
        if host.key_id != key_id:  # re-enrolled with a new key meanwhile
            self._verify(self._remember(host_id, host.key_id, host.public_key)[1], batch)
        acks, tip = self._commit(tx, host, batch)
        return {"acks": acks, "last_seq": tip.last_seq, "last_digest": tip.last_digest}

    def _count(
        self, batch: list[tuple[wire.Envelope, bodies.Reading]], done: Future[dict[str, Any]]
    ) -> None:
        if done.exception() is None:
            for (env, _), ack in zip(batch, done.result()["acks"], strict=True):
                self.metrics.envelope(env.kind, ack["status"])

    def _parse(self, request: Any) -> tuple[str, list[tuple[wire.Envelope, bodies.Reading]]]:
        if not isinstance(request, dict) or set(request) != {"host_id", "envelopes"}:
            raise self._refuse(400, "malformed", "body must be {'host_id', 'envelopes'}")
        host_id, items = request["host_id"], request["envelopes"]
        if not isinstance(host_id, str) or not isinstance(items, list):
            raise self._refuse(400, "malformed", "host_id must be a string, envelopes a list")
        if not 1 <= len(items) <= wire.MAX_BATCH_ENVELOPES:
            raise self._refuse(
                400,
                "malformed",
                f"a batch holds 1 to {wire.MAX_BATCH_ENVELOPES} envelopes, not {len(items)}",
            )
        batch = []
        for index, item in enumerate(items):
            try:
                env = wire.parse_envelope(item)
                if env.host_id != host_id:
                    raise wire.MalformedError(
                        f"envelope is for host {env.host_id!r}, batch for {host_id!r}", seq=env.seq
                    )
                reading = bodies.read(env, now=self.store.clock())
            except wire.WireError as exc:
                raise self._refuse(400, exc.code, str(exc), index=index, seq=exc.seq) from exc
            batch.append((env, reading))
        return host_id, batch

    def _verify(self, key: HostKey, batch: list[tuple[wire.Envelope, bodies.Reading]]) -> None:
        bad = _first_bad(key, batch)
        if bad is not None:
            index, env, exc = bad
            raise self._refuse(401, exc.code, str(exc), index=index, seq=env.seq) from exc

    def _commit(
        self, tx: Tx, host: Host, batch: list[tuple[wire.Envelope, bodies.Reading]]
    ) -> tuple[list[dict[str, Any]], wire.ChainState]:
        """Write the batch. Its whole chain is checked first, so a refusal writes nothing."""
        stored = tx.key_tip(host.host_id, host.key_id) or wire.ChainState()
        links = self._chain(tx, host, stored, batch)
        tip = wire.ChainState(stored.last_seq, stored.last_digest)
        acks: list[dict[str, Any]] = []
        values: dict[str, Any] = {}
        accepted = 0
        for (env, reading), (link, gap) in zip(batch, links, strict=True):
            if link is wire.Link.DUPLICATE:
                acks.append({"seq": env.seq, "status": "duplicate"})
                continue
            if gap is not None:
                log.warning("sequence_gap", host_id=host.host_id, **gap)
                host = transitions.apply(tx, host, Observation(Signal.SUSPECT, "sequence_gap", gap))
            tx.add_envelope(host.host_id, host.key_id, env)
            tip.advance(env)
            accepted += 1
            host = self._judge(tx, host, reading)
            values.update(reading.host_values)
            acks.append({"seq": env.seq, "status": "accepted"})
        if accepted:  # a batch of duplicates only (a replay of old reports) is not a sign of life
            tx.set_tip(host.host_id, host.key_id, tip)
            tx.update_host(
                host.host_id,
                {**values, "last_seen_at": tx.now, "envelopes": host.envelopes + accepted},
            )
        return acks, tip

    def _chain(
        self,
        tx: Tx,
        host: Host,
        stored: wire.ChainState,
        batch: list[tuple[wire.Envelope, bodies.Reading]],
    ) -> list[tuple[wire.Link, dict[str, int] | None]]:
        """How each envelope links to the chain (and the gap it jumps, if any); a replay or a
        fork refuses the whole batch (409) naming the envelope and the stored tip."""
        tip = wire.ChainState(stored.last_seq, stored.last_digest)
        seen: dict[int, str] = {}  # this batch's envelopes, not written yet
        links: list[tuple[wire.Link, dict[str, int] | None]] = []
        for index, (env, _) in enumerate(batch):
            known = None
            if env.seq < tip.last_seq:
                known = seen.get(env.seq) or tx.stored_digest(host.host_id, host.key_id, env.seq)
            gap = None
            try:
                link = tip.link(env, known_digest=known)
            except wire.GapError:
                gap = {"expected": tip.last_seq + 1, "got": env.seq}
                link = wire.Link.NEXT
            except wire.ChainError as exc:
                self._chain_conflict(tx, host, env, exc.code, known, stored)
                raise self._refuse(
                    409,
                    exc.code,
                    str(exc),
                    index=index,
                    seq=env.seq,
                    last_seq=stored.last_seq,
                    last_digest=stored.last_digest,
                ) from exc
            if link is wire.Link.NEXT:
                tip.advance(env)
                seen[env.seq] = env.digest
            links.append((link, gap))
        return links

    def _chain_conflict(
        self,
        tx: Tx,
        host: Host,
        env: wire.Envelope,
        code: str,
        known: str | None,
        stored: wire.ChainState,
    ) -> None:
        """A correctly signed replay or fork is evidence (a restored snapshot, a clone, a
        forged history): the host becomes suspect. Written before the refusal, so it commits
        although nothing of the batch does."""
        evidence = {
            "code": code,
            "seq": env.seq,
            "digest": env.digest,
            "prev": env.prev,
            "stored_digest": known,
            "last_seq": stored.last_seq,
            "last_digest": stored.last_digest,
        }
        log.warning("chain_conflict", host_id=host.host_id, **evidence)
        transitions.apply(tx, host, Observation(Signal.SUSPECT, "chain_conflict", evidence))

    def _judge(self, tx: Tx, host: Host, reading: bodies.Reading) -> Host:
        tx.add_findings(reading.findings)
        observations = list(reading.observations)
        if reading.boot is not None:
            observations.extend(self._image_check(tx, reading.boot))
        observations = breakglass.attribute(tx, host, reading.findings, observations)
        for observation in observations:
            host = transitions.apply(tx, host, observation)
        return host

    def _image_check(self, tx: Tx, boot: bodies.BootImage) -> list[Observation]:
        """A boot on an image nobody registered, on a baseline that is not the registered one,
        or whose measurement is not the registered root, is drift: the authoritative baseline
        lives here, not on the host."""
        image = tx.image(boot.build_id)
        if image is None:
            if not self.config.images.require_registered:
                return []
            evidence = {"build_id": boot.build_id, "baseline_root": boot.baseline_root}
            return [Observation(Signal.DRIFT, "image_unregistered", evidence)]
        if boot.baseline_root != image.root:
            evidence = {
                "build_id": boot.build_id,
                "registered_root": image.root,
                "baseline_root": boot.baseline_root,
            }
            return [Observation(Signal.DRIFT, "baseline_mismatch", evidence)]
        if boot.measured_root and boot.measured_root != image.root:
            # the image's root with the host's drift in it (an older agent sends none)
            evidence = {
                "build_id": boot.build_id,
                "registered_root": image.root,
                "measured_root": boot.measured_root,
            }
            return [Observation(Signal.DRIFT, "measurement_mismatch", evidence)]
        return []

    def _refuse(self, status: int, code: str, message: str, **details: Any) -> Refused:
        self.metrics.rejected(code)
        details = {k: v for k, v in details.items() if v is not None}
        log.info("report_refused", status=status, code=code, reason=message, **details)
        return Refused(status, code, message, **details)


def _first_bad(
    key: HostKey, batch: list[tuple[wire.Envelope, bodies.Reading]]
) -> tuple[int, wire.Envelope, wire.WireError] | None:
    """The first envelope whose signature ``key`` does not verify, and why."""
    for index, (env, _) in enumerate(batch):
        try:
            wire.verify_signature(env, key)
        except wire.WireError as exc:
            return index, env, exc
    return None


def _integrity(host_id: str, at: datetime, severity: str, detail: Mapping[str, Any]) -> Finding:
    """A finding the collector itself records (no envelope carried it: seq 0)."""
    return Finding(host_id, 0, "integrity", "integrity", severity, False, None, at, dict(detail))


def _bind_pool(host_id: str, values: Mapping[str, Any], token: EnrollToken) -> dict[str, Any]:
    """The pool is the enrollment token's when it names one; what the host claims is then
    only a fact (a different claim is logged as a mismatch)."""
    if token.pool is None:
        return dict(values)
    claimed = values.get("pool")
    if claimed is not None and claimed != token.pool:
        log.warning(
            "enroll_pool_mismatch",
            host_id=host_id,
            claimed=claimed,
            pool=token.pool,
            enroll_token_id=token.token_id,
        )
    return {**values, "pool": token.pool}


def _facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The host columns enrollment facts set; the shape is checked (400 malformed)."""
    return {
        "hostname": bodies.required(facts, "hostname", str),
        "boot_id": bodies.required(facts, "boot_id", str),
        "agent_version": bodies.required(facts, "agent_version", str),
        "pool": bodies.optional(facts, "pool", str),
        "facts": dict(facts),
        **bodies.image_values(bodies.required(facts, "image", dict)),
    }
