"""Health checks end to end on real processes and Docker: a pool of two behind an edge; one member's
check starts failing, so the edge stops sending it requests (every answer comes from the other)
and `portside ps` shows it running while the other is healthy; once its check passes again it is
healthy and back in routing."""

from __future__ import annotations

import json

import aiohttp
import docker
import pytest

from nodeagent.runtime.labels import LABEL_CLASS, LABEL_INSTANCE, LABEL_NODE
from tests.e2e.harness import Cluster
from tests.e2e.test_cli import ok, portside
from tests.integration.test_health_checks import SICKABLE_ENTRYPOINT
from tests.support import eventually

pytestmark = pytest.mark.e2e


def config(image: str) -> str:
    # A fixed pool of two (a CPU target no test load reaches), checked twice a second: two
    # failures in a row (one second) make a member unhealthy.
    return f"""
[[containers]]
class_name = "Sickable"
image = "{image}"
instance_type = "lite"
entrypoint = {json.dumps(list(SICKABLE_ENTRYPOINT))}
ping_endpoint = "cgi-bin/ping"
health_check_interval = "500ms"
health_check_failures = 2
health_check_timeout = "400ms"

[containers.autoscaling]
minimum_instances = 2
maximum_instances = 2
cpu_target = 90

[[routes]]
path = "/cgi-bin"
class_name = "Sickable"
"""


def members(client: docker.DockerClient, cluster: Cluster) -> dict[str, str]:
    """The pool's running containers on this test's node: short id (its hostname) → name."""
    found = client.api.containers(filters={"label": f"{LABEL_CLASS}=Sickable"})
    return {
        c["Id"][:12]: c["Labels"][LABEL_INSTANCE]
        for c in found
        if c["Labels"][LABEL_NODE].startswith(cluster.tag + "-")
    }


def states(cluster: Cluster) -> dict[str, str]:
    listed = json.loads(ok(portside(cluster, "ps", "--json", "--class", "Sickable")))
    return {i["name"]: i["state"] for i in listed}


async def answered_by(session: aiohttp.ClientSession, edge: str, count: int) -> list[str]:
    """Which containers answered `count` requests through the edge (all must succeed)."""
    hosts = []
    for _ in range(count):
        async with session.get(f"http://{edge}/cgi-bin/whoami") as r:
            text = await r.text()
            assert r.status == 200, (r.status, text)
            hosts.append(text.split()[0])
    return hosts


async def test_a_member_failing_its_check_leaves_routing_until_it_passes(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra").address
    cluster.wait_for_nodes(1)
    await eventually(
        lambda: len(members(docker_client, cluster)) == 2, within=30, what="a pool of two"
    )
    pool = members(docker_client, cluster)
    await eventually(
        lambda: set(states(cluster).values()) == {"healthy"}, within=20, what="both healthy"
    )

    async with aiohttp.ClientSession() as session:
        # Both serve: the edge picks between two ready members at random.
        async def both_serve() -> bool:
            return set(await answered_by(session, edge, 20)) == set(pool)

        await eventually(both_serve, within=20, what="both members answer through the edge")

        async with session.get(f"http://{edge}/cgi-bin/sick") as r:
            assert r.status == 200
            sick_host = (await r.text()).split()[0]
        sick = pool[sick_host]
        (well_host,) = set(pool) - {sick_host}
        well = pool[well_host]

        # Two failed checks (a second), then the heartbeat, the control plane and the edge's
        # pool watch: from then on every request goes to the other member.
        await eventually(
            lambda: states(cluster) == {sick: "running", well: "healthy"},
            within=15,
            what="the sick member shown running, the other healthy",
        )
        table = ok(portside(cluster, "ps", "--class", "Sickable"))
        rows = {line.split()[1]: line.split()[2] for line in table.splitlines()[1:]}
        assert rows == {sick: "running", well: "healthy"}, table

        async def only_the_well_one() -> bool:
            return set(await answered_by(session, edge, 10)) == {well_host}

        await eventually(only_the_well_one, within=10, what="the edge routes around it")
        assert set(await answered_by(session, edge, 40)) == {well_host}
        # It still runs, untouched: out of routing, not replaced.
        assert members(docker_client, cluster) == pool

        # Its check passes again: healthy, and back in routing.
        healed = ok(portside(cluster, "exec", "Sickable", sick, "--", "rm", "-f", "/tmp/sick"))
        assert healed == ""
        await eventually(
            lambda: set(states(cluster).values()) == {"healthy"}, within=15, what="healed"
        )
        await eventually(both_serve, within=20, what="both members answer again")
    assert members(docker_client, cluster) == pool
