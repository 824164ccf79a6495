"""The collector's exceptions and exit codes.

Exceptions carry their context (``path``, ``host_id``) and a message that says what to do.
Only ``collector.cli.main`` turns them into ``error: …`` on stderr and an exit code; the HTTP
API turns ``Refused`` into its one error envelope::

    CollectorError                 exit 2 unless a subclass says otherwise
    ├── ConfigError                exit 78: bad configuration; systemd must not restart
    ├── StoreError                 the database cannot be opened, migrated or used
    ├── ApiClientError             the SRE CLI could not get an answer from the API
    ├── SshError                   a break-glass SSH session could not be opened
    ├── JobFailed                  a job handler's failed attempt: final, or when to retry
    └── Refused                    a request the API refuses: HTTP status, code, details
        ├── AuthError              401: no, unknown or revoked token
        └── ForbiddenError         403: the token's role is too low
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

EXIT_OK: Final = 0
EXIT_ERROR: Final = 2
EXIT_CONFIG: Final = 78  # sysexits EX_CONFIG; listed in the unit's RestartPreventExitStatus=


class CollectorError(Exception):
    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        message = super().__str__()
        return f"{self.path}: {message}" if self.path is not None else message


class ConfigError(CollectorError):
    exit_code = EXIT_CONFIG


class StoreError(CollectorError):
    pass


class ApiClientError(CollectorError):
    pass


class SshError(CollectorError):
    pass


class JobFailed(CollectorError):
    """Raised by a job handler: this attempt failed. ``retryable`` False buries the job at once;
    ``retry_after_s`` is the soonest the next attempt may run (a receiver's Retry-After)."""

    def __init__(
        self, message: str, *, retryable: bool = True, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class Refused(CollectorError):
    """A refusal the API reports as ``wire.error_body(code, message, **details)``."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details


class AuthError(Refused):
    def __init__(self, message: str) -> None:
        super().__init__(401, "unauthorized", message)


class ForbiddenError(Refused):
    def __init__(self, message: str) -> None:
        super().__init__(403, "forbidden", message)
