"""The wire contract: envelopes, chains, paths, enrollment and manifest statements."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import keys, wire


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _chain(key: Ed25519PrivateKey, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    prev = ""
    for seq in range(1, count + 1):
        env = wire.make_envelope(
            key, host_id="h-1", boot_id="b-1", seq=seq, prev=prev, kind="heartbeat", body={"n": seq}
        )
        prev = env.digest
        out.append(env.to_json())
    return out


def test_chain_verifies(key: Ed25519PrivateKey) -> None:
    envs = wire.verify_chain(_chain(key, 5), key.public_key())
    assert [e.seq for e in envs] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "body",
    [
        {"n": 1},
        {"time": "2026-01-01T00:00:00Z", "sig": "x", "v": 2, "nested": {"seq": [1, 2.5, None]}},
        {"text": 'é \u2028 \n " \\ \u0000', "flag": True, "empty": {}, "list": []},
        {"path": wire.encode_path("/etc/\udcff\nname"), "big": 2**70, "neg": -0.0},
    ],
)
def test_signed_and_hashed_bytes_are_the_canonical_form(
    key: Ed25519PrivateKey, body: dict[str, Any]
) -> None:
    """The bytes a received envelope is verified and chained by are ``canonical`` of the
    envelope without and with its signature, byte for byte, whatever the body holds."""
    sent = wire.make_envelope(
        key, host_id="h-1", boot_id="b-1", seq=7, prev="a" * 64, kind="heartbeat", body=body
    ).to_json()
    received = wire.parse_envelope(copy.deepcopy(sent))
    unsigned = {k: v for k, v in sent.items() if k != "sig"}
    assert received.signed_bytes == wire.canonical(unsigned)
    assert received.digest == wire.sha256_hex(wire.canonical(sent))
    wire.verify_signature(received, key.public_key())


def test_forged_body_is_refused(key: Ed25519PrivateKey) -> None:
    envs = _chain(key, 3)
    envs[1]["body"] = {"n": 99}
    with pytest.raises(wire.BadSignatureError):
        wire.verify_chain(envs, key.public_key())


def test_other_key_is_refused(key: Ed25519PrivateKey) -> None:
    with pytest.raises(wire.BadSignatureError):
        wire.verify_chain(_chain(key, 2), Ed25519PrivateKey.generate().public_key())


def test_reordered_is_detected(key: Ed25519PrivateKey) -> None:
    envs = _chain(key, 4)
    envs[1], envs[2] = envs[2], envs[1]
    with pytest.raises(wire.GapError):
        wire.verify_chain(envs, key.public_key())


def test_replay_and_duplicate(key: Ed25519PrivateKey) -> None:
    envs = _chain(key, 3)
    state = wire.ChainState()
    wire.verify_chain(envs, key.public_key(), state)
    # the tip again is a duplicate (a re-send), acknowledged and not counted
    assert wire.verify_chain([envs[2]], key.public_key(), state) == []
    with pytest.raises(wire.ReplayError):
        wire.verify_chain([envs[0]], key.public_key(), state)
    # an older one is a duplicate when the store vouches for its digest
    older = wire.parse_envelope(envs[0])
    assert state.link(older, known_digest=older.digest) is wire.Link.DUPLICATE


def test_fork_is_detected(key: Ed25519PrivateKey) -> None:
    envs = _chain(key, 2)
    other = wire.make_envelope(
        key, host_id="h-1", boot_id="b-1", seq=3, prev="0" * 64, kind="heartbeat", body={}
    )
    with pytest.raises(wire.ForkError):
        wire.verify_chain([*envs, other.to_json()], key.public_key())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.pop("seq"), "no 'seq'"),
        (lambda e: e.update(seq="1"), "'seq' has the wrong type"),
        (lambda e: e.update(seq=True), "'seq' has the wrong type"),
        (lambda e: e.update(kind="party"), "unknown kind 'party'"),
        (lambda e: e.update(host_id="a b"), "host_id and boot_id"),
        (lambda e: e.update(extra=1), "unknown keys ['extra']"),
        (lambda e: e.update(v=2), "unsupported protocol version"),
        (lambda e: e.update(time="yesterday"), "not RFC 3339"),
        (lambda e: e.update(prev="x"), "prev must be"),
    ],
)
def test_malformed(key: Ed25519PrivateKey, mutate: Any, message: str) -> None:
    env = copy.deepcopy(_chain(key, 1)[0])
    mutate(env)
    with pytest.raises(wire.MalformedError, match=None) as info:
        wire.parse_envelope(env)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "/tmp/new\nline", "/tmp/bad-\udcff-utf8", "/t/ümlaut", "/b64:x"]
)
def test_path_round_trip(path: str) -> None:
    encoded = wire.encode_path(path)
    assert wire.decode_path(encoded) == path
    encoded.encode("utf-8")  # always valid UTF-8 on the wire
    assert "\n" not in wire.display_path(path)


def test_enrollment(key: Ed25519PrivateKey) -> None:
    raw = keys.public_raw(key.public_key())
    req = wire.make_enrollment(key, token="t0k", host_id="h-1", public_key_raw=raw, facts={"a": 1})
    host, got_raw, facts = wire.verify_enrollment(req, keys.public_from_raw)
    assert (host, got_raw, facts) == ("h-1", raw, {"a": 1})
    req["host_id"] = "h-2"
    with pytest.raises(wire.BadSignatureError):
        wire.verify_enrollment(req, keys.public_from_raw)


def test_statement_signature(key: Ed25519PrivateKey) -> None:
    statement = {
        "format": wire.MANIFEST_FORMAT,
        "v": wire.MANIFEST_VERSION,
        "build_id": "b1",
        "policy_digest": "sha256:00",
        "hash_alg": "sha256",
        "created": wire.utc_now(),
        "tool_version": "0.1.0",
        "root": "ab" * 32,
        "entries": 3,
    }
    signed = wire.sign_statement(statement, key)
    wire.verify_statement(wire.check_statement(signed), key.public_key())
    with pytest.raises(wire.BadSignatureError):
        wire.verify_statement({**signed, "root": "cd" * 32}, key.public_key())
    with pytest.raises(wire.BadSignatureError, match="not signed"):
        wire.verify_statement(statement, key.public_key())


@pytest.mark.parametrize(
    ("shown", "masked"),
    [
        ("postgresql://dw:hunter2@db:5432/x", "postgresql://dw:***@db:5432/x"),
        ("postgresql://dw:it's hunter2@db/x", "postgresql://dw:***@db/x"),
        ("postgresql://dw:hunter2@at@db/x", "postgresql://dw:***@db/x"),
        ("postgresql://dw:hunter2/x@db/x", "postgresql://dw:***@db/x"),
        ("postgresql://dw:hunter2%40@[::1]:5432/x", "postgresql://dw:***@[::1]:5432/x"),
        ("https://:hunter2@collector/", "https://:***@collector/"),
        ("postgresql://db/x", "postgresql://db/x"),
        (
            "sqlite:///var/lib/driftwarden/collector.db",
            "sqlite:///var/lib/driftwarden/collector.db",
        ),
        ("ops@example.org", "ops@example.org"),
    ],
)
def test_a_urls_password_never_shows(shown: str, masked: str) -> None:
    assert wire.redact_urls(shown) == masked
    assert wire.redact_urls([shown, 7]) == [masked, 7]
    assert wire.redact_urls({"url": shown}) == {"url": masked}
