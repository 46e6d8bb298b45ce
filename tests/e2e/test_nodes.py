"""Nodes come and go: a node whose lease expires stops being a placement target and its named
instances are placed again on their next request; a restarted agent adopts its containers."""

from __future__ import annotations

import json
import signal
import subprocess

import aiohttp
import docker
import pytest

from tests.e2e.harness import PORTSIDE, Cluster
from tests.e2e.test_named_instances import config, containers_of, get
from tests.support import eventually

pytestmark = pytest.mark.e2e


def node_ids(cluster: Cluster) -> list[str]:
    out = subprocess.run(
        [*PORTSIDE, "nodes", "--json", "--controlplane", cluster.controlplane_address],
        capture_output=True,
        text=True,
        check=True,
    )
    return [n["id"] for n in json.loads(out.stdout)]


async def test_lost_node_is_no_target_and_its_instances_move_on_next_request(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane("--node-ttl", "2")
    cluster.deploy(config(test_image))
    fra = cluster.start_agent("fra", "127.0.0.2")
    cluster.start_agent("sin", "127.0.0.3")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(2)
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        status, before, _ = await get(s, f"{base}/session/whoami", "roamer")
        assert status == 200
        (first,) = containers_of(docker_client, "roamer", cluster)
        assert "-fra-" in first.labels["portside.node"]

        cluster.stop(fra, signal.SIGKILL)  # no goodbye: the lease has to expire
        await eventually(
            lambda: len(node_ids(cluster)) <= 1,
            within=10,
            every=0.2,
            what="the dead node's lease expired",
        )
        assert all("-sin-" in n for n in node_ids(cluster))

        # The edge still caches the fra node: its connect fails, it resolves again and retries.
        status, after, _ = await get(s, f"{base}/session/whoami", "roamer")
        assert status == 200, after
        assert after != before
        moved = [
            c
            for c in containers_of(docker_client, "roamer", cluster)
            if "-sin-" in c.labels["portside.node"]
        ]
        assert len(moved) == 1
        status, _, _ = await get(s, f"{base}/session/whoami", "newcomer")
        assert status == 200
        (newcomer,) = containers_of(docker_client, "newcomer", cluster)
        assert "-sin-" in newcomer.labels["portside.node"]


async def test_restarted_agent_adopts_its_running_containers(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    agent = cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        status, before, _ = await get(s, f"{base}/session/whoami", "kept")
        assert status == 200
        assert cluster.stop(agent) == 0
        (container,) = containers_of(docker_client, "kept", cluster)
        container.reload()
        assert container.status == "running"  # stopping the agent leaves its containers be

        cluster.restart(agent)
        cluster.wait_for_nodes(1)
        status, after, _ = await get(s, f"{base}/session/whoami", "kept")
        assert status == 200 and after == before
        assert [c.id for c in containers_of(docker_client, "kept", cluster)] == [container.id]
        assert "adopted 1 containers (1 running)" in cluster.procs[-1].log_text()
