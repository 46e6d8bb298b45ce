"""Lifecycle events travel on the agent's heartbeat stream to a control plane on loopback: at
once when queued, and again after the stream broke before the control plane answered."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from nodeagent.agent import Heartbeat
from nodeagent.events import EventOutbox
from nodeagent.instances import InstanceManager, Timing
from nodeagent.pools import PoolKeeper, UsageSampler
from nodeagent.runtime import DockerRuntime
from portside import net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from portside.events import Event, EventKind
from portside.spec import INSTANCE_TYPES, ContainerClass, Node
from tests.images.build import ECHO_IMAGE
from tests.support import eventually

pytestmark = pytest.mark.integration

ECHO = ContainerClass("echo", ECHO_IMAGE, instance_type=INSTANCE_TYPES["lite"], boot_timeout_s=10.0)


class ControlPlane(cp_grpc.ControlPlaneServicer):
    """Records the events of every heartbeat message; `break_next` makes it fail the stream
    when the next message carrying events arrives, before answering it."""

    def __init__(self) -> None:
        self.events: list[pb.Event] = []
        self.break_next = False
        self.streams = 0

    async def NodeHeartbeat(
        self, request_iterator: AsyncIterator[cp.NodeHeartbeatRequest], context: Any
    ) -> AsyncIterator[cp.NodeHeartbeatResponse]:
        self.streams += 1
        async for message in request_iterator:
            if message.events and self.break_next:
                self.break_next = False
                await context.abort(grpc.StatusCode.UNAVAILABLE, "control plane restarting")
            self.events.extend(message.events)
            yield cp.NodeHeartbeatResponse(lease_ttl_seconds=30)


@dataclasses.dataclass
class Setup:
    control: ControlPlane
    manager: InstanceManager
    outbox: EventOutbox


@pytest.fixture
async def setup(node_id: str, echo_image: str) -> AsyncIterator[Setup]:
    control = ControlPlane()
    server = net.grpc_server()
    cp_grpc.add_ControlPlaneServicer_to_server(control, server)
    address = f"127.0.0.1:{net.free_port()}"
    net.add_grpc_port(server, address)
    await server.start()
    runtime = DockerRuntime(node_id)
    outbox = EventOutbox()
    manager = InstanceManager(
        runtime,
        {ECHO.name: ECHO}.get,
        on_event=outbox.put,
        node_id=node_id,
        timing=Timing(reconcile=3600),
    )
    node = Node(node_id, "127.0.0.1:1", address, "weur", 50.0, 8.0, 2.0, 1024)
    channel = net.grpc_channel(address)
    heartbeat = Heartbeat(
        channel,
        node,
        manager,
        UsageSampler(manager, runtime),
        PoolKeeper(manager, {ECHO.name: ECHO}.get),
        outbox,
    )
    heartbeat.period = 30.0  # only queued events and state changes send a message
    outbox.wake = heartbeat.changed
    beat = asyncio.create_task(heartbeat.run())
    try:
        yield Setup(control, manager, outbox)
    finally:
        await heartbeat.leave(beat)
        await channel.close()
        await server.stop(0)
        await manager.close()
        await runtime.close()


def kinds(control: ControlPlane) -> list[str]:
    return [e.kind for e in control.events]


async def test_events_are_sent_as_they_happen(setup: Setup) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await setup.manager.start(ECHO, "a")
    await eventually(lambda: kinds(setup.control) == ["starting", "ready"], within=2, every=0.01)
    assert loop.time() - started < 2, "a queued event wakes the heartbeat"
    ready = setup.control.events[-1]
    assert ready.class_name == "echo" and ready.name == "a" and ready.node_id and ready.time > 0


async def test_events_of_an_unanswered_message_are_sent_again(setup: Setup) -> None:
    await eventually(lambda: setup.control.streams == 1)  # registered
    setup.control.break_next = True
    setup.outbox.put(Event(EventKind.SLEPT, 1.0, "echo", "a", "id-a", "n1"))
    setup.outbox.put(Event(EventKind.EXITED, 2.0, "echo", "b", "id-b", "n1", exit_code=3))
    await eventually(lambda: kinds(setup.control) == ["slept", "exited"])
    assert setup.control.streams == 2
    assert setup.control.events[1].exit_code == 3 and not setup.control.events[0].HasField(
        "exit_code"
    )
