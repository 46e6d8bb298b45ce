"""A rollout's replace on the agent, over a fake runtime (no Docker): requests during a replace
wait for the new container, requests in flight on the old one finish first (bounded by the
class's stop_timeout), each instance is replaced once per version, one container at a time; a
sleeping instance older than wake_min_version wakes in a new container; a fenced agent replaces
nothing. tests/integration/test_agent_replace.py covers the real engine."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from nodeagent.agent import Heartbeat
from nodeagent.fence import Fence
from nodeagent.instances import InstanceManager, Upstream
from nodeagent.pools import PoolKeeper, UsageSampler
from nodeagent.runtime import ContainerInfo
from portside.api.v1 import controlplane_pb2 as cp
from portside.events import Event
from portside.spec import Autoscaling, ContainerClass, Node, instance_id
from portside.states import InstanceState
from tests.support import eventually
from tests.unit.nodeagent.test_instances import FAST, Clock, FakeRuntime, Probe

S = InstanceState


V1 = ContainerClass(
    "app", "app:1", sleep_after_s=60.0, boot_timeout_s=1.0, version=1, stop_timeout_s=5
)
V2 = dataclasses.replace(V1, image="app:2", version=2, wake_min_version=2)
IID = instance_id("app", "a")


class VersionRuntime(FakeRuntime):
    """Every container has an id of its own and its class's version (as the portside.version
    label); records each stop's grace and the most containers of one instance running at once."""

    def __init__(self) -> None:
        super().__init__()
        self.made = 0
        self.graces: list[float] = []
        self.stopped_at: list[float] = []
        self.most_running = 0

    def add(
        self,
        cls: ContainerClass,
        name: str,
        status: str,
        exit_code: int | None = None,
        ip: str | None = None,
    ) -> ContainerInfo:
        info = super().add(cls, name, status, exit_code, ip)
        del self.containers[info.id]
        self.made += 1
        info = dataclasses.replace(info, id=f"{info.id}-{self.made}", version=cls.version)
        self.containers[info.id] = info
        return info

    async def start(self, container_id: str) -> ContainerInfo:
        info = await super().start(container_id)
        for iid in {c.instance_id for c in self.containers.values()}:
            running = sum(1 for c in self.containers.values() if c.instance_id == iid and c.running)
            self.most_running = max(self.most_running, running)
        return info

    async def stop(
        self, container_id: str, grace_s: float, signum: int | None = None
    ) -> ContainerInfo | None:
        self.graces.append(grace_s)
        self.stopped_at.append(time.monotonic())
        return await super().stop(container_id, grace_s, signum)


@pytest.fixture
def runtime() -> VersionRuntime:
    return VersionRuntime()


@pytest.fixture
def probe() -> Probe:
    return Probe()


def manager_for(
    runtime: VersionRuntime,
    probe: Probe,
    classes: dict[str, ContainerClass],
    clock: Clock | None = None,
) -> tuple[InstanceManager, list[Event]]:
    events: list[Event] = []
    manager = InstanceManager(
        runtime,
        classes.get,
        timing=FAST,
        port_probe=probe,
        on_event=events.append,
        node_id="n1",
        clock=clock or time.monotonic,
    )
    return manager, events


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def replacing(manager: InstanceManager, iid: str = IID) -> bool:
    return manager._instances[iid].replacing is not None  # noqa: SLF001


async def test_a_request_during_a_replace_waits_and_is_served_by_the_new_container(
    runtime: VersionRuntime, probe: Probe
) -> None:
    classes: dict[str, ContainerClass] = {"app": V1}
    manager, events = manager_for(runtime, probe, classes)
    ok = counted("portside_agent_replacements_total", **{"class": "app", "outcome": "ok"})
    drained = counted(
        "portside_agent_replace_drains_total", **{"class": "app", "outcome": "drained"}
    )
    old = await manager.acquire(V1, "a")  # a request in flight on the version-1 container
    assert old.container_id is not None and runtime.containers[old.container_id].version == 1
    classes["app"] = V2
    assert manager.replace(IID)

    waiter = asyncio.create_task(manager.acquire(V2, "a"))
    await asyncio.sleep(0.1)
    assert not waiter.done(), "a request during the replace waits for the new container"
    assert runtime.count("stop") == 0, "the old container's request in flight is not cut"
    assert manager.info(IID).state is S.HEALTHY and manager.info(IID).version == 1

    old.release()  # the last request on the old container ends: now it stops
    new = await asyncio.wait_for(waiter, 2)
    assert new.container_id not in (None, old.container_id)
    assert old.container_id not in runtime.containers, "the old container is removed"
    assert new.container_id is not None and runtime.containers[new.container_id].version == 2
    assert new.upstream == Upstream(runtime.containers[new.container_id].ip or "", 8080)
    info = manager.info(IID)
    assert (info.state, info.version, info.in_flight) == (S.HEALTHY, 2, 1)
    new.release()
    # SIGTERM with what was left of stop_timeout (5 s) as the grace, never two copies running.
    assert runtime.graces == [pytest.approx(5.0, abs=0.5)]
    assert runtime.most_running == 1
    assert [e.kind for e in events] == ["starting", "ready", "replaced", "starting", "ready"]
    assert events[2].reason.startswith("version 1 → 2")
    assert "writable layer starts fresh" in events[2].reason
    await eventually(lambda: not replacing(manager))
    assert (
        counted("portside_agent_replacements_total", **{"class": "app", "outcome": "ok"}) == ok + 1
    )
    assert (
        counted("portside_agent_replace_drains_total", **{"class": "app", "outcome": "drained"})
        == drained + 1
    )


async def test_repeats_are_ignored_and_each_version_is_replaced_once(
    runtime: VersionRuntime, probe: Probe
) -> None:
    classes: dict[str, ContainerClass] = {"app": V1}
    manager, _ = manager_for(runtime, probe, classes)
    hold = await manager.acquire(V1, "a")
    assert not manager.replace(IID), "its container runs the class's current version"
    assert not manager.replace(instance_id("app", "nobody")), "not an instance of this node"
    classes["app"] = V2
    assert manager.replace(IID)
    assert not manager.replace(IID), "a replace under way is not begun again"
    hold.release()
    await eventually(lambda: not replacing(manager))
    assert manager.info(IID).version == 2
    assert not manager.replace(IID), "done: it runs version 2"
    assert runtime.count("create") == 2 and runtime.count("stop") == 1

    # A version whose container exits at start: the replace fails once, and is not tried again
    # for that version however often the rollout asks; the next version is.
    v3 = dataclasses.replace(V2, image="app:3", version=3)
    classes["app"] = v3
    runtime.exit_on_start = 3
    failed = counted("portside_agent_replacements_total", **{"class": "app", "outcome": "failed"})
    assert manager.replace(IID)
    await eventually(lambda: not replacing(manager))
    assert manager.info(IID).state is S.STOPPED_WITH_CODE
    assert (
        counted("portside_agent_replacements_total", **{"class": "app", "outcome": "failed"})
        == failed + 1
    )
    assert not manager.replace(IID), "version 3 was tried once"
    runtime.exit_on_start = None
    classes["app"] = dataclasses.replace(v3, image="app:4", version=4)
    assert not manager.replace(IID), "a resting instance is left for its next wake"


async def test_in_flight_requests_get_stop_timeout_then_sigterm(
    runtime: VersionRuntime, probe: Probe
) -> None:
    v1 = dataclasses.replace(V1, stop_timeout_s=0.3)
    classes: dict[str, ContainerClass] = {"app": v1}
    manager, _ = manager_for(runtime, probe, classes)
    timeouts = counted(
        "portside_agent_replace_drains_total", **{"class": "app", "outcome": "timeout"}
    )
    stuck = await manager.acquire(v1, "a")  # never released before the stop
    classes["app"] = dataclasses.replace(V2, stop_timeout_s=0.3)
    asked = time.monotonic()
    assert manager.replace(IID)
    waiter = asyncio.create_task(manager.acquire(V2, "a"))
    new = await asyncio.wait_for(waiter, 3)
    assert runtime.stopped_at[0] - asked >= 0.3, "in-flight requests had their stop_timeout"
    # Nothing of stop_timeout was left: SIGKILL after Timing.stop_grace (1 s), capped by it.
    assert runtime.graces == [pytest.approx(0.3)]
    assert new.container_id is not None and runtime.containers[new.container_id].version == 2
    assert (
        counted("portside_agent_replace_drains_total", **{"class": "app", "outcome": "timeout"})
        == timeouts + 1
    )
    stuck.release()
    new.release()
    assert manager.info(IID).in_flight == 0


async def test_a_sleeping_instance_older_than_wake_min_version_wakes_in_a_new_container(
    runtime: VersionRuntime, probe: Probe
) -> None:
    clock = Clock()
    classes: dict[str, ContainerClass] = {"app": V1}
    manager, events = manager_for(runtime, probe, classes, clock)
    async with manager.use(V1, "a"):
        pass
    old = manager.get(IID)
    assert old is not None and old.container_id is not None
    clock.now += 61
    assert manager.sleep_idle() == [IID]
    await eventually(lambda: manager.info(IID).state is S.SLEEPING)

    # --rollout none: the class moved on, its wake floor did not; the old container wakes.
    classes["app"] = dataclasses.replace(V2, wake_min_version=1)
    wakes = counted("portside_agent_wakes_total", **{"class": "app"})
    fresh = counted("portside_agent_wakes_new_version_total", **{"class": "app"})
    async with manager.use(classes["app"], "a") as upstream:
        assert upstream.host
    woke = manager.get(IID)
    assert woke is not None and woke.container_id == old.container_id
    assert runtime.count("create") == 1 and manager.info(IID).version == 1
    assert counted("portside_agent_wakes_total", **{"class": "app"}) == wakes + 1
    clock.now += 61
    assert manager.sleep_idle() == [IID]
    await eventually(lambda: manager.info(IID).state is S.SLEEPING)

    # A rollout set the floor to version 2: the wake makes a new container of it instead.
    classes["app"] = V2
    events.clear()
    async with manager.use(V2, "a"):
        pass
    now = manager.get(IID)
    assert now is not None and now.container_id not in (None, old.container_id)
    assert old.container_id not in runtime.containers
    assert now.container_id is not None and runtime.containers[now.container_id].version == 2
    assert manager.info(IID).version == 2
    assert [e.kind for e in events] == ["starting", "replaced", "ready"]
    assert events[1].reason == (
        "version 1 → 2 at its wake: a new container, its writable layer starts fresh"
    )
    assert counted("portside_agent_wakes_new_version_total", **{"class": "app"}) == fresh + 1
    assert counted("portside_agent_wakes_total", **{"class": "app"}) == wakes + 1, "not a wake"


async def test_a_pool_member_is_replaced_like_a_named_one_and_stays_in_its_pool(
    runtime: VersionRuntime, probe: Probe
) -> None:
    pool1 = dataclasses.replace(V1, name="pool", autoscaling=Autoscaling(minimum_instances=1))
    classes: dict[str, ContainerClass] = {"pool": pool1}
    manager, _ = manager_for(runtime, probe, classes)
    iid = instance_id("pool", "m1")
    await manager.start_pinned(pool1, "m1")
    classes["pool"] = dataclasses.replace(pool1, image="app:2", version=2)
    assert manager.replace(iid)
    await eventually(lambda: not replacing(manager, iid))
    assert manager.info(iid).version == 2 and manager.info(iid).state is S.HEALTHY
    assert iid in manager.pinned
    assert runtime.most_running == 1


async def test_a_stop_during_a_replace_makes_no_new_container(
    runtime: VersionRuntime, probe: Probe
) -> None:
    classes: dict[str, ContainerClass] = {"app": V1}
    manager, _ = manager_for(runtime, probe, classes)
    cancelled = counted(
        "portside_agent_replacements_total", **{"class": "app", "outcome": "cancelled"}
    )
    hold = await manager.acquire(V1, "a")
    classes["app"] = V2
    assert manager.replace(IID)
    await asyncio.sleep(0.02)  # draining: the request is in flight
    assert await manager.stop(IID)
    hold.release()
    assert not replacing(manager)
    assert (
        counted("portside_agent_replacements_total", **{"class": "app", "outcome": "cancelled"})
        == cancelled + 1
    )
    assert manager.info(IID).state is S.STOPPED
    assert runtime.count("create") == 1, "the operator's stop won: nothing new was made"


async def test_a_fenced_agent_replaces_nothing(runtime: VersionRuntime, probe: Probe) -> None:
    classes: dict[str, ContainerClass] = {"app": V1}
    manager, _ = manager_for(runtime, probe, classes)
    async with manager.use(V1, "a"):
        pass
    classes["app"] = V2
    fence = Fence()  # fenced: it has not reconciled its instances yet
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never used: replies are handed in
    node = Node("n1", "127.0.0.1:1", "127.0.0.1:2", "weur", 50.0, 8.0, 2.0, 1024)
    keeper = PoolKeeper(manager, classes.get)
    heartbeat = Heartbeat(
        channel, node, manager, UsageSampler(manager, runtime), keeper, fence=fence
    )
    fenced = counted("portside_agent_replacements_total", **{"class": "app", "outcome": "fenced"})
    try:
        fence.sent()
        heartbeat._handle(cp.NodeHeartbeatResponse(lease_ttl_seconds=30, replace=[IID]))  # noqa: SLF001
        await asyncio.sleep(0.05)
        assert not replacing(manager) and runtime.count("stop") == 0
        assert manager.info(IID).version == 1
        assert (
            counted("portside_agent_replacements_total", **{"class": "app", "outcome": "fenced"})
            == fenced + 1
        )
        # Its lease confirmed and its instances reconciled: the next reply's ask is carried out.
        fence.sent()
        heartbeat._handle(  # noqa: SLF001
            cp.NodeHeartbeatResponse(
                lease_ttl_seconds=30,
                lease_confirmed=True,
                reconciled=True,
                fence_after_seconds=7,
                replace=[IID],
            )
        )
        assert replacing(manager)
        await eventually(lambda: manager.info(IID).version == 2)
    finally:
        await keeper.close()
        await channel.close()
        await manager.close()


async def test_a_waiter_is_never_failed_by_the_replace_itself(
    runtime: VersionRuntime, probe: Probe
) -> None:
    """Only the new container's own boot can fail a waiting request (as any wake would)."""
    classes: dict[str, ContainerClass] = {"app": V1}
    manager, _ = manager_for(runtime, probe, classes)
    async with manager.use(V1, "a"):
        pass
    classes["app"] = V2
    assert manager.replace(IID)
    results = await asyncio.gather(
        *(manager.acquire(V2, "a") for _ in range(5)), return_exceptions=True
    )
    holds = [r for r in results if not isinstance(r, BaseException)]
    assert len(holds) == 5, results
    now = manager.get(IID)
    assert now is not None and {h.container_id for h in holds} == {now.container_id}
    for hold in holds:
        hold.release()
    assert runtime.count("create") == 2
