"""What an exec session does to an instance's sleep (issue 13): by default nothing (it may go
to sleep under the session, which then ends), `wake` boots and holds it, `activity` restarts its
sleep timer; over the fake runtime of test_instances (tests/e2e/test_exec_tty.py runs the real
thing)."""

from __future__ import annotations

import dataclasses

import pytest

from nodeagent.instances import InstanceManager, InstanceSnapshot
from portside.errors import NotFound
from portside.spec import ContainerClass, instance_id
from portside.states import InstanceState
from tests.support import eventually
from tests.unit.nodeagent.test_instances import ECHO, FAST, Clock, FakeRuntime, Probe

S = InstanceState
IID = instance_id(ECHO.name, "ann")


def manager_for(runtime: FakeRuntime, clock: Clock, *classes: ContainerClass) -> InstanceManager:
    by_name = {c.name: c for c in (classes or (ECHO,))}
    return InstanceManager(runtime, by_name.get, timing=FAST, port_probe=Probe(), clock=clock)


def snapshot(manager: InstanceManager) -> InstanceSnapshot:
    snap = manager.get(IID)
    assert snap is not None
    return snap


def state(manager: InstanceManager) -> InstanceState:
    return snapshot(manager).state


def last_activity(manager: InstanceManager) -> float:
    return snapshot(manager).last_activity


async def running(manager: InstanceManager, cls: ContainerClass = ECHO) -> None:
    async with manager.use(cls, "ann"):
        pass


async def test_by_default_a_session_neither_holds_nor_counts_and_ends_with_a_sleep() -> None:
    clock = Clock()
    manager = manager_for(FakeRuntime(), clock)
    await running(manager)
    booted = last_activity(manager)
    async with manager.exec_session(ECHO.name, "ann") as ended:
        clock.now += 1
        assert snapshot(manager).in_flight == 0
        assert last_activity(manager) == booted
        assert not ended.is_set()
        clock.now += ECHO.sleep_after_s
        assert manager.sleep_idle() == [IID]  # the open session does not keep it awake
        assert ended.is_set()  # the session is over
    assert last_activity(manager) == booted
    await eventually(lambda: state(manager) is S.SLEEPING)


async def test_activity_restarts_the_sleep_timer_at_start_and_end_but_holds_nothing() -> None:
    clock = Clock()
    manager = manager_for(FakeRuntime(), clock)
    await running(manager)
    clock.now += 1.5
    async with manager.exec_session(ECHO.name, "ann", activity=True) as ended:
        assert last_activity(manager) == clock.now
        assert snapshot(manager).in_flight == 0
        clock.now += 1.5
    assert last_activity(manager) == clock.now and not ended.is_set()
    clock.now += ECHO.sleep_after_s - 0.1
    assert manager.sleep_idle() == []
    clock.now += 0.1
    assert manager.sleep_idle() == [IID]


async def test_wake_boots_a_sleeping_instance_and_holds_it_without_counting() -> None:
    clock, runtime = Clock(), FakeRuntime()
    manager = manager_for(runtime, clock)
    await running(manager)
    clock.now += ECHO.sleep_after_s
    assert manager.sleep_idle() == [IID]
    await eventually(lambda: state(manager) is S.SLEEPING)
    async with manager.exec_session(ECHO.name, "ann", wake=True) as ended:
        assert state(manager) is S.HEALTHY and runtime.count("start") == 2
        booted = last_activity(manager)
        clock.now += 10 * ECHO.sleep_after_s
        assert manager.sleep_idle() == []  # held awake for the session
    assert not ended.is_set() and snapshot(manager).in_flight == 0
    assert last_activity(manager) == booted  # its end is no activity: it sleeps at once
    assert manager.sleep_idle() == [IID]


async def test_wake_with_activity_restarts_the_timer_when_the_session_ends() -> None:
    clock = Clock()
    manager = manager_for(FakeRuntime(), clock)
    async with manager.exec_session(ECHO.name, "ann", wake=True, activity=True):
        assert state(manager) is S.HEALTHY  # placed, never booted: booted now
        clock.now += 10 * ECHO.sleep_after_s
        assert manager.sleep_idle() == []
    assert last_activity(manager) == clock.now
    assert manager.sleep_idle() == []


async def test_a_stop_ends_even_a_holding_session() -> None:
    manager = manager_for(FakeRuntime(), Clock())
    async with manager.exec_session(ECHO.name, "ann", wake=True) as ended:
        await manager.stop(IID)
        assert ended.is_set()
    assert snapshot(manager).in_flight == 0


async def test_a_pause_ends_the_session() -> None:
    pausing = dataclasses.replace(ECHO, sleep_mode="pause", pause_max_s=60)
    clock = Clock()
    manager = manager_for(FakeRuntime(), clock, pausing)
    await running(manager, pausing)
    async with manager.exec_session(pausing.name, "ann") as ended:
        clock.now += pausing.sleep_after_s
        assert manager.sleep_idle() == [IID]
        assert state(manager) is S.PAUSED and ended.is_set()


async def test_unknown_instances_and_classes_are_not_found() -> None:
    manager = manager_for(FakeRuntime(), Clock())
    with pytest.raises(NotFound, match="no instance"):
        async with manager.exec_session(ECHO.name, "ann"):
            pass
    with pytest.raises(NotFound, match="class nope is not deployed"):
        async with manager.exec_session("nope", "ann", wake=True):
            pass
