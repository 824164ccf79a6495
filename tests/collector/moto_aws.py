"""moto in server mode on a loopback port, with a real boto3 client, and a small Auto Scaling
group built in it: a launch template and an ASG with running instances."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

REGION = "us-east-1"


class MotoServer:
    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""
        self._image_id = ""

    def __enter__(self) -> MotoServer:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
        inner = self._server._server
        if inner is not None:
            inner.server_close()

    def image_id(self) -> str:
        """An image moto knows (looked up once: the listing is large)."""
        if not self._image_id:
            ec2 = self.client("ec2")
            try:
                images = ec2.describe_images(Owners=["amazon"], MaxResults=5)["Images"]
            finally:
                ec2.close()
            self._image_id = images[0]["ImageId"]
        return self._image_id

    def client(self, service: str) -> Any:
        session: Any = boto3.session.Session(region_name=REGION)
        return session.client(service, endpoint_url=self.endpoint_url)


@dataclass(frozen=True)
class Group:
    name: str
    instance_ids: tuple[str, ...]


def make_group(aws: MotoServer, *, size: int = 2) -> Group:
    """A launch template and an Auto Scaling group of ``size`` running instances."""
    ec2 = aws.client("ec2")
    autoscaling = aws.client("autoscaling")
    try:
        image_id = aws.image_id()
        name = "web-" + uuid.uuid4().hex[:8]
        ec2.create_launch_template(
            LaunchTemplateName=name,
            LaunchTemplateData={"ImageId": image_id, "InstanceType": "t3.micro"},
        )
        autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=name,
            LaunchTemplate={"LaunchTemplateName": name, "Version": "$Latest"},
            MinSize=0,
            MaxSize=size + 2,
            DesiredCapacity=size,
            AvailabilityZones=[f"{REGION}a"],
            HealthCheckGracePeriod=0,
        )
        return Group(name, group_instances(aws, name))
    finally:
        ec2.close()
        autoscaling.close()


def group_instances(aws: MotoServer, name: str) -> tuple[str, ...]:
    autoscaling = aws.client("autoscaling")
    try:
        group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
        return tuple(i["InstanceId"] for i in group["AutoScalingGroups"][0]["Instances"])
    finally:
        autoscaling.close()


@pytest.fixture(scope="module", name="aws")
def aws_server() -> Iterator[MotoServer]:
    """moto's server for a test module, with throw-away credentials."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        with MotoServer() as server:
            yield server
