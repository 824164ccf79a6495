"""SSH login detection: the parser on real log formats, the auth log tailer through real
rotations, the watcher's de-duplication and saved positions, and a real sshd that paramiko
logs in to by password, key, certificate and keyboard-interactive."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paramiko
import pytest
from structlog.testing import capture_logs

from agent.logins import AuthLogSource, JournalSource, Login, LoginWatcher, UtmpSource
from agent.logins.parse import LineParser, split_syslog
from tests.sshd import Sshd, SshUser, journald_namespace, local_port, start_sshd, wait_until

DATA = Path(__file__).parent / "data" / "logins"


def _parse_file(path: Path) -> list[Login]:
    parser = LineParser("authlog")
    return [login for line in path.read_text().splitlines() if (login := parser.parse_line(line))]


# --- parsing -------------------------------------------------------------------------------


def test_auth_log_lines_become_events() -> None:
    events = _parse_file(DATA / "auth.log")
    summary = [(e.event, e.user, e.method, e.source_ip, e.source_port, e.pid) for e in events]
    assert summary == [
        ("accepted", "admin", "publickey", "203.0.113.7", 52144, 2210),
        ("session_open", "admin", "publickey", "203.0.113.7", 52144, 2210),
        ("session_open", "admin", "publickey", "203.0.113.7", 52144, 2210),
        ("invalid_user", "oracle", None, "198.51.100.9", 40022, 2290),
        ("failed", "oracle", "password", "198.51.100.9", 40022, 2290),
        ("failed", "oracle", "password", "198.51.100.9", 40022, 2290),
        ("failed", "root", "password", "198.51.100.9", 40100, 2301),
        ("accepted", "alice", "keyboard-interactive/pam", "192.0.2.10", 61022, 2350),
        ("session_open", "alice", "keyboard-interactive/pam", "192.0.2.10", 61022, 2350),
        ("disconnected", "admin", "publickey", "203.0.113.7", 52144, 2210),
        ("disconnected", "admin", "publickey", "203.0.113.7", 52144, 2210),
        ("session_close", "admin", "publickey", "203.0.113.7", 52144, 2210),
        ("accepted", "root", "password", "2001:db8::5", 61000, 3310),
        ("session_open", "root", "password", "2001:db8::5", 61000, 3310),
        ("accepted", "deploy", "publickey", "10.1.2.3", 50022, 3390),
        ("session_close", "deploy", "publickey", "10.1.2.3", 50022, 3390),
    ]
    first = events[0]
    assert (first.key_type, first.fingerprint) == (
        "ED25519",
        "SHA256:t6P0EEbETC1nGs55GX+aNTjEInQzfwGnNSB/DzoAQPk",
    )
    assert events[2].tty == "pts/1"
    assert events[5].repeated == 2
    assert events[12].at == "2025-11-26T10:22:00.123456Z"
    cert = events[14]
    assert (cert.key_type, cert.key_id, cert.cert_serial, cert.ca_fingerprint) == (
        "RSA-CERT",
        'deploy@ci "nightly"',
        9,
        "SHA256:x/C6I0QRcIHcJOquJahiMFVIips2bfSndcPi1peVvq0",
    )
    assert all(e.source == "authlog" and e.raw for e in events)


def test_traditional_syslog_time_takes_the_year_that_is_not_in_the_future() -> None:
    now = datetime(2026, 1, 1, 0, 5).astimezone()
    line = split_syslog("Dec 31 23:59:59 h sshd[1]: x", now=now)
    assert line.at is not None
    moment = datetime.fromisoformat(line.at.replace("Z", "+00:00")).astimezone(now.tzinfo)
    assert (moment.year, moment.month, moment.day) == (2025, 12, 31) and moment < now
    assert (line.program, line.pid, line.message) == ("sshd", 1, "x")


def test_a_bare_sshd_E_line_and_garbage_are_handled() -> None:
    parser = LineParser("authlog")
    login = parser.parse_line("Accepted password for bob from 127.0.0.1 port 4022 ssh2\r")
    assert login is not None and (login.user, login.pid, login.source_port) == ("bob", None, 4022)
    # A connection that never logged in ends without an event.
    assert parser.parse_line("Connection closed by 192.0.2.1 port 4100") is None
    for junk in ["", "\x00\xff", "Accepted", "Accepted password for x from y port 99999999 ssh2"]:
        result = parser.parse_line(junk)
        assert result is None or result.source_port is None


def test_to_wire_is_json_and_typed() -> None:
    login = _parse_file(DATA / "auth.log")[0]
    wire = login.to_wire()
    assert wire["type"] == "login" and wire["event"] == "accepted" and wire["unlogged"] is False
    assert json.loads(json.dumps(wire)) == wire
    long = Login("accepted", "x", at="t", source="authlog", raw="y" * 5000).to_wire()
    assert len(long["raw"]) == 1024


def _journal_entry(cursor: str, ident: str, pid: int, message: Any, **extra: Any) -> bytes:
    entry = {
        "__CURSOR": cursor,
        "__REALTIME_TIMESTAMP": "1764152221000000",
        "SYSLOG_IDENTIFIER": ident,
        "_PID": str(pid),
        "MESSAGE": message,
        **extra,
    }
    return json.dumps(entry).encode() + b"\n"


def test_journal_entries_are_parsed_and_advance_the_cursor() -> None:
    """journalctl -o json lines; logind's entries carry the session LEADER (the sshd pid)."""
    source = JournalSource()
    accepted = "Accepted publickey for ops from 192.0.2.1 port 5000 ssh2: ED25519 SHA256:abc"
    data = (
        _journal_entry("c1", "sshd-session", 77, accepted)
        + _journal_entry("c2", "systemd-logind", 400, "New session 12 of user ops.", LEADER="77")
        + _journal_entry("c3", "sshd", 88, list(b"Failed password for ops from ::1 port 9 ssh2"))
        + _journal_entry("c4", "systemd-logind", 400, "Removed session 12.")
        + b"{not json}\n"
        + b'{"__CURSOR": "c5", "MESSAGE": "partial'
    )
    events = source._parse(data)
    assert [(e.event, e.user, e.pid, e.source_port) for e in events] == [
        ("accepted", "ops", 77, 5000),
        ("session_open", "ops", 77, 5000),
        ("failed", "ops", 88, 9),
        ("session_close", "ops", 77, 5000),
    ]
    assert events[0].at == "2025-11-26T10:17:01.000000Z"
    assert events[1].session_id == "12" and events[1].fingerprint == "SHA256:abc"
    assert source.position() == {"cursor": "c4"}
    assert "--after-cursor" in source.command() and "SYSLOG_IDENTIFIER=sshd-session" in (
        source.command()
    )


# --- auth log files ------------------------------------------------------------------------


def _accept(port: int, user: str = "bob") -> bytes:
    return f"Accepted password for {user} from 10.0.0.1 port {port} ssh2\n".encode()


def _ports(events: list[Login]) -> list[int]:
    return [e.source_port for e in events if e.event == "accepted" and e.source_port]


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)


def test_partial_line_waits_for_its_newline(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    _append(log, _accept(1) + _accept(2)[:20])
    source = AuthLogSource(log)
    assert _ports(source.poll()) == [1]
    assert _ports(source.poll()) == []
    _append(log, _accept(2)[20:])
    assert _ports(source.poll()) == [2]
    source.close()


def test_rename_rotation_drains_the_old_file_first(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    _append(log, _accept(1))
    clock = [0.0]
    source = AuthLogSource(log, rotate_grace_s=5, clock=lambda: clock[0])
    assert _ports(source.poll()) == [1]
    with log.open("ab") as writer:  # a syslog daemon that has not reopened yet
        writer.write(_accept(2))
        os.rename(log, tmp_path / "auth.log.1")
        _append(log, _accept(4))
        writer.write(_accept(3))
        writer.flush()
        assert _ports(source.poll()) == [2, 3, 4]
        writer.write(_accept(5)[:10])
        writer.flush()
        assert _ports(source.poll()) == []
        clock[0] = 10.0  # the old file has stopped growing: its last partial line is final
        _append(log, _accept(6))
        assert _ports(source.poll()) == [6]
        assert source.poll() == []
    source.close()


def test_copytruncate_reads_the_copy_from_our_offset(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    _append(log, _accept(1))
    source = AuthLogSource(log, rotate_grace_s=0)
    assert _ports(source.poll()) == [1]
    _append(log, _accept(2) + _accept(3))
    shutil.copyfile(log, tmp_path / "auth.log.1")  # logrotate copytruncate
    os.truncate(log, 0)
    _append(log, _accept(4) + _accept(5) + _accept(6))  # longer than before: size alone can't tell
    assert _ports(source.poll()) == [2, 3, 4, 5, 6]
    source.close()


def _restart(source: AuthLogSource, **kwargs: Any) -> AuthLogSource:
    position = json.loads(json.dumps(source.position()))
    source.close()
    fresh = AuthLogSource(source.path, **kwargs)
    fresh.restore(position)
    return fresh


@pytest.mark.parametrize("rotation", ["none", "rename", "copytruncate", "compressed"])
def test_restart_neither_loses_nor_repeats(tmp_path: Path, rotation: str) -> None:
    log = tmp_path / "auth.log"
    _append(log, _accept(1) + _accept(2) + _accept(3)[:9])
    source = AuthLogSource(log, rotate_grace_s=0)
    assert _ports(source.poll()) == [1, 2]
    _append(log, _accept(3)[9:] + _accept(4))
    if rotation == "rename":
        os.rename(log, tmp_path / "auth.log.1")
    elif rotation in {"copytruncate", "compressed"}:
        shutil.copyfile(log, tmp_path / "auth.log.1")
        os.truncate(log, 0)
        if rotation == "compressed":
            os.rename(tmp_path / "auth.log.1", tmp_path / "auth.log.1.gz")
    _append(log, _accept(5))
    source = _restart(source, rotate_grace_s=0)
    expected = [5] if rotation == "compressed" else [3, 4, 5]  # a compressed copy is gone
    assert _ports(source.poll()) == expected
    source = _restart(source, rotate_grace_s=0)
    assert source.poll() == []
    source.close()


def test_first_start_can_begin_at_the_end(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    _append(log, _accept(1) + _accept(2)[:5])
    source = AuthLogSource(log, from_start=False)
    assert source.poll() == []
    _append(log, _accept(2)[5:] + _accept(3))
    assert _ports(source.poll()) == [2, 3]  # the line being written when we started is new
    source.close()


def test_missing_and_unreadable_files_are_not_fatal(tmp_path: Path) -> None:
    source = AuthLogSource(tmp_path / "nope.log")
    assert source.poll() == [] and source.poll() == []
    (tmp_path / "nope.log").write_bytes(_accept(9))
    assert _ports(source.poll()) == [9]
    source.close()


# --- the watcher ---------------------------------------------------------------------------


def _watcher(state_dir: Path, *paths: Path, **kwargs: Any) -> LoginWatcher:
    return LoginWatcher(state_dir, [AuthLogSource(p, rotate_grace_s=0) for p in paths], **kwargs)


def test_a_failing_source_is_reported_once_until_it_recovers(tmp_path: Path) -> None:
    log_path = tmp_path / "auth.log"
    log_path.mkdir()  # not a file: reading it fails
    journalctl = tmp_path / "journalctl"  # missing: it cannot be started
    journal = JournalSource(journalctl=str(journalctl), restart_backoff_s=0)
    watcher = LoginWatcher(tmp_path, [journal, AuthLogSource(log_path, rotate_grace_s=0)])
    authlog = f"authlog:{log_path}"
    with capture_logs():
        assert watcher.poll() == []
    failed = dict(watcher.new_failures())
    assert set(failed) == {"journal", authlog}
    assert failed["journal"].startswith("journalctl cannot be started")
    assert "IsADirectoryError" in failed[authlog]
    with capture_logs():
        assert watcher.poll() == []
    assert watcher.new_failures() == []  # once, not at every poll

    entry = {
        "__CURSOR": "c1",
        "__REALTIME_TIMESTAMP": "1795600000000000",
        "SYSLOG_IDENTIFIER": "sshd",
        "SYSLOG_PID": "4242",
        "MESSAGE": "Accepted publickey for ops from 192.0.2.1 port 7 ssh2: ED25519 SHA256:abc",
    }
    journalctl.write_text(f"#!/bin/sh\necho '{json.dumps(entry)}'\nexec sleep 30\n")
    journalctl.chmod(0o755)
    found: list[Login] = []
    with capture_logs() as logs:
        wait_until(lambda: found.extend(watcher.poll()) or found, what="the journal login")
    assert _ports(found) == [7]
    assert [e["source"] for e in logs if e["event"] == "login_source_recovered"] == ["journal"]
    assert list(watcher.failing) == [authlog]  # still failing, and not reported again
    assert watcher.new_failures() == []
    watcher.close()


def test_one_login_seen_by_two_sources_is_reported_once(tmp_path: Path) -> None:
    lines = (DATA / "auth.log").read_bytes()
    (tmp_path / "auth.log").write_bytes(lines)
    (tmp_path / "secure").write_bytes(lines)
    # The sample's lines carry fixed dates: as if the machine had booted before them.
    booted_at = datetime(2000, 1, 1, tzinfo=UTC)
    sources = [
        AuthLogSource(tmp_path / name, rotate_grace_s=0, booted_at=booted_at)
        for name in ("auth.log", "secure")
    ]
    with LoginWatcher(tmp_path, sources) as watcher:
        events = watcher.poll()
        assert watcher.failures.failed == 4 and watcher.failures.invalid_user == 1
    assert [(e.event, e.user, e.source_port) for e in events] == [
        ("accepted", "admin", 52144),
        ("session_open", "admin", 52144),
        ("accepted", "alice", 61022),
        ("session_open", "alice", 61022),
        ("disconnected", "admin", 52144),
        ("session_close", "admin", 52144),
        ("accepted", "root", 61000),
        ("session_open", "root", 61000),
        ("accepted", "deploy", 50022),
        ("session_close", "deploy", 50022),
    ]
    assert {e.source for e in events} == {"authlog"}


def test_positions_are_committed_atomically_and_restored(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    _append(log, _accept(1))
    with _watcher(tmp_path, log) as watcher:
        assert _ports(watcher.poll()) == [1]
        watcher.commit()
        _append(log, _accept(2))
        assert _ports(watcher.poll()) == [2]  # polled, but not committed: a crash repeats it
    saved = json.loads((tmp_path / "logins.json").read_text())
    assert saved["version"] == 1 and f"authlog:{log}" in saved["sources"]
    assert not list(tmp_path.glob("*.tmp"))
    with _watcher(tmp_path, log) as watcher:
        assert _ports(watcher.poll()) == [2]
        watcher.commit()
        written = (tmp_path / "logins.json").stat().st_ino
        assert watcher.poll() == []
        watcher.commit()  # nothing moved: nothing written (the file is replaced on a save)
        assert (tmp_path / "logins.json").stat().st_ino == written
    with _watcher(tmp_path, log) as watcher:
        assert watcher.poll() == []


def test_staged_positions_hold_only_if_their_spool_record_was_written(tmp_path: Path) -> None:
    """A kill between queueing the logins and committing the positions: the positions staged
    for spool record q hold when q was written (nothing repeats), else the previous ones do
    (nothing is lost)."""
    log = tmp_path / "auth.log"
    _append(log, _accept(1))
    with _watcher(tmp_path, log) as watcher:
        assert _ports(watcher.poll()) == [1]
        watcher.commit()
        _append(log, _accept(2))
        assert _ports(watcher.poll()) == [2]
        watcher.stage(7)  # killed here: record 7 may or may not be on disk
    with _watcher(tmp_path, log, written=lambda q: q < 7) as watcher:  # it was not
        assert _ports(watcher.poll()) == [2]
        watcher.stage(7)
    with _watcher(tmp_path, log, written=lambda q: q < 8) as watcher:  # it was
        assert watcher.poll() == []
        _append(log, _accept(3))
        assert _ports(watcher.poll()) == [3]
        watcher.stage(9)
    # settled at load: a later report numbered 7 cannot be taken for the staged one
    assert "pending" in json.loads((tmp_path / "logins.json").read_text())
    with _watcher(tmp_path, log) as watcher:  # nobody can say: repeat rather than lose
        assert "pending" not in json.loads((tmp_path / "logins.json").read_text())
        assert _ports(watcher.poll()) == [3]
        watcher.commit()
    with _watcher(tmp_path, log) as watcher:
        assert watcher.poll() == []


def test_a_corrupt_state_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "logins.json").write_text("{torn")
    _append(tmp_path / "auth.log", _accept(1))
    with _watcher(tmp_path, tmp_path / "auth.log") as watcher:
        assert _ports(watcher.poll()) == [1]
    assert (tmp_path / "logins.json.bad").read_text() == "{torn"


class _Exploding:
    name = "exploding"

    def poll(self) -> list[Login]:
        raise RuntimeError("boom")

    def position(self) -> dict[str, Any]:
        return {}

    def restore(self, position: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_failing_source_does_not_stop_the_others(tmp_path: Path) -> None:
    _append(tmp_path / "auth.log", _accept(1))
    sources = [_Exploding(), AuthLogSource(tmp_path / "auth.log")]
    with LoginWatcher(tmp_path, sources) as watcher:
        assert _ports(watcher.poll()) == [1]


# --- a real sshd ---------------------------------------------------------------------------


@contextlib.contextmanager
def _watching(sshd: Sshd, tmp_path: Path, **kwargs: Any) -> Iterator[LoginWatcher]:
    sources = [AuthLogSource(sshd.log_path, from_start=False), *kwargs.pop("extra", [])]
    with LoginWatcher(tmp_path, sources, **kwargs) as watcher:
        watcher.poll()  # position at the end of the shared log
        yield watcher


def _collect(watcher: LoginWatcher, events: list[Login], predicate: Any, what: str) -> None:
    def done() -> bool:
        events.extend(watcher.poll())
        return bool(predicate(events))

    wait_until(done, timeout_s=20, what=what)


def _for_port(events: list[Login], port: int) -> list[Login]:
    return [e for e in events if e.source_port == port]


def test_each_real_login_is_reported_once_with_its_details(
    sshd: Sshd, ssh_user: SshUser, tmp_path: Path
) -> None:
    with _watching(sshd, tmp_path) as watcher:
        by_password = sshd.connect(password=ssh_user.password)
        by_key = sshd.connect(pkey=ssh_user.key())
        by_cert = sshd.connect(pkey=ssh_user.cert_key())
        by_pam = sshd.connect_interactive(ssh_user.password)
        ports = {local_port(c): c for c in (by_password, by_key, by_cert, by_pam)}
        port_of = {c: local_port(c) for c in ports.values()}
        events: list[Login] = []
        accepted = lambda got: {e.source_port for e in got if e.event == "accepted"} >= set(ports)  # noqa: E731
        _collect(watcher, events, accepted, "four accepted logins")
        for client in ports.values():
            client.close()
        _collect(
            watcher,
            events,
            lambda got: {e.source_port for e in got if e.event == "disconnected"} >= set(ports),
            "four disconnects",
        )
    logins = {e.source_port: e for e in events if e.event == "accepted"}
    assert len([e for e in events if e.event == "accepted"]) == 4
    for port, login in logins.items():
        assert (login.user, login.source_ip, login.source, login.pid) == (
            ssh_user.name,
            "127.0.0.1",
            "authlog",
            None,  # sshd -E writes bare messages
        )
        assert [e.event for e in _for_port(events, port)].count("disconnected") == 1
    password = logins[port_of[by_password]]
    key = logins[port_of[by_key]]
    cert = logins[port_of[by_cert]]
    pam = logins[port_of[by_pam]]
    assert (password.method, password.fingerprint) == ("password", None)
    assert (key.method, key.key_type, key.fingerprint) == (
        "publickey",
        "ED25519",
        ssh_user.fingerprint,
    )
    assert key.fingerprint == ssh_user.key().fingerprint  # paramiko agrees with ssh-keygen
    assert (cert.key_type, cert.fingerprint, cert.key_id, cert.cert_serial) == (
        "ED25519-CERT",
        ssh_user.cert_fingerprint,
        ssh_user.cert_id,
        ssh_user.cert_serial,
    )
    assert cert.ca_fingerprint == ssh_user.ca_fingerprint
    assert pam.method == "keyboard-interactive/pam"
    assert watcher.failures.failed == 0


def test_failed_attempts_are_counted_not_reported(
    sshd: Sshd, ssh_user: SshUser, tmp_path: Path
) -> None:
    with _watching(sshd, tmp_path) as watcher:
        for username in (ssh_user.name, "no-such-user-dw"):
            with pytest.raises(paramiko.AuthenticationException):
                sshd.connect(username=username, password="wrong")
        events: list[Login] = []
        wait_until(
            lambda: (events.extend(watcher.poll()), watcher.failures.failed >= 2)[1],
            what="two failed attempts counted",
        )
        assert watcher.failures.invalid_user == 1
        assert not [e for e in events if e.event == "accepted"]


def test_a_pty_session_in_utmp_corroborates_the_log(
    sshd: Sshd, ssh_user: SshUser, tmp_path: Path
) -> None:
    with _watching(sshd, tmp_path, extra=[UtmpSource()], corroborate_s=30) as watcher:
        client = sshd.connect(password=ssh_user.password)
        client.invoke_shell()
        port = local_port(client)
        events: list[Login] = []
        wait_until(
            lambda: (events.extend(watcher.poll()), watcher.corroborated >= 1)[1],
            what="utmp session matched to its log line",
        )
        client.close()
        wait_until(
            lambda: (events.extend(watcher.poll()), watcher.corroborated >= 2)[1],
            what="utmp logout matched to its log line",
        )
    mine = _for_port(events, port)
    assert [e.event for e in mine if e.event in {"accepted", "session_open"}] == [
        "accepted",
        "session_open",
    ]
    assert not [e for e in events if e.source == "utmp"]


def test_a_utmp_session_without_a_log_line_is_reported_unlogged(
    sshd: Sshd, ssh_user: SshUser, tmp_path: Path
) -> None:
    with LoginWatcher(tmp_path, [UtmpSource()], corroborate_s=0) as watcher:
        watcher.poll()
        client = sshd.connect(pkey=ssh_user.key())
        client.invoke_shell()
        port = local_port(client)
        events: list[Login] = []
        _collect(watcher, events, lambda got: _for_port(got, port), "the utmp session")
        client.close()
        _collect(
            watcher,
            events,
            lambda got: len(_for_port(got, port)) == 2,
            "the utmp session to end",
        )
    opened, closed = _for_port(events, port)
    assert (opened.event, opened.source, opened.unlogged) == ("session_open", "utmp", True)
    assert (opened.user, opened.source_ip) == (ssh_user.name, "127.0.0.1")
    assert opened.tty is not None and opened.tty.startswith("pts/")
    assert (closed.event, closed.unlogged) == ("session_close", True)


def test_a_burst_of_logins_across_a_rotation_loses_none(ssh_user: SshUser, tmp_path: Path) -> None:
    """sshd -E keeps its log open; SIGHUP makes it re-exec and reopen the path, as a syslog
    daemon does after logrotate renames the file. Sessions opened before the rotation keep
    writing their ends into the renamed file."""
    total, rotate_after = 24, 8
    with start_sshd(tmp_path / "sshd", ssh_user) as server:
        watcher = LoginWatcher(
            tmp_path, [AuthLogSource(server.log_path, from_start=False, rotate_grace_s=60)]
        )
        watcher.poll()
        opened: list[int] = []
        failures: list[BaseException] = []

        def burst() -> None:
            for _ in range(total):
                # The listener is away while sshd re-execs: connecting is retried until it
                # listens again, within a deadline (a fixed count of retries ran out at once).
                deadline = time.monotonic() + 30
                while True:
                    try:
                        client = server.connect(password=ssh_user.password)
                        break
                    except (paramiko.SSHException, OSError) as error:
                        if time.monotonic() > deadline:
                            failures.append(error)
                            return
                        time.sleep(0.05)  # a refused connect returns at once: pace the retries
                opened.append(local_port(client))

        thread = threading.Thread(target=burst)
        thread.start()
        try:
            events: list[Login] = []
            _collect(watcher, events, lambda got: len(_ports(got)) >= rotate_after, "first logins")
            os.rename(server.log_path, tmp_path / "sshd" / "sshd.log.1")
            server.process.send_signal(signal.SIGHUP)
            thread.join(timeout=120)
            assert not failures and len(opened) == total
            for client in server.clients:
                client.close()
            _collect(
                watcher,
                events,
                lambda got: (
                    {e.source_port for e in got if e.event == "disconnected"} >= set(opened)
                ),
                "every login and its disconnect",
            )
        finally:
            thread.join(timeout=120)
            watcher.close()
    assert sorted(_ports(events)) == sorted(opened)
    disconnects = [e.source_port for e in events if e.event == "disconnected"]
    assert sorted(disconnects) == sorted(opened)
    # Both files contributed: logins after the rotation are in the new file, and sessions
    # opened before it wrote their ends into the renamed one after it was renamed.
    old_text = (tmp_path / "sshd" / "sshd.log.1").read_text()
    new_text = server.log_path.read_text()
    assert any(f"port {port} ssh2" in new_text for port in opened)
    assert any(f"Closing connection to 127.0.0.1 port {port}" in old_text for port in opened)


def test_real_journal_logins_resume_from_the_saved_cursor(
    ssh_user: SshUser, tmp_path: Path
) -> None:
    """A real journald (a journal namespace) receives the real sshd's syslog lines, PAM's
    included; journalctl follows it, and a restart continues after the saved cursor."""
    with (
        journald_namespace() as (namespace, dev_log),
        start_sshd(tmp_path / "sshd", ssh_user, syslog=dev_log) as server,
    ):

        def watcher() -> LoginWatcher:
            return LoginWatcher(tmp_path, [JournalSource(extra_args=[f"--namespace={namespace}"])])

        def opened(port: int) -> Any:
            return lambda got: [e for e in _for_port(got, port) if e.event == "session_open"]

        first: list[Login] = []
        with watcher() as before:
            by_key = server.connect(pkey=ssh_user.key())
            key_port = local_port(by_key)
            _collect(before, first, opened(key_port), "the key login in the journal")
            before.commit()
        by_password = server.connect(password=ssh_user.password)  # while nothing watches
        password_port = local_port(by_password)
        second: list[Login] = []
        with watcher() as after:
            _collect(after, second, opened(password_port), "the password login after restart")
    accepted = [e for e in first if e.event == "accepted"]
    assert [(e.source_port, e.method, e.source) for e in accepted] == [
        (key_port, "publickey", "journal")
    ]
    assert accepted[0].fingerprint == ssh_user.fingerprint
    assert accepted[0].pid is not None and accepted[0].pid != server.process.pid
    session = [e for e in first if e.event == "session_open"]
    assert len(session) == 1 and session[0].pid == accepted[0].pid
    assert "pam_unix(sshd:session): session opened" in session[0].raw
    assert [(e.event, e.source_port, e.method) for e in second if e.event == "accepted"] == [
        ("accepted", password_port, "password")
    ]
    assert not _for_port(second, key_port)
