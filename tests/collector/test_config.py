"""Configuration: TOML into frozen dataclasses; every mistake names the file, key and value."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from collector import config
from collector.errors import EXIT_CONFIG, ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "collector.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_zero_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.chdir(tmp_path)
    defaults = config.Config()
    assert defaults.database.url == f"sqlite:///{tmp_path / 'driftwarden.db'}"
    assert defaults.server.max_body_bytes == 4 * 1024 * 1024
    assert defaults.verdicts.silent_after_s == 90.0
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/driftwarden-collector")
    url = "sqlite:////var/lib/driftwarden-collector/driftwarden.db"
    assert config.Config().database.url == url


def test_a_full_file(tmp_path: Path) -> None:
    key = tmp_path / "pipeline.pub"
    public = Ed25519PrivateKey.generate().public_key()
    key.write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    loaded = config.load(
        write(
            tmp_path,
            f"""
[server]
listen = "0.0.0.0:9000"
metrics_public = true

[database]
url = "postgresql+psycopg://dw:s3cret@db/dw"
pool_size = 20

[verdicts]
heartbeat_interval_s = 10
silent_after_intervals = 4
fleet_silent_percent = 25.5

[images]
pipeline_public_keys = ["{key}"]
require_registered = false

[jobs]
lease_s = 30

[log]
level = "debug"
json = true
""",
        )
    )
    assert loaded.server.host_port() == ("0.0.0.0", 9000)
    assert loaded.verdicts.silent_after_s == 40.0
    assert loaded.images.pipeline_public_keys == (str(key),)
    assert loaded.jobs.lease_s == 30.0 and loaded.log.json is True
    assert "s3cret" not in repr(loaded)  # the database URL may hold a password


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[srever]\n", "collector.toml: unknown section [srever]; known: database, images"),
        (
            "[server]\ncolour = 'blue'\n",
            "[server] colour = 'blue': unknown key; known: keep_alive_s, listen",
        ),
        (
            "[verdicts]\nsilent_after_intervals = 'three'\n",
            "[verdicts] silent_after_intervals = 'three' is not a number",
        ),
        ("[database]\npool_size = true\n", "[database] pool_size = True is not an integer"),
        ("[server]\nmetrics_public = 1\n", "[server] metrics_public = 1 is not true or false"),
        ("[verdicts]\nfleet_silent_percent = 150\n", "fleet_silent_percent = 150 is out of range"),
        ("[server]\nlisten = 'localhost'\n", "[server] listen = 'localhost': 'localhost' is not"),
        ("[log]\nlevel = 'loud'\n", "[log] level = 'loud' is not one of debug"),
        ("[images]\npipeline_public_keys = '/k'\n", "is not a list of strings"),
        ("[images]\npipeline_public_keys = ['/nope.pub']\n", "'/nope.pub', which is not a file"),
        ("server = 1\n", "[server] must be a table"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_mistakes_name_file_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    assert message in str(info.value)
    assert info.value.exit_code == EXIT_CONFIG


def test_pipeline_keys_must_be_ed25519_pem(tmp_path: Path) -> None:
    key = tmp_path / "pipeline.pub"
    key.write_text("not a key")
    with pytest.raises(ConfigError, match=r"pipeline_public_keys: .*not a PEM public key"):
        config.load(write(tmp_path, f'[images]\npipeline_public_keys = ["{key}"]\n'))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    "text",
    [
        '[database]\nuri = "postgresql://dw:hunter2@db.internal/dw"\n',
        'database = "postgresql://dw:hunter2@db.internal/dw"\n',
        '[database]\nurl = ["postgresql://dw:hunter2@db.internal/dw"]\n',
    ],
)
def test_a_database_password_never_shows_in_an_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    assert "hunter2" not in str(info.value)
    assert "postgresql://dw:***@db.internal/dw" in str(info.value)
