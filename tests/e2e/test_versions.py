"""Class versions: a deploy that changes what containers are made from makes the next version,
one that changes only runtime policy does not; `portside versions` lists them with the
instances running each."""

from __future__ import annotations

import json
import subprocess

import aiohttp
import pytest

from tests.e2e.harness import PORTSIDE, Cluster
from tests.e2e.test_named_instances import get
from tests.support import eventually

pytestmark = pytest.mark.e2e


def config(image: str, mark: str, sleep_after: str = "10m") -> str:
    return f"""
[[containers]]
class_name = "Echo"
image = "{image}"
instance_type = "lite"
sleep_after = "{sleep_after}"
env = {{ MARK = "{mark}" }}

[[routes]]
path = "/session"
class_name = "Echo"
instance = "header:X-Session-Id"
"""


def run_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PORTSIDE, *args, "--controlplane", cluster.controlplane_address],
        capture_output=True,
        text=True,
    )


def versions(cluster: Cluster) -> list[dict[str, object]]:
    out = run_cli(cluster, "versions", "Echo", "--json")
    assert out.returncode == 0, out.stderr
    listed: list[dict[str, object]] = json.loads(out.stdout)
    return listed


async def test_versions_follow_what_containers_are_made_from(
    cluster: Cluster, test_image: str
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image, "one"))
    cluster.deploy(config(test_image, "one", sleep_after="20m"))  # policy only: same version
    assert [(v["number"], v["changes"], v["current"]) for v in versions(cluster)] == [
        (1, ["new"], True)
    ]
    cluster.deploy(config(test_image, "two"))
    listed = versions(cluster)
    assert [(v["number"], v["changes"], v["current"]) for v in listed] == [
        (2, ["env"], True),
        (1, ["new"], False),
    ]
    spec = listed[0]["spec"]
    assert isinstance(spec, dict) and spec["env"] == {"MARK": "two"} and spec["version"] == 2

    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    async with aiohttp.ClientSession() as s:
        status, body, _ = await get(s, f"http://{edge.address}/session/whoami", "v")
    assert status == 200, body

    def one_instance_on_version_2() -> bool:
        counts = {v["number"]: v["instances"] for v in versions(cluster)}
        return counts == {2: 1, 1: 0}

    await eventually(one_instance_on_version_2, within=10, every=0.3, what="instance counted")

    table = run_cli(cluster, "versions", "Echo").stdout
    assert "current" in table and "env" in table
    missing = run_cli(cluster, "versions", "Nope")
    assert missing.returncode == 1 and "Nope" in missing.stderr, missing.stderr
