"""A scheduled call's hold on its instance (issue 13): with `activity` false it keeps the instance
awake while in flight but restarts no sleep timer; without `wake` a call to an instance that does
not run is refused without booting it. Over the fake runtime of test_instances
(tests/e2e/test_schedules.py runs the real thing)."""

from __future__ import annotations

import pytest

from nodeagent.calls import call_instance
from nodeagent.instances import InstanceManager
from portside.errors import NotRunning
from portside.spec import instance_id
from portside.states import InstanceState
from tests.unit.nodeagent.test_instances import ECHO, FAST, Clock, FakeRuntime, Probe

IID = instance_id(ECHO.name, "ann")


def manager_for(runtime: FakeRuntime, clock: Clock) -> InstanceManager:
    return InstanceManager(
        runtime, {ECHO.name: ECHO}.get, timing=FAST, port_probe=Probe(), clock=clock
    )


async def test_a_hold_without_activity_keeps_it_awake_but_restarts_no_timer() -> None:
    clock = Clock()
    manager = manager_for(FakeRuntime(), clock)
    (await manager.acquire(ECHO, "ann")).release()  # booted and served at 1000
    clock.now += 1.5
    hold = await manager.acquire(ECHO, "ann", activity=False)
    clock.now += 10
    assert manager.sleep_idle() == []  # never slept under a call in flight
    hold.release()
    snap = manager.get(IID)
    assert snap is not None and snap.last_activity == 1000.0
    assert manager.sleep_idle() == [IID]  # idle since 1000, not since the call ended


async def test_without_wake_a_call_to_an_instance_that_does_not_run_is_refused() -> None:
    runtime = FakeRuntime()
    manager = manager_for(runtime, Clock())
    call = call_instance(manager, ECHO, "ann", "GET", "/", wake=False, activity=True, timeout_s=1.0)
    with pytest.raises(NotRunning, match="not on this node: not woken"):
        await call
    (await manager.acquire(ECHO, "ann")).release()
    await manager.stop(IID)
    snap = manager.get(IID)
    assert snap is not None and snap.state is not InstanceState.HEALTHY
    with pytest.raises(NotRunning, match="not woken"):
        await call_instance(
            manager, ECHO, "ann", "GET", "/", wake=False, activity=True, timeout_s=1.0
        )
    assert runtime.count("create") == 1  # never booted again
