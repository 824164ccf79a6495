"""A command that replaces the host: ``terraform apply -replace=ADDR``, ``kubectl drain``, ….

``argv`` is a list run directly, never through a shell. In each argument the placeholders
``{host_id}``, ``{instance_id}``, ``{pool}`` and ``{request_id}`` are replaced by the request's
values (``{{`` and ``}}`` stand for literal braces); a value that does not match
``request.SAFE_VALUE`` (a leading ``-``, spaces, quotes, brackets, a ``..`` segment) is refused,
so a host name can never become an option, a path escape or a different address. The same
values, and the reason, are also in the environment as ``DRIFTWARDEN_HOST_ID``,
``DRIFTWARDEN_INSTANCE_ID``, ``DRIFTWARDEN_POOL``, ``DRIFTWARDEN_REQUEST_ID``,
``DRIFTWARDEN_REASON`` and ``DRIFTWARDEN_DRY_RUN`` (``1``/``0``).

Exit 0 is ``done``; a code in ``already_exit_codes`` is ``already``; a code in
``retryable_exit_codes`` (default 75, EX_TEMPFAIL) is a retryable failure; anything else, or
running past ``timeout_s`` (the whole process group is then killed), is a final failure: a
command that may have half-run is left to a person. The exit code and the tail of the output
are recorded in the outcome. With ``dry_run_argv`` a dry run runs that (``terraform plan``)
and reports ``would_replace``; without it a dry run runs nothing. Logs name only the program,
never the arguments or the ``env`` values.

The command must be idempotent for one ``request_id`` (it is given for that purpose).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import structlog

from collector.actions.errors import MalformedRequestError
from collector.actions.request import (
    ActionOutcome,
    ReplacementRequest,
    failed,
    logged,
    safe_value,
)
from collector.sinks.config import ConfigTable

log = structlog.get_logger(__name__)

PLACEHOLDERS: Final = ("host_id", "instance_id", "pool", "request_id")
OUTPUT_TAIL_BYTES: Final = 4096
KILL_GRACE_S: Final = 5.0
EX_TEMPFAIL: Final = 75
_TOKEN_RE: Final = re.compile(r"\{\{|\}\}|\{([A-Za-z_]*)\}|[{}]")


@dataclass(frozen=True)
class Template:
    """One argument: literal text and placeholders, checked when the configuration loads."""

    parts: tuple[tuple[bool, str], ...]  # (is_placeholder, text or name)

    @classmethod
    def parse(cls, text: str) -> Template:
        parts: list[tuple[bool, str]] = []
        literal: list[str] = []
        position = 0
        for match in _TOKEN_RE.finditer(text):
            literal.append(text[position : match.start()])
            position = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                literal.append(token[0])
            elif match.group(1) in PLACEHOLDERS:
                parts.append((False, "".join(literal)))
                literal = []
                parts.append((True, match.group(1)))
            else:
                raise ValueError(
                    f"{token!r} is not a placeholder; known: "
                    f"{['{' + p + '}' for p in PLACEHOLDERS]} (write {{{{ and }}}} for braces)"
                )
        literal.append(text[position:])
        parts.append((False, "".join(literal)))
        return cls(tuple(p for p in parts if p[0] or p[1]))

    def render(self, values: Mapping[str, str | None]) -> str:
        out = []
        for is_placeholder, text in self.parts:
            if not is_placeholder:
                out.append(text)
                continue
            value = values[text]
            if value is None:
                raise LookupError(f"{{{text}}} is used but the request has no {text}")
            try:
                safe_value(text, value)
            except MalformedRequestError as exc:
                raise LookupError(str(exc)) from exc
            out.append(value)
        return "".join(out)


class CommandAction:
    def __init__(
        self,
        name: str,
        *,
        argv: Sequence[str],
        dry_run_argv: Sequence[str] | None = None,
        timeout_s: float = 600.0,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        already_exit_codes: Sequence[int] = (),
        retryable_exit_codes: Sequence[int] = (EX_TEMPFAIL,),
    ) -> None:
        self.name = name
        self.argv = _templates("argv", argv)
        self.dry_run_argv = _templates("dry_run_argv", dry_run_argv) if dry_run_argv else None
        self.timeout_s = timeout_s
        self.cwd = cwd
        self._env = dict(env or {})
        self.already_exit_codes = frozenset(already_exit_codes)
        self.retryable_exit_codes = frozenset(retryable_exit_codes)

    def __repr__(self) -> str:
        return f"CommandAction(name={self.name!r}, program={self.program!r})"

    @property
    def program(self) -> str:
        first = self.argv[0].parts
        return first[0][1] if len(first) == 1 and not first[0][0] else "<templated>"

    def close(self) -> None:
        pass

    def replace(self, request: ReplacementRequest) -> ActionOutcome:
        templates = self.dry_run_argv if request.dry_run else self.argv
        if templates is None:
            return logged(
                self.name, request, ActionOutcome("would_replace", f"would run {self.program}")
            )
        values = {
            "host_id": request.host_id,
            "instance_id": request.instance_id,
            "pool": request.pool,
            "request_id": request.request_id,
        }
        try:
            argv = [template.render(values) for template in templates]
        except LookupError as exc:
            return logged(self.name, request, failed(str(exc), retryable=False))
        bound = log.bind(action=self.name, program=argv[0], request_id=request.request_id)
        try:
            code, tail = self._run(argv, self._environment(request), bound)
        except OSError as exc:
            outcome = failed(f"cannot run {argv[0]}: {exc.strerror}", retryable=False)
            return logged(self.name, request, outcome, program=argv[0])
        facts = {"exit_code": code, "output_tail": tail}
        if code is None:
            outcome = failed(
                f"{argv[0]} ran past {self.timeout_s:g}s and was killed", **facts, retryable=False
            )
        elif request.dry_run and code == 0:
            outcome = ActionOutcome("would_replace", f"{argv[0]} (dry run) exited 0", facts=facts)
        elif code == 0:
            outcome = ActionOutcome("done", f"{argv[0]} exited 0", facts=facts)
        elif code in self.already_exit_codes:
            outcome = ActionOutcome("already", f"{argv[0]} exited {code}: already", facts=facts)
        else:
            outcome = failed(
                f"{argv[0]} exited {code}", retryable=code in self.retryable_exit_codes, **facts
            )
        return logged(self.name, request, outcome, program=argv[0], exit_code=code)

    def _environment(self, request: ReplacementRequest) -> dict[str, str]:
        return {
            **os.environ,
            **self._env,
            "DRIFTWARDEN_HOST_ID": request.host_id,
            "DRIFTWARDEN_INSTANCE_ID": request.instance_id or "",
            "DRIFTWARDEN_POOL": request.pool,
            "DRIFTWARDEN_REQUEST_ID": request.request_id,
            "DRIFTWARDEN_REASON": request.reason,
            "DRIFTWARDEN_DRY_RUN": "1" if request.dry_run else "0",
        }

    def _run(
        self, argv: list[str], env: dict[str, str], bound: structlog.stdlib.BoundLogger
    ) -> tuple[int | None, str]:
        """Run ``argv`` in its own session: the exit code (None on timeout) and output tail.
        Raises ``OSError`` when it cannot start."""
        with tempfile.TemporaryFile() as output:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
            )
            bound.info("replacement_command_started", pid=process.pid)
            try:
                code: int | None = process.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                bound.warning("replacement_command_timeout", timeout_s=self.timeout_s)
                _kill_group(process)
                code = None
            return code, _tail(output)


def _templates(key: str, args: Sequence[str]) -> tuple[Template, ...]:
    if not args or not args[0]:
        raise ValueError(f"{key} = {list(args)!r} is not a list starting with the program")
    templates = []
    for arg in args:
        try:
            templates.append(Template.parse(arg))
        except ValueError as exc:
            raise ValueError(f"{key} has {arg!r}: {exc}") from None
    return tuple(templates)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the command's whole process group, SIGKILL it after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=KILL_GRACE_S)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def _tail(output: IO[bytes]) -> str:
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - OUTPUT_TAIL_BYTES))
    return output.read().decode("utf-8", errors="replace")


def from_config(name: str, table: ConfigTable) -> CommandAction:
    cwd = table.optional_string("cwd")
    if cwd is not None and not Path(cwd).is_absolute():
        raise table.bad("cwd", cwd, "an absolute path")
    try:
        return CommandAction(
            name,
            argv=table.str_list("argv"),
            dry_run_argv=table.str_list("dry_run_argv", []) or None,
            timeout_s=table.number("timeout_s", 600.0, minimum=0.1),
            cwd=Path(cwd) if cwd else None,
            env=table.str_table("env", secret_values=True),
            already_exit_codes=table.int_list("already_exit_codes"),
            retryable_exit_codes=table.int_list("retryable_exit_codes", (EX_TEMPFAIL,)),
        )
    except ValueError as exc:
        raise table.fail(str(exc)) from None
