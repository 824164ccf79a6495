"""Ed25519 key files: the image pipeline's signing key and the per-host reporting key.

A private key is PKCS#8 PEM, written with mode 0600 and never logged; its public half sits
beside it as ``NAME.pub`` (SubjectPublicKeyInfo PEM), which is what ``--pubkey`` reads.

``check`` only reads a public key: it is decoded here, without importing cryptography's
serialization package (a tenth of what ``check`` spends starting up); any other key file goes
through that package.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import KeyFileError, advice

# SubjectPublicKeyInfo of an Ed25519 key (RFC 8410), up to the 32 bytes of the key itself.
_ED25519_SPKI_HEAD: Final = bytes.fromhex("302a300506032b6570032100")


def public_path(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def generate(out: Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Write a new key pair to ``out`` (0600) and ``out.pub``; refuse to clobber a key."""
    if out.exists() and not overwrite:
        raise KeyFileError("refusing to overwrite an existing key", path=out)
    from cryptography.hazmat.primitives import serialization

    from agent import durable

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # unique temporary name, O_EXCL, fsync, rename, directory fsync: a power cut at first
        # boot must not lose the key (a new one is a new identity the collector refuses)
        durable.write_atomic(out, pem, mode=0o600)
        durable.write_atomic(public_path(out), public_pem(key.public_key()), mode=0o644)
    except OSError as exc:
        raise KeyFileError(f"cannot write key: {advice(exc)}", path=out) from exc
    return key


def public_pem(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes_raw()


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read private key: {advice(exc)}", path=path) from exc
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError("not an unencrypted PEM private key", path=path) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError("not an Ed25519 private key", path=path)
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key: {advice(exc)}", path=path) from exc
    raw = _ed25519_public_raw(data)
    if raw is not None:
        return Ed25519PublicKey.from_public_bytes(raw)
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError("not a PEM public key", path=path) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError("not an Ed25519 public key", path=path)
    return key


def _ed25519_public_raw(pem: bytes) -> bytes | None:
    """The 32 raw bytes of the Ed25519 key in the PEM file ``pem`` (what ``public_pem``
    writes), or None for anything else."""
    lines = pem.strip().splitlines()
    if len(lines) < 3 or lines[0] != b"-----BEGIN PUBLIC KEY-----":
        return None
    if lines[-1] != b"-----END PUBLIC KEY-----":
        return None
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except binascii.Error:
        return None
    if len(der) != len(_ED25519_SPKI_HEAD) + 32 or not der.startswith(_ED25519_SPKI_HEAD):
        return None
    return der[len(_ED25519_SPKI_HEAD) :]
