"""The ingest's Ed25519 verifier (libsodium) against signatures made as agents make them
(``cryptography``)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.exceptions import BadSignatureError

from agent import wire
from collector.hostkeys import HostKey


def _pair() -> tuple[Ed25519PrivateKey, HostKey]:
    secret = Ed25519PrivateKey.generate()
    raw = secret.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return secret, HostKey(raw)


def test_an_agents_signature_verifies() -> None:
    secret, key = _pair()
    key.verify(secret.sign(b"report"), b"report")
    env = wire.make_envelope(
        secret, host_id="h1", boot_id="b", seq=1, prev="", kind="heartbeat", body={"n": "é\n"}
    )
    wire.verify_signature(wire.parse_envelope(env.to_json()), key)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda sig, data: (sig, data + b"!"),  # other data
        lambda sig, data: (sig[:-1] + bytes([sig[-1] ^ 1]), data),  # a flipped bit
        lambda sig, data: (sig[:63], data),  # too short
        lambda sig, data: (b"", data),
        lambda sig, data: (sig + b"\x00", data),  # too long: the extra byte is data
    ],
)
def test_a_forged_signature_is_refused(mangle: object) -> None:
    secret, key = _pair()
    sig, data = mangle(secret.sign(b"report"), b"report")  # type: ignore[operator]
    with pytest.raises(BadSignatureError):
        key.verify(sig, data)


def test_another_hosts_key_and_a_small_order_key_are_refused() -> None:
    secret, _ = _pair()
    _, other = _pair()
    sig = secret.sign(b"report")
    with pytest.raises(BadSignatureError):
        other.verify(sig, b"report")
    identity = b"\x01" + b"\x00" * 31  # a small-order key: OpenSSL accepts this signature
    with pytest.raises(BadSignatureError):
        HostKey(identity).verify(identity + bytes(32), b"any report")


def test_a_key_of_the_wrong_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="32 bytes, not 31"):
        HostKey(b"\x00" * 31)
