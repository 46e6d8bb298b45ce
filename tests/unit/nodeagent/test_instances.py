"""Unit tests of the instance manager's logic (shared boots, sleep, adopt, reconcile) over a fake
runtime and a fake port probe: no Docker, no sockets. tests/integration covers the real engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime

import pytest

from nodeagent.instances import Capacity, InstanceManager, Timing, Upstream
from nodeagent.runtime import (
    NO_OVERRIDES,
    ContainerEvent,
    ContainerEventKind,
    ContainerInfo,
    ExecProcess,
    Overrides,
    Stream,
)
from nodeagent.runtime.protocol import FromSnapshot
from portside.capacity import Resources
from portside.errors import (
    BootTimeout,
    ContainerExited,
    EngineUnavailable,
    FailedPrecondition,
    ImageUnavailable,
    NoCapacity,
    NotFound,
    PortsideError,
    Unavailable,
)
from portside.events import Event, EventKind
from portside.spec import ContainerClass, instance_id
from portside.states import InstanceState
from portside.terminal import TerminalSize
from tests.support import eventually

ECHO = ContainerClass("echo", "echo:latest", sleep_after_s=2.0, boot_timeout_s=1.0)
FAST = Timing(sleep_check=0.01, reconcile=3600, port_poll=0.001, exit_poll=0.005, stop_grace=1)


class FakeRuntime:
    """Containers in a dict. `exit_on_start` makes a started container exit at once with that
    code; `start_delay` stretches start() so tests can pile requests onto one boot;
    `create_error` is what create() raises. Like the
    real engine, a stop reports the death as an engine event before stop() returns."""

    def __init__(self) -> None:
        self.containers: dict[str, ContainerInfo] = {}
        self.calls: list[tuple[str, str]] = []
        self.exit_on_start: int | None = None
        self.start_delay = 0.0
        self.create_error: PortsideError | None = None
        self.pause_delay = 0.0
        self._next_ip = 1
        self.engine_events: asyncio.Queue[ContainerEvent | str] = asyncio.Queue()
        self.down = False  # the engine is out of reach: ping and list fail
        self.followed_since: list[float | None] = []  # each events() call's `since`

    def add(
        self,
        cls: ContainerClass,
        name: str,
        status: str,
        exit_code: int | None = None,
        ip: str | None = None,
    ) -> ContainerInfo:
        iid = instance_id(cls.name, name)
        info = ContainerInfo(
            id=f"c-{iid[:8]}",
            name=f"portside-n-{iid[:16]}",
            status=status,
            exit_code=exit_code,
            ip=ip,
            port=cls.default_port,
            class_name=cls.name,
            instance_name=name,
            instance_id=iid,
        )
        self.containers[info.id] = info
        return info

    def set(self, container_id: str, **changes: object) -> None:
        self.containers[container_id] = dataclasses.replace(
            self.containers[container_id],
            **changes,  # type: ignore[arg-type]
        )

    async def ensure_networks(self) -> None:
        self.calls.append(("ensure_networks", ""))

    async def list(self) -> list[ContainerInfo]:
        if self.down:
            raise EngineUnavailable("the engine is down")
        return list(self.containers.values())

    async def create(
        self,
        cls: ContainerClass,
        name: str,
        overrides: Overrides = NO_OVERRIDES,
        from_snapshot: FromSnapshot | None = None,
    ) -> str:
        self.calls.append(("create", name))
        if self.create_error is not None:
            raise self.create_error
        info = self.add(cls, name, "created")
        self.set(info.id, overrides_digest=overrides.digest)
        if from_snapshot is not None:
            self.set(info.id, snapshot_id=from_snapshot.snapshot_id)
        return info.id

    async def start(self, container_id: str) -> ContainerInfo:
        self.calls.append(("start", container_id))
        if container_id not in self.containers:
            raise NotFound(f"no container {container_id}")
        await asyncio.sleep(self.start_delay)
        if self.exit_on_start is not None:
            self.set(container_id, status="exited", exit_code=self.exit_on_start, ip=None)
        else:
            self._next_ip += 1
            self.set(container_id, status="running", exit_code=None, ip=f"127.0.1.{self._next_ip}")
        self.set(container_id, started_at=datetime.now(UTC))
        return self.containers[container_id]

    async def stop(
        self, container_id: str, grace_s: float, signum: int | None = None
    ) -> ContainerInfo | None:
        self.calls.append(("stop", container_id))
        await asyncio.sleep(0.01)
        if container_id not in self.containers:
            raise NotFound(f"no container {container_id}")
        if self.containers[container_id].running:
            self.die(container_id, 143)
        await asyncio.sleep(0.01)  # the engine's event comes first, as it does from dockerd
        return self.containers[container_id]

    async def signal(self, container_id: str, signum: int) -> None:
        self.calls.append(("signal", container_id))

    async def pause(self, container_id: str) -> None:
        """Like docker pause: `pause_delay` stretches it, so tests can send a request meanwhile."""
        self.calls.append(("pause", container_id))
        await asyncio.sleep(self.pause_delay)
        if container_id not in self.containers:
            raise NotFound(f"no container {container_id}")
        if not self.containers[container_id].running:
            raise FailedPrecondition(f"container {container_id} is not running")
        self.set(container_id, status="paused")

    async def unpause(self, container_id: str) -> None:
        self.calls.append(("unpause", container_id))
        if container_id not in self.containers:
            raise NotFound(f"no container {container_id}")
        if not self.containers[container_id].paused:
            raise FailedPrecondition(f"container {container_id} is not paused")
        self.set(container_id, status="running")

    async def events(self, since: float | None = None) -> AsyncIterator[ContainerEvent]:
        self.followed_since.append(since)
        if self.down:
            raise EngineUnavailable("the engine is down")
        while True:
            item = await self.engine_events.get()
            if isinstance(item, str):  # the stream broke
                raise EngineUnavailable(item)
            yield item

    async def ping(self) -> None:
        self.calls.append(("ping", ""))
        if self.down:
            raise EngineUnavailable("the engine is down")

    def restart_engine(self, live_restore: bool = False) -> None:
        """The engine goes away (its event stream breaks), stopping every running container
        unless `live_restore`; it stays down until `down` is set False."""
        self.down = True
        if not live_restore:
            for info in list(self.containers.values()):
                if info.running:
                    self.set(info.id, status="exited", exit_code=143, ip=None)
        self.engine_events.put_nowait("the engine restarted")

    async def exec(
        self,
        container_id: str,
        command: Sequence[str],
        env: Mapping[str, str],
        working_dir: str,
        stdin: bool,
        *,
        tty: TerminalSize | None = None,
        user: str = "",
    ) -> ExecProcess:
        raise NotImplementedError("exec is tested against a real engine")

    async def logs(
        self, container_id: str, follow: bool, tail: int
    ) -> AsyncIterator[tuple[Stream, bytes]]:
        return
        yield

    def die(self, container_id: str, exit_code: int, at: float | None = None) -> None:
        """The container exits; the engine reports it (`at`: the event's time, default now)."""
        self.set(container_id, status="exited", exit_code=exit_code, ip=None)
        self.report(ContainerEventKind.DIE, container_id, exit_code, at)

    def report(
        self,
        kind: ContainerEventKind,
        container_id: str,
        exit_code: int | None = None,
        at: float | None = None,
    ) -> None:
        info = self.containers[container_id]
        when = time.time() if at is None else at
        self.engine_events.put_nowait(
            ContainerEvent(kind, container_id, info.instance_id, when, exit_code)
        )

    async def inspect(self, container_id: str) -> ContainerInfo:
        if container_id not in self.containers:
            raise NotFound(f"no container {container_id}")
        return self.containers[container_id]

    async def remove(self, container_id: str, force: bool = False) -> None:
        self.containers.pop(container_id, None)

    async def close(self) -> None:
        pass

    def count(self, call: str) -> int:
        return sum(1 for c, _ in self.calls if c == call)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Probe:
    """The port answers once `answers` is true."""

    def __init__(self) -> None:
        self.answers = True

    async def __call__(self, host: str, port: int) -> bool:
        return self.answers


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def probe() -> Probe:
    return Probe()


def manager_for(
    runtime: FakeRuntime, probe: Probe, *classes: ContainerClass, clock: Clock | None = None
) -> InstanceManager:
    by_name = {c.name: c for c in (classes or (ECHO,))}
    return InstanceManager(
        runtime, by_name.get, timing=FAST, port_probe=probe, clock=clock or time.monotonic
    )


def state_of(manager: InstanceManager, cls: ContainerClass, name: str) -> InstanceState:
    snap = manager.get(instance_id(cls.name, name))
    assert snap is not None
    return snap.state


async def test_concurrent_acquires_share_one_boot(runtime: FakeRuntime, probe: Probe) -> None:
    runtime.start_delay = 0.05
    manager = manager_for(runtime, probe)
    leases = await asyncio.gather(*(manager.acquire(ECHO, "alice") for _ in range(50)))
    assert runtime.count("create") == 1 and runtime.count("start") == 1
    assert {lease.upstream for lease in leases} == {Upstream("127.0.1.2", 8080)}
    snap = manager.get(instance_id("echo", "alice"))
    assert snap is not None and snap.in_flight == 50 and snap.state is InstanceState.HEALTHY
    for lease in leases:
        lease.release()
        lease.release()  # a second release is ignored
    snap = manager.get(instance_id("echo", "alice"))
    assert snap is not None and snap.in_flight == 0


async def test_exit_during_boot_reports_the_code_and_next_request_wakes_it(
    runtime: FakeRuntime, probe: Probe
) -> None:
    runtime.exit_on_start = 3
    clock = Clock()
    manager = manager_for(runtime, probe, clock=clock)
    results = await asyncio.gather(
        *(manager.acquire(ECHO, "bob") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ContainerExited) for r in results)
    error = results[0]
    assert isinstance(error, ContainerExited) and error.exit_code == 3
    assert str(error) == (
        "container for echo/bob exited with code 3 before its port 8080 answered; next try in 1s"
    )
    assert state_of(manager, ECHO, "bob") is InstanceState.STOPPED_WITH_CODE
    runtime.exit_on_start = None
    clock.now += 1.0  # past its crash-loop backoff
    async with manager.use(ECHO, "bob"):
        pass
    # The same container was started again, not replaced.
    assert runtime.count("create") == 1 and runtime.count("start") == 2


async def test_silent_port_times_out_and_stops_the_container(
    runtime: FakeRuntime, probe: Probe
) -> None:
    probe.answers = False
    cls = dataclasses.replace(ECHO, boot_timeout_s=0.1)
    manager = manager_for(runtime, probe, cls)
    with pytest.raises(BootTimeout, match=r"port 8080 did not answer within 0\.1s"):
        await manager.acquire(cls, "carol")
    assert state_of(manager, cls, "carol") is InstanceState.STOPPING
    await eventually(lambda: state_of(manager, cls, "carol") is InstanceState.STOPPED)
    assert runtime.count("stop") == 1


async def test_cancelled_waiter_frees_its_hold_and_boot_goes_on(
    runtime: FakeRuntime, probe: Probe
) -> None:
    runtime.start_delay = 0.05
    manager = manager_for(runtime, probe)
    waiter = asyncio.create_task(manager.acquire(ECHO, "dave"))
    await eventually(lambda: runtime.count("start") == 1, every=0.001)  # the boot is under way
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    snap = manager.get(instance_id("echo", "dave"))
    assert snap is not None and snap.in_flight == 0 and snap.state is InstanceState.STARTING
    await eventually(lambda: state_of(manager, ECHO, "dave") is InstanceState.HEALTHY)


async def test_sleeps_after_idle_never_while_in_flight(runtime: FakeRuntime, probe: Probe) -> None:
    clock = Clock()
    manager = manager_for(runtime, probe, clock=clock)
    lease = await manager.acquire(ECHO, "erin")
    clock.now += 10
    assert manager.sleep_idle() == []  # a request is in flight
    lease.release()
    clock.now += 1.9
    assert manager.sleep_idle() == []
    clock.now += 0.1
    assert manager.sleep_idle() == [instance_id("echo", "erin")]
    assert state_of(manager, ECHO, "erin") is InstanceState.STOPPING
    await eventually(lambda: state_of(manager, ECHO, "erin") is InstanceState.SLEEPING)


async def test_request_during_stop_waits_then_boots_again(
    runtime: FakeRuntime, probe: Probe
) -> None:
    clock = Clock()
    manager = manager_for(runtime, probe, clock=clock)
    async with manager.use(ECHO, "fay"):
        pass
    clock.now += 5
    manager.sleep_idle()
    async with manager.use(ECHO, "fay") as upstream:
        assert state_of(manager, ECHO, "fay") is InstanceState.HEALTHY
        assert upstream == Upstream("127.0.1.3", 8080)  # a new IP after the restart
    assert runtime.count("stop") == 1 and runtime.count("start") == 2
    assert runtime.count("create") == 1


async def test_unknown_class_sleeps_after_the_default(runtime: FakeRuntime, probe: Probe) -> None:
    clock = Clock()
    manager = InstanceManager(
        runtime, lambda name: None, timing=FAST, clock=clock, port_probe=probe
    )
    async with manager.use(ECHO, "gus"):
        pass
    clock.now += 60
    assert manager.sleep_idle() == []
    clock.now += 600
    assert manager.sleep_idle() == [instance_id("echo", "gus")]


async def test_adopt_takes_over_running_and_stopped_containers(
    runtime: FakeRuntime, probe: Probe
) -> None:
    running = runtime.add(ECHO, "hal", "running", ip="127.0.1.50")
    stopped = runtime.add(ECHO, "ida", "exited", exit_code=143)
    manager = manager_for(runtime, probe)
    adopted = await manager.adopt()
    assert {s.name: s.state for s in adopted} == {
        "hal": InstanceState.HEALTHY,
        "ida": InstanceState.STOPPED,
    }
    async with manager.use(ECHO, "hal") as upstream:
        assert upstream == Upstream("127.0.1.50", 8080)
    assert runtime.count("start") == 0
    async with manager.use(ECHO, "ida"):
        pass
    assert runtime.calls.count(("start", stopped.id)) == 1 and runtime.count("create") == 0
    assert running.id in runtime.containers


async def test_reconcile_notices_a_container_that_exited(
    runtime: FakeRuntime, probe: Probe
) -> None:
    clock = Clock()
    manager = manager_for(runtime, probe, clock=clock)
    lease = await manager.acquire(ECHO, "jo")
    lease.served()  # it served, so its death soon after is no crash loop: it wakes at once
    lease.release()
    assert lease.container_id is not None
    runtime.set(lease.container_id, status="exited", exit_code=137, ip=None)
    clock.now += 0.01
    await manager.reconcile()
    snap = manager.get(lease.instance_id)
    assert snap is not None and snap.state is InstanceState.STOPPED_WITH_CODE
    assert snap.exit_code == 137
    async with manager.use(ECHO, "jo"):
        pass
    assert runtime.count("start") == 2


async def test_reconcile_ignores_a_listing_older_than_the_boot(
    runtime: FakeRuntime, probe: Probe
) -> None:
    clock = Clock()
    manager = manager_for(runtime, probe, clock=clock)
    lease = await manager.acquire(ECHO, "kim")
    assert lease.container_id is not None
    runtime.set(lease.container_id, status="exited", exit_code=0)
    await manager.reconcile()  # the clock did not move: the listing may predate the boot
    assert state_of(manager, ECHO, "kim") is InstanceState.HEALTHY
    lease.release()


async def test_recheck_marks_a_dead_container_stopped(runtime: FakeRuntime, probe: Probe) -> None:
    manager = manager_for(runtime, probe)
    lease = await manager.acquire(ECHO, "lou")
    assert lease.container_id is not None
    assert (await manager.recheck(lease)) is not None
    assert state_of(manager, ECHO, "lou") is InstanceState.HEALTHY
    runtime.set(lease.container_id, status="exited", exit_code=143, ip=None)
    info = await manager.recheck(lease)
    assert info is not None and info.exit_code == 143
    assert state_of(manager, ECHO, "lou") is InstanceState.STOPPED_WITH_CODE
    lease.release()


async def test_removed_container_is_created_again(runtime: FakeRuntime, probe: Probe) -> None:
    clock = Clock()
    manager = manager_for(runtime, probe, clock=clock)
    lease = await manager.acquire(ECHO, "max")
    lease.release()
    clock.now += 5
    manager.sleep_idle()
    await eventually(lambda: state_of(manager, ECHO, "max") is InstanceState.SLEEPING)
    assert lease.container_id is not None
    await runtime.remove(lease.container_id)
    async with manager.use(ECHO, "max"):
        pass
    assert runtime.count("create") == 2


async def test_capacity_counts_awake_instances_only(runtime: FakeRuntime, probe: Probe) -> None:
    # ECHO is "basic": 0.25 vCPU. A node offering 0.5 vCPU holds two awake at once.
    changes: list[int] = []
    manager = InstanceManager(
        runtime,
        {ECHO.name: ECHO}.get,
        timing=FAST,
        port_probe=probe,
        capacity=Capacity("n1", 0.5, 1 << 20),
        on_change=lambda: changes.append(1),
    )
    (await manager.acquire(ECHO, "a")).release()
    (await manager.acquire(ECHO, "b")).release()
    assert manager.awake_use() == Resources(0.5, 2048)
    with pytest.raises(NoCapacity, match="node n1 is full.*echo/c can wake when others sleep"):
        await manager.acquire(ECHO, "c")
    assert state_of(manager, ECHO, "c") is InstanceState.PLACED  # no container was made
    await manager.stop(instance_id(ECHO.name, "a"))
    (await manager.acquire(ECHO, "c")).release()
    assert manager.awake_use() == Resources(0.5, 2048)
    assert changes  # every state change is announced, for the heartbeat


# -- the lifecycle API and its events ---------------------------------------------------------


def events_manager(
    runtime: FakeRuntime, probe: Probe, *classes: ContainerClass, clock: Clock | None = None
) -> tuple[InstanceManager, list[Event]]:
    events: list[Event] = []
    by_name = {c.name: c for c in (classes or (ECHO,))}
    manager = InstanceManager(
        runtime,
        by_name.get,
        timing=FAST,
        port_probe=probe,
        on_event=events.append,
        node_id="n1",
        clock=clock or time.monotonic,
    )
    return manager, events


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


@contextlib.asynccontextmanager
async def running(manager: InstanceManager) -> AsyncIterator[None]:
    """The manager's loops (sleep, reconcile, the engine's events) for the block's duration."""
    loop = asyncio.create_task(manager.run())
    try:
        yield
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_an_exit_reported_by_the_engine_is_noticed_at_once(
    runtime: FakeRuntime, probe: Probe
) -> None:
    manager, events = events_manager(runtime, probe)
    iid = instance_id("echo", "a")
    await manager.start(ECHO, "a")
    assert manager.info(iid).state is InstanceState.HEALTHY
    async with running(manager):  # reconcile is hourly in FAST: only events tell
        container = manager.get(iid)
        assert container is not None and container.container_id is not None
        runtime.report(ContainerEventKind.OOM, container.container_id)
        runtime.die(container.container_id, 137)
        await eventually(lambda: manager.info(iid).state is InstanceState.STOPPED_WITH_CODE)
        assert manager.info(iid).exit_code == 137
        assert kinds(events) == ["starting", "ready", "exited"]
        exited = events[-1]
        assert (exited.exit_code, exited.signal, exited.node_id) == (137, 9, "n1")
        assert exited.reason == "out of memory"


async def test_an_earlier_runs_late_die_event_is_not_this_runs_death(
    runtime: FakeRuntime, probe: Probe
) -> None:
    manager, events = events_manager(runtime, probe)
    iid = instance_id("echo", "a")
    await manager.start(ECHO, "a")
    snap = manager.get(iid)
    assert snap is not None and snap.container_id is not None
    async with running(manager):
        # A die event stamped before this run started (the previous sleep's, delivered late).
        runtime.report(ContainerEventKind.DIE, snap.container_id, 143, at=time.time() - 60)
        # The manager handles an event in the step that takes it from the queue.
        await eventually(lambda: runtime.engine_events.empty())
        assert manager.info(iid).state is InstanceState.HEALTHY
        assert kinds(events) == ["starting", "ready"]


async def test_a_sleep_is_reported_as_slept_and_a_stop_as_exited(
    runtime: FakeRuntime, probe: Probe
) -> None:
    clock = Clock()
    manager, events = events_manager(runtime, probe, clock=clock)
    iid = instance_id("echo", "a")
    async with running(manager):  # the engine's die events come before stop returns
        await manager.start(ECHO, "a")
        clock.now += ECHO.sleep_after_s
        assert manager.sleep_idle() == [iid]
        await manager.stop(iid)  # waits for the sleep in progress
        # One event per run, though both the engine and docker stop's answer told of the death.
        assert kinds(events) == ["starting", "ready", "activity-expired", "slept"]
        assert events[2].reason == "idle for 2s"
        assert manager.info(iid).state is InstanceState.SLEEPING

        await manager.start(ECHO, "a")
        assert await manager.stop(iid, signum=15, grace_s=1)
        assert kinds(events)[-3:] == ["starting", "ready", "exited"]
        assert (events[-1].exit_code, events[-1].reason) == (143, "stopped")
        info = manager.info(iid)
        assert (info.state, info.exit_code) == (InstanceState.STOPPED, 143)


async def test_a_crash_while_starting_is_exited_then_failed(
    runtime: FakeRuntime, probe: Probe
) -> None:
    runtime.exit_on_start = 3
    manager, events = events_manager(runtime, probe)
    with pytest.raises(ContainerExited):
        await manager.start(ECHO, "a")
    assert kinds(events) == ["starting", "exited", "failed"]
    assert "exited with code 3" in events[-1].reason
    info = manager.info(instance_id("echo", "a"))
    assert (info.state, info.exit_code) == (InstanceState.STOPPED_WITH_CODE, 3)


async def test_start_without_wait_leaves_a_silent_container_running(
    runtime: FakeRuntime, probe: Probe
) -> None:
    probe.answers = False
    cls = dataclasses.replace(ECHO, boot_timeout_s=0.1)
    manager, events = events_manager(runtime, probe, cls)
    info = await manager.start(cls, "job", wait=False)
    assert info.state is InstanceState.RUNNING
    # Not a wait for something to happen: past boot_timeout, nothing may (no stop, no failure).
    await asyncio.sleep(0.2)
    assert manager.info(info.instance_id).state is InstanceState.RUNNING
    assert runtime.count("stop") == 0 and kinds(events) == ["starting"]
    with pytest.raises(BootTimeout):
        await manager.start(cls, "job")  # waiting for a port that never answered


async def test_start_without_wait_turns_healthy_when_the_port_answers(
    runtime: FakeRuntime, probe: Probe
) -> None:
    probe.answers = False
    manager, events = events_manager(runtime, probe)
    info = await manager.start(ECHO, "web", wait=False)
    assert info.state is InstanceState.RUNNING
    probe.answers = True
    await eventually(lambda: manager.info(info.instance_id).state is InstanceState.HEALTHY)
    assert kinds(events) == ["starting", "ready"]


async def test_other_overrides_make_the_container_again(runtime: FakeRuntime, probe: Probe) -> None:
    manager, events = events_manager(runtime, probe)
    iid = instance_id("echo", "a")
    await manager.start(ECHO, "a", Overrides(env={"A": "1"}))
    first = manager.get(iid)
    await manager.start(ECHO, "a", Overrides(env={"A": "1"}))
    assert runtime.count("create") == 1
    await manager.start(ECHO, "a", Overrides(env={"A": "2"}))
    second = manager.get(iid)
    # The fake names containers after the instance: the new one replaced the old in its dict.
    assert runtime.count("create") == 2 and runtime.count("stop") == 1
    assert first is not None and second is not None and second.container_id is not None
    assert (
        runtime.containers[second.container_id].overrides_digest
        == Overrides(env={"A": "2"}).digest
        != Overrides(env={"A": "1"}).digest
    )
    assert kinds(events) == ["starting", "ready", "starting", "ready"]  # the replace is silent


async def test_verbs_on_a_stopped_instance_fail_precondition(
    runtime: FakeRuntime, probe: Probe
) -> None:
    manager, events = events_manager(runtime, probe)
    iid = instance_id("echo", "a")
    with pytest.raises(NotFound):
        manager.info(iid)
    await manager.start(ECHO, "a")
    await manager.stop(iid)
    with pytest.raises(FailedPrecondition, match="is stopped"):
        await manager.signal(iid, 15)
    with pytest.raises(FailedPrecondition):
        manager.renew(iid)
    with pytest.raises(FailedPrecondition):
        await manager.exec(iid, ["true"], {})
    await manager.destroy(iid)
    assert kinds(events)[-1] == "removed" and not runtime.containers
    with pytest.raises(NotFound):
        manager.info(iid)


async def test_a_stop_while_starting_ends_the_boot(runtime: FakeRuntime, probe: Probe) -> None:
    probe.answers = False
    manager, events = events_manager(runtime, probe)
    iid = instance_id("echo", "a")
    request = asyncio.create_task(manager.acquire(ECHO, "a"))
    # Docker started it; the port is silent.
    await eventually(lambda: state_of(manager, ECHO, "a") is InstanceState.RUNNING, every=0.001)
    await manager.stop(iid)
    with pytest.raises(Unavailable, match="stopped"):
        await request
    info = manager.info(iid)
    assert info.state is InstanceState.STOPPED and runtime.count("stop") == 1
    assert kinds(events) == ["starting", "exited"]


async def test_get_and_snapshot_report_pool_instances_as_pinned(
    runtime: FakeRuntime, probe: Probe
) -> None:
    clock = Clock()
    manager = manager_for(runtime, probe, clock=clock)
    await manager.start_pinned(ECHO, "p1")
    (await manager.acquire(ECHO, "n1")).release()
    pinned, named = instance_id("echo", "p1"), instance_id("echo", "n1")
    got = manager.get(pinned)
    assert got is not None and got.pinned and manager.info(pinned).pool
    other = manager.get(named)
    assert other is not None and not other.pinned
    assert {s.id: s.pinned for s in manager.snapshot()} == {pinned: True, named: False}
    clock.now += 3600
    assert manager.sleep_idle() == [named]  # a pool instance never sleeps
    await manager.drain_and_remove(pinned)
    assert manager.get(pinned) is None


async def test_a_boot_that_docker_fails_rests_stopped_and_says_why(
    runtime: FakeRuntime, probe: Probe
) -> None:
    manager, events = events_manager(runtime, probe)

    runtime.create_error = ImageUnavailable("class echo: image 'echo:latest' is not on node n1")
    with pytest.raises(ImageUnavailable, match="is not on node n1"):
        await manager.acquire(ECHO, "a")
    iid = instance_id("echo", "a")
    await eventually(lambda: manager.info(iid).state is InstanceState.STOPPED)
    assert kinds(events) == ["starting", "failed"]
    assert "is not on node n1" in events[-1].reason
    assert manager.awake_use() == Resources()


async def test_stop_all_stops_every_awake_instance_and_keeps_its_container(
    runtime: FakeRuntime, probe: Probe
) -> None:
    manager, events = events_manager(runtime, probe)
    for name in ("a", "b"):
        await manager.start(ECHO, name)
    hold = await manager.acquire(ECHO, "busy")  # a request in flight does not keep it up
    await manager.start_pinned(ECHO, "pool")
    assert await manager.stop_all() == []
    assert {i.name: i.state for i in manager.infos()} == dict.fromkeys(
        ("a", "b", "busy", "pool"), InstanceState.STOPPED
    )
    assert runtime.count("stop") == 4 and len(runtime.containers) == 4
    exits = [e for e in events if e.kind is EventKind.EXITED]
    assert [e.reason for e in exits] == ["its agent shut down"] * 4
    hold.release()


# -- crash-loop backoff ---------------------------------------------------------------------------


async def test_a_crash_loop_is_refused_without_docker_until_its_backoff_passed(
    runtime: FakeRuntime, probe: Probe
) -> None:
    runtime.exit_on_start = 3
    clock = Clock()
    manager = manager_for(runtime, probe, clock=clock)
    iid = instance_id("echo", "cy")
    waits = []
    for crash in range(1, 5):
        with pytest.raises(ContainerExited, match=r"before its port 8080 answered; next try in"):
            await manager.acquire(ECHO, "cy")
        starts = runtime.count("start")
        info = manager.info(iid)
        assert (info.state, info.exit_code, info.restarts) == (
            InstanceState.STOPPED_WITH_CODE,
            3,
            crash,
        )
        assert info.backoff_until > time.time()
        wait = 2.0 ** (crash - 1)
        waits.append(round(info.backoff_until - time.time()))
        # During the backoff: refused at once, naming the code and the wait, and Docker is not
        # asked anything.
        clock.now += wait - 0.5
        for _ in range(3):
            with pytest.raises(ContainerExited) as refused:
                await manager.acquire(ECHO, "cy")
            assert str(refused.value) == (
                "container for echo/cy exited with code 3 at start; next try in 1s"
            )
            assert refused.value.exit_code == 3
        assert runtime.count("start") == starts
        clock.now += 0.5
    assert waits == [1, 2, 4, 8]
    # It gets better: the next try after the backoff succeeds, and the count stays until a
    # steady run.
    runtime.exit_on_start = None
    async with manager.use(ECHO, "cy"):
        pass
    info = manager.info(iid)
    assert (info.state, info.restarts, info.backoff_until) == (InstanceState.HEALTHY, 4, 0.0)


async def test_a_start_or_a_deploy_of_another_class_begins_afresh(
    runtime: FakeRuntime, probe: Probe
) -> None:
    runtime.exit_on_start = 3
    clock = Clock()
    manager = manager_for(runtime, probe, clock=clock)
    for _ in range(2):
        with pytest.raises(ContainerExited):
            await manager.acquire(ECHO, "di")
        clock.now += 10
    iid = instance_id("echo", "di")
    assert manager.info(iid).restarts == 2
    # An explicit Start is tried at once, whatever the backoff.
    with pytest.raises(ContainerExited, match="next try in 1s"):
        await manager.start(ECHO, "di")
    assert manager.info(iid).restarts == 1
    # A deploy that changed the class (a fixed image, say) is tried at once too.
    fixed = dataclasses.replace(ECHO, env={"FIXED": "1"})
    runtime.exit_on_start = None
    async with manager.use(fixed, "di"):
        pass
    info = manager.info(iid)
    assert (info.state, info.restarts) == (InstanceState.HEALTHY, 0)


async def test_an_exit_right_after_the_boot_without_serving_is_a_crash(
    runtime: FakeRuntime, probe: Probe
) -> None:
    clock = Clock()
    manager = manager_for(runtime, probe, clock=clock)
    for name, served in (("el", False), ("fo", True)):
        lease = await manager.acquire(ECHO, name)
        if served:
            lease.served()
        lease.release()
        assert lease.container_id is not None
        runtime.set(lease.container_id, status="exited", exit_code=1, ip=None)
        clock.now += 0.01
        await manager.reconcile()
    with pytest.raises(ContainerExited, match="exited with code 1 at start; next try in 1s"):
        await manager.acquire(ECHO, "el")
    async with manager.use(ECHO, "fo"):  # it had served: booted again at once
        pass


async def test_a_steady_run_forgives_the_crashes(runtime: FakeRuntime, probe: Probe) -> None:
    runtime.exit_on_start = 3
    clock, later = Clock(), 0.0
    manager = InstanceManager(
        runtime,
        {"echo": ECHO}.get,
        timing=FAST,
        port_probe=probe,
        clock=clock,
        wall_clock=lambda: time.time() + later,
    )
    with pytest.raises(ContainerExited):
        await manager.acquire(ECHO, "gil")
    clock.now += 1
    runtime.exit_on_start = None
    lease = await manager.acquire(ECHO, "gil")
    iid = lease.instance_id
    manager.sleep_idle()
    assert manager.info(iid).restarts == 1
    later = 601.0  # ten minutes up since docker started it
    manager.sleep_idle()
    assert manager.info(iid).restarts == 0
    lease.release()


# -- the engine restarting under the agent ---------------------------------------------------


@pytest.mark.parametrize("live_restore", [False, True])
async def test_after_an_engine_restart_the_manager_reconnects_and_takes_its_containers_again(
    live_restore: bool, runtime: FakeRuntime, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    manager, events = events_manager(runtime, probe)
    lease = await manager.acquire(ECHO, "hu")
    lease.release()
    iid = lease.instance_id
    first_container = lease.container_id
    async with running(manager):
        await eventually(lambda: runtime.followed_since == [None], what="following the engine")
        caplog.clear()
        runtime.restart_engine(live_restore=live_restore)
        await eventually(lambda: runtime.count("ping") >= 3, what="pings while it is away")
        assert manager.info(iid).state is InstanceState.HEALTHY  # nothing known yet
        runtime.down = False
        await eventually(lambda: len(runtime.followed_since) == 2, what="following again")
        since = runtime.followed_since[-1]
        assert since is not None and abs(since - time.time()) < 5
        expected = InstanceState.HEALTHY if live_restore else InstanceState.STOPPED
        await eventually(lambda: manager.info(iid).state is expected, what=str(expected))
        if not live_restore:
            # It was stopped by the engine, not by itself: no crash counted, and the event
            # says so.
            assert manager.info(iid).restarts == 0
            assert events[-1].kind == "exited" and "engine restarted" in events[-1].reason
        # It serves again, the same container (woken when the engine stopped it).
        async with manager.use(ECHO, "hu"):
            pass
        assert manager.info(iid).state is InstanceState.HEALTHY
        assert manager.get(iid) is not None and manager.get(iid).container_id == first_container  # type: ignore[union-attr]
        assert runtime.count("start") == (1 if live_restore else 2)
    lost = [r for r in caplog.records if "lost the container engine" in r.getMessage()]
    back = [r for r in caplog.records if "container engine is back" in r.getMessage()]
    assert (len(lost), len(back)) == (1, 1)  # once each way, however many pings failed
    assert runtime.count("ensure_networks") >= 1  # made again (with their packet filter)
