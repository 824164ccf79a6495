"""The response's configuration: pools, budgets that must not compute to zero, sinks and
actions wired into the collector's loader (exit 78), every key documented."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from collector import config
from collector.errors import EXIT_CONFIG, ConfigError
from collector.response.config import BreakglassSettings, PoolConfig, ResponseSettings
from tests.collector.servers import REPO

ACTION = """
[[action]]
type = "command"
name = "reimage"
argv = ["/usr/local/bin/reimage", "{host_id}"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "collector.toml"
    path.write_text(text)
    return path


def test_a_full_response_configuration(tmp_path: Path) -> None:
    text = (
        ACTION
        + """
[[sink]]
type = "webhook"
name = "soc"
url = "https://soc.example/hook"
secret = "k"

[[pool]]
name = "web"
action = "reimage"
budget = 4
budget_percent = 10
desired_capacity = 50
storm_hosts = 8

[[pool]]
name = "db"

[response]
verify_after_s = 120
runbook_url = "https://wiki.example/ops"

[breakglass]
grace_s = 60
"""
    )
    loaded = config.load(write(tmp_path, text))
    try:
        response = loaded.response
        assert [s.name for s in response.sinks] == ["soc"]
        assert list(response.actions) == ["reimage"]
        web = response.pool("web")
        assert (web.budget_limit(50), web.storm_hosts) == (4, 8)  # min(4, 10% of 50)
        assert response.pool("db").action is None
        assert response.pool("unknown") == PoolConfig(name="unknown")  # alert only
        assert response.settings.verify_after_s == 120
        assert response.breakglass.grace_s == 60
    finally:
        loaded.response.close()


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        (
            "budget_percent = 10\ndesired_capacity = 5",
            "[[pool]] 'web' budget_percent = 10 of desired_capacity = 5 computes to 0 "
            "replacements in flight; raise it to at least 20, or set budget",
        ),
        ("budget = 0", "[[pool]] 'web' budget = 0 is not a whole number >= 1"),
        ("budget_percent = 20", "budget_percent = 20 needs desired_capacity or"),
        ('action = "nope"', "[[pool]] 'web' action = 'nope' is not an [[action]] name"),
        (
            'action = "reimage"\nbudget_percent = 10\ndesired_capacity_from = "action"',
            "desired_capacity_from = 'action' is not usable",
        ),
        ('desired_capacity_from = "moon"', "desired_capacity_from = 'moon' is not one of"),
        ("colour = 'blue'", "[[pool]] 'web' unknown key(s) ['colour']"),
        ("budget_percent = 150\ndesired_capacity = 4", "budget_percent = 150.0 is not a percent"),
    ],
)
def test_pool_mistakes_name_the_key(tmp_path: Path, pool: str, message: str) -> None:
    path = write(tmp_path, ACTION + f'\n[[pool]]\nname = "web"\n{pool}\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert message in str(caught.value)
    assert str(caught.value).startswith("collector.toml: ")


def test_two_pools_with_one_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="two \\[\\[pool\\]\\] tables are named 'web'"):
        config.load(write(tmp_path, '[[pool]]\nname = "web"\n[[pool]]\nname = "web"\n'))


@pytest.mark.parametrize(
    "text",
    [
        '[[sink]]\ntype = "opsgenie"\nname = "x"\n',
        '[[pool]]\nname = "web"\nbudget_percent = 10\ndesired_capacity = 5\n',
        "[response]\nverify_after_s = 'soon'\n",
        "[breakglass]\ngrace = 10\n",
    ],
)
def test_a_bad_response_configuration_exits_78(tmp_path: Path, text: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "collector", "check-config", "--config", str(write(tmp_path, text))],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert done.stderr.startswith("error: collector.toml: ")


@pytest.mark.parametrize("cls", [PoolConfig, ResponseSettings, BreakglassSettings])
def test_every_response_key_is_documented(repo: Path, cls: type) -> None:
    documented = set(re.findall(r"`([a-z_]+)`", (repo / "docs" / "operations.md").read_text()))
    keys = {f.name for f in dataclasses.fields(cls)}
    assert keys <= documented, sorted(keys - documented)
