"""Key files: what ``keygen`` writes is what ``--pubkey`` reads, and nothing else is taken."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import keys
from agent.errors import KeyFileError


def test_a_written_public_key_reads_back_as_the_same_key(tmp_path: Path) -> None:
    private = keys.generate(tmp_path / "pipeline.key")
    public = keys.load_public(keys.public_path(tmp_path / "pipeline.key"))
    assert keys.public_raw(public) == keys.public_raw(private.public_key())
    public.verify(private.sign(b"statement"), b"statement")
    loaded = keys.load_private(tmp_path / "pipeline.key")
    assert keys.public_raw(loaded.public_key()) == keys.public_raw(public)


def test_a_public_key_with_other_line_breaks_reads_the_same(tmp_path: Path) -> None:
    private = keys.generate(tmp_path / "k")
    pem = keys.public_pem(private.public_key()).decode()
    head, body, tail = pem.strip().splitlines()
    reflowed = tmp_path / "reflowed.pub"
    reflowed.write_text(f"{head}\r\n{body[:20]}\r\n{body[20:]}\r\n{tail}\r\n")
    assert keys.public_raw(keys.load_public(reflowed)) == keys.public_raw(private.public_key())


def test_other_keys_and_other_files_are_refused(tmp_path: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="not an Ed25519 public key"):
        keys.load_public(ec_pub)
    damaged = tmp_path / "damaged.pub"
    damaged.write_bytes(b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        keys.load_public(damaged)
    with pytest.raises(KeyFileError, match="cannot read public key"):
        keys.load_public(tmp_path / "missing.pub")
