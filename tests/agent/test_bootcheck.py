"""The boot check as the daemon runs it: in a child process, handing back the same check with
the baseline compacted, and failing the same ways."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from agent import bootcheck
from agent.compact import CompactLines
from agent.config import AgentSection
from agent.errors import UntrustedError
from agent.identity import Identity
from tests.agent import imagetree

IDENTITY = Identity("host-1", "machine-id", "boot-1", "web-1", None)


@pytest.fixture
def image(tmp_path: Path) -> AgentSection:
    root = imagetree.build(tmp_path / "root")
    key = imagetree.make_key(tmp_path)
    manifest = tmp_path / "image.manifest.gz"
    imagetree.bake(root, imagetree.write_policy(tmp_path), manifest, key=key)
    (root / "etc" / "passwd").write_text("mallory:x:0:0::/:/bin/sh\n")  # drift
    return AgentSection(
        root=root,
        state_dir=tmp_path / "state",
        baseline=manifest,
        pipeline_public_key=Path(str(key) + ".pub"),
    )


def test_the_child_hands_back_the_check_with_the_baseline_compacted(image: AgentSection) -> None:
    here = bootcheck.run(image, first_boot=True, identity=IDENTITY)
    apart = bootcheck.run_apart(image, first_boot=True, identity=IDENTITY)

    assert here.body is not None and apart.body is not None
    for body in (here.body, apart.body):
        del body["stats"]["seconds"]
    assert apart.body == here.body
    assert not apart.clean
    assert [f["path"] for f in apart.body["findings"]] == ["/etc/passwd"]
    assert apart.result is not None and here.result is not None
    assert isinstance(apart.result.baseline._lines, CompactLines)
    assert dict(apart.result.baseline._lines.items()) == dict(here.result.baseline._lines.items())
    for path in here.result.baseline.paths():  # the index holds in this process too
        assert apart.result.baseline.get(path) == here.result.baseline.get(path)
    assert apart.result.baseline.get("/etc/nothing") is None
    assert apart.result.baseline.compact() is apart.result.baseline  # not compacted twice
    assert apart.result.findings == here.result.findings
    assert apart.result.packages == here.result.packages
    assert apart.policy is not None and apart.policy.name == "test-image"


def test_an_untrusted_manifest_raises_in_the_daemon_as_it_did_in_the_child(
    image: AgentSection, tmp_path: Path
) -> None:
    other = imagetree.make_key(tmp_path, "other.key")
    section = AgentSection(
        root=image.root,
        state_dir=image.state_dir,
        baseline=image.baseline,
        pipeline_public_key=Path(str(other) + ".pub"),
    )
    with pytest.raises(UntrustedError) as here:
        bootcheck.run(section, first_boot=False, identity=IDENTITY)
    with pytest.raises(UntrustedError) as apart:
        bootcheck.run_apart(section, first_boot=False, identity=IDENTITY)
    assert str(apart.value) == str(here.value)


def test_a_child_that_dies_is_a_failed_boot_check(
    image: AgentSection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bootcheck, "CHILD", "import os; os._exit(9)")
    with capture_logs() as logs:
        check = bootcheck.run_apart(image, first_boot=False, identity=IDENTITY)
    assert check.body is None and not check.clean
    (finding,) = check.integrity
    assert finding["reason"] == "boot_check_failed"
    assert finding["detail"] == "the boot check's process exited with status 9 without an answer"
    assert [e["status"] for e in logs if e["event"] == "boot_check_process_failed"] == [9]

    monkeypatch.setattr(
        bootcheck, "CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    )
    with capture_logs():
        check = bootcheck.run_apart(image, first_boot=False, identity=IDENTITY)
    (finding,) = check.integrity
    assert finding["detail"] == "the boot check's process was killed by SIGTERM"


def test_without_a_baseline_no_child_is_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bootcheck, "CHILD", "import os; os._exit(9)")
    section = AgentSection(root=tmp_path, state_dir=tmp_path / "state")
    check = bootcheck.run_apart(section, first_boot=False, identity=IDENTITY)
    assert [f["reason"] for f in check.integrity] == ["no_baseline"]


def test_the_child_logs_with_the_daemons_context(
    image: AgentSection, capfd: pytest.CaptureFixture[str]
) -> None:
    from agent import logs

    logs.configure("driftwarden-agent", level="info", json_lines=True)
    structlog.contextvars.bind_contextvars(host_id="host-1")
    try:
        bootcheck.run_apart(image, first_boot=False, identity=IDENTITY)
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
    lines = [line for line in capfd.readouterr().err.splitlines() if "boot_check_finished" in line]
    assert len(lines) == 1
    assert '"host_id": "host-1"' in lines[0] and '"service": "driftwarden-agent"' in lines[0]


def test_the_boot_report_says_when_a_local_policy_judged_instead_of_the_baked_one(
    image: AgentSection, tmp_path: Path
) -> None:
    baked = bootcheck.run(image, first_boot=False, identity=IDENTITY)
    assert baked.body is not None and baked.body["baseline"]["policy_override"] is None

    local = tmp_path / "local.toml"
    local.write_text(imagetree.POLICY.replace('name = "test-image"', 'name = "local-rules"'))
    section = replace(image, policy=local)
    check = bootcheck.run_apart(section, first_boot=False, identity=IDENTITY)
    assert check.body is not None
    override = check.body["baseline"]["policy_override"]
    digest = "sha256:" + hashlib.sha256(local.read_bytes()).hexdigest()
    assert override == {"path": str(local), "name": "local-rules", "digest": digest}
    assert check.body["stats"]["policy"] == "local-rules"
    assert check.policy is not None and check.policy.name == "local-rules"
