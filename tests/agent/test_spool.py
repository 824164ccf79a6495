"""The durable spool and the chain: order, durability, compaction, a full disk, restarts."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from agent import durable, keys, wire
from agent.reporter import MAX_BODY_BYTES, Reporter, split_findings
from agent.spool import Spool

KEY_ID = "ed25519:test"


def _open(state: Path, key: Ed25519PrivateKey, **limits: int) -> Reporter:
    spool = Spool(
        state / "spool",
        max_bytes=limits.get("max_bytes", 1 << 20),
        max_records=limits.get("max_records", 1000),
    )
    return Reporter(spool, key, host_id="h-1", key_id=KEY_ID, boot_id="b-1", state_dir=state)


def _drain(reporter: Reporter, limit: int = 500) -> list[wire.Envelope]:
    """Seal and 'deliver' everything: verify, then acknowledge."""
    out = []
    while batch := reporter.batch(max_envelopes=limit, max_bytes=4 << 20):
        out.extend(wire.parse_envelope(s.envelope) for s in batch)
        reporter.spool.ack(s.seq for s in batch)
    return out


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_reports_survive_reopen_and_chain_continues(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    reporter = _open(tmp_path, key)
    for n in range(5):
        reporter.report("finding", {"source": "realtime", "findings": [{"n": n}]})
    first = _drain(reporter, limit=2)
    reporter.report("heartbeat", {"health": {}})
    reporter.report("finding", {"source": "ssh", "findings": []})

    reopened = _open(tmp_path, key)  # a restart: state only from disk
    assert reopened.spool.health().depth == 2
    second = _drain(reopened)
    chain = first + second
    assert [e.seq for e in chain] == list(range(1, 8))
    assert [e.body.get("findings") for e in chain[:5]] == [[{"n": n}] for n in range(5)]
    wire.verify_chain([e.to_json() for e in chain], key.public_key())
    assert reopened.spool.empty()


def test_unacknowledged_envelopes_are_offered_again_identically(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    reporter = _open(tmp_path, key)
    for n in range(3):
        reporter.report("heartbeat", {"health": {"n": n}})
    sent = reporter.batch(max_envelopes=10, max_bytes=4 << 20)
    again = _open(tmp_path, key).batch(max_envelopes=10, max_bytes=4 << 20)
    assert [s.envelope for s in again] == [s.envelope for s in sent]


def test_crash_after_sealing_before_chain_state_is_reconciled(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    reporter = _open(tmp_path, key)
    reporter.report("heartbeat", {"health": {"n": 1}})
    _drain(reporter)
    saved = (tmp_path / "chain.json").read_bytes()
    for n in range(2, 5):
        reporter.report("heartbeat", {"health": {"n": n}})
    sealed = reporter.batch(max_envelopes=10, max_bytes=4 << 20)
    # as if killed after the sealed files were written but before chain.json was: the queue
    # files are still there too
    (tmp_path / "chain.json").write_bytes(saved)
    for s in sealed:
        record = {"q": s.q, "kind": "heartbeat", "boot_id": "b-1", "time": "x", "body": {}}
        (tmp_path / "spool" / "queue" / f"{s.q:016d}.json").write_text(json.dumps(record))

    reopened = _open(tmp_path, key)
    assert reopened.tip.seq == 4
    rest = _drain(reopened)
    assert [e.seq for e in rest] == [2, 3, 4]  # each report sealed once, never twice
    reopened.report("heartbeat", {"health": {"n": 5}})
    assert [e.seq for e in _drain(reopened)] == [5]


def test_torn_temporaries_and_corrupt_records_are_set_aside(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    reporter = _open(tmp_path, key)
    reporter.report("heartbeat", {"health": {}})
    queue = tmp_path / "spool" / "queue"
    (queue / ".tmp-0000000000000009.json").write_bytes(b'{"q": 9, "ki')  # a torn write
    (queue / "0000000000000008.json").write_bytes(b"\x00garbage")
    with capture_logs() as logs:
        reopened = _open(tmp_path, key)
    assert not (queue / ".tmp-0000000000000009.json").exists()
    assert any(e["event"] == "spool_record_corrupt" for e in logs)
    assert reopened.spool.health().rejected == 1
    assert [e.kind for e in _drain(reopened)] == ["heartbeat"]


def test_full_spool_compacts_heartbeats_and_keeps_findings(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    reporter = _open(tmp_path, key, max_records=6)
    for n in range(4):
        reporter.report("finding", {"source": "realtime", "findings": [{"n": n}]})
    for n in range(10):
        reporter.report("heartbeat", {"health": {"n": n}})
    for n in range(4, 8):
        reporter.report("finding", {"source": "realtime", "findings": [{"n": n}]})
    health = reporter.spool.health()
    assert health.compacted == 9
    assert health.state == "over_limit"  # findings are kept beyond the bound
    delivered = _drain(reporter)
    findings = [e.body["findings"][0]["n"] for e in delivered if e.kind == "finding"]
    heartbeats = [e.body["health"]["n"] for e in delivered if e.kind == "heartbeat"]
    assert findings == list(range(8))
    assert heartbeats == [9]  # the newest
    assert [e.seq for e in delivered] == list(range(1, 10))  # no hole in the chain


def test_batches_respect_the_byte_limit(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    reporter = _open(tmp_path, key)
    for _ in range(6):
        reporter.report("finding", {"source": "rescan", "findings": [{"pad": "x" * 1000}]})
    batch = reporter.batch(max_envelopes=100, max_bytes=3000)
    assert 1 <= len(batch) < 6
    assert sum(s.size_bytes for s in batch) <= 3000


def test_oversized_findings_are_split_never_dropped() -> None:
    findings = [{"type": "file", "path": f"/f{n}", "pad": "y" * 2000} for n in range(1200)]
    parts = list(split_findings("boot", {"clean": False, "findings": findings}))
    assert parts[0][0] == "boot" and parts[0][1]["clean"] is False
    assert all(kind == "finding" and body["continues"] == "boot" for kind, body in parts[1:])
    assert [f for _, body in parts for f in body["findings"]] == findings
    assert all(len(wire.canonical(body)) <= MAX_BODY_BYTES for _, body in parts)


# --- a real full disk ------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.mark.root
def test_full_disk_is_a_state_not_a_crash(small_fs: Path, key: Ed25519PrivateKey) -> None:
    reporter = _open(small_fs, key)
    reporter.report("finding", {"source": "realtime", "findings": [{"n": 0}]})
    filler = small_fs / "filler"
    _fill(filler)
    with capture_logs() as logs:
        for n in range(1, 4):
            reporter.report("finding", {"source": "realtime", "findings": [{"n": n}]})
        for n in range(5):
            reporter.report("heartbeat", {"health": {"n": n}})
        reporter.report("finding", {"source": "realtime", "findings": [{"n": 4}]})
    health = reporter.spool.health()
    assert health.state == "disk_full"
    assert health.in_memory == 5  # four findings and the newest heartbeat
    events = [e for e in logs if e["event"] == "spool_disk_full"]
    assert len(events) == 1 and "free space" in events[0]["advice"]

    filler.unlink()  # space returns
    reporter.spool.retry()
    assert reporter.spool.health().state == "ok"
    delivered = _drain(reporter)
    findings = [e.body["findings"][0]["n"] for e in delivered if e.kind == "finding"]
    assert findings == [0, 1, 2, 3, 4]
    assert [e.body["health"]["n"] for e in delivered if e.kind == "heartbeat"] == [4]
    wire.verify_chain([e.to_json() for e in delivered], key.public_key())


def test_a_key_file_never_inherits_a_leftover_temporary_or_follows_a_link(tmp_path: Path) -> None:
    out = tmp_path / "host.key"
    leftover = tmp_path / "host.key.tmp"  # the temporary's old fixed name, world-readable
    leftover.write_bytes(b"old")
    leftover.chmod(0o644)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / f"{durable.TMP_PREFIX}host.key").symlink_to(victim)
    keys.generate(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert victim.read_bytes() == b"keep"
    assert keys.load_private(out).public_key() is not None
    assert keys.public_path(out).read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(durable.TMP_PREFIX + "host.key.")
    ]
