"""A simulated host for tests: a real Ed25519 key and a real envelope chain (agent.wire)."""

from __future__ import annotations

import itertools
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent import wire
from collector.model import HostState
from collector.store import SqlStore

ROOT = "ab" * 32
_ids = itertools.count(1)


class SimHost:
    def __init__(
        self,
        host_id: str | None = None,
        *,
        pool: str | None = "web",
        build_id: str = "img-1",
        root: str = ROOT,
    ) -> None:
        self.host_id = host_id or f"host-{next(_ids)}"
        self.pool = pool
        self.build_id = build_id
        self.root = root
        self.boot_id = "boot-1"
        self.new_key()

    def new_key(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.seq = 0
        self.prev = ""

    @property
    def public_raw(self) -> bytes:
        return self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def enrollment(self, token: str) -> dict[str, Any]:
        facts = {
            "hostname": self.host_id + ".example",
            "boot_id": self.boot_id,
            "agent_version": "0.1.0",
            "pool": self.pool,
            "image": {"build_id": self.build_id, "root": self.root, "cloud_image_id": None},
        }
        return wire.make_enrollment(
            self.key,
            token=token,
            host_id=self.host_id,
            public_key_raw=self.public_raw,
            facts=facts,
        )

    def envelope(
        self, kind: str, body: dict[str, Any], *, seq: int | None = None
    ) -> dict[str, Any]:
        """The next envelope of the chain (or one at ``seq``, which skips ahead)."""
        seq = self.seq + 1 if seq is None else seq
        env = wire.make_envelope(
            self.key,
            host_id=self.host_id,
            boot_id=self.boot_id,
            seq=seq,
            prev=self.prev if seq > 1 else "",
            kind=kind,
            body=body,
        )
        self.seq, self.prev = seq, env.digest
        return env.to_json()

    def heartbeat(self) -> dict[str, Any]:
        return self.envelope("heartbeat", {"health": {"spool_depth": 0, "version": "0.1.0"}})

    def agent_start(self, previous_stop: str = "first") -> dict[str, Any]:
        body = {
            "version": "0.1.0",
            "pid": 123,
            "previous_stop": previous_stop,
            "watch_backend": "inotify",
            "image": {"build_id": self.build_id, "root": self.root, "cloud_image_id": None},
        }
        return self.envelope("agent_start", body)

    def boot(
        self,
        *,
        findings: list[dict[str, Any]] | None = None,
        measured_root: str | None = None,
        baseline_root: str | None = None,
    ) -> dict[str, Any]:
        found = findings or []
        body = {
            "first_boot": True,
            "baseline": {
                "build_id": self.build_id,
                "root": baseline_root or self.root,
                "policy_digest": "sha256:00",
                "key_id": "ed25519:00",
                "signed": True,
            },
            "measured_root": measured_root or self.root,
            "clean": not any(f.get("drift") for f in found),
            "findings": found,
            "stats": {},
        }
        return self.envelope("boot", body)

    def finding(self, *findings: dict[str, Any], source: str = "realtime") -> dict[str, Any]:
        return self.envelope("finding", {"source": source, "findings": list(findings)})

    def batch(self, *envelopes: dict[str, Any]) -> dict[str, Any]:
        return {"host_id": self.host_id, "envelopes": list(envelopes)}


def file_drift(path: str, severity: str = "critical") -> dict[str, Any]:
    return {"type": "file", "drift": True, "severity": severity, "path": path, "change": "content"}


def login(verdict: str = "taint") -> dict[str, Any]:
    return {
        "type": "login",
        "event": "accepted",
        "user": "alice",
        "method": "publickey",
        "source_ip": "192.0.2.7",
        "source_port": 50000,
        "fingerprint": "SHA256:abc",
        "key_id": None,
        "at": wire.utc_now(),
        "verdict": verdict,
        "severity": "critical",
    }


def add_host(store: SqlStore, host_id: str, *, state: HostState = HostState.CLEAN) -> None:
    with store.transaction() as tx:
        tx.insert_host(
            host_id,
            {
                "state": state.value,
                "state_since": tx.now,
                "state_cause": "test",
                "key_id": "ed25519:0",
                "public_key": b"\x00" * 32,
                "hostname": host_id,
                "pool": "web",
                "boot_id": "b",
                "agent_version": "0.1.0",
                "image_build_id": "img-1",
                "enrolled_at": tx.now,
                "envelopes": 0,
                "health": {},
                "facts": {},
            },
        )
