"""A rollout's replace on a real agent: a control plane on loopback asks, in its heartbeat replies,
for a named instance of version 1 (the echo image) to be replaced after its class moved to version
2; the agent drains the old container's request in flight, makes a container of version 2 (label
portside.version=2), removes the old one, and a request sent during the replace is served by the
new container."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import docker
import pytest
from prometheus_client import REGISTRY

from nodeagent.agent import Heartbeat
from nodeagent.events import EventOutbox
from nodeagent.fence import Fence
from nodeagent.instances import InstanceManager, Timing
from nodeagent.pools import PoolKeeper, UsageSampler
from nodeagent.proxy import DataPlane
from nodeagent.runtime import DockerRuntime
from nodeagent.runtime.labels import LABEL_INSTANCE_ID, LABEL_VERSION
from portside import net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from portside.spec import INSTANCE_TYPES, ContainerClass, Node, instance_id
from tests.images.build import ECHO_IMAGE
from tests.support import eventually

pytestmark = pytest.mark.integration


V1 = ContainerClass(
    "echo",
    ECHO_IMAGE,
    instance_type=INSTANCE_TYPES["lite"],
    sleep_after_s=60.0,
    boot_timeout_s=10.0,
    env={"RELEASE": "one"},
    version=1,
    stop_timeout_s=30.0,
)
V2 = dataclasses.replace(V1, env={"RELEASE": "two"}, version=2, wake_min_version=2)
IID = instance_id("echo", "a")


class ControlPlane(cp_grpc.ControlPlaneServicer):
    """Confirms every heartbeat's lease (reconciled at once) and asks, in every reply, for the
    instances in `replace` to be replaced; records the events and counts the replies."""

    def __init__(self) -> None:
        self.replace: list[str] = []
        self.events: list[pb.Event] = []
        self.replies = 0

    async def NodeHeartbeat(
        self, request_iterator: AsyncIterator[cp.NodeHeartbeatRequest], context: Any
    ) -> AsyncIterator[cp.NodeHeartbeatResponse]:
        async for message in request_iterator:
            self.events.extend(message.events)
            self.replies += 1
            yield cp.NodeHeartbeatResponse(
                lease_ttl_seconds=30,
                lease_confirmed=True,
                reconciled=True,
                fence_after_seconds=20,
                replace=self.replace,
            )


@dataclasses.dataclass
class Agent:
    control: ControlPlane
    classes: dict[str, ContainerClass]
    manager: InstanceManager
    heartbeat: Heartbeat
    url: str
    session: aiohttp.ClientSession

    async def get(self, path: str) -> tuple[int, str]:
        headers = {"Portside-Class": "echo", "Portside-Instance": "a"}
        async with self.session.get(f"{self.url}{path}", headers=headers) as r:
            return r.status, await r.text()


@pytest.fixture
async def agent(node_id: str, echo_image: str) -> AsyncIterator[Agent]:
    control = ControlPlane()
    server = net.grpc_server()
    cp_grpc.add_ControlPlaneServicer_to_server(control, server)
    address = f"127.0.0.1:{net.free_port()}"
    net.add_grpc_port(server, address)
    await server.start()
    classes: dict[str, ContainerClass] = {"echo": V1}
    runtime = DockerRuntime(node_id)
    outbox = EventOutbox()
    manager = InstanceManager(
        runtime,
        classes.get,
        on_event=outbox.put,
        node_id=node_id,
        timing=Timing(reconcile=0.5),
    )
    await manager.adopt()
    loops = asyncio.create_task(manager.run())
    fence = Fence()
    data = f"127.0.0.1:{net.free_port()}"
    plane = DataPlane(manager, classes.get, fence=fence)
    await plane.listen(data)
    node = Node(node_id, data, address, "weur", 50.0, 8.0, 2.0, 1024)
    channel = net.grpc_channel(address)
    keeper = PoolKeeper(manager, classes.get)
    heartbeat = Heartbeat(
        channel, node, manager, UsageSampler(manager, runtime), keeper, outbox, fence=fence
    )
    outbox.wake = heartbeat.changed
    beat = asyncio.create_task(heartbeat.run())
    session = aiohttp.ClientSession()
    try:
        await eventually(lambda: not fence.fenced, what="the first reconcile")
        yield Agent(control, classes, manager, heartbeat, f"http://{data}", session)
    finally:
        await session.close()
        await plane.close()
        await heartbeat.leave(beat)
        await keeper.close()
        await channel.close()
        await server.stop(0)
        loops.cancel()
        await manager.close()
        await runtime.close()


def containers_of(client: docker.DockerClient, iid: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE_ID}={iid}"}))


def replaced(outcome: str) -> float:
    labels = {"class": "echo", "outcome": outcome}
    return REGISTRY.get_sample_value("portside_agent_replacements_total", labels) or 0.0


async def test_a_replace_makes_a_new_version_while_requests_wait_for_it(
    agent: Agent, docker_client: docker.DockerClient
) -> None:
    ok = replaced("ok")
    status, body = await agent.get("/whoami")
    assert status == 200
    (old,) = containers_of(docker_client, IID)
    assert old.labels[LABEL_VERSION] == "1" and body.split()[0] == old.id[:12]

    # A request in flight on the old container when the rollout asks: it must finish there.
    slow = asyncio.create_task(agent.get("/slow?2"))
    await eventually(lambda: agent.manager.info(IID).in_flight == 1)
    agent.classes["echo"] = V2  # the control plane's config brought version 2
    agent.control.replace = [IID]
    agent.heartbeat.changed()  # a message now, so that its reply asks at once
    await eventually(lambda: agent.manager._instances[IID].replace_gate is not None)  # noqa: SLF001

    # A request during the replace waits for the new container and is served by it.
    status, body = await agent.get("/whoami")
    assert status == 200, body
    assert await slow == (200, "slept 2"), "the request in flight finished before SIGTERM"
    (new,) = containers_of(docker_client, IID)  # never two: the old one is gone
    assert new.id != old.id and body.split()[0] == new.id[:12]
    assert new.labels[LABEL_VERSION] == "2"
    assert "RELEASE=two" in new.attrs["Config"]["Env"]
    info = agent.manager.info(IID)
    assert info.version == 2 and info.state.running

    # The rollout asks again on every reply until it sees version 2: nothing more happens.
    replies = agent.control.replies
    for _ in range(3):
        agent.heartbeat.changed()
        await asyncio.sleep(0.2)
    assert agent.control.replies > replies
    (still,) = containers_of(docker_client, IID)
    assert still.id == new.id
    assert replaced("ok") == ok + 1
    await eventually(lambda: any(e.kind == "replaced" for e in agent.control.events))
    event = next(e for e in agent.control.events if e.kind == "replaced")
    assert event.reason.startswith("version 1 → 2") and event.name == "a"
    kinds = [e.kind for e in agent.control.events]
    assert kinds[kinds.index("replaced") :][:3] == ["replaced", "starting", "ready"]


async def test_a_sleeping_instance_older_than_wake_min_version_wakes_fresh(
    agent: Agent, docker_client: docker.DockerClient
) -> None:
    agent.classes["echo"] = dataclasses.replace(V1, sleep_after_s=0.5)
    assert await agent.get("/state?write=kept") == (200, "wrote kept")
    await eventually(lambda: agent.manager.info(IID).state.value == "sleeping")
    (old,) = containers_of(docker_client, IID)
    # --rollout none: version 2 without a wake floor wakes the old container, layer kept.
    agent.classes["echo"] = dataclasses.replace(V2, sleep_after_s=0.5, wake_min_version=0)
    assert await agent.get("/state") == (200, "kept")
    assert [c.id for c in containers_of(docker_client, IID)] == [old.id]
    await eventually(lambda: agent.manager.info(IID).state.value == "sleeping")
    # A rollout to version 2 set the floor: the wake makes a new container, its layer fresh.
    agent.classes["echo"] = dataclasses.replace(V2, sleep_after_s=0.5)
    status, _ = await agent.get("/state")
    assert status == 404, "the writable layer starts fresh"
    (new,) = containers_of(docker_client, IID)
    assert new.id != old.id and new.labels[LABEL_VERSION] == "2"
    await eventually(lambda: any(e.kind == "replaced" for e in agent.control.events))
    event = next(e for e in agent.control.events if e.kind == "replaced")
    assert "writable layer starts fresh" in event.reason
