"""The daemon as a real process: one cycle, kill -9 and restart, clean stops, bad config, and
the identity it reports under."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent import fanotify, identity, keys, wire
from agent.errors import EXIT_CONFIG, ConfigError
from tests.agent.receiver import Receiver

TOKEN = "tok-1"
MACHINE_ID = "0123456789abcdef0123456789abcdef"


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "machine-id").write_text(MACHINE_ID + "\n")
    return root


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(tokens=(TOKEN,)) as rx:
        yield rx


class Runner:
    """Starts ``python -m agent run`` processes and never leaves one behind."""

    def __init__(self, cmd: list[str], env: dict[str, str], tmp: Path) -> None:
        self.cmd = cmd
        self.env = env
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def config(self, root: Path, url: str = "", *, state: Path | None = None, **agent: Any) -> Path:
        lines = [
            "[agent]",
            f'root = "{root}"',
            f'state_dir = "{state or self.tmp / "state"}"',
            *(f"{k} = {json.dumps(v)}" for k, v in agent.items()),
            "[collector]",
            f'url = "{url}"',
            f'enroll_token = "{TOKEN}"' if url else "",
            "backoff_initial_s = 0.02",
            "backoff_max_s = 0.1",
            "stop_timeout_s = 10",
        ]
        path = self.tmp / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"agent-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [*self.cmd, "--log-level", "info", "--log-json", "run", *args],
            env={**self.env, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, index: int) -> str:
        return (self.tmp / f"agent-{index}.log").read_text()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def runner(
    agent_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path
) -> Iterator[Runner]:
    r = Runner(agent_cmd, subprocess_env, tmp_path)
    yield r
    r.close()


def _spooled(state: Path) -> list[dict[str, Any]]:
    """Every report in the spool (queued or sealed) as (kind, time, body) records."""
    out = []
    for path in sorted((state / "spool" / "queue").glob("[0-9]*.json")):
        record = json.loads(path.read_text())
        out.append({k: record[k] for k in ("kind", "time", "body")})
    for path in sorted((state / "spool" / "sealed").glob("[0-9]*.json")):
        env = json.loads(path.read_text())["envelope"]
        out.append({k: env[k] for k in ("kind", "time", "body")})
    return out


def _key(env: wire.Envelope) -> str:
    return json.dumps([env.kind, env.time, env.body], sort_keys=True)


# --- one cycle -------------------------------------------------------------------------------


def test_once_without_a_collector_keeps_everything_in_the_spool(
    runner: Runner, root: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    proc = runner.start("--once", "--root", str(root), "--state-dir", str(state))
    assert proc.wait(60) == 0, runner.log(0)
    kinds = [r["kind"] for r in _spooled(state)]
    assert kinds == ["agent_start", "finding", "heartbeat", "agent_stop"]
    start = _spooled(state)[0]["body"]
    assert start["previous_stop"] == "first"
    assert start["watch_backend"] == "none"
    assert (state / "host-key.pem").stat().st_mode & 0o777 == 0o600
    assert json.loads((state / "lifecycle.json").read_text())["state"] == "stopped"


def test_once_delivers_and_the_next_start_continues_the_chain(
    runner: Runner, root: Path, receiver: Receiver
) -> None:
    config = runner.config(root, receiver.url)
    assert runner.start("--config", str(config), "--once").wait(60) == 0, runner.log(0)
    assert runner.start("--config", str(config), "--once").wait(60) == 0, runner.log(1)
    envs = receiver.envelopes(MACHINE_ID)
    assert [e.kind for e in envs] == ["agent_start", "finding", "heartbeat", "agent_stop"] * 2
    assert [e.body["previous_stop"] for e in envs if e.kind == "agent_start"] == ["first", "clean"]
    assert [e.seq for e in envs] == list(range(1, 9))
    assert len(receiver.enrollments) == 1  # the second start is already enrolled
    key = keys.load_public(runner.tmp / "state" / "host-key.pem.pub")
    wire.verify_chain([e.to_json() for e in envs], key)
    facts = receiver.enrollments[0]["facts"]
    assert facts["boot_id"] == envs[0].boot_id and facts["image"]["build_id"] == ""
    health = envs[2].body["health"]
    assert {"watch_backend", "overflows", "spool_depth", "rejected", "last_rescan"} <= set(health)
    assert health["spool_state"] == "ok"


# --- kill -9 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("collector_up", [False, True], ids=["collector-down", "collector-up"])
def test_kill_9_loses_and_duplicates_nothing(
    runner: Runner, root: Path, receiver: Receiver, collector_up: bool
) -> None:
    state = runner.tmp / "state"
    config = runner.config(root, receiver.url, heartbeat_interval_s=0.005, poll_interval_s=0.005)
    first = runner.start("--config", str(config))
    receiver.wait_for(lambda rx: len(rx.envelopes()) >= 10)
    if collector_up:  # killed in the middle of delivering
        receiver.wait_for(lambda rx: len(rx.envelopes()) >= 60)
    else:  # the collector goes away: reports pile up in the spool
        receiver.stop()
        wait_until(lambda: len(list((state / "spool" / "queue").glob("[0-9]*.json"))) >= 20)
    first.send_signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    left = _spooled(state)
    assert left or collector_up

    if not collector_up:
        receiver.start()
    second = runner.start("--config", str(config))
    receiver.wait_for(lambda rx: any(e.kind == "agent_start" and e.seq > 1 for e in rx.envelopes()))
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0, runner.log(1)

    envs = receiver.envelopes(MACHINE_ID)
    assert [e.seq for e in envs] == list(range(1, len(envs) + 1))  # no gap, no replay
    assert receiver.hosts[MACHINE_ID].gaps == []
    received = [_key(e) for e in envs]
    assert len(set(received)) == len(received)  # nothing sealed twice
    for record in left:  # everything the killed agent had spooled arrived
        assert json.dumps([record["kind"], record["time"], record["body"]], sort_keys=True) in set(
            received
        )
    starts = [e.body["previous_stop"] for e in envs if e.kind == "agent_start"]
    assert starts == ["first", "unclean"]
    assert envs[-1].kind == "agent_stop" and envs[-1].body == {"reason": "signal"}
    assert _spooled(state) == []

    third = runner.start("--config", str(config), "--once")
    assert third.wait(60) == 0, runner.log(2)
    starts = [e.body["previous_stop"] for e in receiver.envelopes() if e.kind == "agent_start"]
    assert starts == ["first", "unclean", "clean"]


# --- configuration and secrets ---------------------------------------------------------------


def test_bad_config_exits_78_naming_file_key_and_value(runner: Runner, tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text('[collector]\nread_timeout_s = "ten"\n')
    proc = runner.start("--config", str(bad))
    assert proc.wait(30) == EXIT_CONFIG
    assert "agent.toml: [collector] read_timeout_s = 'ten' is not a number" in runner.log(0)


def _new_token(receiver: Receiver) -> str:
    """A fresh enrollment token the receiver accepts."""
    secret = "s3cret-" + os.urandom(4).hex()
    receiver.tokens.add(secret)
    return secret


def test_token_never_reaches_the_log(
    runner: Runner, root: Path, receiver: Receiver, tmp_path: Path
) -> None:
    secret = _new_token(receiver)
    proc = runner.start(
        "--once", "--root", str(root), "--state-dir", str(tmp_path / "state"),
        "--collector", receiver.url, "--enroll-token", secret,
    )  # fmt: skip
    assert proc.wait(60) == 0, runner.log(0)
    assert receiver.enrollments
    log = runner.log(0)
    assert "enrolled" in log and secret not in log
    (deprecated,) = [
        e for e in _log_events(log) if e["event"] == "enroll_token_argument_deprecated"
    ]
    assert "--enroll-token-file" in deprecated["advice"]


def test_the_token_file_is_read_only_to_enroll_and_not_needed_again(
    runner: Runner, root: Path, receiver: Receiver, tmp_path: Path
) -> None:
    secret = _new_token(receiver)
    token_file = tmp_path / "enroll.token"
    token_file.write_text(secret + "\n")
    args = [
        "--once", "--root", str(root), "--state-dir", str(tmp_path / "state"),
        "--collector", receiver.url, "--enroll-token-file", str(token_file),
    ]  # fmt: skip
    assert runner.start(*args).wait(60) == 0, runner.log(0)
    assert len(receiver.enrollments) == 1
    spent = [e for e in _log_events(runner.log(0)) if e["event"] == "enroll_token_file_spent"]
    assert [e["path"] for e in spent] == [str(token_file)]
    token_file.unlink()  # as the log advises
    # The next start does not need it: it is enrolled.
    assert runner.start(*args).wait(60) == 0, runner.log(1)
    assert len(receiver.enrollments) == 1
    assert not [e for e in _log_events(runner.log(1)) if e["level"] == "error"]
    # Not enrolled (another state directory), the missing file is a configuration error.
    args[args.index("--state-dir") + 1] = str(tmp_path / "other-state")
    assert runner.start(*args).wait(60) == EXIT_CONFIG
    assert "enroll_token_file cannot be read" in runner.log(2)


def test_a_token_from_the_environment_is_not_in_the_command_line(
    runner: Runner, root: Path, receiver: Receiver, tmp_path: Path
) -> None:
    secret = _new_token(receiver)
    proc = runner.start(
        "--root", str(root), "--state-dir", str(tmp_path / "state"), "--collector", receiver.url,
        extra_env={"DRIFTWARDEN_ENROLL_TOKEN": secret},
    )  # fmt: skip
    receiver.wait_for(lambda rx: "agent_start" in rx.kinds())
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, runner.log(0)
    assert receiver.enrollments and secret.encode() not in cmdline
    assert secret not in runner.log(0)


# --- identity --------------------------------------------------------------------------------


def test_host_id_prefers_cloud_init_then_machine_id(root: Path) -> None:
    assert identity.read_identity(root).host_id == MACHINE_ID
    data = root / "run" / "cloud-init" / "instance-data.json"
    data.parent.mkdir(parents=True)
    data.write_text(
        json.dumps({"v1": {"instance_id": "i-0abc"}, "ds": {"meta_data": {"ami-id": "ami-1"}}})
    )
    ident = identity.read_identity(root)
    assert (ident.host_id, ident.host_id_source, ident.cloud_image_id) == (
        "i-0abc",
        "cloud-init",
        "ami-1",
    )


def test_no_usable_host_id_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no host id"):
        identity.read_identity(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "machine-id").write_text("not an id!\n")
    with pytest.raises(ConfigError, match="not a valid id"):
        identity.read_identity(tmp_path)


def test_host_key_is_private_reused_and_never_shared(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = identity.host_key(state, "host-a")
    assert (state / "host-key.pem").stat().st_mode & 0o777 == 0o600
    again = identity.host_key(state, "host-a")
    assert keys.public_raw(again.public_key()) == keys.public_raw(key.public_key())
    with capture_logs() as logs:
        other = identity.host_key(state, "host-b")  # the state dir came with an image
    assert keys.public_raw(other.public_key()) != keys.public_raw(key.public_key())
    assert [e["event"] for e in logs] == ["host_key_replaced", "host_key_created"]


def test_first_boot_only_on_the_first_boot_of_this_host(tmp_path: Path, root: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    ident = identity.read_identity(root, boot_id_path=boot)
    assert identity.first_boot(state, ident)
    identity.mark_first_boot(state, ident)
    assert identity.first_boot(state, ident)  # an agent restart within the first boot
    boot.write_text("boot-2\n")
    rebooted = identity.read_identity(root, boot_id_path=boot)
    assert not identity.first_boot(state, rebooted)
    identity.mark_first_boot(state, rebooted)
    assert not identity.first_boot(state, rebooted)
    (root / "etc" / "machine-id").write_text("f" * 32 + "\n")  # a clone of this disk
    assert identity.first_boot(state, identity.read_identity(root, boot_id_path=boot))


# --- the boot check with a real baked manifest ------------------------------------------------


def _bake(
    root: Path,
    manifest: Path,
    tmp_path: Path,
    agent_cmd: list[str],
    env: dict[str, str],
    repo: Path,
) -> dict[str, Path]:
    """``root`` baked into a manifest signed by a new pipeline key, with the minimal policy."""
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "ssh").mkdir()
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "var" / "lib").mkdir(parents=True)
    (root / "var" / "log").mkdir(parents=True)
    (root / "var" / "log" / "app.log").write_text("started\n")
    (root / "usr" / "bin" / "tool").write_bytes(b"\x7fELF tool")
    key = tmp_path / "pipeline.key"
    for args in (
        ["keygen", "--out", str(key)],
        ["bake", "--root", str(root), "--policy", str(repo / "policies" / "minimal.toml"),
         "--out", str(manifest), "--key", str(key), "--build-id", "build-7"],
    ):  # fmt: skip
        subprocess.run([*agent_cmd, *args], env=env, check=True, capture_output=True)
    return {"manifest": manifest, "pub": Path(str(key) + ".pub"), "key": key}


@pytest.fixture
def baked(
    root: Path, tmp_path: Path, agent_cmd: list[str], subprocess_env: dict[str, str], repo: Path
) -> dict[str, Path]:
    """An image root baked into a signed manifest (outside the root)."""
    manifest = tmp_path / "image.manifest.gz"
    return _bake(root, manifest, tmp_path, agent_cmd, subprocess_env, repo)


def _once(root: Path, state: Path, baked: dict[str, Path], boot_id: Path, **agent: Any) -> int:
    from agent.config import load_config
    from agent.daemon import Daemon

    text = (
        f'[agent]\nroot = "{root}"\nstate_dir = "{state}"\nbaseline = "{baked["manifest"]}"\n'
        + "".join(f"{k} = {json.dumps(str(v))}\n" for k, v in agent.items())
    )
    path = boot_id.parent / "boot.toml"
    path.write_text(text)
    return Daemon(load_config(path), once=True, boot_id_path=boot_id).run()


def _boot_reports(state: Path) -> list[dict[str, Any]]:
    return [r["body"] for r in _spooled(state) if r["kind"] == "boot"]


def test_boot_check_clean_then_first_boot_allowance_only_on_the_first_boot(
    root: Path, tmp_path: Path, baked: dict[str, Path]
) -> None:
    state = root / "var" / "lib" / "driftwarden"  # inside the root: not measured
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    pub = {"pipeline_public_key": baked["pub"]}
    assert _once(root, state, baked, boot, **pub) == 0, _boot_reports(state)
    (root / "etc" / "ssh" / "ssh_host_ed25519_key").write_text("made at first boot\n")
    assert _once(root, state, baked, boot, **pub) == 0  # still the first boot
    first, again = _boot_reports(state)
    # only /var/lib's mtime changed (the state directory was made in it): an attribute no
    # rule cares about, so not even a finding
    assert first["clean"] and first["first_boot"]
    assert first["findings"] == []
    assert first["baseline"]["build_id"] == "build-7" and first["baseline"]["signed"]
    key = [f for f in again["findings"] if f["path"] == "/etc/ssh/ssh_host_ed25519_key"]
    assert again["clean"] and [(f["change"], f["drift"]) for f in key] == [("added", False)]

    boot.write_text("boot-2\n")  # a reboot: the same change is now drift
    assert _once(root, state, baked, boot, **pub) == 1
    later = _boot_reports(state)[-1]
    assert not later["first_boot"] and not later["clean"]
    assert [f["path"] for f in later["findings"] if f["drift"]] == ["/etc/ssh/ssh_host_ed25519_key"]


def test_boot_check_reports_drift_of_an_immutable_file(
    root: Path, tmp_path: Path, baked: dict[str, Path]
) -> None:
    (root / "usr" / "bin" / "tool").write_bytes(b"\x7fELF trojan")
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    assert _once(root, tmp_path / "state", baked, boot) == 1
    (report,) = _boot_reports(tmp_path / "state")
    assert not report["baseline"]["signed"]  # no pipeline key configured
    (finding,) = report["findings"]
    assert (
        finding["path"] == "/usr/bin/tool" and finding["drift"] and "content" in finding["fields"]
    )


def test_untrusted_manifest_is_reported_not_a_crash(
    root: Path, tmp_path: Path, baked: dict[str, Path]
) -> None:
    other = tmp_path / "other.key"
    keys.generate(other)
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    state = tmp_path / "state"
    with capture_logs() as logs:
        code = _once(root, state, baked, boot, pipeline_public_key=Path(str(other) + ".pub"))
    assert code == 3
    assert any(e["event"] == "baseline_untrusted" for e in logs)
    assert _boot_reports(state) == []
    findings = [r["body"]["findings"][0] for r in _spooled(state) if r["kind"] == "finding"]
    assert [(f["reason"], f["severity"]) for f in findings] == [("baseline_untrusted", "critical")]
    assert [r["kind"] for r in _spooled(state)][-1] == "agent_stop"


# --- package database re-reads ---------------------------------------------------------------


def _dpkg_status(root: Path, *packages: tuple[str, str]) -> None:
    status = root / "var" / "lib" / "dpkg" / "status"
    status.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(
        f"Package: {name}\nStatus: install ok installed\nArchitecture: amd64\nVersion: {ver}\n\n"
        for name, ver in packages
    )
    tmp = status.with_name("status-new")
    tmp.write_text(text)
    tmp.rename(status)  # as dpkg does


def test_a_package_change_while_running_is_reported(
    runner: Runner, root: Path, receiver: Receiver
) -> None:
    _dpkg_status(root, ("libc6", "2.36-9"), ("openssl", "3.0.11-1"))
    config = runner.config(root, receiver.url, poll_interval_s=0.02)
    with config.open("a") as fh:
        fh.write("[packages]\nsettle_s = 0.05\n")
    proc = runner.start("--config", str(config))
    receiver.wait_for(lambda rx: "agent_start" in rx.kinds())
    _dpkg_status(root, ("libc6", "2.36-9"), ("openssl", "3.0.13-1"), ("netcat", "1.10-47"))
    receiver.wait_for(lambda rx: "finding" in [e.kind for e in rx.envelopes() if e.seq > 2])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, runner.log(0)
    (found,) = [
        e.body
        for e in receiver.envelopes()
        if e.kind == "finding" and e.body["source"] == "packages"
    ]
    changes = {(f["change"], f["name"], f["before"], f["after"]) for f in found["findings"]}
    assert changes == {
        ("installed", "netcat", None, "1.10-47"),
        ("changed", "openssl", "3.0.11-1", "3.0.13-1"),
    }
    assert all(f["drift"] and f["type"] == "package" for f in found["findings"])


# --- SSH logins ------------------------------------------------------------------------------


def test_an_ssh_login_is_reported_with_the_policy_verdict(
    runner: Runner, root: Path, receiver: Receiver, tmp_path: Path
) -> None:
    auth_log = tmp_path / "auth.log"
    auth_log.write_text("")
    config = runner.config(root, receiver.url, poll_interval_s=0.02)
    with config.open("a") as fh:
        fh.write(f'[logins]\nauth_logs = ["{auth_log}"]\njournal = false\nutmp = false\n')
    proc = runner.start("--config", str(config))
    receiver.wait_for(lambda rx: "agent_start" in rx.kinds())
    with auth_log.open("a") as fh:
        fh.write(
            "2026-11-26T10:00:00.123456+00:00 web sshd[4242]: Accepted publickey for ops from "
            "192.0.2.1 port 5000 ssh2: ED25519 SHA256:abc\n"
        )
    receiver.wait_for(
        lambda rx: any(e.kind == "finding" and e.body["source"] == "ssh" for e in rx.envelopes())
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, runner.log(0)
    (found,) = [
        e.body for e in receiver.envelopes() if e.kind == "finding" and e.body["source"] == "ssh"
    ]
    (login,) = found["findings"]
    assert (login["type"], login["event"], login["user"], login["source_port"]) == (
        "login",
        "accepted",
        "ops",
        5000,
    )
    assert (login["fingerprint"], login["verdict"], login["severity"]) == (
        "SHA256:abc",
        "taint",  # no baseline: the default policy verdict
        "critical",
    )
    saved = json.loads((runner.tmp / "state" / "logins.json").read_text())
    assert saved  # the position is kept, so a restart does not report it again


def test_a_failing_login_source_is_reported_once_and_the_agent_goes_on(
    runner: Runner, root: Path, receiver: Receiver, tmp_path: Path
) -> None:
    auth_log = tmp_path / "auth.log"
    auth_log.mkdir()  # what should be sshd's log cannot be read
    config = runner.config(root, receiver.url, poll_interval_s=0.02, heartbeat_interval_s=0.2)
    with config.open("a") as fh:
        fh.write(f'[logins]\nauth_logs = ["{auth_log}"]\njournal = false\nutmp = false\n')
    proc = runner.start("--config", str(config))
    receiver.wait_for(lambda rx: len([e for e in rx.envelopes() if e.kind == "heartbeat"]) >= 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, runner.log(0)

    failed = [f for f in _findings(receiver, "integrity") if f["reason"] == "login_source_failed"]
    assert len(failed) == 1, failed  # once, though the source failed at every poll
    assert f"the authlog:{auth_log} login source failed" in failed[0]["detail"]
    assert "integrity unknown" in failed[0]["detail"]
    assert receiver.envelopes()[-1].kind == "agent_stop"


# --- the realtime guard ----------------------------------------------------------------------


@pytest.fixture
def guarded(
    root: Path, tmp_path: Path, agent_cmd: list[str], subprocess_env: dict[str, str], repo: Path
) -> dict[str, Path]:
    """An image root whose manifest and agent state lie inside it, where the policy would call
    them immutable (the agent must exclude its own files)."""
    (root / "opt" / "driftwarden").mkdir(parents=True)
    manifest = root / "opt" / "driftwarden" / "image.manifest.gz"
    baked = _bake(root, manifest, tmp_path, agent_cmd, subprocess_env, repo)
    return {**baked, "state": root / "opt" / "agent-state"}


def _findings(rx: Receiver, source: str) -> list[dict[str, Any]]:
    return [
        f
        for e in rx.envelopes()
        if e.kind == "finding" and e.body["source"] == source
        for f in e.body["findings"]
    ]


def _log_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("backend", ["inotify", "fanotify"])
def test_a_change_while_running_arrives_as_a_signed_realtime_finding(
    runner: Runner, root: Path, receiver: Receiver, guarded: dict[str, Path], backend: str
) -> None:
    if backend == "fanotify":
        usable, why = fanotify.available()
        if not usable:
            pytest.skip(f"fanotify cannot run here: {why}")
    config = runner.config(
        root,
        receiver.url,
        state=guarded["state"],
        baseline=str(guarded["manifest"]),
        pipeline_public_key=str(guarded["pub"]),
        poll_interval_s=5,  # the loop must be woken by the finding, not find it by polling
    )
    with config.open("a") as fh:
        fh.write(f'[guard]\nbackend = "{backend}"\n[logins]\nwatch = false\n')
    proc = runner.start("--config", str(config))
    receiver.wait_for(
        lambda rx: any(
            e.kind == "heartbeat" and e.body["health"]["watch_backend"] == backend
            for e in rx.envelopes()
        )
    )
    with (root / "var" / "log" / "app.log").open("a") as fh:  # mutable: never reported
        fh.write("a line\n")
    writer = subprocess.Popen(["sh", "-c", f"echo 'mallory:x:0:0::/:/bin/sh' >> {root}/etc/passwd"])
    assert writer.wait(10) == 0
    try:
        receiver.wait_for(
            lambda rx: any(f["path"] == "/etc/passwd" for f in _findings(rx, "realtime"))
        )
    except AssertionError as exc:
        raise AssertionError(f"no realtime finding; agent log:\n{runner.log(0)}") from exc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, runner.log(0)

    (passwd,) = [f for f in _findings(receiver, "realtime") if f["path"] == "/etc/passwd"]
    assert (passwd["change"], passwd["drift"], passwd["rule"]) == ("modified", True, "default")
    assert "content" in passwd["fields"]
    if backend == "fanotify":
        assert passwd["process"]["pid"] == writer.pid
    envs = receiver.envelopes(MACHINE_ID)
    key = keys.load_public(guarded["state"] / "host-key.pem.pub")
    wire.verify_chain([e.to_json() for e in envs], key)  # signed, chained, no gap
    assert [e.kind for e in envs[:2]] == ["agent_start", "boot"]
    assert envs[0].body["watch_backend"] == backend  # the backend in use, named from the start
    assert envs[-1].kind == "agent_stop"
    reported = {f.get("path") for e in envs if e.kind == "finding" for f in e.body["findings"]}
    assert reported == {"/etc/passwd"}  # not the log, the state directory or the manifest
    events = _log_events(runner.log(0))
    (stopped,) = [e for e in events if e["event"] == "agent_stopped"]
    assert stopped["threads_left"] == []
    assert not [e for e in events if e["event"] == "worker_stop_timeout"]
