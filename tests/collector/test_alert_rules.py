"""The shipped Prometheus rules only name metrics the collector really exports."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from tests.collector.apptest import bearer

RULES = Path(__file__).resolve().parents[2] / "packaging" / "prometheus" / "driftwarden-rules.yml"


def test_rules_name_exported_metrics(client: TestClient, tokens: dict[str, str]) -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules and all({"alert", "expr", "labels", "annotations"} <= set(r) for r in rules)
    assert all(r["labels"]["severity"] in ("warning", "critical") for r in rules)
    exported = client.get("/metrics", headers=bearer(tokens["viewer"])).text
    names = set(re.findall(r"^# TYPE (\w+) ", exported, re.MULTILINE))
    for rule in rules:
        for metric in re.findall(r"\bdriftwarden_\w+", rule["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            assert base in names, f"{rule['alert']} uses {metric}, not exported: {sorted(names)}"
    # label values the rules match on are ones the collector emits
    from collector.silence import FLEET_SILENCE

    assert f'kind="{FLEET_SILENCE}"' in RULES.read_text()
