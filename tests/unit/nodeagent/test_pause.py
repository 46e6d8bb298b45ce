"""Pause mode in the instance manager (sleep_mode "pause"): freeze after sleep_after, thaw on the
next request through the boot path, pause_max, capacity, stops and what the engine says behind
the agent's back; over the fake runtime of test_instances (no Docker: tests/e2e/test_pause.py
runs it on a real engine)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from nodeagent.instances import Capacity, InstanceManager
from nodeagent.lifecycle import Effect
from nodeagent.runtime import ContainerEventKind
from portside.capacity import Resources
from portside.errors import NoCapacity
from portside.events import Event, EventKind
from portside.spec import INSTANCE_TYPES, ContainerClass, instance_id
from portside.states import InstanceState
from tests.support import eventually
from tests.unit.nodeagent.test_instances import FAST, Clock, FakeRuntime, Probe

PAUSING = ContainerClass(
    "box", "box:latest", sleep_after_s=2.0, boot_timeout_s=1.0, sleep_mode="pause", pause_max_s=60
)
S = InstanceState


def manager_for(
    runtime: FakeRuntime,
    clock: Clock,
    events: list[Event] | None = None,
    runs: list[Effect] | None = None,
    capacity: Capacity | None = None,
) -> InstanceManager:
    return InstanceManager(
        runtime,
        {PAUSING.name: PAUSING}.get,
        timing=FAST,
        port_probe=Probe(),
        clock=clock,
        capacity=capacity,
        on_event=events.append if events is not None else None,
        on_run=(lambda _snap, change, _at: runs.append(change)) if runs is not None else None,
    )


def state(manager: InstanceManager, name: str) -> InstanceState:
    snap = manager.get(instance_id(PAUSING.name, name))
    assert snap is not None
    return snap.state


async def paused(manager: InstanceManager, runtime: FakeRuntime, clock: Clock, name: str) -> str:
    """Serve one request, then idle past sleep_after until the freeze was answered; returns the
    container's id."""
    async with manager.use(PAUSING, name):
        pass
    clock.now += PAUSING.sleep_after_s
    assert manager.sleep_idle() == [instance_id(PAUSING.name, name)]
    assert state(manager, name) is S.PAUSED  # at once, before docker pause answered
    snap = manager.get(instance_id(PAUSING.name, name))
    assert snap is not None and snap.container_id is not None
    container_id = snap.container_id
    await eventually(lambda: runtime.containers[container_id].paused)
    return container_id


async def test_idle_freezes_and_the_next_request_thaws_the_same_container() -> None:
    runtime, clock, events, runs = FakeRuntime(), Clock(), list[Event](), list[Effect]()
    manager = manager_for(runtime, clock, events, runs)
    container_id = await paused(manager, runtime, clock, "ann")
    async with manager.use(PAUSING, "ann") as upstream:
        assert state(manager, "ann") is S.HEALTHY
        assert upstream.host == "127.0.1.2"  # its address was kept while frozen
    # Frozen and thawed, never stopped or started again: its memory and processes were kept.
    assert runtime.count("pause") == runtime.count("unpause") == 1
    assert runtime.count("stop") == 0 and runtime.calls.count(("start", container_id)) == 1
    said = [(e.kind, e.reason) for e in events if e.kind in (EventKind.PAUSED, EventKind.RESUMED)]
    assert said == [(EventKind.PAUSED, "idle for 2s"), (EventKind.RESUMED, "a request")]
    # Metering stops while frozen and goes on after.
    assert runs == [Effect.BEGIN_RUN, Effect.PAUSE_RUN, Effect.RESUME_RUN]


async def test_a_request_during_the_freeze_waits_for_it_then_thaws() -> None:
    runtime, clock = FakeRuntime(), Clock()
    runtime.pause_delay = 0.05
    manager = manager_for(runtime, clock)
    async with manager.use(PAUSING, "bea"):
        pass
    clock.now += PAUSING.sleep_after_s
    manager.sleep_idle()
    async with manager.use(PAUSING, "bea"):  # docker pause has not answered yet
        assert state(manager, "bea") is S.HEALTHY
    assert [c for c, _ in runtime.calls if c in ("pause", "unpause")] == ["pause", "unpause"]


async def test_the_address_of_a_frozen_instance_is_known_for_a_connect_during_its_thaw() -> None:
    runtime, clock = FakeRuntime(), Clock()
    runtime.pause_delay = 0.05
    manager = manager_for(runtime, clock)
    assert manager.frozen_upstream(PAUSING.name, "dot") is None  # unknown
    async with manager.use(PAUSING, "dot") as upstream:
        assert manager.frozen_upstream(PAUSING.name, "dot") is None  # awake
    clock.now += PAUSING.sleep_after_s
    manager.sleep_idle()
    assert manager.frozen_upstream(PAUSING.name, "dot") == upstream  # being frozen
    snap = manager.get(instance_id(PAUSING.name, "dot"))
    assert snap is not None and snap.container_id is not None
    container_id = snap.container_id
    await eventually(lambda: runtime.containers[container_id].paused)
    assert manager.frozen_upstream(PAUSING.name, "dot") == upstream  # paused
    async with manager.use(PAUSING, "dot"):
        assert manager.frozen_upstream(PAUSING.name, "dot") is None  # thawed


async def test_never_paused_with_a_request_in_flight() -> None:
    runtime, clock = FakeRuntime(), Clock()
    manager = manager_for(runtime, clock)
    hold = await manager.acquire(PAUSING, "cid")
    clock.now += 60
    assert manager.sleep_idle() == []
    hold.release()
    clock.now += PAUSING.sleep_after_s
    assert manager.sleep_idle() == [instance_id(PAUSING.name, "cid")]


async def test_pause_max_stops_it_as_a_sleep() -> None:
    runtime, clock, events = FakeRuntime(), Clock(), list[Event]()
    manager = manager_for(runtime, clock, events)
    await paused(manager, runtime, clock, "dot")
    clock.now += PAUSING.pause_max_s - 1
    assert manager.sleep_idle() == []
    clock.now += 1
    assert manager.sleep_idle() == [instance_id(PAUSING.name, "dot")]
    await eventually(lambda: state(manager, "dot") is S.SLEEPING)
    kinds = [e.kind for e in events][-3:]
    assert kinds == [EventKind.PAUSED, EventKind.ACTIVITY_EXPIRED, EventKind.SLEPT]
    assert events[-2].reason == "paused for 60s"
    async with manager.use(PAUSING, "dot"):  # asleep: a boot, not a thaw
        pass
    assert runtime.count("unpause") == 0 and runtime.count("start") == 2


async def test_an_unhealthy_instance_sleeps_by_stopping() -> None:
    runtime, clock = FakeRuntime(), Clock()
    probe = Probe()
    manager = InstanceManager(
        runtime, {PAUSING.name: PAUSING}.get, timing=FAST, port_probe=probe, clock=clock
    )
    probe.answers = False
    await manager.start(PAUSING, "eve", wait=False)  # runs; its port never answered
    await eventually(lambda: state(manager, "eve") is S.RUNNING)
    clock.now += PAUSING.sleep_after_s + PAUSING.boot_timeout_s
    assert manager.sleep_idle() == [instance_id(PAUSING.name, "eve")]
    await eventually(lambda: state(manager, "eve") is S.SLEEPING)
    assert runtime.count("pause") == 0


async def test_a_paused_instance_holds_its_memory_not_its_cpu() -> None:
    runtime, clock = FakeRuntime(), Clock()
    standard = INSTANCE_TYPES["standard-1"]
    cls = dataclasses.replace(PAUSING, instance_type=standard)
    capacity = Capacity("n1", vcpu=standard.vcpu, memory_mib=2 * standard.memory_mib)
    manager = InstanceManager(
        runtime, {cls.name: cls}.get, timing=FAST, port_probe=Probe(), clock=clock,
        capacity=capacity,
    )  # fmt: skip
    async with manager.use(cls, "fay"):
        pass
    assert manager.awake_use() == Resources.of(standard)
    clock.now += cls.sleep_after_s
    manager.sleep_idle()
    assert manager.awake_use() == Resources(0.0, standard.memory_mib)
    # Its CPU is free for another instance; its memory is not.
    async with manager.use(cls, "gil"):
        assert manager.awake_use() == Resources(standard.vcpu, 2 * standard.memory_mib)
        with pytest.raises(NoCapacity, match="1 awake and 1 paused instances use 0.5/0.5 vCPU"):
            await manager.acquire(cls, "fay")  # its thaw needs its CPU back
    clock.now += cls.sleep_after_s
    manager.sleep_idle()  # now gil is paused: its CPU is free for fay's thaw
    async with manager.use(cls, "fay"):
        assert manager.awake_use() == Resources(standard.vcpu, 2 * standard.memory_mib)


async def test_stop_and_destroy_of_a_paused_instance() -> None:
    runtime, clock = FakeRuntime(), Clock()
    manager = manager_for(runtime, clock)
    await paused(manager, runtime, clock, "hal")
    assert await manager.stop(instance_id(PAUSING.name, "hal"))
    assert state(manager, "hal") is S.STOPPED and runtime.count("stop") == 1
    container_id = await paused(manager, runtime, clock, "ivy")
    await manager.destroy(instance_id(PAUSING.name, "ivy"))
    assert container_id not in runtime.containers


async def test_a_start_thaws_it() -> None:
    runtime, clock, events = FakeRuntime(), Clock(), list[Event]()
    manager = manager_for(runtime, clock, events)
    await paused(manager, runtime, clock, "jan")
    info = await manager.start(PAUSING, "jan", wait=False)
    assert info.state is S.HEALTHY and runtime.count("unpause") == 1
    assert events[-1].kind is EventKind.RESUMED and events[-1].reason == "a Start"


async def test_adopted_paused_and_what_docker_did_behind_its_back() -> None:
    runtime, clock, events = FakeRuntime(), Clock(), list[Event]()
    frozen = runtime.add(PAUSING, "kim", "paused", ip="127.0.1.60")
    manager = manager_for(runtime, clock, events)
    adopted = await manager.adopt()
    assert [s.state for s in adopted] == [S.PAUSED]
    follow = asyncio.create_task(manager.run())
    try:
        # docker unpause behind its back: awake (the event's time is after its last thaw).
        runtime.set(frozen.id, status="running")
        runtime.report(ContainerEventKind.UNPAUSE, frozen.id)
        await eventually(lambda: state(manager, "kim") is S.HEALTHY)
        # docker pause behind its back, seen by a listing: paused; the next request thaws it.
        runtime.set(frozen.id, status="paused")
        clock.now += 0.01
        await manager.reconcile()
        assert state(manager, "kim") is S.PAUSED
        async with manager.use(PAUSING, "kim") as upstream:
            assert upstream.host == "127.0.1.60"
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
    reasons = [e.reason for e in events if e.kind in (EventKind.PAUSED, EventKind.RESUMED)]
    assert reasons == [
        "unpaused outside Portside (docker unpause)",
        "paused outside Portside (docker pause)",
        "a request",
    ]
