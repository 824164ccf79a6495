"""A host's Ed25519 public key, as the ingest checks report signatures with it.

Every report's signature is checked, and on a busy collector that is one of the largest costs
per report. libsodium (PyNaCl) verifies an Ed25519 signature in about half the time OpenSSL
(``cryptography``) takes on the machines measured (85 µs against 176 µs on an Intel Xeon), so
the ingest uses it; agents sign with ``cryptography``, and both follow RFC 8032. libsodium is
also the stricter of the two: it refuses non-canonical signatures and small-order public keys.
"""

from __future__ import annotations

from typing import Final

from nacl.bindings import crypto_sign_BYTES, crypto_sign_open, crypto_sign_PUBLICKEYBYTES
from nacl.exceptions import BadSignatureError, CryptoError

SIZE: Final = crypto_sign_PUBLICKEYBYTES


class HostKey:
    """Verifies signatures (``agent.wire.Verifier``) with a raw 32-byte Ed25519 public key."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != SIZE:
            raise ValueError(f"an Ed25519 public key is {SIZE} bytes, not {len(raw)}")
        self._raw = bytes(raw)

    def verify(self, signature: bytes, data: bytes, /) -> None:
        """Return if ``signature`` is this key's over ``data``; raise ``BadSignatureError``."""
        if len(signature) != crypto_sign_BYTES:  # else bytes could move between the two
            raise BadSignatureError(f"an Ed25519 signature is {crypto_sign_BYTES} bytes")
        try:
            crypto_sign_open(signature + data, self._raw)
        except CryptoError as exc:  # a malformed signature or key is a bad signature too
            raise BadSignatureError(str(exc)) from None
