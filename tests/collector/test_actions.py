"""Replacement actions: AWS Auto Scaling against moto's server mode with the real boto3
client, a real command run with a real script, and a webhook to a loopback receiver."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from collector.actions import (
    ACTIONS,
    ActionConfigError,
    ActionOutcome,
    MalformedRequestError,
    ReplacementRequest,
    build_action,
    build_actions,
)
from collector.actions.aws import REQUEST_TAG, AutoScalingAction
from collector.actions.command import CommandAction
from collector.actions.webhook import WebhookAction
from collector.sinks import signing
from collector.sinks.config import Secret
from tests.collector.alertmanager_proc import free_port
from tests.collector.loopback import Answer, LoopbackReceiver
from tests.collector.moto_aws import (  # noqa: F401  (aws_server is the aws fixture)
    REGION,
    Group,
    MotoServer,
    aws_server,
    group_instances,
    make_group,
)
from tests.sshd import wait_until


def request(
    instance_id: str | None = "i-0123", *, dry_run: bool = False, **kw: Any
) -> ReplacementRequest:
    fields: dict[str, Any] = {
        "request_id": "req-" + uuid.uuid4().hex[:12],
        "host_id": "web-17",
        "instance_id": instance_id,
        "pool": "web",
        "reason": "drifted: /usr/bin/sudo changed",
        "dry_run": dry_run,
    }
    fields.update(kw)
    return ReplacementRequest(**fields)


def test_a_request_round_trips_and_a_malformed_one_is_refused() -> None:
    req = request()
    assert ReplacementRequest.from_json(json.loads(json.dumps(req.to_json()))) == req
    with pytest.raises(MalformedRequestError, match="exactly"):
        ReplacementRequest.from_json({**req.to_json(), "force": True})
    with pytest.raises(MalformedRequestError, match="host_id = ''"):
        request(host_id="")
    with pytest.raises(ValueError, match="only a failed outcome"):
        ActionOutcome("done", "x", retryable=True)


# --- AWS Auto Scaling on moto's server --------------------------------------------------------


@pytest.fixture
def group(aws: MotoServer) -> Group:
    return make_group(aws, size=2)


@contextmanager
def asg_action(
    aws: MotoServer, mode: str = "set-unhealthy", **kw: Any
) -> Iterator[AutoScalingAction]:
    action = AutoScalingAction("asg", mode=mode, region=REGION, endpoint_url=aws.endpoint_url, **kw)
    try:
        yield action
    finally:
        action.close()


@pytest.fixture
def set_unhealthy(aws: MotoServer) -> Iterator[AutoScalingAction]:
    with asg_action(aws) as action:
        yield action


@pytest.fixture
def terminate(aws: MotoServer) -> Iterator[AutoScalingAction]:
    with asg_action(aws, "terminate") as action:
        yield action


@pytest.fixture
def detach(aws: MotoServer) -> Iterator[AutoScalingAction]:
    with asg_action(aws, "detach") as action:
        yield action


def asg_state(aws: MotoServer, instance_id: str) -> dict[str, Any] | None:
    client = aws.client("autoscaling")
    try:
        found = client.describe_auto_scaling_instances(InstanceIds=[instance_id])
    finally:
        client.close()
    states = found["AutoScalingInstances"]
    return states[0] if states else None


def ec2_instance(aws: MotoServer, instance_id: str) -> dict[str, Any]:
    client = aws.client("ec2")
    try:
        found = client.describe_instances(InstanceIds=[instance_id])
    finally:
        client.close()
    instance: dict[str, Any] = found["Reservations"][0]["Instances"][0]
    return instance


def test_set_unhealthy_marks_the_instance_and_a_repeat_is_already(
    aws: MotoServer, group: Group, set_unhealthy: AutoScalingAction
) -> None:
    victim, other = group.instance_ids
    req = request(victim)
    outcome = set_unhealthy.replace(req)
    assert outcome.status == "done", outcome
    assert outcome.facts["group"] == group.name
    state = asg_state(aws, victim)
    assert state is not None and state["HealthStatus"].upper() == "UNHEALTHY"
    other_state = asg_state(aws, other)
    assert other_state is not None and other_state["HealthStatus"].upper() == "HEALTHY"

    repeat = set_unhealthy.replace(req)
    assert (repeat.status, repeat.retryable) == ("already", False)
    assert "Unhealthy" in repeat.detail


def test_terminate_keeps_capacity_and_a_repeat_is_already(
    aws: MotoServer, group: Group, terminate: AutoScalingAction
) -> None:
    victim = group.instance_ids[0]
    req = request(victim)
    assert terminate.replace(req).status == "done"
    assert ec2_instance(aws, victim)["State"]["Name"] in ("shutting-down", "terminated")
    remaining = group_instances(aws, group.name)
    assert victim not in remaining and len(remaining) == 2  # a replacement was launched

    repeat = terminate.replace(req)
    assert repeat.status == "already"
    assert "terminated" in repeat.detail or "shutting-down" in repeat.detail


def test_detach_keeps_the_instance_for_forensics_and_a_repeat_is_already(
    aws: MotoServer, group: Group, detach: AutoScalingAction
) -> None:
    victim = group.instance_ids[0]
    req = request(victim)
    assert detach.replace(req).status == "done"
    instance = ec2_instance(aws, victim)
    assert instance["State"]["Name"] == "running"
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags[REQUEST_TAG] == req.request_id
    assert tags["driftwarden:detached-from"] == group.name
    assert asg_state(aws, victim) is None
    remaining = group_instances(aws, group.name)
    assert victim not in remaining and len(remaining) == 2

    repeat = detach.replace(req)
    assert repeat.status == "already" and req.request_id in repeat.detail


def test_dry_run_changes_nothing(
    aws: MotoServer, group: Group, terminate: AutoScalingAction
) -> None:
    victim = group.instance_ids[0]
    outcome = terminate.replace(request(victim, dry_run=True))
    assert outcome.status == "would_replace"
    assert outcome.detail == f"would terminate {victim} in {group.name!r} (capacity kept)"
    assert ec2_instance(aws, victim)["State"]["Name"] == "running"
    assert set(group_instances(aws, group.name)) == set(group.instance_ids)


def test_an_instance_of_another_group_is_refused(aws: MotoServer, group: Group) -> None:
    with asg_action(aws, "terminate", group="some-other-group") as action:
        outcome = action.replace(request(group.instance_ids[0]))
    assert (outcome.status, outcome.retryable) == ("failed", False)
    assert "not 'some-other-group'; refusing" in outcome.detail
    assert ec2_instance(aws, group.instance_ids[0])["State"]["Name"] == "running"


def test_an_instance_in_no_group_is_refused(
    aws: MotoServer, set_unhealthy: AutoScalingAction
) -> None:
    ec2 = aws.client("ec2")
    try:
        loose = ec2.run_instances(ImageId=aws.image_id(), MinCount=1, MaxCount=1)["Instances"][0]
    finally:
        ec2.close()
    outcome = set_unhealthy.replace(request(loose["InstanceId"]))
    assert (outcome.status, outcome.retryable) == ("failed", False)
    assert "in no Auto Scaling group; refusing" in outcome.detail


def test_a_host_without_an_instance_id_cannot_be_replaced_on_aws(
    set_unhealthy: AutoScalingAction,
) -> None:
    outcome = set_unhealthy.replace(request(None))
    assert (outcome.status, outcome.retryable) == ("failed", False)


def test_unreachable_aws_is_a_retryable_failure() -> None:
    action = AutoScalingAction(
        "asg", region=REGION, endpoint_url=f"http://127.0.0.1:{free_port()}", timeout_s=2
    )
    try:
        outcome = action.replace(request("i-0123"))
    finally:
        action.close()
    assert (outcome.status, outcome.retryable) == ("failed", True)
    assert outcome.detail.startswith("AWS unreachable")


def test_aws_action_from_its_table(aws: MotoServer) -> None:
    action = build_action(
        {
            "type": "aws-autoscaling",
            "name": "web-asg",
            "region": REGION,
            "endpoint_url": aws.endpoint_url,
            "mode": "detach",
            "respect_grace_period": False,
        }
    )
    try:
        assert isinstance(action, AutoScalingAction)
        assert (action.mode, action.respect_grace_period) == ("detach", False)
    finally:
        action.close()
    with pytest.raises(ActionConfigError, match="mode = 'reboot' is not one of"):
        build_action({"type": "aws-autoscaling", "name": "a", "region": REGION, "mode": "reboot"})


# --- command ----------------------------------------------------------------------------------


@pytest.fixture
def script(tmp_path: Path) -> Path:
    """A real script that records its argv and environment, then exits as told."""
    path = tmp_path / "replace-host"
    path.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import json, os, sys
            out = os.environ["RECORD"]
            with open(out, "w") as fh:
                json.dump({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                           if k.startswith(("DRIFTWARDEN_", "DW_TEST_"))}}}}, fh)
            print("planning replacement of", sys.argv[1:])
            print("x" * 10000)
            print("last line")
            sys.exit(int(os.environ.get("EXIT_CODE", "0")))
            """
        )
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def command(script: Path, tmp_path: Path, exit_code: int = 0, **kw: Any) -> CommandAction:
    env = {"RECORD": str(tmp_path / "record.json"), "EXIT_CODE": str(exit_code)}
    env.update(kw.pop("env", {}))
    return CommandAction(
        "tf",
        argv=[str(script), '-replace=aws_instance.web["{host_id}"]', "{instance_id}", "{pool}"],
        env=env,
        **kw,
    )


def test_command_substitutes_per_argument_and_records_the_tail(
    script: Path, tmp_path: Path
) -> None:
    action = command(script, tmp_path, env={"DW_TEST_TOKEN": "tf-secret-token"})
    req = request("i-0abc")
    with capture_logs() as logs:
        outcome = action.replace(req)
    assert outcome.status == "done", outcome
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["argv"] == ['-replace=aws_instance.web["web-17"]', "i-0abc", "web"]
    assert record["env"] == {
        "DW_TEST_TOKEN": "tf-secret-token",
        "DRIFTWARDEN_HOST_ID": "web-17",
        "DRIFTWARDEN_INSTANCE_ID": "i-0abc",
        "DRIFTWARDEN_POOL": "web",
        "DRIFTWARDEN_REQUEST_ID": req.request_id,
        "DRIFTWARDEN_REASON": req.reason,
        "DRIFTWARDEN_DRY_RUN": "0",
    }
    assert outcome.facts["exit_code"] == 0
    tail = outcome.facts["output_tail"]
    assert tail.endswith("last line\n") and len(tail) == 4096
    assert "tf-secret-token" not in repr(logs) + repr(action)
    assert [e["event"] for e in logs] == ["replacement_command_started", "replacement_action"]


@pytest.mark.parametrize(
    ("exit_code", "status", "retryable"),
    [(0, "done", False), (3, "already", False), (75, "failed", True), (1, "failed", False)],
)
def test_command_exit_codes(
    script: Path, tmp_path: Path, exit_code: int, status: str, retryable: bool
) -> None:
    outcome = command(script, tmp_path, exit_code, already_exit_codes=[3]).replace(request())
    assert (outcome.status, outcome.retryable) == (status, retryable)
    assert outcome.facts["exit_code"] == exit_code


def test_command_dry_run_runs_only_the_dry_run_argv(script: Path, tmp_path: Path) -> None:
    without = command(script, tmp_path)
    outcome = without.replace(request(dry_run=True))
    assert (outcome.status, outcome.detail) == ("would_replace", f"would run {script}")
    assert not (tmp_path / "record.json").exists()

    with_plan = command(script, tmp_path, dry_run_argv=[str(script), "plan", "{host_id}"])
    outcome = with_plan.replace(request(dry_run=True))
    assert outcome.status == "would_replace"
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["argv"] == ["plan", "web-17"] and record["env"]["DRIFTWARDEN_DRY_RUN"] == "1"


def test_command_refuses_values_that_would_become_options(script: Path, tmp_path: Path) -> None:
    with pytest.raises(MalformedRequestError, match="host_id = '-rf' is refused"):
        request(host_id="-rf")
    action = command(script, tmp_path)
    for bad in ("-rf", "../other", "web]", "a b"):  # a request stored before the rule
        forged = request()
        object.__setattr__(forged, "pool", bad)
        outcome = action.replace(forged)
        assert (outcome.status, outcome.retryable) == ("failed", False)
        assert f"pool = {bad!r} is refused" in outcome.detail
    outcome = command(script, tmp_path).replace(request(None))
    assert "{instance_id} is used but the request has no instance_id" in outcome.detail
    assert not (tmp_path / "record.json").exists()


def test_command_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    slow = tmp_path / "slow"
    slow.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\necho started\nwait\n")
    slow.chmod(0o755)
    outcome = CommandAction("slow", argv=[str(slow)], timeout_s=1).replace(request())
    assert (outcome.status, outcome.retryable) == ("failed", False)
    assert "ran past 1s and was killed" in outcome.detail
    assert outcome.facts["exit_code"] is None and "started" in outcome.facts["output_tail"]
    child = int(pidfile.read_text())
    wait_until(  # SIGKILL is delivered at once; the exit itself may take the kernel a moment
        lambda: not Path(f"/proc/{child}").exists() or _zombie(child),
        timeout_s=10,
        what=f"the killed child {child} to exit",
    )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_command_that_cannot_start_is_a_final_failure(tmp_path: Path) -> None:
    outcome = CommandAction("x", argv=[str(tmp_path / "missing")]).replace(request())
    assert (outcome.status, outcome.retryable) == ("failed", False)
    assert "cannot run" in outcome.detail and "No such file" in outcome.detail


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"argv": []}, "argv = \\[\\] is not a list starting with the program"),
        ({"argv": "terraform apply"}, "argv = 'terraform apply' is not a list of strings"),
        (
            {"argv": ["kubectl", "drain", "{hostname}"]},
            "argv has '\\{hostname\\}': '\\{hostname\\}' is not a placeholder",
        ),
        ({"argv": ["kubectl", "-o", "jsonpath={.items}"]}, "write \\{\\{ and \\}\\} for braces"),
        ({"argv": ["x"], "timeout_s": -1}, "timeout_s = -1 is not a number >= 0.1"),
        ({"argv": ["x"], "cwd": "relative"}, "cwd = 'relative' is not an absolute path"),
        ({"argv": ["x"], "shell": True}, "unknown key\\(s\\) \\['shell'\\]"),
    ],
)
def test_a_bad_command_table_names_the_key_and_value(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ActionConfigError, match=message):
        build_action({"type": "command", "name": "tf", **table}, source="collector.toml")


def test_literal_braces_are_written_doubled(tmp_path: Path) -> None:
    action = build_action(
        {"type": "command", "name": "k", "argv": ["/bin/echo", "jsonpath={{.items}}", "{pool}"]}
    )
    outcome = action.replace(request())
    assert outcome.facts["output_tail"] == "jsonpath={.items} web\n"


def test_env_values_are_never_quoted_in_errors() -> None:
    with pytest.raises(ActionConfigError) as caught:
        build_action({"type": "command", "name": "k", "argv": ["x"], "env": {"TOKEN": 12345}})
    assert "12345" not in str(caught.value) and "TOKEN" in str(caught.value)


# --- webhook ----------------------------------------------------------------------------------


@pytest.fixture
def pipeline() -> Iterator[LoopbackReceiver]:
    with LoopbackReceiver(Answer(202, b'{"status":"accepted"}')) as server:
        yield server


def test_webhook_action_is_signed_and_keyed_by_the_request_id(pipeline: LoopbackReceiver) -> None:
    action = WebhookAction("pipeline", url=pipeline.url + "/replace", secret=Secret("hmac-key"))
    req = request()
    outcome = action.replace(req)
    assert outcome.status == "done" and outcome.facts["http_status"] == 202
    (received,) = pipeline.wait_for(1)
    assert received.json() == {"version": 1, "event": "replacement", "request": req.to_json()}
    assert received.headers["Idempotency-Key"] == req.request_id
    assert received.headers["X-Driftwarden-Event"] == "replacement"
    signing.verify(b"hmac-key", received.headers, received.body)


@pytest.mark.parametrize(
    ("answer", "status", "retryable"),
    [
        (Answer(409, b"duplicate"), "already", False),
        (Answer(200, b'{"status":"already"}'), "already", False),
        (Answer(503, b"busy"), "failed", True),
        (Answer(429, b"slow down"), "failed", True),
        (Answer(400, b"unknown pool"), "failed", False),
    ],
)
def test_webhook_action_answers(
    pipeline: LoopbackReceiver, answer: Answer, status: str, retryable: bool
) -> None:
    pipeline.answer(answer)
    action = WebhookAction("pipeline", url=pipeline.url, secret=Secret("k"))
    outcome = action.replace(request())
    assert (outcome.status, outcome.retryable) == (status, retryable)
    assert outcome.facts["http_status"] == answer.status


def test_webhook_action_dry_run_sends_nothing(pipeline: LoopbackReceiver) -> None:
    action = WebhookAction("pipeline", url=pipeline.url, secret=Secret("k"))
    assert action.replace(request(dry_run=True)).status == "would_replace"
    assert pipeline.requests == []


def test_webhook_action_unreachable_is_retryable() -> None:
    action = WebhookAction("pipeline", url=f"http://127.0.0.1:{free_port()}", secret=Secret("k"))
    outcome = action.replace(request())
    assert (outcome.status, outcome.retryable) == ("failed", True)


# --- the registry -----------------------------------------------------------------------------


def test_built_in_actions_are_registered() -> None:
    assert ACTIONS.known() == ("aws-autoscaling", "command", "webhook")


def test_an_unknown_action_type_lists_the_known_ones() -> None:
    with pytest.raises(
        ActionConfigError,
        match=re.escape(
            "collector.toml: [[action]] 'x' type = 'ansible' is unknown; "
            "known: ['aws-autoscaling', 'command', 'webhook']"
        ),
    ):
        build_actions([{"type": "ansible", "name": "x"}], source="collector.toml")


@pytest.mark.parametrize(
    ("type_name", "minimal"),
    [
        ("aws-autoscaling", {"region": REGION}),
        ("webhook", {"url": "https://ci.example/hook", "secret": "k"}),
        ("command", {"argv": ["true"]}),
    ],
)
def test_every_action_key_is_documented(
    repo: Path, type_name: str, minimal: dict[str, Any]
) -> None:
    assert type_name in ACTIONS.known()
    table = ACTIONS.table({"type": type_name, "name": "x", **minimal})
    _, action = ACTIONS.build(table)
    action.close()
    documented = set(re.findall(r"`([a-z_]+)`", (repo / "docs" / "operations.md").read_text()))
    read = {k for k in table.keys_read if not k.endswith(("_file", "_env"))}
    assert not read - documented, (
        f"docs/operations.md does not document {sorted(read - documented)}"
    )


def test_actions_by_name_and_duplicates_refused() -> None:
    hook = {"type": "webhook", "name": "deploy", "url": "https://ci.example/hook", "secret": "k"}
    drain = {"type": "command", "name": "drain", "argv": ["kubectl", "drain", "{host_id}"]}
    actions = build_actions([hook, drain])
    assert sorted(actions) == ["deploy", "drain"]
    assert "'k'" not in repr(actions)
    with pytest.raises(ActionConfigError, match="two \\[\\[action\\]\\] tables are named"):
        build_actions([hook, hook])
    assert os.environ.get("DRIFTWARDEN_HOST_ID") is None
