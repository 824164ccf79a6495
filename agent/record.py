"""The entry record: one ``Entry`` as one compact JSON line (``docs/manifest.md``).

A record is a JSON object with short keys in a fixed order, defaults left out, ending with
the fast-path hints ``"z":[mtime_ns,ctime_ns,ino]``. Everything before ``,"z":`` is the
record's *content*, which the Merkle tree covers; the hints are covered separately (they
differ between two copies of the same image). The same object is the ``before`` / ``after``
of a finding on the wire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any, Final, NamedTuple

from agent.errors import ManifestError
from agent.measure import Entry
from agent.wire import WireError, b64, decode_path, encode_path

TYPE_CODES: Final = {
    "file": "f",
    "dir": "d",
    "symlink": "l",
    "fifo": "p",
    "socket": "s",
    "chardev": "c",
    "blockdev": "b",
    "unknown": "?",
}
TYPE_NAMES: Final = {code: name for name, code in TYPE_CODES.items()}
HINTS_MARK: Final = ',"z":'
_DECODER: Final = json.JSONDecoder()
_HEX64: Final = re.compile(r"[0-9a-f]{64}\Z")
_KEYS: Final = frozenset({"p", "t", "m", "u", "g", "s", "n", "h", "l", "k", "x", "r", "st", "z"})
_jstr = json.encoder.encode_basestring


def encode_text(text: str) -> str:
    """Like ``wire.encode_path`` for any text (symlink targets, xattr names): base64 when it is
    not valid UTF-8 or would itself look like base64."""
    if text.startswith("b64:"):
        return "b64:" + b64(text.encode("utf-8", "surrogateescape"))
    return encode_path(text)


def _default_nlink(kind: str) -> int:
    return 0 if kind == "dir" else 1


def to_line(entry: Entry) -> str:
    """The record of ``entry`` as one line of JSON, without the newline."""
    e = entry
    return "".join(
        fields_parts(
            e.path, e.type, e.mode, e.uid, e.gid, e.size, e.digest, e.target, e.hardlink,
            e.xattrs, e.rdev, e.mtime_ns, e.ctime_ns, e.ino, e.nlink, e.state,
        )
    )  # fmt: skip


def fields_parts(
    path: str,
    kind: str,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    digest: str | None,
    target: str | None,
    hardlink: str | None,
    xattrs: tuple[tuple[str, bytes], ...],
    rdev: int,
    mtime_ns: int,
    ctime_ns: int,
    ino: int,
    nlink: int,
    state: str,
) -> tuple[str, str]:
    """The record of the entry with these fields as (content, hints) (``split_line``)."""
    line = (
        '{"p":'
        + _jstr(path if path.isascii() else encode_path(path))
        + ',"t":"'
        + TYPE_CODES[kind]
        + f'","m":"{mode:o}"'
    )
    if uid:
        line += f',"u":{uid}'
    if gid:
        line += f',"g":{gid}'
    if size:
        line += f',"s":{size}'
    if nlink != (0 if kind == "dir" else 1):
        line += f',"n":{nlink}'
    if digest is not None:
        line += f',"h":"{digest}"'
    if target is not None:
        line += ',"l":' + _jstr(encode_text(target))
    if hardlink is not None:
        line += ',"k":' + _jstr(encode_path(hardlink))
    if xattrs:
        line += _xattrs_part(xattrs)
    if rdev:
        line += f',"r":{rdev}'
    if state != "ok":
        line += f',"st":"{state}"'
    return line, f"{HINTS_MARK}[{mtime_ns},{ctime_ns},{ino}]}}"


def file_parts(
    path: str, st: os.stat_result, digest: str, xattrs: tuple[tuple[str, bytes], ...]
) -> tuple[str, str]:
    """``fields_parts`` of the regular file that ``lstat`` showed as ``st``, measured in
    state ok (a walk's hot path: the same record, without the fields in between)."""
    line = (
        '{"p":'
        + _jstr(path if path.isascii() else encode_path(path))
        + f',"t":"f","m":"{st.st_mode & 0o7777:o}"'
    )
    if st.st_uid:
        line += f',"u":{st.st_uid}'
    if st.st_gid:
        line += f',"g":{st.st_gid}'
    if st.st_size:
        line += f',"s":{st.st_size}'
    if st.st_nlink != 1:
        line += f',"n":{st.st_nlink}'
    line += f',"h":"{digest}"'
    if xattrs:
        line += _xattrs_part(xattrs)
    return line, f"{HINTS_MARK}[{st.st_mtime_ns},{st.st_ctime_ns},{st.st_ino}]}}"


def _xattrs_part(xattrs: tuple[tuple[str, bytes], ...]) -> str:
    pairs = ",".join(_jstr(encode_text(k)) + ':"' + b64(v) + '"' for k, v in xattrs)
    return ',"x":{' + pairs + "}"


def leaf_digest(content: bytes) -> bytes:
    """The Merkle tree's leaf of a record whose content (``split_line``) is ``content``."""
    return hashlib.sha256(b"\x00" + content).digest()


class Block(NamedTuple):
    """Consecutive entry records in manifest order, as a manifest takes them in: what a
    walk's worker sends, so that the writer handles a block, not each record."""

    paths: list[str]
    dirs: bytes  # per record: 1 for a directory, else 0
    data: bytes  # the record lines, each ending with a newline (UTF-8)
    hints: bytes  # the records' hints, one after another
    leaves: bytes  # the records' Merkle leaves (``leaf_digest``), 32 bytes each

    @classmethod
    def of(cls, records: Iterable[tuple[str, str, bool]]) -> Block:
        """The block of these (path, record line, is_dir)."""
        return cls.of_parts((path, *split_line(line), is_dir) for path, line, is_dir in records)

    @classmethod
    def of_parts(cls, records: Iterable[tuple[str, str, str, bool]]) -> Block:
        """The block of these (path, content, hints, is_dir): each record's line split as
        ``split_line`` splits it."""
        paths: list[str] = []
        dirs = bytearray()
        hints: list[str] = []
        leaves: list[bytes] = []
        lines: list[str] = []
        sha256 = hashlib.sha256
        for path, content, hint, is_dir in records:
            paths.append(path)
            dirs.append(is_dir)
            hints.append(hint)
            leaves.append(sha256(b"\x00" + content.encode()).digest())  # leaf_digest
            lines.append(content + hint + "\n")
        data = "".join(lines).encode()
        return cls(paths, bytes(dirs), data, "".join(hints).encode(), b"".join(leaves))

    def records(self) -> Iterator[tuple[str, str, bool]]:
        """(path, record line, is_dir) of each record, in order."""
        lines = self.data.decode().split("\n")
        return zip(self.paths, lines, map(bool, self.dirs), strict=False)


def to_json(entry: Entry) -> dict[str, Any]:
    """The record as a JSON object (for findings on the wire)."""
    obj: dict[str, Any] = json.loads(to_line(entry))
    return obj


def line_path(line: str) -> str:
    """The path of a record line, read without decoding the rest of it."""
    if not line.startswith('{"p":"'):
        raise ManifestError(f"not an entry record: {line[:60]!r}")
    try:
        text, _end = _DECODER.raw_decode(line, 5)
        return decode_path(text)
    except (ValueError, WireError) as exc:
        raise ManifestError(f"bad path in entry record: {line[:60]!r}") from exc


def split_line(line: str) -> tuple[str, str]:
    """(content, hints) of a record line: what the Merkle tree covers, and the rest."""
    cut = line.rfind(HINTS_MARK)
    if cut < 0:
        raise ManifestError(f"entry record has no hints: {line[:60]!r}")
    return line[:cut], line[cut:]


def hints_suffix(mtime_ns: int, ctime_ns: int, ino: int) -> str:
    """The end of a record line whose hints are these (for the fast path's comparison)."""
    return f"{HINTS_MARK}[{mtime_ns},{ctime_ns},{ino}]}}"


def from_line(line: str) -> Entry:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise ManifestError(f"entry record is not JSON: {line[:60]!r}") from exc
    return from_json(obj)


def from_json(obj: Any) -> Entry:
    """Decode a record object, checking every field; ``ManifestError`` names what is wrong."""
    if not isinstance(obj, dict):
        raise ManifestError("entry record is not a JSON object")
    unknown = set(obj) - _KEYS
    if unknown:
        raise ManifestError(f"entry record has unknown keys {sorted(unknown)}")
    try:
        kind = TYPE_NAMES[obj["t"]]
        mtime_ns, ctime_ns, ino = obj["z"]
        mtime_ns, ctime_ns = _int(mtime_ns, "z", signed=True), _int(ctime_ns, "z", signed=True)
        ino = _int(ino, "z")
        digest = obj.get("h")
        if digest is not None and not (isinstance(digest, str) and _HEX64.match(digest)):
            raise ManifestError("entry record 'h' is not a SHA-256 hex digest")
        xattrs = tuple(
            (decode_path(k), base64.b64decode(v, validate=True))
            for k, v in _dict(obj.get("x", {})).items()
        )
        state = obj.get("st", "ok")
        if state not in ("ok", "unreadable", "too_large", "unstable"):
            raise ManifestError(f"entry record has unknown state {state!r}")
        return Entry(
            path=decode_path(_str(obj["p"], "p")),
            type=kind,
            mode=int(_str(obj["m"], "m"), 8),
            uid=_int(obj.get("u", 0), "u"),
            gid=_int(obj.get("g", 0), "g"),
            size=_int(obj.get("s", 0), "s"),
            digest=digest,
            target=_opt_path(obj.get("l"), "l"),
            hardlink=_opt_path(obj.get("k"), "k"),
            xattrs=xattrs,
            rdev=_int(obj.get("r", 0), "r"),
            mtime_ns=mtime_ns,
            ctime_ns=ctime_ns,
            ino=ino,
            nlink=_int(obj.get("n", _default_nlink(kind)), "n"),
            state=state,
        )
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError, binascii.Error, WireError) as exc:
        raise ManifestError(f"entry record is malformed ({type(exc).__name__}: {exc})") from exc


def _int(value: Any, key: str, *, signed: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (value < 0 and not signed):
        raise ManifestError(f"entry record {key!r} is not a whole number")
    return value


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"entry record {key!r} is not a string")
    return value


def _opt_path(value: Any, key: str) -> str | None:
    return None if value is None else decode_path(_str(value, key))


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError("entry record 'x' is not an object")
    return value
