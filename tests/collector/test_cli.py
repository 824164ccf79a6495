"""The ``driftwarden`` command, run as a process against a real collector process."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.collector.apptest import statement
from tests.collector.hosts import SimHost, file_drift
from tests.collector.servers import CONFIG, REPO, Server

pytestmark = pytest.mark.slow


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    done = run(*args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A collector on SQLite with one clean and one drifted host, and an admin token."""
    tmp = tmp_path_factory.mktemp("cli")
    db = f"sqlite:///{tmp / 'collector.db'}"
    key = Ed25519PrivateKey.generate()
    pub = tmp / "pipeline.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    admin = json.loads(ok("token", "create", "--role", "admin", "--db", db, "--json"))["token"]
    enroll = ok("enroll-token", "create", "--db", db, "--uses", "5").splitlines()[-1]
    config = CONFIG.replace("[images]\n", f'[images]\npipeline_public_keys = ["{pub}"]\n')
    with Server(db, tmp, config=config) as server:
        for name, drift in (("cli-1", False), ("cli-2", True)):
            sim = SimHost(name)
            assert requests.post(server.url + "/v1/enroll", json=sim.enrollment(enroll)).ok
            envs = [sim.agent_start(), sim.boot()]
            if drift:
                envs.append(sim.finding(file_drift("/etc/hosts")))
            assert requests.post(server.url + "/v1/reports", json=sim.batch(*envs)).ok
        env = {"DRIFTWARDEN_URL": server.url, "DRIFTWARDEN_TOKEN": admin}
        yield {"env": env, "db": db, "tmp": tmp, "key": key, "pub": pub, "server": server}


def test_hosts_table_and_json(world: dict[str, Any]) -> None:
    table = ok("hosts", env=world["env"]).splitlines()
    assert table[0].split() == ["HOST_ID", "STATE", "STATE_CAUSE", "POOL", "IMAGE", "LAST_SEEN_AT"]
    assert [line.split()[:2] for line in table[1:]] == [["cli-1", "clean"], ["cli-2", "drifted"]]
    data = json.loads(ok("hosts", "--state", "drifted", "--json", env=world["env"]))
    assert [h["host_id"] for h in data["hosts"]] == ["cli-2"]


def test_host_events_and_fleet(world: dict[str, Any]) -> None:
    host = ok("host", "cli-2", env=world["env"])
    assert "drifted" in host and "/etc/hosts" in host and "transitions:" in host
    events = ok("events", "cli-2", "--limit", "2", env=world["env"]).splitlines()
    assert len(events) == 3 and events[0].split() == ["AT", "TYPE", "SEQ", "WHAT"]
    fleet = ok("fleet", env=world["env"])
    assert "hosts: 2" in fleet and "drifted" in fleet
    assert json.loads(ok("fleet", "--json", env=world["env"]))["states"]["clean"] == 1
    assert json.loads(ok("host", "cli-1", "--json", env=world["env"]))["state"] == "clean"
    assert json.loads(ok("events", "cli-1", "--json", env=world["env"]))["host_id"] == "cli-1"


def test_images_register_reads_only_the_statement(world: dict[str, Any]) -> None:
    manifest = world["tmp"] / "image.dwm"
    with gzip.open(manifest, "wt") as fh:
        fh.write(json.dumps(statement(world["key"], "img-9", "ef" * 32)) + "\n")
        fh.write('{"path": "/etc/hosts"}\n' * 3)
    out = ok("images", "register", str(manifest), "--pubkey", str(world["pub"]), env=world["env"])
    assert out.strip() == f"registered image img-9 root {'ef' * 32}"
    assert "img-9" in ok("images", env=world["env"])
    assert json.loads(ok("images", "--json", env=world["env"]))["images"][0]["build_id"] == "img-9"
    forged = world["tmp"] / "forged.dwm"
    with gzip.open(forged, "wt") as fh:
        other = Ed25519PrivateKey.generate()
        fh.write(json.dumps(statement(other, "img-10", "ef" * 32)) + "\n")
    refused = run("images", "register", str(forged), env=world["env"])
    assert refused.returncode == 2 and "bad_signature" in refused.stderr
    local = run("images", "register", str(forged), "--pubkey", str(world["pub"]), env=world["env"])
    assert local.returncode == 2 and "does not verify" in local.stderr
    # the API's options may come before the subcommand too (nothing in the environment)
    url, token = world["env"]["DRIFTWARDEN_URL"], world["env"]["DRIFTWARDEN_TOKEN"]
    again = ok("images", "--url", url, "--token", token, "--json", "register", str(manifest))
    assert json.loads(again)["build_id"] == "img-9"
    garbage = world["tmp"] / "garbage.dwm"
    garbage.write_bytes(b"not gzip")
    assert "cannot read manifest statement" in run("images", "register", str(garbage)).stderr


def test_actions_and_errors(world: dict[str, Any]) -> None:
    env = world["env"]
    assert ok("acknowledge", "cli-2", "--reason", "on it", env=env).strip() == "cli-2: drifted"
    assert ok("cohort", "img-1", "--json", env=env).startswith("{")
    no_token = run("hosts", env={**env, "DRIFTWARDEN_TOKEN": ""})
    assert no_token.returncode == 2
    assert (
        "refused (401 unauthorized)" in no_token.stderr and "DRIFTWARDEN_TOKEN" in no_token.stderr
    )
    unknown = run("host", "nope", env=env)
    assert unknown.returncode == 2 and "unknown_host" in unknown.stderr
    nowhere = run("hosts", "--url", "http://127.0.0.1:9", env=env)
    assert nowhere.returncode == 2 and "cannot reach the collector" in nowhere.stderr


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[server]\nlisten = "127.0.0.1:9999"\n')
    assert "ok: good.toml" in ok("check-config", "--config", str(good))
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nlisten = 80\n")
    done = run("check-config", "--config", str(bad))
    assert done.returncode == 78 and "bad.toml: [server] listen = 80 is not a string" in done.stderr
    scheme = run("check-config", "--db", "mysql://x/y")
    assert scheme.returncode == 78 and "unknown scheme 'mysql'" in scheme.stderr
    serve = run("serve", "--db", "mysql://x/y")
    assert serve.returncode == 78 and "valid: sqlite:///PATH" in serve.stderr


def test_bootstrap_tokens_are_shown_once(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'c.db'}"
    out = ok("token", "create", "--role", "viewer", "--name", "ci", "--db", db).splitlines()
    assert out[0] == "created viewer token 1; it is shown only once:"
    assert out[1].startswith("dwt_")
    made = json.loads(ok("enroll-token", "create", "--db", db, "--expires-in", "60", "--json"))
    assert made["token"].startswith("dwe_") and made["expires_at"]


def test_host_controlled_text_cannot_drive_the_terminal(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'collector.db'}"
    admin = json.loads(ok("token", "create", "--role", "admin", "--db", db, "--json"))["token"]
    enroll = ok("enroll-token", "create", "--db", db).splitlines()[-1]
    hostile = "\x1b[1A\x1b[2Kclean\x1b]52;c;cm0gLXJmIH4=\x07\r\n"
    with Server(db, tmp_path) as server:
        sim = SimHost("evil-1", pool=hostile)
        assert requests.post(server.url + "/v1/enroll", json=sim.enrollment(enroll)).ok
        env = {"DRIFTWARDEN_URL": server.url, "DRIFTWARDEN_TOKEN": admin}
        for args in (("hosts",), ("host", "evil-1")):
            out = ok(*args, env=env)
            assert not any(c in out for c in "\x1b\x07\r"), out
            assert "\\x1b[1A\\x1b[2Kclean\\x1b]52;c;cm0gLXJmIH4=\\x07\\r\\n" in out
