"""Fencing: a named instance has at most one live copy. A node that was out of touch longer than
its lease (frozen, or its agent dead) finds on its return that its instances were placed
elsewhere meanwhile, and removes its copies without ever serving them again."""

from __future__ import annotations

import signal

import aiohttp
import docker
import pytest

from tests.e2e.harness import Cluster, Proc
from tests.e2e.test_named_instances import config, get
from tests.e2e.test_nodes import node_ids
from tests.support import eventually

pytestmark = pytest.mark.e2e

NODE_TTL = "4"  # seconds: the fence closes at 2.8 s, the lease ends at 4 s


async def metric(session: aiohttp.ClientSession, agent: Proc, name: str) -> float:
    async with session.get(f"http://{agent.option('--metrics-listen')}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def on_node(client: docker.DockerClient, name: str, cluster: Cluster, region: str) -> list[str]:
    """Ids of the instance's containers on the node of `region`. One listing call (sparse: no
    inspect per container), so a container removed meanwhile cannot fail the look."""
    found = client.containers.list(
        all=True, sparse=True, filters={"label": f"portside.instance={name}"}
    )
    node = f"{cluster.tag}-{region}-"
    return [c.id for c in found if c.attrs["Labels"]["portside.node"].startswith(node)]


async def test_a_thawed_node_removes_the_instance_that_moved_and_never_serves_it(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane("--node-ttl", NODE_TTL)
    cluster.deploy(config(test_image))
    fra = cluster.start_agent("fra", "127.0.0.2")
    cluster.start_agent("sin", "127.0.0.3")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(2)
    async with aiohttp.ClientSession() as s:
        status, first, _ = await get(s, f"http://{edge.address}/session/whoami", "roamer")
        assert status == 200, first
        assert on_node(docker_client, "roamer", cluster, "fra")

        fra.popen.send_signal(signal.SIGSTOP)  # a VM pause: the host still accepts connections
        try:
            await eventually(
                lambda: all("-fra-" not in n for n in node_ids(cluster)),
                within=15,
                what="the frozen node's lease expired",
            )
            # A new edge knows nothing of fra: its resolve places roamer anew, on sin.
            other = cluster.start_edge("fra")
            status, moved, _ = await get(s, f"http://{other.address}/session/whoami", "roamer")
            assert status == 200, moved
            assert moved != first
            assert on_node(docker_client, "roamer", cluster, "sin")
            assert on_node(docker_client, "roamer", cluster, "fra"), "the frozen copy is there"
        finally:
            fra.popen.send_signal(signal.SIGCONT)

        # Back from its pause, fra's agent hears that its lease was renewed anew, reconciles,
        # and removes its copy of roamer: from then on only sin's copy exists.
        await eventually(
            lambda: not on_node(docker_client, "roamer", cluster, "fra"),
            within=20,
            what="the thawed node removed its copy of the moved instance",
        )
        assert await metric(s, fra, "portside_agent_reconcile_removed_total") == 1
        assert await metric(s, fra, "portside_agent_fenced") == 0
        assert len(on_node(docker_client, "roamer", cluster, "sin")) == 1
        # Every edge now reaches the one copy: the same answer through both.
        for address in (edge.address, other.address):
            status, text, _ = await get(s, f"http://{address}/session/whoami", "roamer")
            assert (status, text) == (200, moved)


async def test_a_restarted_agent_never_serves_what_was_placed_elsewhere_while_it_was_down(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane("--node-ttl", NODE_TTL)
    cluster.deploy(config(test_image))
    fra = cluster.start_agent("fra", "127.0.0.2")
    cluster.start_agent("sin", "127.0.0.3")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(2)
    async with aiohttp.ClientSession() as s:
        for name in ("leaver", "stayer"):
            status, text, _ = await get(s, f"http://{edge.address}/session/whoami", name)
            assert status == 200, text
        _, stayer_before, _ = await get(s, f"http://{edge.address}/session/whoami", "stayer")

        cluster.stop(fra, signal.SIGKILL)  # its containers keep running, unreachable
        await eventually(
            lambda: all("-fra-" not in n for n in node_ids(cluster)),
            within=15,
            what="the dead node's lease expired",
        )
        status, moved, _ = await get(s, f"http://{edge.address}/session/whoami", "leaver")
        assert status == 200, moved
        assert on_node(docker_client, "leaver", cluster, "sin")

        fra = cluster.restart(fra)  # adopts both containers; must serve only stayer
        cluster.wait_for_nodes(2)
        await eventually(
            lambda: not on_node(docker_client, "leaver", cluster, "fra"),
            within=15,
            what="the restarted agent removed its copy of the moved instance",
        )
        status, text, _ = await get(s, f"http://{edge.address}/session/whoami", "leaver")
        assert (status, text) == (200, moved)
        # stayer was never placed elsewhere: it is still fra's, same container, served again.
        status, text, _ = await get(s, f"http://{edge.address}/session/whoami", "stayer")
        assert (status, text) == (200, stayer_before)
        assert on_node(docker_client, "stayer", cluster, "fra")
