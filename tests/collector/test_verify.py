"""Verifying a replacement against AWS Auto Scaling (moto's server, the real boto3 client):
SetInstanceHealth ignored during the group's health-check grace period is noticed later and
requested again; the instance is replaced once the group acts; the budget is a percentage of
the group's DesiredCapacity, read from AWS."""

from __future__ import annotations

import pytest

from collector.model import HostState
from collector.response.records import ReplacementState
from collector.store import SqlStore
from tests.collector.clock import Clock
from tests.collector.fleet import Fleet
from tests.collector.moto_aws import REGION, MotoServer, aws_server, make_group

__all__ = ["aws_server"]  # the aws fixture

VERIFY_S = 300


def health(aws: MotoServer, instance_id: str) -> str | None:
    client = aws.client("autoscaling")
    try:
        found = client.describe_auto_scaling_instances(InstanceIds=[instance_id])
    finally:
        client.close()
    states = found["AutoScalingInstances"]
    return str(states[0]["HealthStatus"]).upper() if states else None


def call(aws: MotoServer, method: str, **kwargs: object) -> None:
    client = aws.client("autoscaling")
    try:
        getattr(client, method)(**kwargs)
    finally:
        client.close()


def asg_fleet(
    store: SqlStore, aws: MotoServer, group: str, pool: dict[str, object], max_requests: int
) -> Fleet:
    """A fleet whose pool ``web`` is replaced through the Auto Scaling group ``group``."""
    action = {
        "type": "aws-autoscaling",
        "name": "asg",
        "region": REGION,
        "endpoint_url": aws.endpoint_url,
        "group": group,
    }
    return Fleet(
        store,
        {
            "action": [action],
            "pool": [{"name": "web", "action": "asg", **pool}],
            "response": {"verify_after_s": VERIFY_S, "max_requests": max_requests},
        },
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_ignored_request_is_made_again_until_the_instance_goes(
    store: SqlStore, clock: Clock, aws: MotoServer
) -> None:
    group = make_group(aws, size=3)
    pool = {"budget_percent": 50, "desired_capacity_from": "action"}
    fleet = asg_fleet(store, aws, group.name, pool, max_requests=3)
    try:
        first, second, third = group.instance_ids  # agents on EC2 use the instance id
        fleet.enroll(first, second, third)
        fleet.drift(first, "/etc/shadow")
        fleet.drift(second, "/etc/gshadow")
        fleet.run()
        assert health(aws, first) == "UNHEALTHY"
        assert health(aws, second) == "HEALTHY"  # 50% of a desired capacity of 3 is 1
        assert fleet.replacement(second).blocked_reason == "budget: 1 of 1 replacements in flight"
        assert fleet.host(first).state is HostState.REPLACING

        # inside the group's grace period AWS ignores SetInstanceHealth: still Healthy
        call(aws, "set_instance_health", InstanceId=first, HealthStatus="Healthy")
        clock.advance(VERIFY_S)
        fleet.heartbeat(first, second, third)
        fleet.run()
        assert health(aws, first) == "UNHEALTHY"  # asked again
        row = fleet.replacement(first)
        assert (row.state, row.requests) == (ReplacementState.VERIFYING, 2)
        stayed = [d for d in fleet.decisions(host_id=first) if d.decision == "host_stayed"]
        assert len(stayed) == 1

        clock.advance(VERIFY_S)  # marked, the group has yet to act: leaving, not asked again
        fleet.run()
        assert fleet.replacement(first).requests == 2

        call(
            aws,
            "terminate_instance_in_auto_scaling_group",
            InstanceId=first,
            ShouldDecrementDesiredCapacity=False,
        )
        clock.advance(VERIFY_S)
        fleet.run()
        assert fleet.host(first).state is HostState.REPLACED
        assert fleet.replacement(first).state is ReplacementState.DONE
        assert health(aws, second) == "UNHEALTHY"  # the budget freed: the next one goes
    finally:
        fleet.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_request_that_never_takes_is_paged_as_stuck(
    store: SqlStore, clock: Clock, aws: MotoServer
) -> None:
    group = make_group(aws, size=1)
    fleet = asg_fleet(store, aws, group.name, {"budget": 1}, max_requests=2)
    try:
        [instance] = group.instance_ids
        fleet.enroll(instance)
        fleet.drift(instance)
        fleet.run()
        for _ in range(2):
            call(aws, "set_instance_health", InstanceId=instance, HealthStatus="Healthy")
            clock.advance(VERIFY_S)
            fleet.run()
        row = fleet.replacement(instance)
        assert (row.state, row.requests) == (ReplacementState.FAILED, 2)
        pages = [j.payload["cause"] for j in store.jobs(kind="alert")]
        assert "replacement_stuck" in pages
    finally:
        fleet.close()
