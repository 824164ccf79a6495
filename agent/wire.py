"""The wire contract between the agent and the collector.

This is the only module of ``agent`` that ``collector`` imports, and it uses the standard
library only. Signing and verification take any object with the shape of
``cryptography``'s Ed25519 keys (``sign(data)`` / ``verify(signature, data)``), so this
module never imports a crypto library itself. The full description is ``docs/protocol.md``.

Exceptions::

    WireError                 anything on the wire that cannot be accepted
    ├── MalformedError        not an envelope / statement of the documented shape
    ├── BadSignatureError     the signature does not verify with the given key
    └── ChainError            the envelope does not follow the chain
        ├── ReplayError       a sequence number at or below one already seen, different content
        ├── ForkError         the next sequence number, but ``prev`` names another envelope
        └── GapError          sequence numbers were skipped
"""

from __future__ import annotations

import base64
import binascii
import enum
import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, Protocol

PROTOCOL_VERSION: Final = 1
MANIFEST_FORMAT: Final = "driftwarden-manifest"
MANIFEST_VERSION: Final = 1

KINDS: Final = frozenset({"enroll", "agent_start", "boot", "finding", "heartbeat", "agent_stop"})
SEVERITIES: Final = ("info", "warning", "critical")

MAX_ENVELOPE_BYTES: Final = 1 << 20
MAX_BATCH_ENVELOPES: Final = 500
_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HEX64_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_B64_PREFIX: Final = "b64:"


class WireError(Exception):
    """Something on the wire that cannot be accepted; ``code`` is a stable snake_case name."""

    code = "invalid"

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class MalformedError(WireError):
    code = "malformed"


class BadSignatureError(WireError):
    code = "bad_signature"


class ChainError(WireError):
    code = "chain"


class ReplayError(ChainError):
    code = "replay"


class ForkError(ChainError):
    code = "fork"


class GapError(ChainError):
    code = "gap"


class Signer(Protocol):
    def sign(self, data: bytes, /) -> bytes: ...


class Verifier(Protocol):
    def verify(self, signature: bytes, data: bytes, /) -> None: ...


# --- canonical bytes -------------------------------------------------------------------------


# One encoder for every call: ``json.dumps`` with these options builds a new one each time.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


_URL_USERINFO: Final = re.compile(r"(://[^:/?#@\s]*:).*@")


def redact_urls(value: Any) -> Any:
    """``value`` (a string, or lists and tables of them) as a log or an error may show it: the
    password of every URL in it masked, ``scheme://user:***@host…``. Everything up to the
    last ``@`` is taken as the password, so a password with ``@``, ``/`` or quotes never
    shows; an ``@`` later in a URL without a password over-masks, which is the safe side."""
    if isinstance(value, str):
        return _URL_USERINFO.sub(r"\1***@", value) if "@" in value else value
    if isinstance(value, list | tuple):
        return [redact_urls(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_urls(v) for k, v in value.items()}
    return value


def canonical(obj: Any) -> bytes:
    """The one byte form that is signed and hashed: sorted keys, no spaces, UTF-8, no NaN."""
    return _CANONICAL.encode(obj).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, *, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise MalformedError(f"{what} is not valid base64") from exc


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def key_id(public_key_raw: bytes) -> str:
    """A short stable name for a raw 32-byte Ed25519 public key."""
    return "ed25519:" + hashlib.sha256(public_key_raw).hexdigest()[:16]


# --- paths -----------------------------------------------------------------------------------
# Inside driftwarden a path is a ``str`` decoded from the file system's bytes with
# ``surrogateescape`` (what ``os.fsdecode`` gives on Linux), so no name is ever lost. On the
# wire a path that is valid UTF-8 is sent as itself (it always begins with "/"); any other is
# sent as "b64:" followed by the base64 of its raw bytes. The round trip is lossless.


def encode_path(path: str) -> str:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return _B64_PREFIX + b64(path.encode("utf-8", "surrogateescape"))
    return path


def decode_path(text: str) -> str:
    if text.startswith(_B64_PREFIX):
        raw = unb64(text[len(_B64_PREFIX) :], what="path")
        return raw.decode("utf-8", "surrogateescape")
    return text


def display_path(path: str) -> str:
    """A one-line, printable rendering of a path for humans (newlines and bad bytes escaped)."""
    raw = path.encode("utf-8", "surrogateescape")
    out = raw.decode("utf-8", "backslashreplace")
    return out.encode("unicode_escape").decode("ascii") if not out.isprintable() else out


# --- envelopes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """One signed report. ``raw`` is the object as received; ``digest`` its chain hash."""

    host_id: str
    boot_id: str
    seq: int
    prev: str
    kind: str
    time: str
    body: Mapping[str, Any]
    sig: str
    digest: str = field(compare=False)
    signed_bytes: bytes = field(default=b"", compare=False, repr=False)  # what ``sig`` signs

    def to_json(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "host_id": self.host_id,
            "boot_id": self.boot_id,
            "seq": self.seq,
            "prev": self.prev,
            "kind": self.kind,
            "time": self.time,
            "body": dict(self.body),
            "sig": self.sig,
        }


def _unsigned(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "sig"}


def envelope_digest(obj: Mapping[str, Any]) -> str:
    """The chain hash of an envelope: SHA-256 of its canonical bytes, signature included."""
    return sha256_hex(canonical(dict(obj)))


def _canonical_forms(obj: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """An envelope's canonical bytes without its signature (what is signed) and with it (what
    the chain hashes), encoding the body once: ``canonical`` of each, byte for byte. The keys
    sort as body, boot_id, host_id, kind, prev, seq, (sig,) time, v."""

    def member(key: str) -> bytes:
        return b',"' + key.encode() + b'":' + canonical(obj[key])

    head = (
        b'{"body":'
        + canonical(obj["body"])
        + b"".join(member(k) for k in ("boot_id", "host_id", "kind", "prev", "seq"))
    )
    tail = member("time") + member("v") + b"}"
    return head + tail, head + member("sig") + tail


def make_envelope(
    signer: Signer,
    *,
    host_id: str,
    boot_id: str,
    seq: int,
    prev: str,
    kind: str,
    body: Mapping[str, Any],
    time: str | None = None,
) -> Envelope:
    obj: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "host_id": host_id,
        "boot_id": boot_id,
        "seq": seq,
        "prev": prev,
        "kind": kind,
        "time": time or utc_now(),
        "body": dict(body),
    }
    obj["sig"] = b64(signer.sign(canonical(obj)))
    return parse_envelope(obj)


def _require(obj: Mapping[str, Any], key: str, typ: type | tuple[type, ...], seq: Any) -> Any:
    if key not in obj:
        raise MalformedError(f"envelope has no {key!r}", seq=seq if isinstance(seq, int) else None)
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, typ):
        raise MalformedError(
            f"envelope {key!r} has the wrong type", seq=seq if isinstance(seq, int) else None
        )
    return value


def parse_envelope(obj: Any) -> Envelope:
    """Check the shape of a decoded envelope (not its signature) and return it typed."""
    if not isinstance(obj, Mapping):
        raise MalformedError("envelope is not a JSON object")
    seq = obj.get("seq")
    unknown = set(obj) - {"v", "host_id", "boot_id", "seq", "prev", "kind", "time", "body", "sig"}
    if unknown:
        raise MalformedError(f"envelope has unknown keys {sorted(unknown)}", seq=None)
    if _require(obj, "v", int, seq) != PROTOCOL_VERSION:
        raise MalformedError(f"unsupported protocol version {obj['v']!r}")
    host_id = _require(obj, "host_id", str, seq)
    boot_id = _require(obj, "boot_id", str, seq)
    seq_value = _require(obj, "seq", int, seq)
    prev = _require(obj, "prev", str, seq)
    kind = _require(obj, "kind", str, seq)
    time = _require(obj, "time", str, seq)
    body = _require(obj, "body", dict, seq)
    sig = _require(obj, "sig", str, seq)
    if not _ID_RE.match(host_id) or not _ID_RE.match(boot_id):
        raise MalformedError("host_id and boot_id must be 1-128 of [A-Za-z0-9._:-]", seq=seq_value)
    if seq_value < 1:
        raise MalformedError("seq must be >= 1", seq=seq_value)
    if (seq_value == 1) != (prev == "") or (prev and not _HEX64_RE.match(prev)):
        raise MalformedError("prev must be '' for seq 1, else 64 hex digits", seq=seq_value)
    if kind not in KINDS:
        raise MalformedError(f"unknown kind {kind!r}; known: {sorted(KINDS)}", seq=seq_value)
    try:
        datetime.fromisoformat(time.replace("Z", "+00:00"))
    except ValueError as exc:
        raise MalformedError(f"time {time!r} is not RFC 3339", seq=seq_value) from exc
    try:
        unsigned, signed = _canonical_forms(obj)
    except (TypeError, ValueError) as exc:
        raise MalformedError("envelope is not canonical JSON", seq=seq_value) from exc
    digest = sha256_hex(signed)
    return Envelope(host_id, boot_id, seq_value, prev, kind, time, body, sig, digest, unsigned)


def verify_signature(envelope: Envelope, public_key: Verifier) -> None:
    """Raise ``BadSignatureError`` unless ``envelope`` was signed by ``public_key``'s owner."""
    signature = unb64(envelope.sig, what="sig")
    payload = envelope.signed_bytes or canonical(_unsigned(envelope.to_json()))
    try:
        public_key.verify(signature, payload)
    except Exception as exc:  # the key type's own error (cryptography: InvalidSignature)
        raise BadSignatureError("signature does not verify", seq=envelope.seq) from exc


class Link(enum.Enum):
    """How an envelope relates to the chain seen so far."""

    NEXT = "next"  # seq = last + 1 and prev = last digest: append
    DUPLICATE = "duplicate"  # exactly the last envelope again: acknowledge, do not count


@dataclass
class ChainState:
    """The tip of one host's chain: last sequence number and digest (0 and "" when empty)."""

    last_seq: int = 0
    last_digest: str = ""

    def link(self, envelope: Envelope, *, known_digest: str | None = None) -> Link:
        """Classify ``envelope`` against the tip; raise ``ChainError`` if it breaks the chain.

        ``known_digest`` is the stored digest at ``envelope.seq`` when it is below the tip (a
        store can look it up), so a re-send of an older envelope is a duplicate, not a replay.
        A ``GapError`` is evidence, not necessarily a refusal: the caller decides.
        """
        if envelope.seq == self.last_seq and envelope.digest == self.last_digest:
            return Link.DUPLICATE
        if envelope.seq <= self.last_seq:
            if known_digest is not None and known_digest == envelope.digest:
                return Link.DUPLICATE
            raise ReplayError(
                f"seq {envelope.seq} is at or below the last seen {self.last_seq}",
                seq=envelope.seq,
            )
        if envelope.seq > self.last_seq + 1:
            raise GapError(f"seq jumped from {self.last_seq} to {envelope.seq}", seq=envelope.seq)
        if self.last_seq != 0 and envelope.prev != self.last_digest:
            raise ForkError(
                f"seq {envelope.seq} does not follow the envelope at {self.last_seq}",
                seq=envelope.seq,
            )
        return Link.NEXT

    def advance(self, envelope: Envelope) -> None:
        self.last_seq = envelope.seq
        self.last_digest = envelope.digest


def verify_chain(
    envelopes: Iterable[Mapping[str, Any]], public_key: Verifier, state: ChainState | None = None
) -> list[Envelope]:
    """Parse, verify and chain-check a sequence of envelopes; the first problem raises."""
    state = state or ChainState()
    out: list[Envelope] = []
    for obj in envelopes:
        env = parse_envelope(obj)
        verify_signature(env, public_key)
        if state.link(env) is Link.NEXT:
            state.advance(env)
            out.append(env)
    return out


# --- enrollment ------------------------------------------------------------------------------


def make_enrollment(
    signer: Signer, *, token: str, host_id: str, public_key_raw: bytes, facts: Mapping[str, Any]
) -> dict[str, Any]:
    """An enrollment request: the token, the new key, and proof that the host holds it."""
    obj: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "token": token,
        "host_id": host_id,
        "public_key": b64(public_key_raw),
        "facts": dict(facts),
        "time": utc_now(),
    }
    obj["sig"] = b64(signer.sign(canonical(obj)))
    return obj


def verify_enrollment(obj: Any, public_key_factory: Any) -> tuple[str, bytes, dict[str, Any]]:
    """Check an enrollment request; return (host_id, raw public key, facts).

    ``public_key_factory(raw) -> Verifier`` builds a key from 32 raw bytes. The token is
    checked by the caller.
    """
    if not isinstance(obj, Mapping):
        raise MalformedError("enrollment is not a JSON object")
    for key, typ in (("token", str), ("host_id", str), ("public_key", str), ("sig", str)):
        if not isinstance(obj.get(key), typ):
            raise MalformedError(f"enrollment has no string {key!r}")
    if not isinstance(obj.get("facts", {}), dict):
        raise MalformedError("enrollment 'facts' must be an object")
    if not _ID_RE.match(obj["host_id"]):
        raise MalformedError("host_id must be 1-128 of [A-Za-z0-9._:-]")
    raw = unb64(obj["public_key"], what="public_key")
    if len(raw) != 32:
        raise MalformedError("public_key must be 32 raw bytes (Ed25519)")
    signature = unb64(obj["sig"], what="sig")
    try:
        public_key_factory(raw).verify(signature, canonical(_unsigned(obj)))
    except Exception as exc:
        raise BadSignatureError("enrollment signature does not verify") from exc
    return obj["host_id"], raw, dict(obj.get("facts", {}))


# --- manifest statement ----------------------------------------------------------------------
# A manifest is a gzip stream of JSON lines. Its first line is the *statement*, the signed
# summary of the whole image; the rest are entries (see docs/manifest.md). The statement holds
# the Merkle root over every entry's content, and ``hints_digest`` over the entries' fast-path
# hints (mtime, ctime, inode: they differ between copies of one image, so the root leaves them
# out), and ``entries_digest`` over the entries' bytes (what readers recompute: one hash), so
# verifying its signature and recomputing the digests verifies the whole manifest, and the
# collector can register an image from the first line alone.

STATEMENT_KEYS: Final = frozenset(
    {
        "format",
        "v",
        "build_id",
        "policy_digest",
        "hash_alg",
        "created",
        "tool_version",
        "root",
        "entries",
        "hints_digest",
        "entries_digest",
        "packages_digest",
        "key_id",
        "sig",
    }
)


def statement_payload(statement: Mapping[str, Any]) -> bytes:
    return canonical(_unsigned(statement))


def sign_statement(statement: Mapping[str, Any], signer: Signer) -> dict[str, Any]:
    out = _unsigned(statement)
    out["sig"] = b64(signer.sign(canonical(out)))
    return out


def check_statement(statement: Any) -> dict[str, Any]:
    """Check a statement's shape; return it as a dict."""
    if not isinstance(statement, Mapping):
        raise MalformedError("manifest statement is not a JSON object")
    if statement.get("format") != MANIFEST_FORMAT:
        raise MalformedError("not a driftwarden manifest (format field missing or wrong)")
    if statement.get("v") != MANIFEST_VERSION:
        raise MalformedError(f"unsupported manifest version {statement.get('v')!r}")
    unknown = set(statement) - STATEMENT_KEYS
    if unknown:
        raise MalformedError(f"manifest statement has unknown keys {sorted(unknown)}")
    for key in ("build_id", "policy_digest", "hash_alg", "created", "tool_version", "root"):
        if not isinstance(statement.get(key), str):
            raise MalformedError(f"manifest statement has no string {key!r}")
    if not isinstance(statement.get("entries"), int):
        raise MalformedError("manifest statement has no integer 'entries'")
    return dict(statement)


def verify_statement(statement: Mapping[str, Any], public_key: Verifier) -> None:
    sig = statement.get("sig")
    if not isinstance(sig, str) or not sig:
        raise BadSignatureError("manifest is not signed")
    try:
        public_key.verify(unb64(sig, what="sig"), statement_payload(statement))
    except WireError:
        raise
    except Exception as exc:
        raise BadSignatureError("manifest signature does not verify with this key") from exc


def read_statement(source: Path | IO[bytes]) -> dict[str, Any]:
    """Read only the first line of a manifest file: its statement."""
    try:
        if isinstance(source, Path):
            with gzip.open(source, "rb") as fh:
                line = fh.readline(MAX_ENVELOPE_BYTES)
        else:
            with gzip.GzipFile(fileobj=source, mode="rb") as fh:
                line = fh.readline(MAX_ENVELOPE_BYTES)
        obj = json.loads(line)
    except (OSError, EOFError, ValueError) as exc:
        raise MalformedError(f"cannot read manifest statement: {exc}") from exc
    return check_statement(obj)


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    """The collector's one error envelope, also understood by the agent."""
    return {"error": {"code": code, "message": message, "details": details}}
