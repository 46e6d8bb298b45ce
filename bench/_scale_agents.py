"""Simulated node agents for bench/scale.py: many heartbeat streams from one process, each
behaving like nodeagent/agent.py on the wire (the node in the first message, then a message
every min(lease / 3, CPU sample interval) s, a new stream a second after one breaks), with no
containers behind them. The parent drives a worker through a pipe: "stats", "reset", "stop".
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc

from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from portside.spec import CPU_SAMPLE_INTERVAL_S

# Streams share connections as an edge's or a NAT's agents would not; several connections per
# worker keep one HTTP/2 connection's flow control from being what is measured.
STREAMS_PER_CONNECTION = 250
RECONNECT_S = 1.0  # as the agent's backoff starts


@dataclass(frozen=True)
class FakeNode:
    """What a simulated agent registers: where it is and how big it is."""

    id: str
    region: str
    latitude: float
    longitude: float
    vcpu: float
    memory_mib: int

    def to_pb(self) -> pb.Node:
        return pb.Node(
            id=self.id,
            # Never contacted: the benchmark resolves names and watches routes, nothing boots.
            data_address="127.0.0.1:9",
            api_address="127.0.0.1:9",
            region=self.region,
            latitude=self.latitude,
            longitude=self.longitude,
            vcpu=self.vcpu,
            memory_mib=self.memory_mib,
        )


@dataclass
class Tally:
    """What the worker's streams saw since the last reset."""

    registered: set[str] = field(default_factory=set)  # nodes whose first reply came
    replies: int = 0
    unconfirmed: int = 0  # replies saying the lease was not refreshed
    renewed: int = 0  # reconciling replies after the first: the lease had expired
    broken: int = 0  # streams that ended in an error
    rtt: list[float] = field(default_factory=list)  # message sent -> its reply, seconds

    def reset(self) -> None:
        """Start counting afresh; who is registered is the streams' state, kept."""
        self.replies = self.unconfirmed = self.renewed = self.broken = 0
        self.rtt = []

    def report(self) -> dict[str, Any]:
        return {
            "registered": len(self.registered),
            "replies": self.replies,
            "unconfirmed": self.unconfirmed,
            "renewed": self.renewed,
            "broken": self.broken,
            "rtt": self.rtt,
        }


async def _heartbeats(
    stub: cp_grpc.ControlPlaneStub, node: FakeNode, tally: Tally, stop: asyncio.Event
) -> None:
    """One node's heartbeat streams until `stop`."""
    first = node.to_pb()
    period = CPU_SAMPLE_INTERVAL_S
    sent: list[float] = []

    async def messages() -> AsyncIterator[cp.NodeHeartbeatRequest]:
        sent.append(time.perf_counter())
        yield cp.NodeHeartbeatRequest(node=first)
        # Spread over the period, as agents started at different times are.
        delay = random.uniform(0, period)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            delay = period
            sent.append(time.perf_counter())
            yield cp.NodeHeartbeatRequest()

    while not stop.is_set():
        sent.clear()
        replies = 0
        try:
            async for reply in stub.NodeHeartbeat(messages()):
                now = time.perf_counter()
                if sent:
                    tally.rtt.append(now - sent.pop(0))
                tally.replies += 1
                tally.unconfirmed += not reply.lease_confirmed
                tally.renewed += replies > 0 and reply.reconciled
                if replies == 0:
                    tally.registered.add(node.id)
                replies += 1
                period = max(0.2, min(reply.lease_ttl_seconds / 3, CPU_SAMPLE_INTERVAL_S))
            return
        except grpc.aio.AioRpcError:
            tally.broken += 1
            tally.registered.discard(node.id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RECONNECT_S)


async def _run(conn: Connection, address: str, nodes: list[FakeNode], join_per_s: float) -> None:
    tally = Tally()
    stop = asyncio.Event()
    channels = [
        # Its own subchannel pool: one TCP connection per channel, not one shared by all.
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, len(nodes) // STREAMS_PER_CONNECTION))
    ]
    tasks = []
    for i, node in enumerate(nodes):
        stub = cp_grpc.ControlPlaneStub(channels[i % len(channels)])
        tasks.append(asyncio.create_task(_heartbeats(stub, node, tally, stop)))
        await asyncio.sleep(1 / join_per_s)  # nodes join at a bounded rate, not all at once
    while True:
        command = await asyncio.to_thread(conn.recv)
        if command == "stats":
            conn.send(tally.report())
        elif command == "reset":
            tally.reset()
            conn.send(None)
        elif command == "stop":
            break
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    for channel in channels:
        await channel.close()
    conn.send(tally.report())


def run_worker(conn: Connection, address: str, nodes: list[FakeNode], join_per_s: float) -> None:
    """The entry of a worker process: `nodes`' heartbeats to the control plane at `address`."""
    asyncio.run(_run(conn, address, nodes, join_per_s))
