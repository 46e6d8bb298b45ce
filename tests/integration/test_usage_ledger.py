"""Usage in a real store (etcd on loopback, SQLite in a file): replicas adding at once lose
nothing, and a batch whose heartbeat reply was lost is sent again and counted once."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from controlplane import records
from controlplane.store import Store, open_store
from controlplane.usage import UsageLedger
from nodeagent.agent import Heartbeat
from nodeagent.instances import InstanceManager, Timing
from nodeagent.pools import PoolKeeper, UsageSampler
from nodeagent.runtime import DockerRuntime
from nodeagent.usage import Size, UsageMeter
from portside import net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.convert import usage_from_pb
from portside.errors import InvalidArgument
from portside.spec import Node
from portside.usage import Usage
from tests.support import eventually

pytestmark = pytest.mark.integration

ONE_SECOND = Usage(
    class_name="",
    day="",
    running_ms=1000,
    vcpu_seconds=0.25,
    memory_gib_seconds=1.0,
    disk_gb_seconds=4.0,
    cpu_seconds_used=0.125,
    egress_bytes=100,
)


@pytest.fixture(params=["etcd", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "etcd":
        return cast(str, request.getfixturevalue("etcd_url"))
    return f"sqlite://{tmp_path / 'state.db'}"


@pytest.fixture
def class_name() -> str:
    return "UsageTest" + uuid.uuid4().hex[:8]  # its own keys under usage/ in a shared etcd


@pytest.fixture
async def store(store_url: str, class_name: str) -> AsyncIterator[Store]:
    opened = await open_store(store_url)
    yield opened
    kvs, _ = await opened.range(f"{records.USAGE}{class_name}/")
    for kv in kvs:
        await opened.delete(kv.key)
    await opened.close()


def report(class_name: str, day: str = "2026-11-27", iid: str = "i1") -> Usage:
    return dataclasses.replace(ONE_SECOND, class_name=class_name, day=day, instance_id=iid)


async def test_replicas_adding_at_once_lose_nothing(
    store: Store, store_url: str, class_name: str
) -> None:
    # Four clients of etcd; SQLite allows one opener, whose concurrent tasks race just as well.
    shared = store_url.startswith("sqlite://")
    others = [store if shared else await open_store(store_url) for _ in range(3)]
    try:
        ledgers = [UsageLedger(s) for s in (store, *others)]
        await asyncio.gather(
            *(
                ledgers[n % 4].add(f"agent-{n}", 1, [report(class_name, iid=f"i{n}")] * 2)
                for n in range(20)
            )
        )
    finally:
        if not shared:
            for s in others:
                await s.close()
    (day,) = await UsageLedger(store).read(class_name)
    assert day.use.running_ms == 40_000
    assert day.use.egress_bytes == 4000
    assert day.use.vcpu_seconds == pytest.approx(10.0)


async def test_a_batch_sent_again_is_added_once_and_reads_filter(
    store: Store, class_name: str
) -> None:
    ledger = UsageLedger(store)
    batch = [report(class_name, "2026-11-27"), report(class_name, "2026-11-28")]
    assert await ledger.add("agent", 1, batch) == 2
    assert await ledger.add("agent", 1, batch) == 0
    assert await ledger.add("agent", 2, batch[1:]) == 1
    days = await ledger.read(class_name)
    assert [(d.day, d.use.running_ms) for d in days] == [("2026-11-27", 1000), ("2026-11-28", 2000)]
    assert [d.day for d in await ledger.read(class_name, since="2026-11-28")] == ["2026-11-28"]
    with pytest.raises(InvalidArgument):
        await ledger.read(class_name, since="yesterday")


class LossyControlPlane(cp_grpc.ControlPlaneServicer):
    """Adds each message's usage like the real one, but breaks the stream after adding the
    first batch and before answering it: the agent never hears that it was counted."""

    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger
        self.broke = False
        self.sequences: list[int] = []  # of each batch as it arrived
        self.added = 0  # batches the ledger has finished adding

    async def NodeHeartbeat(
        self, request_iterator: AsyncIterator[cp.NodeHeartbeatRequest], context: Any
    ) -> AsyncIterator[cp.NodeHeartbeatResponse]:
        async for message in request_iterator:
            if message.usage:
                self.sequences.append(message.usage_sequence)
                await self.ledger.add(
                    message.usage_source,
                    message.usage_sequence,
                    [usage_from_pb(u) for u in message.usage],
                )
                self.added += 1
                if not self.broke:
                    self.broke = True
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "reply lost")
            yield cp.NodeHeartbeatResponse(lease_ttl_seconds=30)


async def test_usage_whose_reply_was_lost_is_counted_once(
    store: Store, class_name: str, node_id: str
) -> None:
    ledger = UsageLedger(store)
    control = LossyControlPlane(ledger)
    server = net.grpc_server()
    cp_grpc.add_ControlPlaneServicer_to_server(control, server)
    address = f"127.0.0.1:{net.free_port()}"
    net.add_grpc_port(server, address)
    await server.start()
    runtime = DockerRuntime(node_id)
    manager = InstanceManager(
        runtime, lambda _: None, node_id=node_id, timing=Timing(reconcile=3600)
    )
    mono = [0.0]
    meter = UsageMeter(clock=lambda: mono[0], wall_clock=lambda: 1_795_780_800.0 + mono[0])
    meter.run_began("i1", class_name, "a", "c1", Size(0.25, 1024, 4000))
    mono[0] = 2.0
    meter.run_ended("i1")  # 2 s, all of it in the first batch
    node = Node(node_id, "127.0.0.1:1", address, "weur", 50.0, 8.0, 2.0, 1024)
    channel = net.grpc_channel(address)
    heartbeat = Heartbeat(
        channel,
        node,
        manager,
        UsageSampler(manager, runtime),
        PoolKeeper(manager, lambda _: None),
        meter=meter,
    )
    beat = asyncio.create_task(heartbeat.run())
    try:
        await eventually(
            lambda: control.added >= 2, within=10, what="the batch sent again was added"
        )
    finally:
        await heartbeat.leave(beat)
        await channel.close()
        await server.stop(0)
        await manager.close()
        await runtime.close()
    assert control.sequences[:2] == [1, 1]  # the same batch, sent again
    (day,) = await ledger.read(class_name)
    assert day.use.running_ms == 2000
