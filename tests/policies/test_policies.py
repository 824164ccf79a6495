"""Every shipped policy loads, has sample cases, and decides each sample as it says."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import PolicyError
from agent.policy import check_samples, load_policy, parse_policy

POLICIES = sorted((Path(__file__).resolve().parents[2] / "policies").glob("*.toml"))


def test_policies_are_shipped() -> None:
    assert {p.name for p in POLICIES} >= {"minimal.toml", "debian-server.toml"}


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_policy_samples(path: Path) -> None:
    policy = load_policy(path)
    assert policy.samples, f"{path.name} has no [[sample]] cases"
    assert check_samples(policy) == []


def test_first_matching_rule_decides() -> None:
    policy = parse_policy(
        {
            "policy": {"name": "t"},
            "rule": [
                {"name": "keys", "kind": "critical", "paths": ["/var/lib/app/keys/**"]},
                {"name": "app", "kind": "mutable", "paths": ["/var/lib/app/**"]},
            ],
        },
        source="t.toml",
    )
    assert policy.decide("/var/lib/app/keys/k1").rule == "keys"
    assert policy.decide("/var/lib/app/data").rule == "app"
    assert policy.decide("/var/lib/app").kind == "immutable"
    assert "also matches, but comes later: 'app'" in policy.explain("/var/lib/app/keys/k1")


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/etc/*.conf", "/etc/a.conf", True),
        ("/etc/*.conf", "/etc/sub/a.conf", False),
        ("/etc/*", "/etc/.hidden", True),
        ("/home/**/.ssh", "/home/.ssh", True),
        ("/home/**/.ssh", "/home/a/b/.ssh", True),
        ("/var/log/**", "/var/log", False),
        ("/var/log/**", "/var/log/a\nb", True),
        ("/dev/tty[0-9]", "/dev/tty5", True),
        ("/dev/tty[!0-9]", "/dev/tty5", False),
        ("/etc/shado?", "/etc/shadow", True),
    ],
)
def test_glob_semantics(pattern: str, path: str, matches: bool) -> None:
    policy = parse_policy(
        {"policy": {"exclude": []}, "rule": [{"name": "r", "kind": "mutable", "paths": [pattern]}]},
        source="t.toml",
    )
    assert (policy.decide(path).rule == "r") is matches


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"policy": {"bogus": 1}}, "t.toml: [policy] unknown key(s) ['bogus']"),
        ({"policy": {"ssh_login": "ignore"}}, "ssh_login = 'ignore' is not one of"),
        ({"policy": {"roots": ["etc"]}}, "roots has 'etc': paths must be absolute"),
        ({"policy": {}, "rule": [{"name": "x", "kind": "bad", "paths": ["/a"]}]}, "kind = 'bad'"),
        (
            {"policy": {}, "rule": [{"name": "x", "kind": "mutable", "paths": ["/a**"]}]},
            "'**' must be a whole path segment",
        ),
        (
            {
                "policy": {},
                "rule": [
                    {"name": "x", "kind": "critical", "paths": ["/a"], "attributes": ["colour"]}
                ],
            },
            "attributes has unknown ['colour']",
        ),
        ({"policy": {"max_file_size_bytes": "big"}}, "max_file_size_bytes = 'big'"),
    ],
)
def test_bad_policy_errors_name_key_and_value(data: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=None) as info:
        parse_policy(data, source="/x/t.toml")
    assert message in str(info.value)


def test_policy_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("[policy\n")
    with pytest.raises(PolicyError, match=r"broken\.toml: not valid TOML"):
        load_policy(bad)


def test_verdicts() -> None:
    policy = parse_policy(
        {
            "policy": {},
            "rule": [
                {"name": "id", "kind": "first_boot", "paths": ["/etc/machine-id"]},
                {"name": "logs", "kind": "growth_only", "paths": ["/var/log/**"]},
            ],
        },
        source="t.toml",
    )
    first = policy.decide("/etc/machine-id")
    assert not policy.verdict(first, "modified", ["content"], first_boot=True).drift
    assert policy.verdict(first, "modified", ["content"], first_boot=False).drift
    log = policy.decide("/var/log/syslog")
    assert not policy.verdict(log, "modified", ["size", "content"], grew_only=True).drift
    assert policy.verdict(log, "modified", ["size", "content"], grew_only=False).drift
    assert policy.verdict(log, "modified", ["mode"], grew_only=True).drift
    plain = policy.decide("/usr/bin/ls")
    verdict = policy.verdict(plain, "modified", ["content"])
    assert verdict.drift and verdict.severity == "warning"


def test_every_policy_key_is_documented(repo: Path) -> None:
    from agent import policy as engine

    doc = (repo / "docs" / "policy.md").read_text()
    keys = engine._POLICY_KEYS | engine._RULE_KEYS | engine._SAMPLE_KEYS
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"docs/policy.md does not document {missing}"
    assert all(f"`{kind}`" in doc for kind in engine.KINDS)
    assert all(f"`{attr}`" in doc for attr in engine.ATTRIBUTES)


def test_explain_command(agent_cmd: list[str], subprocess_env: dict[str, str], repo: Path) -> None:
    import subprocess

    proc = subprocess.run(
        [
            *agent_cmd,
            "explain",
            "--policy",
            str(repo / "policies" / "debian-server.toml"),
            "/etc/sudoers.d/x",
            "/var/log/syslog",
        ],
        env=subprocess_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "/etc/sudoers.d/x: critical (critical)" in proc.stdout
    assert "rule 'credentials and access' (critical) matches '/etc/sudoers.d/**'" in proc.stdout
    assert "/var/log/syslog: mutable (info)" in proc.stdout


def test_bad_policy_exits_78(
    agent_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    import subprocess

    bad = tmp_path / "p.toml"
    bad.write_text('[policy]\nssh_login = "maybe"\n')
    proc = subprocess.run(
        [*agent_cmd, "explain", "--policy", str(bad), "/x"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 78
    assert "error: p.toml: [policy] ssh_login = 'maybe' is not one of" in proc.stderr


def test_excluding_adds_literal_paths_and_keeps_the_digest() -> None:
    policy = parse_policy({"policy": {"name": "t", "exclude": ["/proc"]}}, source="t.toml")
    own = policy.excluding(["/var/lib/driftwarden", "/opt/image.manifest.gz", "/proc/self"])
    assert own.digest == policy.digest
    assert own.excluded("/var/lib/driftwarden/spool/queue/1.json")
    assert own.excluded("/opt/image.manifest.gz") and not own.excluded("/opt/image.manifest")
    assert own.decide("/var/lib/driftwarden").rule == "exclude"
    assert not own.excluded("/var/lib/driftwarden2") and not policy.excluded("/var/lib/driftwarden")
    assert policy.excluding(["/proc/1"]) is policy
    with pytest.raises(PolicyError, match="free of"):
        policy.excluding(["/var/lib/dw[1]"])
