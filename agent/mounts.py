"""The mount table (``/proc/self/mountinfo``): which file system type is mounted where.

The tree walk asks it only where a directory's device differs from its parent's, to keep out
of virtual file systems (``proc``, ``tmpfs``, ...) that the policy excludes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

MOUNTINFO: Final = Path("/proc/self/mountinfo")
_OCTAL: Final = re.compile(r"\\([0-7]{3})")


def _unescape(field_text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\NNN`` octal."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field_text)


@dataclass(frozen=True)
class MountTable:
    """Mount point (as a path on this machine) → file system type."""

    fstypes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> MountTable:
        fstypes: dict[str, str] = {}
        for line in text.splitlines():
            fields = line.split(" ")
            if "-" not in fields[6:]:
                continue
            sep = fields.index("-", 6)
            if len(fields) > sep + 1:
                fstypes[_unescape(fields[4])] = fields[sep + 1]
        return cls(fstypes)

    @classmethod
    def from_proc(cls) -> MountTable:
        try:
            return cls.parse(MOUNTINFO.read_text(encoding="utf-8", errors="surrogateescape"))
        except OSError:
            return cls()

    def fstype(self, mount_point: str) -> str | None:
        """The type mounted at (or, failing that, above) ``mount_point``, if known."""
        path = mount_point
        while True:
            found = self.fstypes.get(path)
            if found is not None or path in ("", "/"):
                return found
            path = path.rsplit("/", 1)[0] or "/"
