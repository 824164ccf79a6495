"""Logins made before this boot (an image build's own SSH sessions, left in the image's auth
log) do not taint the host: a real auth log file read on the agent's first run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.logins.authlog import AuthLogSource, boot_time
from agent.logins.watcher import LoginWatcher

FINGERPRINT = "SHA256:Zm9yLXRoZS1pbWFnZS1idWlsZC1vbmx5LW5vdC1hLWh1bWFuLWxvZ2lu"


def accepted(user: str, port: int) -> str:
    return f"Accepted publickey for {user} from 192.0.2.10 port {port} ssh2: ED25519 {FINGERPRINT}"


def traditional(moment: datetime, message: str) -> str:
    """A classic syslog line: local time, no year."""
    stamp = moment.astimezone().strftime("%b %e %H:%M:%S")
    return f"{stamp} image sshd[{moment.second + 100}]: {message}"


def rfc3339(moment: datetime, message: str) -> str:
    return f"{moment.astimezone().isoformat()} image sshd[{moment.second + 200}]: {message}"


def write(path: Path, lines: list[str]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.writelines(line + "\n" for line in lines)


def users(source: AuthLogSource) -> list[tuple[str, int | None]]:
    return [(login.user, login.source_port) for login in source.poll() if login.event == "accepted"]


def test_boot_time_is_this_machine_s() -> None:
    booted = boot_time()
    assert booted is not None
    assert booted < datetime.now(UTC)
    assert boot_time(Path("/nonexistent/stat")) is None


def test_logins_dated_before_this_boot_are_read_but_not_reported(tmp_path: Path) -> None:
    booted = boot_time()
    assert booted is not None
    build = booted - timedelta(days=2)
    log = tmp_path / "auth.log"
    write(
        log,
        [
            traditional(build, accepted("packer", 40001)),
            traditional(build, "pam_unix(sshd:session): session opened for user packer(uid=0)"),
            rfc3339(build + timedelta(minutes=5), accepted("packer", 40002)),
            rfc3339(booted - timedelta(seconds=1), accepted("packer", 40003)),
            traditional(datetime.now(UTC), accepted("alice", 40004)),
            rfc3339(datetime.now(UTC), accepted("bob", 40005)),
            accepted("carol", 40006),  # as `sshd -E` writes it: no date, so it is now
        ],
    )
    source = AuthLogSource(log)
    assert users(source) == [("alice", 40004), ("bob", 40005), ("carol", 40006)]
    assert source.before_boot == 4  # three accepted logins and the session they opened

    # What is written from now on is reported, whatever date it carries.
    write(log, [rfc3339(build, accepted("dave", 40007))])
    assert users(source) == [("dave", 40007)]
    source.close()


def test_after_a_restart_lines_past_the_saved_position_are_all_reported(tmp_path: Path) -> None:
    """A saved position means those lines were not read yet: a login during an earlier boot
    that the agent missed is still evidence."""
    booted = boot_time()
    assert booted is not None
    log = tmp_path / "auth.log"
    write(log, [rfc3339(booted - timedelta(days=1), accepted("packer", 41001))])
    with LoginWatcher(tmp_path, [AuthLogSource(log)]) as watcher:
        assert watcher.poll() == []
        watcher.commit()
    write(log, [rfc3339(booted - timedelta(minutes=1), accepted("eve", 41002))])
    with LoginWatcher(tmp_path, [AuthLogSource(log)]) as watcher:
        found = [(login.user, login.source_port) for login in watcher.poll()]
    assert found == [("eve", 41002)]
