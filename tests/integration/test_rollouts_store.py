"""Rollouts against a real store (etcd on loopback, SQLite in a file) and the real control-plane
service over gRPC: Deploy starts them, the leader's loop moves them from what nodes report on
their heartbeat streams, and the heartbeat replies carry `replace`. No agent: the test reports
instances as an agent would, on the real NodeHeartbeat stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from controlplane import records
from controlplane.agents import AgentClients
from controlplane.events import EventLog
from controlplane.leader import LeaderElection
from controlplane.lifecycle import Lifecycle
from controlplane.pools import PoolManager
from controlplane.rolloutloop import RolloutBook, RolloutLoop
from controlplane.rollouts import ROLLOUTS
from controlplane.service import ControlPlaneService
from controlplane.store import Store, open_store
from controlplane.versions import history, versions_prefix
from controlplane.view import ClusterView
from portside import net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.convert import config_to_pb, instance_status_to_pb, node_to_pb
from portside.instances import InstanceInfo, InstanceStatus
from portside.spec import Autoscaling, Config, ContainerClass, Node, instance_id
from portside.states import InstanceState as S

pytestmark = pytest.mark.integration

WAIT_S = 10.0


@pytest.fixture(params=["etcd", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "etcd":
        return cast(str, request.getfixturevalue("etcd_url"))
    return f"sqlite://{tmp_path / 'state.db'}"


@dataclass
class Cluster:
    """One control-plane replica (service, view, rollout book and loop) on a real store, a gRPC
    stub to it, and names of this test's own (etcd is shared)."""

    store: Store
    view: ClusterView
    stub: cp_grpc.ControlPlaneStub
    loop: RolloutLoop
    pools: PoolManager
    name: str = field(default_factory=lambda: "Roll" + uuid.uuid4().hex[:8])
    node_id: str = field(default_factory=lambda: "rnode-" + uuid.uuid4().hex[:8])

    def cls(self, image: str, **kw: Any) -> ContainerClass:
        return ContainerClass(name=self.name, image=image, max_instances=10, **kw)

    async def deploy(self, cls: ContainerClass, rollout: str = "") -> cp.DeployResponse:
        request = cp.DeployRequest(config=config_to_pb(Config(classes=(cls,))), rollout=rollout)
        return cast(cp.DeployResponse, await self.stub.Deploy(request))

    async def place(self, *names: str, pool: bool = False) -> list[str]:
        ids = []
        for name in names:
            iid = instance_id(self.name, name)
            rec = records.InstanceRecord(
                self.name, name, iid, self.node_id, 0.25, 256, placed_at=0.0, pool=pool
            )
            await self.store.put(records.instance_key(self.name, iid), rec.encode())
            ids.append(iid)
        await until(lambda: all(i in self.view.by_id for i in ids))
        return ids

    async def class_record(self) -> ContainerClass:
        kv = await self.store.get(records.class_key(self.name))
        assert kv is not None
        return records.decode_class(kv.value)

    async def rollout(self) -> cp.Rollout:
        reply = await self.stub.GetRollout(cp.GetRolloutRequest(class_name=self.name))
        return cast(cp.Rollout, reply.rollout)


class Heartbeats:
    """A node's heartbeat stream, as its agent keeps it: one message, one reply."""

    def __init__(self, stub: cp_grpc.ControlPlaneStub, node: Node) -> None:
        self.node = node
        self.outbox: asyncio.Queue[cp.NodeHeartbeatRequest] = asyncio.Queue()
        self.call = stub.NodeHeartbeat(self._messages())
        self.first = True

    async def _messages(self) -> AsyncIterator[cp.NodeHeartbeatRequest]:
        while True:
            yield await self.outbox.get()

    async def send(self, statuses: list[InstanceStatus]) -> cp.NodeHeartbeatResponse:
        message = cp.NodeHeartbeatRequest(instances=[instance_status_to_pb(s) for s in statuses])
        if self.first:
            message.node.CopyFrom(node_to_pb(self.node))
            self.first = False
        await self.outbox.put(message)
        return cast(cp.NodeHeartbeatResponse, await self.call.read())


async def until(check: Callable[[], bool]) -> None:
    """Poll `check` (what the view shows after the store's watch) until it holds."""
    async with asyncio.timeout(WAIT_S):
        while not check():  # noqa: ASYNC110 - the view signals no event per change
            await asyncio.sleep(0.02)


def status(
    c: Cluster, name: str, version: int, state: S = S.HEALTHY, *, pool: bool = False
) -> InstanceStatus:
    info = InstanceInfo(
        class_name=c.name,
        name=name,
        instance_id=instance_id(c.name, name),
        state=state,
        node_id=c.node_id,
        version=version,
        pool=pool,
    )
    return InstanceStatus(info, cpu_percent=10.0)


async def report(
    c: Cluster, beats: Heartbeats, statuses: list[InstanceStatus]
) -> cp.NodeHeartbeatResponse:
    """Send a heartbeat and wait until the view shows what it reported."""
    reply = await beats.send(statuses)
    want = {s.instance_id: (s.info.version, s.state) for s in statuses}

    def shown() -> bool:
        got = c.view.statuses.get(c.node_id, {})
        return all(
            iid in got and (got[iid].info.version, got[iid].state) == v for iid, v in want.items()
        )

    await until(shown)
    return reply


async def replace_reply(
    c: Cluster, beats: Heartbeats, statuses: list[InstanceStatus], want: int
) -> list[str]:
    """The `replace` of heartbeat replies, once it lists `want` ids (the book follows the
    record through the store's watch)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            reply = await beats.send(statuses)
            if len(reply.replace) == want:
                return list(reply.replace)
            await asyncio.sleep(0.05)


@pytest.fixture
async def cluster(store_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    store = await open_store(store_url)
    view = ClusterView(store)
    await view.load()
    book = RolloutBook(store, view)
    await book.load()
    follow = asyncio.create_task(view.follow())
    service = ControlPlaneService(
        store,
        view,
        node_ttl_s=10,
        default_region="fra",
        lifecycle=Lifecycle(store, view, AgentClients(view), EventLog(store), default_region="fra"),
        events=EventLog(store),
        rollouts=book,
    )
    server = net.grpc_server()
    cp_grpc.add_ControlPlaneServicer_to_server(service, server)
    address = f"127.0.0.1:{net.free_port()}"
    net.add_grpc_port(server, address)
    await server.start()
    leader = LeaderElection(store, "test")
    pools = PoolManager(store, view, leader, default_region="fra")
    loop = RolloutLoop(store, view, lambda: True, pools=pools)
    channel = grpc.aio.insecure_channel(address)
    c = Cluster(store, view, cp_grpc.ControlPlaneStub(channel), loop, pools)
    try:
        yield c
    finally:
        await channel.close()
        await server.stop(0)
        follow.cancel()
        for prefix in (
            records.class_key(c.name),
            records.instance_key(c.name, ""),
            versions_prefix(c.name),
            ROLLOUTS + c.name,
            records.node_key(c.node_id),
        ):
            kvs, _ = await store.range(prefix)
            for kv in kvs:
                await store.delete(kv.key)
        await store.close()


def node(c: Cluster) -> Node:
    return Node(c.node_id, "127.0.0.1:1", "127.0.0.1:2", "fra", 50.1, 8.7, 8.0, 8192)


async def test_a_gradual_rollout_moves_named_instances_through_heartbeat_replies(
    cluster: Cluster,
) -> None:
    c = cluster
    v1 = c.cls("web:1", rollout_step_percentage=(50, 100))
    await c.deploy(v1)
    names = ["a", "b", "c", "d"]
    ids = dict(zip(names, await c.place(*names), strict=True))
    beats = Heartbeats(c.stub, node(c))
    # b and d are busy: the idle ones go first.
    busy = {"b": 3, "d": 2}
    fleet = {n: status(c, n, 1) for n in names}
    fleet = {
        n: replace(s, info=replace(s.info, in_flight=busy.get(n, 0))) for n, s in fleet.items()
    }
    await report(c, beats, list(fleet.values()))

    deployed = await c.deploy(replace(v1, image="web:2"))
    assert [(r.to_version, list(r.from_versions), list(r.steps)) for r in deployed.rollouts] == [
        (2, [1], [50, 100])
    ]
    assert (await c.class_record()).wake_min_version == 2

    await c.loop.tick()
    first = await replace_reply(c, beats, list(fleet.values()), 2)
    assert sorted(first) == sorted([ids["a"], ids["c"]])
    assert (await c.rollout()).state == "rolling"

    # The agent replaced them: they report version 2, healthy. The step is done; the next asks
    # for the other two, and never again for a or c.
    for n in ("a", "c"):
        fleet[n] = status(c, n, 2)
    await report(c, beats, list(fleet.values()))
    await c.loop.tick()
    second = await replace_reply(c, beats, list(fleet.values()), 2)
    assert sorted(second) == sorted([ids["b"], ids["d"]])
    progress = await c.rollout()
    assert (progress.step, progress.instances, progress.updated, progress.healthy) == (1, 4, 2, 2)

    for n in ("b", "d"):
        fleet[n] = status(c, n, 2)
    await report(c, beats, list(fleet.values()))
    await c.loop.tick()
    done = await c.rollout()
    assert (done.state, done.updated, done.healthy) == ("done", 4, 4)
    assert await replace_reply(c, beats, list(fleet.values()), 0) == []


async def test_unhealthy_new_instances_roll_the_class_back(cluster: Cluster) -> None:
    c = cluster
    v1 = c.cls("web:1", rollout_health_deadline_s=5.0)
    await c.deploy(v1)
    ids = await c.place("a", "b")
    beats = Heartbeats(c.stub, node(c))
    await report(c, beats, [status(c, "a", 1), status(c, "b", 1)])
    deployed = await c.deploy(replace(v1, image="web:bad"), rollout="immediate")
    assert list(deployed.rollouts[0].steps) == [100]

    await c.loop.tick()
    assert sorted(await replace_reply(c, beats, [status(c, "a", 1), status(c, "b", 1)], 2)) == (
        sorted(ids)
    )
    bad = [status(c, "a", 2, S.STOPPED_WITH_CODE), status(c, "b", 2, S.HEALTHY)]
    await report(c, beats, bad)
    now = (await c.rollout()).started_at
    await c.loop.tick(now + 1)
    assert (await c.rollout()).state == "waiting"
    await c.loop.tick(now + 7)  # past the 5 s deadline

    back = await c.class_record()
    assert (back.version, back.image, back.wake_min_version) == (1, "web:1", 1)
    assert [v.number for v in await history(c.store, c.name)] == [1, 2]  # no new version
    rollback = await c.rollout()
    assert (rollback.mode, rollback.to_version, list(rollback.from_versions)) == (
        "rollback",
        1,
        [2],
    )
    assert rollback.reason.startswith("automatic rollback from version 2 to 1: ")
    assert "a (stopped_with_code) on version 2 not healthy within 5s" in rollback.reason
    await c.loop.tick(now + 8)
    # b runs version 2 and is replaced; a exited (not awake): it moves when it boots again.
    assert await replace_reply(c, beats, bad, 1) == [ids[1]]

    await report(c, beats, [status(c, "a", 1), status(c, "b", 1)])
    await c.loop.tick(now + 9)
    assert (await c.rollout()).state == "rolled_back"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await c.stub.ControlRollout(cp.ControlRolloutRequest(class_name=c.name, action="pause"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rolled_back: nothing to pause" in str(caught.value.details())


async def test_controls_rollback_and_a_deploy_without_rollout(cluster: Cluster) -> None:
    c = cluster
    for call, request, code in (
        (c.stub.GetRollout, cp.GetRolloutRequest(class_name=c.name), grpc.StatusCode.NOT_FOUND),
        (
            c.stub.Deploy,
            cp.DeployRequest(config=config_to_pb(Config(classes=(c.cls("x"),))), rollout="fast"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            c.stub.ControlRollout,
            cp.ControlRolloutRequest(class_name=c.name, action="pause"),
            grpc.StatusCode.NOT_FOUND,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request)
        assert caught.value.code() == code

    v1 = c.cls("web:1")
    await c.deploy(v1)
    await c.place("a", "b", "c")
    beats = Heartbeats(c.stub, node(c))
    fleet = [status(c, n, 1) for n in ("a", "b", "c")]
    await report(c, beats, fleet)
    await c.deploy(replace(v1, image="web:2"))
    assert (await c.class_record()).wake_min_version == 2

    paused = await c.stub.ControlRollout(
        cp.ControlRolloutRequest(class_name=c.name, action="pause")
    )
    assert paused.rollout.state == "paused"
    await c.loop.tick()
    assert await replace_reply(c, beats, fleet, 0) == []  # paused: nothing asked
    await c.stub.ControlRollout(cp.ControlRolloutRequest(class_name=c.name, action="resume"))
    await c.loop.tick()
    assert len(await replace_reply(c, beats, fleet, 1)) == 1  # 10% of 3
    aborted = await c.stub.ControlRollout(
        cp.ControlRolloutRequest(class_name=c.name, action="abort")
    )
    assert (aborted.rollout.state, aborted.rollout.reason) == ("aborted", "aborted by a user")
    assert (await c.class_record()).wake_min_version == 0  # as before the rollout
    assert await replace_reply(c, beats, fleet, 0) == []

    # rollout none: no rollout, and wake_min_version stays as it was.
    none = await c.deploy(replace(v1, image="web:3"), rollout="none")
    assert list(none.rollouts) == []
    three = await c.class_record()
    assert (three.version, three.wake_min_version) == (3, 0)

    back = await c.stub.Rollback(cp.RollbackRequest(class_name=c.name))
    assert (back.rollout.mode, back.rollout.to_version, list(back.rollout.steps)) == (
        "rollback",
        2,
        [100],
    )
    two = await c.class_record()
    assert (two.version, two.image, two.wake_min_version) == (2, "web:2", 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await c.stub.Rollback(cp.RollbackRequest(class_name=c.name, version=9))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "kept: 1, 2, 3" in str(caught.value.details())
    gradual = await c.stub.Rollback(
        cp.RollbackRequest(class_name=c.name, version=1, rollout="gradual")
    )
    assert list(gradual.rollout.steps) == [10, 100]

    # A deploy while a rollout is in progress supersedes it.
    await c.deploy(replace(v1, image="web:4"))
    newest = await c.rollout()
    assert (newest.to_version, newest.mode, list(newest.from_versions)) == (4, "gradual", [1])


async def test_a_pool_member_is_replaced_by_surge(cluster: Cluster) -> None:
    c = cluster
    v1 = c.cls("web:1", autoscaling=Autoscaling(minimum_instances=2, maximum_instances=4))
    await c.deploy(v1)
    old = await c.place("p1", "p2", pool=True)
    beats = Heartbeats(c.stub, node(c))
    fleet = [status(c, n, 1, pool=True) for n in ("p1", "p2")]
    await report(c, beats, fleet)
    await c.deploy(replace(v1, image="web:2"), rollout="immediate")

    await c.loop.tick()
    # One member beyond the count, of version 2; no pool member is in a heartbeat's replace.
    await until(lambda: len(c.view.pool_members(c.name)) == 3)
    surge = next(r for r in c.view.pool_members(c.name) if r.instance_id not in old)
    assert await replace_reply(c, beats, fleet, 0) == []
    booting = status(c, surge.name, 2, S.STARTING, pool=True)
    await report(c, beats, [*fleet, booting])
    await c.loop.tick()
    assert not any(r.draining for r in c.view.pool_members(c.name))  # not ready: none drained

    await report(c, beats, [*fleet, status(c, surge.name, 2, pool=True)])
    await c.loop.tick()
    await until(lambda: sum(r.draining for r in c.view.pool_members(c.name)) == 1)
    drained = next(r for r in c.view.pool_members(c.name) if r.draining)
    assert drained.instance_id in old
    # The next tick counts the drained member out and starts the next surge, for the other.
    await c.loop.tick()
    progress = await c.rollout()
    assert (progress.updated, progress.instances) == (1, 2)
    await until(lambda: len(c.view.pool_members(c.name)) == 4)
    assert c.pools.surges[c.name].old_id == next(i for i in old if i != drained.instance_id)
