"""Reading one package database file inside the image: every failure a ``PackageDbError``
that names the file (and the line), and text split into lines without losing a byte."""

from __future__ import annotations

from agent.errors import PackageDbError, advice
from agent.packages.image import ImageRoot, NotRegularError


def read_db_file(image: ImageRoot, image_path: str, *, missing_ok: bool = False) -> bytes | None:
    """The file's bytes; ``None`` if it does not exist and ``missing_ok``."""
    try:
        return image.read_bytes(image_path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise PackageDbError("not found", path=image_path) from None
    except NotRegularError as exc:
        raise PackageDbError(f"is a {exc.kind}, not a file", path=image_path) from None
    except OSError as exc:
        raise PackageDbError(f"cannot read: {advice(exc)}", path=image_path) from exc


def db_lines(data: bytes, image_path: str) -> list[str]:
    """The lines of a text database (bytes that are not UTF-8 kept as surrogates); a NUL byte
    means binary garbage, not a database."""
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise PackageDbError(
            f"line {line}: binary data (NUL byte), not a package database", path=image_path
        )
    return data.decode("utf-8", "surrogateescape").split("\n")
