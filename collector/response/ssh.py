"""The break-glass SSH session, through paramiko: a command, or an interactive shell on a pty.

Host keys are checked against ``~/.ssh/known_hosts`` and any ``known_hosts`` file given; an
unknown host key is refused (the point of break-glass is to be sure where one is). The
session's exit status is the remote command's, as with ``ssh``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import shutil
import sys
import termios
import tty
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import paramiko

from collector.errors import SshError

CHUNK: Final = 32768
POLL_S: Final = 0.5


@dataclass(frozen=True)
class Target:
    address: str
    port: int
    user: str
    identity: Path | None = None
    known_hosts: Path | None = None
    timeout_s: float = 15.0

    def __str__(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"


def connect(target: Target) -> paramiko.SSHClient:
    """An authenticated SSH client; ``SshError`` saying why not."""
    client = paramiko.SSHClient()
    try:
        client.load_system_host_keys()
        if target.known_hosts is not None:
            client.load_host_keys(str(target.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            target.address,
            target.port,
            username=target.user,
            key_filename=str(target.identity) if target.identity else None,
            look_for_keys=target.identity is None,
            allow_agent=target.identity is None,
            timeout=target.timeout_s,
            auth_timeout=target.timeout_s,
            banner_timeout=target.timeout_s,
        )
    except (paramiko.SSHException, OSError) as exc:
        client.close()
        raise SshError(f"cannot open an SSH session to {target}: {exc}") from None
    return client


def run(
    client: paramiko.SSHClient,
    command: Sequence[str],
    *,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Run ``command`` (or an interactive shell when empty) and return its exit status.

    Local stdin is forwarded (closed on its end of file); with a terminal on stdin the session
    gets a pty and the terminal is put in raw mode until the session ends.
    """
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    transport = client.get_transport()
    if transport is None:
        raise SshError("the SSH connection is closed")
    interactive = _isatty(stdin)
    channel = transport.open_session()
    try:
        if interactive or not command:
            columns, lines = shutil.get_terminal_size()
            channel.get_pty(term=os.environ.get("TERM", "xterm"), width=columns, height=lines)
        if command:
            channel.exec_command(shlex.join(command))
        else:
            channel.invoke_shell()
        with _raw(stdin if interactive else None):
            _pump(channel, stdin.fileno(), stdout, stderr)
        return channel.recv_exit_status()
    finally:
        channel.close()


def _isatty(stream: BinaryIO) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _raw(stream: BinaryIO | None) -> Iterator[None]:
    if stream is None:
        yield
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _pump(channel: paramiko.Channel, in_fd: int, stdout: BinaryIO, stderr: BinaryIO) -> None:
    """Copy stdin to the channel and the channel to stdout/stderr until the remote exits."""
    reading = True
    remote = channel.fileno()
    while True:
        watched = [remote, in_fd] if reading else [remote]
        ready, _, _ = select.select(watched, [], [], POLL_S)
        while channel.recv_ready():
            stdout.write(channel.recv(CHUNK))
            stdout.flush()
        while channel.recv_stderr_ready():
            stderr.write(channel.recv_stderr(CHUNK))
            stderr.flush()
        if reading and in_fd in ready:
            data = os.read(in_fd, CHUNK)
            if data:
                channel.sendall(data)
            else:
                channel.shutdown_write()
                reading = False
        if (
            channel.exit_status_ready()
            and not channel.recv_ready()
            and not channel.recv_stderr_ready()
        ):
            return
