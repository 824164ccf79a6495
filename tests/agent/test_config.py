"""The agent's configuration: validation messages, flag overrides, secrets, documentation."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from agent.config import AgentConfig, Secret, config_keys, load_config
from agent.errors import EXIT_CONFIG, ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file(tmp_path: Path) -> None:
    config = load_config(None, {"root": tmp_path, "state_dir": tmp_path / "state"})
    assert config.agent.root == tmp_path
    assert config.agent.heartbeat_interval_s == 30.0
    assert config.collector.url == ""
    assert config.spool.max_envelopes == 100_000


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f'[agent]\nroot = "/"\nstate_dir = "{tmp_path}"\nheartbeat_interval_s = 5\n'
        '[collector]\nurl = "https://collector.example"\nenroll_token = "from-file"\n',
    )
    config = load_config(
        path, {"root": tmp_path, "collector": "http://127.0.0.1:9", "enroll_token": "from-flag"}
    )
    assert config.agent.root == tmp_path
    assert config.agent.heartbeat_interval_s == 5.0
    assert config.collector.url == "http://127.0.0.1:9"
    assert config.token().reveal() == "from-flag"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[collector]\nread_timeout_s = "ten"\n',
            "[collector] read_timeout_s = 'ten' is not a number",
        ),
        (
            "[agent]\nheartbeat_interval_s = 0\n",
            "[agent] heartbeat_interval_s = 0 is not a number > 0",
        ),
        ("[spool]\nmax_bytes = true\n", "[spool] max_bytes = True is not a whole number"),
        ('[agent]\nstate_dir = "var/lib"\n', "[agent] state_dir = 'var/lib' is not an absolute"),
        ("[agent]\nbogus = 1\n", "[agent] unknown key(s) ['bogus']; known:"),
        ('[agnet]\nroot = "/"\n', "unknown section(s) ['agnet']"),
        (
            '[agent]\nbaseline = "/nonexistent/m.gz"\n',
            "[agent] baseline = '/nonexistent/m.gz' is not",
        ),
        (
            '[collector]\nurl = "http://collector.example"\n',
            "plain http is allowed only to a loopback",
        ),
        ('[collector]\nurl = "ftp://x"\n', "is not an http(s) URL"),
        ("[collector]\nbatch_max_envelopes = 501\n", "above the protocol's 500"),
        (
            "[collector]\nbackoff_initial_s = 10\nbackoff_max_s = 1\n",
            "backoff_max_s = 1.0 is below",
        ),
        ("[agent\n", "not valid TOML"),
        (
            '[guard]\nbackend = "dtrace"\n',
            "[guard] backend = 'dtrace' is not one of ['auto', 'fanotify', 'inotify', 'none']",
        ),
        ("[guard]\ncoalesce_s = -1\n", "[guard] coalesce_s = -1 is not a number > 0"),
        ("[rescan]\nnice = 20\n", "[rescan] nice = 20 is above 19"),
        ("[rescan]\nio_budget_mb_s = 0\n", "[rescan] io_budget_mb_s = 0 is not a number > 0"),
        ("[packages]\npoll_interval_s = 10\n", "[packages] unknown key(s) ['poll_interval_s']"),
        ('[agent]\nstate_dir = "/var/lib/dw*"\n', "[agent] state_dir = '/var/lib/dw*' has one"),
    ],
)
def test_errors_name_file_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert message in str(info.value)
    assert "agent.toml" in str(info.value)
    assert info.value.exit_code == EXIT_CONFIG


def test_the_token_never_shows(tmp_path: Path) -> None:
    path = _write(tmp_path, '[collector]\nenroll_token = "hunter2-token"\n')
    config = load_config(path)
    assert config.token().reveal() == "hunter2-token"
    for text in (repr(config), str(config), repr(config.collector), f"{config.collector}"):
        assert "hunter2" not in text
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "[collector]\nenroll_token = 12345\n"))
    assert "12345" not in str(info.value) and "'***'" in str(info.value)
    assert repr(Secret("")) == "Secret('')"


@pytest.mark.parametrize(
    "url", ["ftp://agent:hunter2@collector.internal/", "http://agent:hunter2@10.0.0.5:8080"]
)
def test_a_password_in_the_collector_url_never_shows(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, f'[collector]\nurl = "{url}"\n'))
    assert "hunter2" not in str(info.value) and "agent:***@" in str(info.value)


def test_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-a-file\n")
    config = load_config(_write(tmp_path, f'[collector]\nenroll_token_file = "{token}"\n'))
    assert config.token().reveal() == "from-a-file"
    with pytest.raises(ConfigError, match="not both"):
        load_config(
            _write(tmp_path, f'[collector]\nenroll_token_file = "{token}"\nenroll_token = "x"\n')
        )


def test_every_key_is_documented() -> None:
    doc = (REPO / "docs" / "agent.md").read_text()
    sections = dict(re.findall(r"^### \[(\w+)\]\n(.*?)(?=^#|\Z)", doc, re.M | re.S))
    missing = [
        key
        for key in config_keys()
        if f"`{key.split('.')[1]}`" not in sections.get(key.split(".")[0], "")
    ]
    assert not missing, f"not in docs/agent.md: {missing}"


def test_packaged_example_uses_every_key_and_is_valid() -> None:
    example = REPO / "packaging" / "agent.toml.example"
    config = load_config(example, check_files=False)
    assert isinstance(config, AgentConfig)
    text = example.read_text()
    assert all(re.search(rf"^#? ?{key.split('.')[1]} =", text, re.M) for key in config_keys())


def test_check_config_command(
    tmp_path: Path, agent_cmd: list[str], subprocess_env: dict[str, str]
) -> None:
    baseline = tmp_path / "image.manifest.gz"
    baseline.write_bytes(b"")
    good = _write(tmp_path, f'[agent]\nbaseline = "{baseline}"\n')
    result = subprocess.run(
        [*agent_cmd, "check-config", "--config", str(good)],
        env=subprocess_env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[spool]\nmax_envelopes = -1\n")
    result = subprocess.run(
        [*agent_cmd, "check-config", "--config", str(bad)],
        env=subprocess_env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == EXIT_CONFIG
    assert "error: bad.toml: [spool] max_envelopes = -1 is not a whole number >= 1" in result.stderr
