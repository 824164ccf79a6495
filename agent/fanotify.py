"""The fanotify backend: whole-filesystem marks that need no per-directory watches and name
the process behind each change.

``fanotify_init(FAN_REPORT_FID | FAN_REPORT_DFID_NAME)`` (Linux >= 5.9; needs
``CAP_SYS_ADMIN``) and ``fanotify_mark(FAN_MARK_FILESYSTEM)`` (Linux >= 4.20) on every file
system under the policy's roots; each event carries the directory's file handle and the
entry's name, resolved to a path with ``open_by_handle_at`` (``CAP_DAC_READ_SEARCH``). Events
outside the root, on excluded paths or under mutable rules are dropped before anything else
is done. For the rest the process is described at once, while it still exists: pid,
executable, command line, uid, login uid (``/proc/PID/loginuid``, the audit session's user),
and the SSH session it descends from (the nearest ancestor titled ``sshd: user@tty`` or
``sshd-session: user@tty``). ``available()`` says whether this kernel and these privileges
allow the backend, and why not.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import select
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog

from agent.errors import advice
from agent.inotify import mutable_below
from agent.judge import Judge
from agent.mounts import MountTable
from agent.worker import Sink

if TYPE_CHECKING:
    import psutil

NAME: Final = "fanotify"

FAN_CLOEXEC: Final = 0x1
FAN_NONBLOCK: Final = 0x2
FAN_REPORT_FID: Final = 0x200
FAN_REPORT_DIR_FID: Final = 0x400
FAN_REPORT_NAME: Final = 0x800
FAN_MARK_ADD: Final = 0x1
FAN_MARK_FILESYSTEM: Final = 0x100
FAN_MODIFY: Final = 0x2
FAN_ATTRIB: Final = 0x4
FAN_CLOSE_WRITE: Final = 0x8
FAN_MOVED_FROM: Final = 0x40
FAN_MOVED_TO: Final = 0x80
FAN_CREATE: Final = 0x100
FAN_DELETE: Final = 0x200
FAN_Q_OVERFLOW: Final = 0x4000
FAN_ONDIR: Final = 0x40000000
AT_FDCWD: Final = -100
INFO_FID: Final = 1
INFO_DFID_NAME: Final = 2
INFO_DFID: Final = 3
METADATA_VERSION: Final = 3

INIT_FLAGS: Final = (
    FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_FID | FAN_REPORT_DIR_FID | FAN_REPORT_NAME
)
MASK: Final = (
    FAN_MODIFY
    | FAN_ATTRIB
    | FAN_CLOSE_WRITE
    | FAN_CREATE
    | FAN_DELETE
    | FAN_MOVED_FROM
    | FAN_MOVED_TO
    | FAN_ONDIR
)
_DIRENT: Final = FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM | FAN_MOVED_TO
_META: Final = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO: Final = struct.Struct("=BBH")  # info_type, pad, len
_FSID: Final = struct.Struct("=II")
_HANDLE: Final = struct.Struct("=Ii")  # handle_bytes, handle_type
_MASK32: Final = (1 << 32) - 1
_READ_BYTES: Final = 256 << 10
_CMDLINE_CHARS: Final = 4096
_PROCESS_TTL_S: Final = 1.0
_SSHD_TITLE: Final = re.compile(
    r"sshd(?:-session)?: (?P<user>[^\s@\[/][^\s@\[]*)(?:@(?P<tty>\S+)| \[\w+\]|$)"
)

log = structlog.get_logger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_fanotify_init = getattr(_libc, "fanotify_init", None)
_fanotify_mark = getattr(_libc, "fanotify_mark", None)
_open_by_handle_at = getattr(_libc, "open_by_handle_at", None)
if _fanotify_init is not None and _fanotify_mark is not None and _open_by_handle_at is not None:
    _fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    _fanotify_init.restype = ctypes.c_int
    _fanotify_mark.argtypes = [
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint64,
        ctypes.c_int,
        ctypes.c_char_p,
    ]
    _fanotify_mark.restype = ctypes.c_int
    _open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    _open_by_handle_at.restype = ctypes.c_int


def _init() -> int:
    """A fanotify group reporting directory handles and names; ``OSError`` if refused."""
    if _fanotify_init is None:
        raise OSError(errno.ENOSYS, "the C library has no fanotify_init")
    fd = int(_fanotify_init(INIT_FLAGS, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def available() -> tuple[bool, str]:
    """Whether the fanotify backend can run here, and if not, why."""
    try:
        fd = _init()
    except OSError as exc:
        if exc.errno == errno.EPERM:
            return False, "fanotify needs CAP_SYS_ADMIN (run as root)"
        if exc.errno == errno.EINVAL:
            return False, "the kernel lacks FAN_REPORT_DFID_NAME (needs Linux >= 5.9)"
        if exc.errno == errno.ENOSYS:
            return False, "the kernel has no fanotify"
        return False, f"fanotify_init failed: {advice(exc)}"
    os.close(fd)
    return True, "fanotify with filesystem marks and names"


def fsid_key(val0: int, val1: int) -> int:
    """The file system id as ``os.statvfs().f_fsid`` shows it: the two 32-bit words of
    ``__kernel_fsid_t``, unsigned, the second above the first."""
    return (val0 & _MASK32) | ((val1 & _MASK32) << 32)


# --- which process ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SshSession:
    pid: int
    user: str
    tty: str | None


def ssh_session(proc: psutil.Process) -> SshSession | None:
    """The SSH session ``proc`` descends from: its nearest ancestor titled like sshd's
    per-session process (``sshd: alice@pts/0``; OpenSSH >= 9.8: ``sshd-session: …``),
    preferring one with a terminal or ``notty`` over the privileged ``[priv]`` one."""
    import psutil

    privileged: SshSession | None = None
    for parent in [proc, *proc.parents()]:
        try:
            title = " ".join(parent.cmdline())
        except psutil.Error:
            continue
        match = _SSHD_TITLE.match(title.strip())
        if match is None:
            continue
        session = SshSession(parent.pid, match["user"], match["tty"])
        if match["tty"] is not None:
            return session
        privileged = privileged or session
    return privileged


def describe_process(pid: int) -> dict[str, Any]:
    """What can be learnt of process ``pid`` now: ``exited`` when it is gone already."""
    import psutil  # on the first change: a guard with nothing to report never loads it

    out: dict[str, Any] = {"pid": pid, "exited": False}
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            out["uid"] = proc.uids().real
            out["cmdline"] = _bounded(proc.cmdline())
            try:
                out["exe"] = proc.exe() or None
            except psutil.AccessDenied:
                out["exe"] = None
        out["loginuid"] = _loginuid(pid)
        session = ssh_session(proc)
    except psutil.NoSuchProcess:
        out["exited"] = True
        return out
    except psutil.AccessDenied:
        return out
    out["ssh_session"] = (
        {"pid": session.pid, "user": session.user, "tty": session.tty} if session else None
    )
    return out


def _bounded(cmdline: list[str]) -> list[str]:
    out: list[str] = []
    left = _CMDLINE_CHARS
    for arg in cmdline:
        if left <= 0:
            out.append("…")
            break
        out.append(arg[:left])
        left -= len(arg) + 1
    return out


def _loginuid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/loginuid", encoding="ascii") as fh:
            value = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    return None if value == 0xFFFFFFFF else value


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawEvent:
    mask: int
    pid: int
    fd: int
    records: tuple[tuple[int, int, bytes, str], ...]  # (info type, fsid key, handle, name)


def parse_events(data: bytes) -> Iterator[RawEvent]:
    """The events in one ``read`` of a fanotify group reporting FIDs."""
    offset = 0
    while offset + _META.size <= len(data):
        event_len, vers, _res, meta_len, mask, fd, pid = _META.unpack_from(data, offset)
        if vers != METADATA_VERSION or event_len < _META.size or offset + event_len > len(data):
            log.error("fanotify_bad_event", version=vers, length=event_len)
            return
        records = []
        pos, end = offset + meta_len, offset + event_len
        while pos + _INFO.size <= end:
            info_type, _pad, info_len = _INFO.unpack_from(data, pos)
            if info_len < _INFO.size or pos + info_len > end:
                break
            if info_type in (INFO_FID, INFO_DFID_NAME, INFO_DFID):
                val0, val1 = _FSID.unpack_from(data, pos + _INFO.size)
                head = pos + _INFO.size + _FSID.size
                size, _kind = _HANDLE.unpack_from(data, head)
                handle = data[head : head + _HANDLE.size + size]
                name = ""
                if info_type == INFO_DFID_NAME:
                    raw = data[head + _HANDLE.size + size : pos + info_len]
                    name = os.fsdecode(raw.split(b"\0", 1)[0])
                records.append((info_type, fsid_key(val0, val1), handle, name))
            pos += info_len
        yield RawEvent(mask, pid, fd, tuple(records))
        offset += event_len


class FanotifyBackend:
    """Realtime events from fanotify filesystem marks (see the module's docstring)."""

    name = NAME

    def __init__(self, judge: Judge, sink: Sink, *, mounts: MountTable | None = None) -> None:
        self.judge = judge
        self.sink = sink
        self.mounts = mounts if mounts is not None else MountTable.from_proc()
        self._fd = -1
        self._mount_fds: dict[int, int] = {}  # fsid key → a directory on that file system
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._processes: OrderedDict[int, tuple[float, dict[str, Any]]] = OrderedDict()

    @property
    def watches(self) -> int:
        """The file systems marked."""
        return len(self._mount_fds)

    def start(self) -> None:
        self._fd = _init()
        for index, full in enumerate(self._filesystems()):
            try:
                self._mark(full)
            except OSError as exc:
                if index == 0:
                    raise  # the root itself: no fanotify at all
                log.warning("fanotify_mark_failed", path=full, error=advice(exc))
                self.sink.unwatched(NAME, "watch_failed", f"fanotify_mark {full}: {advice(exc)}")
        if not self._mount_fds:
            raise OSError(errno.ENOENT, "no file system to mark under the policy's roots")
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._read_loop, name="driftwarden-fanotify")
        self._thread.daemon = True
        self._thread.start()
        log.info("fanotify_watching", filesystems=len(self._mount_fds))

    def stop(self) -> None:
        self._stopping.set()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for fd in [self._fd, self._wake_r, self._wake_w, *self._mount_fds.values()]:
            if fd >= 0:
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1
        self._mount_fds.clear()

    def _filesystems(self) -> list[str]:
        """One path per file system to mark: the roots, and the mounts below them that the
        policy does not exclude."""
        judge, policy = self.judge, self.judge.policy
        out = [judge.host_path(top) for top in policy.roots if not policy.excluded(top)]
        if policy.one_filesystem:
            return out
        for mount, fstype in self.mounts.fstypes.items():
            path = judge.image_path(mount)
            if path is None or policy.excluded(path) or fstype in policy.exclude_fstypes:
                continue
            if any(path == r or path.startswith(r.rstrip("/") + "/") for r in policy.roots):
                out.append(mount)
        return out

    def _mark(self, full: str) -> None:
        try:
            fsid = os.statvfs(full).f_fsid
        except OSError:
            return  # a root that does not exist
        if fsid in self._mount_fds:
            return
        if _fanotify_mark is None:
            raise OSError(errno.ENOSYS, "the C library has no fanotify_mark")
        result = _fanotify_mark(
            self._fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, MASK, AT_FDCWD, os.fsencode(full)
        )
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_mark {full}: {os.strerror(err)}")
        self._mount_fds[fsid] = os.open(full, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def failure(self) -> str | None:
        thread = self._thread
        if thread is None or thread.is_alive():
            return None
        return "the fanotify reader thread has ended"

    def _read_loop(self) -> None:
        try:
            self._read_events()
        except Exception as exc:  # the guard hears of it and falls back to rescans
            log.exception("fanotify_reader_failed")
            detail = f"the fanotify reader failed: {type(exc).__name__}: {exc}"
            self.sink.unwatched(NAME, "backend_failed", detail)

    def _read_events(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping.is_set():
            poller.poll()
            if self._stopping.is_set():
                break
            try:
                data = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.error("fanotify_read_failed", error=advice(exc))
                detail = f"the fanotify reader failed: {advice(exc)}"
                self.sink.unwatched(NAME, "backend_failed", detail)
                return
            for event in parse_events(data):
                try:
                    self._handle(event)
                except Exception:  # one odd event must not end the reader
                    log.exception("fanotify_event_failed", mask=event.mask)

    def _handle(self, event: RawEvent) -> None:
        if event.fd >= 0:
            os.close(event.fd)
        if event.mask & FAN_Q_OVERFLOW:
            self.sink.overflow(NAME)
            return
        full = self._path(event)
        if full is None:
            return
        path = self.judge.image_path(full)
        if path is None:
            return
        tree = bool(event.mask & FAN_ONDIR and event.mask & _DIRENT)
        if not self.judge.watched(path) and not (
            tree and not mutable_below(self.judge.policy, path)
        ):
            return
        self.sink.changed(full, tree=tree, process=self._process(event.pid))

    def _path(self, event: RawEvent) -> str | None:
        for info_type, fsid, handle, name in event.records:
            if info_type != INFO_DFID_NAME:
                continue
            directory = self._resolve(fsid, handle)
            if directory is None:
                return None
            if name in ("", "."):
                return directory
            return directory.rstrip("/") + "/" + name if directory != "/" else "/" + name
        for _info_type, fsid, handle, _name in event.records:
            return self._resolve(fsid, handle)
        return None

    def _resolve(self, fsid: int, handle: bytes) -> str | None:
        mount_fd = self._mount_fds.get(fsid)
        if mount_fd is None or _open_by_handle_at is None:
            return None
        fd = int(_open_by_handle_at(mount_fd, handle, os.O_PATH | os.O_CLOEXEC))
        if fd < 0:
            return None  # ESTALE: the directory is gone already; its parent's event tells
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        finally:
            os.close(fd)
        return None if path.endswith(" (deleted)") else path

    def _process(self, pid: int) -> dict[str, Any]:
        now = time.monotonic()
        cached = self._processes.get(pid)
        if cached is not None and now - cached[0] < _PROCESS_TTL_S:
            return cached[1]
        info = describe_process(pid)
        self._processes[pid] = (now, info)
        self._processes.move_to_end(pid)
        while len(self._processes) > 256:
            self._processes.popitem(last=False)
        return info
