"""Pipeline public keys (PEM, Ed25519): what image statements are verified with."""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from collector.errors import ConfigError


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read public key: {exc.strerror or exc}", path=path) from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError("not a PEM public key", path=path) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("not an Ed25519 public key", path=path)
    return key
