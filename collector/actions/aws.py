"""AWS EC2 Auto Scaling: let the group replace the drifted instance.

Modes (``mode`` in the ``[[action]]`` table):

``set-unhealthy`` (default)
    ``SetInstanceHealth(HealthStatus="Unhealthy", ShouldRespectGracePeriod=True)``: the group
    terminates the instance and launches a replacement in its own time, respecting its
    health-check grace period (during which AWS ignores the call; a later attempt repeats it).
``terminate``
    ``TerminateInstanceInAutoScalingGroup(ShouldDecrementDesiredCapacity=False)``: now.
``detach``
    For forensics: tag the instance (``driftwarden:replacement-request``,
    ``driftwarden:detached-from``), then ``DetachInstances(ShouldDecrementDesiredCapacity=False)``;
    the group launches a replacement and the instance keeps running outside it for study.

Every mode looks first and answers ``already`` when the instance is on its way out: unhealthy
(set-unhealthy), terminating or terminated, detaching, detached by us (the tag), or gone. An
instance in no group, or in another group than ``group`` when that is set, is refused.
Some time after acting, ``check`` tells whether the instance went away: ``gone`` when it is
terminating, terminated, detached or no longer in the group; ``leaving`` while it is marked
Unhealthy and the group has yet to act; ``stayed`` when it is still Healthy and in service —
what happens when ``SetInstanceHealth`` arrives during the group's health-check grace period,
which AWS ignores — so the request is made again. With ``group`` set, ``desired_capacity``
reads the group's DesiredCapacity (``autoscaling:DescribeAutoScalingGroups``).

Permissions: ``autoscaling:DescribeAutoScalingInstances`` and the mode's call,
``ec2:DescribeInstances``, and ``ec2:CreateTags`` for ``detach``. Credentials come from the
usual chain (instance role, environment, profile), never from this table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from collector.actions.errors import ActionError
from collector.actions.request import ActionOutcome, Check, ReplacementRequest, failed, logged
from collector.sinks.config import ConfigTable

if TYPE_CHECKING:
    from mypy_boto3_autoscaling.client import AutoScalingClient
    from mypy_boto3_autoscaling.type_defs import AutoScalingInstanceDetailsTypeDef
    from mypy_boto3_ec2.client import EC2Client

MODES: Final = ("set-unhealthy", "terminate", "detach")
REQUEST_TAG: Final = "driftwarden:replacement-request"
GROUP_TAG: Final = "driftwarden:detached-from"
REASON_TAG: Final = "driftwarden:reason"
MAX_TAG_VALUE: Final = 256
CALLS_PER_REPLACE: Final = 3  # describe, (tag,) act
ATTEMPTS_PER_CALL: Final = 2
GONE_STATES: Final = frozenset({"shutting-down", "terminated"})
RETRYABLE_CODES: Final = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
        "ResourceContention",
        "ScalingActivityInProgress",
        "RequestTimeout",
    }
)


class AutoScalingAction:
    def __init__(
        self,
        name: str,
        *,
        mode: str = "set-unhealthy",
        respect_grace_period: bool = True,
        group: str | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode = {mode!r} is not one of {list(MODES)}")
        self.name = name
        self.mode = mode
        self.respect_grace_period = respect_grace_period
        self.group = group
        self.timeout_s = timeout_s * CALLS_PER_REPLACE * ATTEMPTS_PER_CALL
        config = Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"mode": "standard", "total_max_attempts": ATTEMPTS_PER_CALL},
        )
        session = boto3.session.Session(region_name=region)
        self._autoscaling: AutoScalingClient = session.client(
            "autoscaling", endpoint_url=endpoint_url, config=config
        )
        self._ec2: EC2Client = session.client("ec2", endpoint_url=endpoint_url, config=config)

    def __repr__(self) -> str:
        return f"AutoScalingAction(name={self.name!r}, mode={self.mode!r}, group={self.group!r})"

    def close(self) -> None:
        self._autoscaling.close()
        self._ec2.close()

    def replace(self, request: ReplacementRequest) -> ActionOutcome:
        instance_id = request.instance_id
        if instance_id is None:
            return failed("the host has no instance id to act on", retryable=False)
        try:
            outcome = self._replace(request, instance_id)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            outcome = failed(
                f"AWS refused: {code}: {error.get('Message', '')}",
                retryable=code in RETRYABLE_CODES or status >= 500,
                error_code=code,
            )
        except BotoCoreError as exc:
            outcome = failed(f"AWS unreachable: {type(exc).__name__}", retryable=True)
        return logged(self.name, request, outcome, mode=self.mode, instance_id=instance_id)

    def _replace(self, request: ReplacementRequest, instance_id: str) -> ActionOutcome:
        found = self._autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])
        details = found.get("AutoScalingInstances", [])
        if not details:
            return self._outside_group(instance_id)
        state = details[0]
        group = state["AutoScalingGroupName"]
        facts = {"instance_id": instance_id, "group": group, "mode": self.mode}
        if self.group is not None and group != self.group:
            return failed(
                f"{instance_id} belongs to group {group!r}, not {self.group!r}; refusing",
                retryable=False,
                **facts,
            )
        leaving = _leaving(state, mode=self.mode)
        if leaving is not None:
            return ActionOutcome("already", f"{instance_id} in {group!r} {leaving}", facts=facts)
        what = {
            "set-unhealthy": f"mark {instance_id} Unhealthy in {group!r}",
            "terminate": f"terminate {instance_id} in {group!r} (capacity kept)",
            "detach": f"tag and detach {instance_id} from {group!r} (capacity kept)",
        }[self.mode]
        if request.dry_run:
            return ActionOutcome("would_replace", f"would {what}", facts=facts)
        if self.mode == "set-unhealthy":
            self._autoscaling.set_instance_health(
                InstanceId=instance_id,
                HealthStatus="Unhealthy",
                ShouldRespectGracePeriod=self.respect_grace_period,
            )
        elif self.mode == "terminate":
            self._autoscaling.terminate_instance_in_auto_scaling_group(
                InstanceId=instance_id, ShouldDecrementDesiredCapacity=False
            )
        else:
            self._ec2.create_tags(
                Resources=[instance_id],
                Tags=[
                    {"Key": REQUEST_TAG, "Value": request.request_id[:MAX_TAG_VALUE]},
                    {"Key": GROUP_TAG, "Value": group},
                    {"Key": REASON_TAG, "Value": request.reason[:MAX_TAG_VALUE]},
                ],
            )
            self._autoscaling.detach_instances(
                InstanceIds=[instance_id],
                AutoScalingGroupName=group,
                ShouldDecrementDesiredCapacity=False,
            )
        return ActionOutcome("done", what[0].upper() + what[1:], facts=facts)

    @property
    def reads_capacity(self) -> bool:
        return self.group is not None

    def desired_capacity(self) -> int:
        """The group's DesiredCapacity; ``ActionError`` when it cannot be read."""
        if self.group is None:
            raise ActionError(f"{self.name}: no group is set, so no capacity can be read")
        try:
            found = self._autoscaling.describe_auto_scaling_groups(
                AutoScalingGroupNames=[self.group]
            )
        except (ClientError, BotoCoreError) as exc:
            raise ActionError(f"{self.name}: cannot read the group: {type(exc).__name__}") from None
        groups = found.get("AutoScalingGroups", [])
        if not groups:
            raise ActionError(f"{self.name}: group {self.group!r} does not exist")
        return int(groups[0]["DesiredCapacity"])

    def check(self, request: ReplacementRequest) -> Check:
        """Did the instance go away since the request? (See the module's docstring.)"""
        instance_id = request.instance_id
        if instance_id is None:
            return "unknown"
        try:
            found = self._autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])
            details = found.get("AutoScalingInstances", [])
            if not details:
                outside = self._outside_group(instance_id)
                return "gone" if outside.status == "already" else "unknown"
        except (ClientError, BotoCoreError):
            return "unknown"
        state = details[0]
        lifecycle = state["LifecycleState"]
        if lifecycle.startswith(("Terminating", "Terminated", "Detaching", "Detached")):
            return "gone"
        if state["HealthStatus"].upper() == "UNHEALTHY":
            return "leaving"
        return "stayed"

    def _outside_group(self, instance_id: str) -> ActionOutcome:
        """The instance is in no group: gone or detached by us is ``already``; else refuse."""
        facts: dict[str, Any] = {"instance_id": instance_id, "mode": self.mode}
        try:
            found = self._ec2.describe_instances(InstanceIds=[instance_id])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
                return ActionOutcome("already", f"{instance_id} no longer exists", facts=facts)
            raise
        instances = [i for r in found.get("Reservations", []) for i in r.get("Instances", [])]
        if not instances:
            return ActionOutcome("already", f"{instance_id} no longer exists", facts=facts)
        instance = instances[0]
        state = instance.get("State", {}).get("Name", "")
        if state in GONE_STATES:
            return ActionOutcome("already", f"{instance_id} is {state}", facts=facts)
        tags = {t.get("Key", ""): t.get("Value", "") for t in instance.get("Tags", [])}
        if REQUEST_TAG in tags:
            return ActionOutcome(
                "already",
                f"{instance_id} was detached from {tags.get(GROUP_TAG, '?')!r} "
                f"by request {tags[REQUEST_TAG]}",
                facts=facts,
            )
        return failed(
            f"{instance_id} is {state or 'unknown'} and in no Auto Scaling group; refusing",
            retryable=False,
            **facts,
        )


def _leaving(state: AutoScalingInstanceDetailsTypeDef, *, mode: str) -> str | None:
    """Why the instance already counts as replaced, or None."""
    lifecycle = state["LifecycleState"]
    if lifecycle.startswith(("Terminating", "Terminated", "Detaching", "Detached")):
        return f"is {lifecycle}"
    if mode == "set-unhealthy" and state["HealthStatus"].upper() == "UNHEALTHY":
        return "is already marked Unhealthy"
    return None


def from_config(name: str, table: ConfigTable) -> AutoScalingAction:
    settings: dict[str, Any] = {
        "mode": table.choice("mode", MODES, "set-unhealthy"),
        "respect_grace_period": table.boolean("respect_grace_period", True),
        "group": table.optional_string("group"),
        "region": table.optional_string("region"),
        "endpoint_url": table.optional_url("endpoint_url"),
        "timeout_s": table.number("timeout_s", 30.0, minimum=1.0),
    }
    try:
        return AutoScalingAction(name, **settings)
    except BotoCoreError as exc:  # no region anywhere, an unusable profile
        raise table.fail(f"cannot set up the AWS clients: {exc} (set region?)") from None
