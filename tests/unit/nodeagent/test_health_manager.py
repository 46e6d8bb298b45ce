"""The instance manager's health checks over a fake runtime and a fake check function (no Docker,
no sockets): failures in a row make an instance running and a pass healthy again, with their
events and metrics; checks never hold an instance awake, never run while it is stopped or being
stopped, and never pile up."""

from __future__ import annotations

import asyncio
import dataclasses

from prometheus_client import REGISTRY

from nodeagent.health import CheckResult
from nodeagent.instances import InstanceManager
from portside.events import Event, EventKind
from portside.spec import ContainerClass, instance_id
from portside.states import InstanceState
from tests.support import eventually
from tests.unit.nodeagent.test_instances import FAST, FakeRuntime, Probe, running

S = InstanceState
K = EventKind
TIMING = dataclasses.replace(FAST, health_tick=0.005)
CHECKED = ContainerClass(
    "checked",
    "echo:latest",
    sleep_after_s=60.0,
    boot_timeout_s=1.0,
    health_check_interval_s=0.02,
    health_check_failures=3,
    health_check_timeout_s=0.01,
)


class FakeCheck:
    """Answers with `result` (a pass by default); with `hold` set, each check waits for it."""

    def __init__(self) -> None:
        self.result = CheckResult(True, 200)
        self.calls: list[tuple[str, int, str, float]] = []
        self.hold: asyncio.Event | None = None
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, host: str, port: int, path: str, timeout_s: float) -> CheckResult:
        self.calls.append((host, port, path, timeout_s))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            return self.result
        finally:
            self.in_flight -= 1


def manager_for(
    runtime: FakeRuntime, check: FakeCheck, *classes: ContainerClass
) -> tuple[InstanceManager, list[Event]]:
    events: list[Event] = []
    by_name = {c.name: c for c in (classes or (CHECKED,))}
    manager = InstanceManager(
        runtime,
        by_name.get,
        timing=TIMING,
        port_probe=Probe(),
        on_event=events.append,
        node_id="n1",
        health_check=check,
    )
    return manager, events


def state(manager: InstanceManager, name: str, cls: ContainerClass = CHECKED) -> InstanceState:
    snap = manager.get(instance_id(cls.name, name))
    assert snap is not None
    return snap.state


def checks(outcome: str, cls: str = "checked") -> float:
    labels = {"class": cls, "outcome": outcome}
    return REGISTRY.get_sample_value("portside_agent_health_checks_total", labels) or 0.0


def turns(to: str, cls: str = "checked") -> float:
    labels = {"class": cls, "to": to}
    return REGISTRY.get_sample_value("portside_agent_health_transitions_total", labels) or 0.0


async def test_failures_in_a_row_make_it_running_and_a_pass_healthy_again() -> None:
    runtime, check = FakeRuntime(), FakeCheck()
    manager, events = manager_for(runtime, check)
    failed_before = checks("fail")
    turned_before = turns("unhealthy")
    async with running(manager):
        hold = await manager.acquire(CHECKED, "a")
        hold.release()
        await eventually(lambda: len(check.calls) >= 2, within=2)
        assert state(manager, "a") is S.HEALTHY
        host, port, path, timeout = check.calls[0]
        assert (host, port, path, timeout) == (hold.upstream.host, 8080, "/ping", 0.01)

        check.result = CheckResult(False, 503, "answered 503")
        await eventually(lambda: state(manager, "a") is S.RUNNING, within=2)
        unhealthy = [e for e in events if e.kind is K.UNHEALTHY]
        assert len(unhealthy) == 1
        assert unhealthy[0].reason == "3 health checks in a row failed; the last: answered 503"
        assert unhealthy[0].node_id == "n1" and unhealthy[0].name == "a"
        failed = checks("fail")
        assert failed - failed_before >= 3
        assert turns("unhealthy") == turned_before + 1

        # Still served: a named instance has no other copy.
        again = await manager.acquire(CHECKED, "a")
        assert again.upstream == hold.upstream
        again.release()
        assert runtime.count("start") == 1

        check.result = CheckResult(True, 404)
        await eventually(lambda: state(manager, "a") is S.HEALTHY, within=2)
    assert [e.kind for e in events] == [K.STARTING, K.READY, K.UNHEALTHY, K.HEALTHY]
    assert events[-1].reason == "its health check passed"


async def test_checks_never_count_as_activity() -> None:
    runtime, check = FakeRuntime(), FakeCheck()
    sleepy = dataclasses.replace(CHECKED, name="sleepy", sleep_after_s=0.3)
    manager, events = manager_for(runtime, check, sleepy)
    async with running(manager):
        (await manager.acquire(sleepy, "a")).release()
        await eventually(lambda: state(manager, "a", sleepy) is S.SLEEPING, within=3)
        checks = len(check.calls)
        assert checks >= 5  # checked every 20 ms while it was awake, and slept all the same
        await asyncio.sleep(0.2)
        assert len(check.calls) == checks  # nothing checks (or wakes) a sleeping instance
    assert runtime.count("start") == 1
    assert [e.kind for e in events] == [K.STARTING, K.READY, K.ACTIVITY_EXPIRED, K.SLEPT]


async def test_a_check_in_flight_when_a_stop_begins_is_cancelled_and_ignored() -> None:
    runtime, check = FakeRuntime(), FakeCheck()
    slow = dataclasses.replace(CHECKED, name="slow", health_check_timeout_s=5.0)
    slow = dataclasses.replace(slow, health_check_interval_s=0.02)
    manager, events = manager_for(runtime, check, slow)
    check.hold = asyncio.Event()
    check.result = CheckResult(False, reason="no answer within 5s")
    async with running(manager):
        (await manager.acquire(slow, "a")).release()
        await eventually(lambda: check.in_flight == 1, within=2)
        await manager.stop(instance_id("slow", "a"))
        assert state(manager, "a", slow) is S.STOPPED
        assert check.in_flight == 0  # cancelled by the stop
        calls = len(check.calls)
        await asyncio.sleep(0.1)
        assert len(check.calls) == calls
    assert K.UNHEALTHY not in [e.kind for e in events]


async def test_a_slow_check_makes_the_next_one_skipped_not_piled_up() -> None:
    runtime, check = FakeRuntime(), FakeCheck()
    # A check function that ignores its timeout: the manager's own bound (timeout + 0.5 s)
    # ends it, and meanwhile every due check of the instance is skipped.
    manager, _events = manager_for(runtime, check)
    check.hold = asyncio.Event()
    skipped_before = checks("skipped")
    async with running(manager):
        (await manager.acquire(CHECKED, "a")).release()
        await eventually(lambda: check.in_flight == 1, within=2)
        await eventually(
            lambda: checks("skipped") >= skipped_before + 3,
            within=2,
        )
        assert len(check.calls) == 1 and check.most_in_flight == 1
        check.hold.set()


async def test_no_checks_without_a_ping_endpoint_and_turning_them_off_heals() -> None:
    runtime, check = FakeRuntime(), FakeCheck()
    classes = {"checked": CHECKED}
    manager = InstanceManager(
        runtime,
        classes.get,
        timing=TIMING,
        port_probe=Probe(),
        health_check=check,
    )
    check.result = CheckResult(False, reason="connection refused")
    async with running(manager):
        (await manager.acquire(CHECKED, "a")).release()
        await eventually(lambda: state(manager, "a") is S.RUNNING, within=2)
        classes["checked"] = dataclasses.replace(CHECKED, ping_endpoint="")  # a deploy
        await eventually(lambda: state(manager, "a") is S.HEALTHY, within=2)
        calls = len(check.calls)
        await asyncio.sleep(0.1)
        assert len(check.calls) == calls


async def test_a_start_of_an_unhealthy_instance_answers_its_state() -> None:
    runtime, check = FakeRuntime(), FakeCheck()
    manager, _events = manager_for(runtime, check)
    check.result = CheckResult(False, 500, "answered 500")
    async with running(manager):
        await manager.start(CHECKED, "a")
        await eventually(lambda: state(manager, "a") is S.RUNNING, within=2)
        # Its port answered: a Start finds it running, it did not time out booting.
        info = await manager.start(CHECKED, "a")
        assert info.state is S.RUNNING
    assert runtime.count("start") == 1


async def test_a_reboot_begins_with_a_clean_streak() -> None:
    runtime, check = FakeRuntime(), FakeCheck()
    lenient = dataclasses.replace(CHECKED, name="lenient", health_check_failures=10)
    manager, events = manager_for(runtime, check, lenient)
    check.result = CheckResult(False, 503, "answered 503")
    async with running(manager):
        (await manager.acquire(lenient, "a")).release()
        await eventually(lambda: state(manager, "a", lenient) is S.RUNNING, within=3)
        await manager.stop(instance_id("lenient", "a"))
        (await manager.acquire(lenient, "a")).release()
        # Still failing: a streak kept from the last run would turn it at its first failure.
        calls = len(check.calls)
        await eventually(lambda: len(check.calls) >= calls + 5, within=2)
        assert state(manager, "a", lenient) is S.HEALTHY
        await eventually(lambda: state(manager, "a", lenient) is S.RUNNING, within=3)
    assert [e.kind for e in events].count(K.UNHEALTHY) == 2
