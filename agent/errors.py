"""The agent's exceptions and exit codes.

Exceptions carry their context (``path``, ``key``, ``host_id``) and a message that says what to
do. Only ``agent.cli.main`` turns them into ``error: …`` on stderr and an exit code::

    AgentError                     exit 2 unless a subclass says otherwise
    ├── ConfigError                exit 78: bad configuration; systemd must not restart
    │   └── PolicyError            a policy file that cannot be loaded or is invalid
    ├── KeyFileError               a key file that is missing, unreadable or of the wrong kind
    ├── ManifestError              a manifest that cannot be read or written
    │   └── UntrustedError         exit 3: missing or bad signature, Merkle root mismatch
    ├── PackageDbError             a package database that cannot be parsed
    ├── SpoolError                 the durable spool cannot be written (disk full, permissions)
    └── CollectorError             the collector cannot be reached or refused us
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Final

EXIT_OK: Final = 0
EXIT_DRIFT: Final = 1
EXIT_ERROR: Final = 2
EXIT_UNTRUSTED: Final = 3
EXIT_CONFIG: Final = 78  # sysexits EX_CONFIG; listed in the unit's RestartPreventExitStatus=


class AgentError(Exception):
    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        message = super().__str__()
        return f"{self.path}: {message}" if self.path is not None else message


class ConfigError(AgentError):
    exit_code = EXIT_CONFIG


class PolicyError(ConfigError):
    pass


class KeyFileError(AgentError):
    pass


class ManifestError(AgentError):
    pass


class UntrustedError(ManifestError):
    exit_code = EXIT_UNTRUSTED


class PackageDbError(AgentError):
    pass


class SpoolError(AgentError):
    pass


class CollectorError(AgentError):
    pass


_ADVICE: Final = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied — the agent needs read access (run as root or with "
    "CAP_DAC_READ_SEARCH)",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EMFILE: "too many open files — raise LimitNOFILE",
}


def advice(exc: OSError) -> str:
    """Turn an errno into words a person can act on."""
    if exc.errno is not None and exc.errno in _ADVICE:
        return _ADVICE[exc.errno]
    return exc.strerror or str(exc)
