"""A real OpenSSH server for tests, on a free loopback port, logging to a file.

Debian's ``openssh-server`` (``/usr/sbin/sshd``), started in the foreground with its own host
key, config, pid file and ``-E LOGFILE``. A throw-away system user is made with ``useradd`` and
a password (``chpasswd``), and gets an Ed25519 key, authorised through ``AuthorizedKeysFile``,
and a certificate for a second key, signed by a test CA that sshd trusts. Needs root.

Use from a conftest::

    from tests.sshd import ssh_user, sshd  # noqa: F401  (fixtures)

or start a private server with :func:`start_sshd` (``with start_sshd(dir, user) as server``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import psutil
import pytest

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
UTMP = Path("/run/utmp")


def wait_until(predicate: Callable[[], object], *, timeout_s: float = 10.0, what: str) -> None:
    """Poll ``predicate`` until it is true; fail the test naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def _run(*cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(cmd, input=stdin, check=True, capture_output=True, text=True).stdout


def fingerprint_of(public_key: Path) -> str:
    """``SHA256:…`` as ``ssh-keygen -l`` (and sshd) print it."""
    return _run("ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key)).split()[1]


@dataclass(frozen=True)
class SshUser:
    name: str
    password: str = field(repr=False)
    key_path: Path  # Ed25519 private key, authorised for the user
    fingerprint: str  # of key_path, per ssh-keygen
    cert_key_path: Path  # a second Ed25519 key, authorised only through its certificate
    cert_path: Path
    cert_fingerprint: str  # of the certified key (sshd logs the certificate's key)
    cert_id: str
    cert_serial: int
    ca_public_path: Path
    ca_fingerprint: str
    authorized_keys_dir: Path  # holds a file named after the user

    def key(self) -> paramiko.PKey:
        return paramiko.Ed25519Key.from_private_key_file(str(self.key_path))

    def cert_key(self) -> paramiko.PKey:
        key = paramiko.Ed25519Key.from_private_key_file(str(self.cert_key_path))
        key.load_certificate(str(self.cert_path))
        return key


@contextlib.contextmanager
def make_ssh_user(workdir: Path) -> Iterator[SshUser]:
    """A fresh system user with a password, an authorised key and a certified key."""
    name = "dwt" + secrets.token_hex(4)
    password = secrets.token_urlsafe(12)
    workdir.mkdir(parents=True, exist_ok=True)
    key_path, cert_key_path, ca_path = workdir / "id_user", workdir / "id_cert", workdir / "ca"
    for path in (key_path, cert_key_path, ca_path):
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path))
    cert_id, serial = f"{name} ticket 42", 4242
    _run(
        "ssh-keygen", "-q", "-s", str(ca_path), "-I", cert_id, "-n", name, "-z", str(serial),
        str(cert_key_path) + ".pub",
    )  # fmt: skip
    # sshd reads authorized keys as the user: outside pytest's private (0700) temp tree.
    keys_dir = Path(tempfile.mkdtemp(prefix="dw-authorized-keys-"))
    keys_dir.chmod(0o755)
    (keys_dir / name).write_text(Path(str(key_path) + ".pub").read_text())
    _run("useradd", "--no-create-home", "--home-dir", "/", "--shell", "/bin/sh", name)
    try:
        _run("chpasswd", stdin=f"{name}:{password}\n")
        yield SshUser(
            name=name,
            password=password,
            key_path=key_path,
            fingerprint=fingerprint_of(Path(str(key_path) + ".pub")),
            cert_key_path=cert_key_path,
            cert_path=Path(str(cert_key_path) + "-cert.pub"),
            cert_fingerprint=fingerprint_of(Path(str(cert_key_path) + ".pub")),
            cert_id=cert_id,
            cert_serial=serial,
            ca_public_path=Path(str(ca_path) + ".pub"),
            ca_fingerprint=fingerprint_of(Path(str(ca_path) + ".pub")),
            authorized_keys_dir=keys_dir,
        )
    finally:
        # sshd's session processes for the user may still be exiting.
        uid = pwd.getpwnam(name).pw_uid
        wait_until(lambda: not _processes_of(uid), what=f"processes of {name} to end")
        _run("userdel", name)
        shutil.rmtree(keys_dir, ignore_errors=True)


def _processes_of(uid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["uids"]):
        uids = process.info["uids"]
        if uids is not None and uid in (uids.real, uids.effective):
            found.append(process)
    return found


@dataclass
class Sshd:
    """A running sshd: where it listens, where it logs, and how to log in to it."""

    host: str
    port: int
    log_path: Path
    config_path: Path
    process: subprocess.Popen[bytes]
    user: SshUser
    clients: list[paramiko.SSHClient | paramiko.Transport] = field(default_factory=list)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect(
        self,
        *,
        password: str | None = None,
        pkey: paramiko.PKey | None = None,
        username: str | None = None,
    ) -> paramiko.SSHClient:
        """Log in by password or key; raises on failure. Closed at :meth:`stop` at the latest."""
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        self.clients.append(client)
        client.connect(
            self.host,
            self.port,
            username=username or self.user.name,
            password=password,
            pkey=pkey,
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
            auth_timeout=10,
        )
        return client

    def connect_interactive(self, password: str) -> paramiko.Transport:
        """Log in by keyboard-interactive (PAM asks, we answer with the password)."""
        transport = paramiko.Transport((self.host, self.port))
        self.clients.append(transport)
        transport.start_client(timeout=10)
        transport.auth_interactive(
            self.user.name, lambda _t, _i, prompts: [password] * len(prompts)
        )
        return transport

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def local_port(client: paramiko.SSHClient | paramiko.Transport) -> int:
    """The client side's TCP port of a connection: what sshd logs as ``port N``."""
    transport = client.get_transport() if isinstance(client, paramiko.SSHClient) else client
    assert transport is not None
    return int(transport.sock.getsockname()[1])  # type: ignore[union-attr]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(workdir: Path, user: SshUser, port: int) -> str:
    return f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {workdir}/host_ed25519
PidFile {workdir}/sshd.pid
LogLevel VERBOSE
UsePAM yes
PasswordAuthentication yes
KbdInteractiveAuthentication yes
PubkeyAuthentication yes
AuthorizedKeysFile {user.authorized_keys_dir}/%u
TrustedUserCAKeys {user.ca_public_path}
StrictModes no
UseDNS no
PermitRootLogin no
MaxStartups 100:30:200
AllowUsers {user.name}
"""


# Run sshd with a private /dev whose "log" is the given syslog socket, so that its syslog(3)
# lines (and PAM's) reach that socket; everything else in /dev is the machine's own.
_PRIVATE_DEV = """
set -e
dev="$1"; sock="$2"; shift 2
mount -t tmpfs -o mode=755 dwdev "$dev"
for node in null zero full random urandom tty ptmx; do
  touch "$dev/$node"; mount --bind "/dev/$node" "$dev/$node"
done
mkdir "$dev/pts" "$dev/shm"
mount --bind /dev/pts "$dev/pts"; mount --bind /dev/shm "$dev/shm"
touch "$dev/log"; mount --bind "$sock" "$dev/log"
mount --move "$dev" /dev
exec "$@"
"""


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def start_sshd(workdir: Path, user: SshUser, *, syslog: Path | None = None) -> Iterator[Sshd]:
    """Start ``sshd -D -f CONFIG -E LOG`` on a free loopback port; stop it on exit.

    With ``syslog`` (a syslog datagram socket, e.g. a journald namespace's ``dev-log``), sshd
    runs in a private mount namespace where ``/dev/log`` is that socket, and logs there
    instead of to ``LOG``.
    """
    if not SSHD.exists():
        pytest.fail(f"{SSHD} is missing: apt-get install -y openssh-server")
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = workdir / "host_ed25519"
    if not host_key.exists():
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    log_path = workdir / "sshd.log"
    started: list[Sshd] = []
    try:
        yield _start(workdir, user, syslog, log_path, started)
    finally:
        for server in started:
            server.stop()


def _start(
    workdir: Path, user: SshUser, syslog: Path | None, log_path: Path, started: list[Sshd]
) -> Sshd:
    for _attempt in range(5):
        port = _free_port()
        config = workdir / "sshd_config"
        config.write_text(_config(workdir, user, port))
        _run(str(SSHD), "-t", "-f", str(config))
        log_path.touch()
        start = log_path.stat().st_size
        command = [str(SSHD), "-D", "-f", str(config)]
        if syslog is None:
            command += ["-E", str(log_path)]
        else:
            dev = workdir / "dev"
            dev.mkdir(exist_ok=True)
            command = [
                "unshare", "--mount", "--propagation", "private",
                "sh", "-c", _PRIVATE_DEV, "sh", str(dev), str(syslog), *command,
            ]  # fmt: skip
        process = subprocess.Popen(command)
        server = Sshd("127.0.0.1", port, log_path, config, process, user)
        started.append(server)

        def _ready(server: Sshd = server, start: int = start) -> bool:
            if server.process.poll() is not None:
                return True
            if syslog is not None:
                return _accepts(server.host, server.port)
            return b"Server listening" in server.log_path.read_bytes()[start:]

        wait_until(_ready, what="sshd to listen")
        if process.poll() is None:
            return server
    pytest.fail(f"sshd did not start: {log_path.read_text()[-2000:]}")


@contextlib.contextmanager
def journald_namespace(name: str | None = None) -> Iterator[tuple[str, Path]]:
    """A real systemd-journald serving journal namespace ``name`` (``journalctl
    --namespace=NAME``); yields the name and its syslog socket. Its files are removed after."""
    journald = Path("/lib/systemd/systemd-journald")
    if not journald.exists():
        pytest.skip("systemd-journald is not installed")
    name = name or "dwt" + secrets.token_hex(4)
    run_dir = Path(f"/run/systemd/journal.{name}")
    machine_id = Path("/etc/machine-id").read_text().strip()
    stores = [
        Path(f"/var/log/journal/{machine_id}.{name}"),
        Path(f"/run/log/journal/{machine_id}.{name}"),
    ]
    process = subprocess.Popen(
        [str(journald), name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_until(
            lambda: (run_dir / "dev-log").exists() or process.poll() is not None,
            what="journald to listen",
        )
        if process.poll() is not None:
            pytest.skip(f"systemd-journald cannot run here: {process.communicate()[1][-500:]!r}")
        yield name, run_dir / "dev-log"
    finally:
        if process.poll() is None:
            process.terminate()
        process.communicate(timeout=10)
        for path in [run_dir, *stores]:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def utmp_file() -> Iterator[Path]:
    """Make sure ``/run/utmp`` exists, as it does after boot, so sshd records sessions."""
    created = not UTMP.exists()
    if created:
        UTMP.touch(mode=0o664)
        with contextlib.suppress(KeyError, OSError):
            shutil.chown(UTMP, group="utmp")
    try:
        yield UTMP
    finally:
        if created:
            with contextlib.suppress(FileNotFoundError):
                UTMP.unlink()


@pytest.fixture(scope="session")
def ssh_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshUser]:
    if os.geteuid() != 0:
        pytest.skip("a real sshd with a test user needs root")
    with make_ssh_user(tmp_path_factory.mktemp("ssh-user")) as user:
        yield user


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory, ssh_user: SshUser) -> Iterator[Sshd]:
    """One sshd for the session; tests read its log from where it was when they began."""
    with utmp_file(), start_sshd(tmp_path_factory.mktemp("sshd"), ssh_user) as server:
        yield server
