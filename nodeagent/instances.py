"""The node agent's instance manager: boots a named instance's container on demand (one boot for
all concurrent requests), tracks requests in flight, sleeps idle containers, adopts survivors.

    stopped ──acquire──▶ booting ──port answers──▶ running ──idle sleep_after──▶ stopping ─▶ stopped
                            └──exited / timeout──▶ stopped (or stopping)          ▲
                                                   running ──container exited────┘ (noticed)

The lifecycle API (start with overrides, stop with a signal, signal, exec, logs, destroy) works on
the same instances, and every change is reported as a `LifecycleEvent` through `on_event`:

    starting          a boot began (a request, a Start, a pool assignment)
    ready             the port answered: the instance is healthy
    activity-expired  sleep_after passed without activity; a sleep follows
    slept             the sleep's stop finished
    exited            the container stopped by itself, by a user's signal, or by a Stop (exit_code,
                      and signal = code - 128 when the code is above 128); "out of memory" as
                      reason when the kernel killed it for that
    failed            a boot failed: the reason says why (timeout, exit, image missing ...)
    removed           Destroy, or a pool instance drained and removed

The agent's own stops (a sleep, a boot timeout, a container made again for other overrides, a
destroy or drain) are not reported as `exited`: each container run ends in at most one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from nodeagent import metrics
from nodeagent.runtime import (
    LABEL_MEMORY_MIB,
    LABEL_OVERRIDES,
    LABEL_VCPU,
    NO_OVERRIDES,
    ContainerEvent,
    ContainerInfo,
    ContainerRuntime,
    ExecProcess,
    Overrides,
    Stream,
)
from portside.errors import (
    BootTimeout,
    ContainerExited,
    FailedPrecondition,
    NoCapacity,
    NotFound,
    PortsideError,
    Unavailable,
)
from portside.spec import DEFAULT_SLEEP_AFTER_S, ContainerClass, instance_id

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class InstanceState(enum.StrEnum):
    STOPPED = "stopped"
    BOOTING = "booting"
    RUNNING = "running"
    STOPPING = "stopping"


class Upstream(NamedTuple):
    """Where the agent reaches a running container: its IP on a Portside network, and port."""

    host: str
    port: int


@dataclass(frozen=True)
class InstanceSnapshot:
    """One instance as heartbeats and listings report it; `last_activity` is time.monotonic()."""

    id: str
    name: str
    class_name: str
    state: InstanceState
    container_id: str | None
    upstream: Upstream | None
    in_flight: int
    last_activity: float
    exit_code: int | None  # of the last time the container exited; None while it runs
    vcpu: float = 0.0  # its instance type's, while awake
    pinned: bool = False  # a pool instance: never sleeps
    memory_mib: int = 0  # its instance type's, while awake


@dataclass(frozen=True)
class InstanceInfo:
    """One instance as the lifecycle API reports it. `state` is stopped | starting | running |
    healthy | stopping | exited (exited: it stopped by itself; see exit_code); `since` is the
    unix time of its last change."""

    instance_id: str
    class_name: str
    name: str
    state: str
    exit_code: int | None
    since: float
    pool: bool
    in_flight: int
    node_id: str


@dataclass(frozen=True)
class LifecycleEvent:
    """One lifecycle event (kinds in the module docstring); `time` is unix seconds."""

    kind: str
    time: float
    class_name: str
    name: str
    instance_id: str
    node_id: str
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class _StopOrder:
    """Why the agent stops a container, and how. `cause` decides which event its death makes:
    sleep → slept, stop → exited, the others (boot-timeout, replace, destroy, drain) none."""

    cause: str
    signum: int | None = None  # None: the image's stop signal (SIGTERM)
    grace_s: float | None = None  # None: Timing.stop_grace


class _Aborted(Exception):
    """A stop or destroy came while the instance booted."""


@dataclass(frozen=True)
class Capacity:
    """What this node offers to awake instances."""

    node_id: str
    vcpu: float
    memory_mib: int


@dataclass(frozen=True)
class Timing:
    """How often the manager looks at things, in seconds."""

    sleep_check: float = 0.2  # the sleep loop's period: sleeps happen within this of sleep_after
    # How often the engine's list is compared with what we believe: a container that died while
    # idle and is not noticed yet costs its next request a failed connect (up to ~3 s of ARP).
    reconcile: float = 1.0
    port_poll: float = 0.015  # during a boot, between TCP connects to the container's port
    exit_poll: float = 0.1  # during a boot, between inspects that notice an early exit
    stop_grace: float = 5.0  # docker stop's SIGTERM-to-SIGKILL delay on sleep


class _Instance:
    """Mutable state of one instance; only the event loop's thread touches it."""

    def __init__(self, iid: str, name: str, class_name: str, now: float) -> None:
        self.id = iid
        self.name = name
        self.class_name = class_name
        self.state = InstanceState.STOPPED
        self.container_id: str | None = None
        self.port: int | None = None  # the container's port, fixed when it was created
        self.upstream: Upstream | None = None
        self.in_flight = 0
        self.last_activity = now
        self.ready_at = 0.0  # when it last became running, to ignore older engine listings
        self.exit_code: int | None = None
        self.vcpu = 0.0  # the instance type it runs with; counts against the node while awake
        self.memory_mib = 0
        self.boot: asyncio.Task[Upstream] | None = None
        self.stop: asyncio.Task[None] | None = None
        # What a Start asked for when the container was made (None: unknown, adopted), and the
        # digest of it that the container's label carries.
        self.overrides: Overrides | None = NO_OVERRIDES
        self.overrides_digest = ""
        self.run_open = False  # its container runs and its death is not handled yet
        self.healthy = False  # the port answered since the container last started
        self.exited = False  # stopped by itself (not by the agent) the last time
        self.oom = False  # the kernel's OOM killer hit the running container
        self.stopping_for: str | None = None  # the cause of the agent's stop in progress
        self.abort: _StopOrder | None = None  # set by a stop that comes while it boots
        self.started: asyncio.Event | None = None  # set once the boot's docker start returned
        self.health: asyncio.Task[bool] | None = None  # port probe after a no-wait start
        self.public = "stopped"  # the lifecycle state last reported, and since when (unix)
        self.since = 0.0


class Lease:
    """An instance held awake by one request or WebSocket; `release()` it exactly once (extra
    calls are ignored), or use it as `async with lease as upstream:`."""

    __slots__ = ("_manager", "_instance", "upstream", "container_id", "_released")

    def __init__(self, manager: InstanceManager, instance: _Instance, upstream: Upstream) -> None:
        self._manager = manager
        self._instance = instance
        self.upstream = upstream
        self.container_id = instance.container_id
        self._released = False

    @property
    def instance_id(self) -> str:
        return self._instance.id

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self._instance)

    async def __aenter__(self) -> Upstream:
        return self.upstream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class InstanceManager:
    """Named instances on this node, keyed by instance id.

    `get_class` answers the current class by name (kept current by the agent from the control
    plane); it decides sleep_after for instances whose class was only known by label (adopted).
    """

    def __init__(
        self,
        runtime: ContainerRuntime,
        get_class: Callable[[str], ContainerClass | None],
        *,
        timing: Timing | None = None,
        clock: Callable[[], float] = time.monotonic,
        port_probe: Callable[[str, int], Awaitable[bool]] | None = None,
        capacity: Capacity | None = None,
        on_change: Callable[[], None] | None = None,
        on_event: Callable[[LifecycleEvent], None] | None = None,
        on_run: Callable[[InstanceSnapshot, str, float | None], None] | None = None,
        node_id: str = "",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._runtime = runtime
        self._on_event = on_event
        # A container run began ("began", "adopted") or its death was handled ("ended", with the
        # engine's unix time of the death when known): metering follows the time docker ran it.
        self._on_run = on_run
        self._node_id = node_id or (capacity.node_id if capacity is not None else "")
        self._wall = wall_clock
        self._capacity = capacity
        self._on_change = on_change
        self._get_class = get_class
        self._timing = timing or Timing()
        self._clock = clock
        self._port_answers = port_probe or tcp_port_answers
        self._instances: dict[str, _Instance] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pinned: set[str] = set()  # pool instances: they never sleep, they are drained
        # Classes as Start gave them, for a class the control plane's config has not brought yet.
        self._started_classes: dict[str, ContainerClass] = {}

    # -- requests -----------------------------------------------------------------------------

    async def acquire(self, cls: ContainerClass, name: str) -> Lease:
        """Hold instance `name` of `cls` awake, booting it first if needed (concurrent callers
        share one boot). Raises ContainerExited, BootTimeout or Unavailable."""
        inst = self._instance(cls, name)
        inst.in_flight += 1
        inst.last_activity = self._clock()
        metrics.REQUESTS_IN_FLIGHT.labels(inst.class_name).inc()
        try:
            upstream = await self._ready(inst, cls)
        except BaseException:
            # Also on cancellation (the client went away): it must not keep the instance awake.
            self._release(inst)
            raise
        return Lease(self, inst, upstream)

    @contextlib.asynccontextmanager
    async def use(self, cls: ContainerClass, name: str) -> AsyncIterator[Upstream]:
        """`async with manager.use(cls, name) as upstream:` — acquire, then release on exit."""
        lease = await self.acquire(cls, name)
        try:
            yield lease.upstream
        finally:
            lease.release()

    def _instance(self, cls: ContainerClass, name: str) -> _Instance:
        iid = instance_id(cls.name, name)
        inst = self._instances.get(iid)
        if inst is None:
            inst = _Instance(iid, name, cls.name, self._clock())
            inst.since = self._wall()
            self._instances[iid] = inst
            metrics.INSTANCES.labels(inst.state.value).inc()
        return inst

    def _release(self, inst: _Instance) -> None:
        inst.in_flight -= 1
        inst.last_activity = self._clock()
        metrics.REQUESTS_IN_FLIGHT.labels(inst.class_name).dec()

    async def _ready(self, inst: _Instance, cls: ContainerClass) -> Upstream:
        while True:
            if inst.state is InstanceState.RUNNING and inst.upstream is not None:
                return inst.upstream
            if inst.state is InstanceState.STOPPING and inst.stop is not None:
                # Shielded: a caller that gives up must not cancel the stop for everyone.
                await asyncio.shield(inst.stop)
                continue
            if inst.state is InstanceState.STOPPED:
                self._begin_boot(inst, cls, detached=False)
            if inst.boot is None:  # unreachable: booting always has its task
                raise Unavailable(f"instance {cls.name}/{inst.name} is {inst.state} without a task")
            # Every waiter gets the boot's result or its error; none of them owns the boot.
            upstream = await asyncio.shield(inst.boot)
            if inst.health is not None:
                # Started without waiting for its port: a request waits for it like a boot.
                await asyncio.shield(inst.health)
            return upstream

    def _begin_boot(self, inst: _Instance, cls: ContainerClass, *, detached: bool) -> None:
        self._check_capacity(inst, cls)
        inst.vcpu, inst.memory_mib = cls.instance_type.vcpu, cls.instance_type.memory_mib
        inst.started = asyncio.Event()
        inst.abort = None
        self._set_state(inst, InstanceState.BOOTING)
        inst.boot = self._spawn(self._boot(inst, cls, detached))

    def _check_capacity(self, inst: _Instance, cls: ContainerClass) -> None:
        """Awake instances may not use more than the node offers. The control plane places with
        the same rule, but a sleeping instance wakes here without asking it, so the agent checks."""
        if self._capacity is None:
            return
        awake = [i for i in self._instances.values() if i.state is not InstanceState.STOPPED]
        vcpu = sum(i.vcpu for i in awake) + cls.instance_type.vcpu
        memory = sum(i.memory_mib for i in awake) + cls.instance_type.memory_mib
        cap = self._capacity
        if vcpu > cap.vcpu + 1e-6 or memory > cap.memory_mib:
            raise NoCapacity(
                f"node {cap.node_id} is full: {len(awake)} awake instances use "
                f"{vcpu - cls.instance_type.vcpu:g}/{cap.vcpu:g} vCPU and "
                f"{memory - cls.instance_type.memory_mib}/{cap.memory_mib} MiB; "
                f"{cls.name}/{inst.name} can wake when others sleep"
            )

    def awake_use(self) -> tuple[float, int]:
        """vCPU and MiB of the instance types of every instance not stopped."""
        awake = [i for i in self._instances.values() if i.state is not InstanceState.STOPPED]
        return sum(i.vcpu for i in awake), sum(i.memory_mib for i in awake)

    async def recheck(self, lease: Lease) -> ContainerInfo | None:
        """After a request to `lease`'s container failed to connect or was cut: inspect it, and if
        it no longer runs, mark the instance stopped so the next acquire boots it again.
        Returns the container as found, or None when it no longer exists."""
        inst = lease._instance
        if lease.container_id is None:
            return None
        try:
            info: ContainerInfo | None = await self._runtime.inspect(lease.container_id)
        except NotFound:
            info = None
        if (
            (info is None or not info.running)
            and inst.state is InstanceState.RUNNING
            and inst.container_id == lease.container_id
        ):
            self._container_gone(inst, info)
        return info

    # -- boot ---------------------------------------------------------------------------------

    async def _boot(self, inst: _Instance, cls: ContainerClass, detached: bool) -> Upstream:
        """Start the container and wait for its port. `detached` (a Start without waiting):
        done once the container runs; the port is probed in the background, and a port that
        never answers leaves it running (a job need not serve HTTP) instead of stopping it."""
        started = self._clock()
        woke = inst.container_id is not None
        if woke:
            metrics.WAKES.labels(cls.name).inc()
        inst.exited = inst.healthy = False
        self._emit(inst, "starting")
        outcome = "error"
        failure: str | None = None
        try:
            async with asyncio.timeout(cls.boot_timeout_s):
                upstream, answered = await self._start_and_wait(inst, cls, detached)
            outcome = "ok"
        except TimeoutError:
            outcome = "timeout"
            port = inst.port or cls.default_port
            what = (
                f"port {port} did not answer"
                if inst.container_id is not None
                else "docker did not create its container"
            )
            failure = f"container for {cls.name}/{inst.name}: {what} within {cls.boot_timeout_s:g}s"
            # Stop it in the background: the waiters hear of the timeout now, and a request that
            # comes during the stop waits for it and then boots afresh.
            self._begin_stop(inst, _StopOrder("boot-timeout"))
            raise BootTimeout(failure) from None
        except _Aborted:
            outcome = "aborted"
            order = inst.abort or _StopOrder("stop")
            self._begin_stop(inst, order)
            raise Unavailable(
                f"{cls.name}/{inst.name} was stopped ({order.cause}) while it "
                "started; start it again"
            ) from None
        except ContainerExited as exc:
            outcome = "exited"
            failure = str(exc)
            raise
        except PortsideError as exc:
            failure = str(exc)
            raise
        except Exception as exc:
            log.exception("boot of %s/%s failed", cls.name, inst.name)
            failure = f"boot of {cls.name}/{inst.name} failed: {exc}"
            raise Unavailable(failure) from exc
        finally:
            metrics.BOOTS.labels(cls.name, outcome).inc()
            if failure is not None:
                self._emit(inst, "failed", reason=failure)
            if outcome != "ok" and inst.state is InstanceState.BOOTING:
                self._set_state(inst, InstanceState.STOPPED)
            inst.boot = None
            inst.abort = None
            if inst.started is not None:
                inst.started.set()
        now = self._clock()
        inst.upstream = upstream
        inst.exit_code = None
        inst.ready_at = inst.last_activity = now
        self._set_state(inst, InstanceState.RUNNING)
        if answered:
            metrics.BOOT_SECONDS.labels(cls.name).observe(now - started)
            self._became_healthy(inst)
            log.info(
                "%s %s/%s in %.0f ms at %s:%d",
                "woke" if woke else "booted",
                cls.name,
                inst.name,
                (now - started) * 1000,
                upstream.host,
                upstream.port,
            )
        else:
            inst.health = self._spawn(self._probe(inst, upstream, started + cls.boot_timeout_s))
        return upstream

    async def _start_and_wait(
        self, inst: _Instance, cls: ContainerClass, detached: bool
    ) -> tuple[Upstream, bool]:
        info: ContainerInfo | None = None
        if inst.container_id is not None:
            try:
                info = await self._runtime.start(inst.container_id)
            except NotFound:
                log.warning(
                    "container %s of %s/%s is gone; creating a new one",
                    inst.container_id,
                    cls.name,
                    inst.name,
                )
                inst.container_id = None
        if inst.container_id is None:
            overrides = inst.overrides or NO_OVERRIDES
            inst.container_id = await self._runtime.create(cls, inst.name, overrides)
            inst.overrides_digest = overrides.digest
            inst.port = cls.default_port
            info = await self._runtime.start(inst.container_id)
        assert info is not None
        inst.oom = False
        inst.run_open = info.running
        if info.running:
            self._run_changed(inst, "began")
        else:
            inst.run_open = True  # so that its death is reported once, here
            self._container_died(inst, inst.container_id, info.exit_code)
        self._refresh(inst)
        if inst.started is not None:
            inst.started.set()
        port = inst.port or cls.default_port
        next_inspect = self._clock() + self._timing.exit_poll
        while True:
            if inst.abort is not None:
                raise _Aborted()
            if not inst.run_open or not info.running:
                if info.running:  # the engine's die event came first
                    info = await self._runtime.inspect(inst.container_id)
                self._container_died(inst, inst.container_id, info.exit_code)
                raise ContainerExited(
                    f"container for {cls.name}/{inst.name} exited with code {inst.exit_code} "
                    f"before its port {port} answered",
                    exit_code=inst.exit_code,
                )
            if detached and info.ip is not None:
                return Upstream(info.ip, port), False
            if info.ip is not None and await self._port_answers(info.ip, port):
                return Upstream(info.ip, port), True
            await asyncio.sleep(self._timing.port_poll)
            if self._clock() >= next_inspect:
                info = await self._runtime.inspect(inst.container_id)
                next_inspect = self._clock() + self._timing.exit_poll

    async def _probe(self, inst: _Instance, upstream: Upstream, deadline: float) -> bool:
        """After a no-wait start: whether the port answers before `deadline` (then: ready)."""
        try:
            while self._clock() < deadline:
                if inst.state is not InstanceState.RUNNING or inst.upstream != upstream:
                    return False
                if await self._port_answers(upstream.host, upstream.port):
                    self._became_healthy(inst)
                    return True
                await asyncio.sleep(max(self._timing.port_poll, 0.05))
            log.info(
                "%s/%s: port %d did not answer; it keeps running",
                inst.class_name,
                inst.name,
                upstream.port,
            )
            return False
        finally:
            if inst.health is asyncio.current_task():  # not a later boot's probe
                inst.health = None

    def _became_healthy(self, inst: _Instance) -> None:
        inst.healthy = True
        self._refresh(inst)
        self._emit(inst, "ready")

    # -- sleep --------------------------------------------------------------------------------

    async def run(self) -> None:
        """The sleep loop and the periodic check against the engine; runs until cancelled
        (give it to the agent's TaskGroup)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._sleep_loop())
            group.create_task(self._reconcile_loop())
            group.create_task(self._follow_engine())

    async def _sleep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._timing.sleep_check)
            self.sleep_idle()

    def sleep_idle(self) -> list[str]:
        """Begin stopping every running instance that has nothing in flight and has been idle for
        its class's sleep_after; returns their ids. Synchronous, so no request slips in between
        the decision and the state change."""
        now = self._clock()
        stopping = []
        for inst in self._instances.values():
            if inst.state is not InstanceState.RUNNING or inst.in_flight > 0:
                continue
            if inst.id in self._pinned:
                continue
            cls = self._get_class(inst.class_name) or self._started_classes.get(inst.class_name)
            sleep_after = cls.sleep_after_s if cls is not None else DEFAULT_SLEEP_AFTER_S
            if now - inst.last_activity >= sleep_after:
                self._emit(inst, "activity-expired", reason=f"idle for {sleep_after:g}s")
                self._begin_stop(inst, _StopOrder("sleep"))
                stopping.append(inst.id)
        return stopping

    # -- pools ----------------------------------------------------------------------------------

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pinned)

    async def start_pinned(self, cls: ContainerClass, name: str) -> None:
        """Boot a pool instance now (not on a request) and keep it awake until it is drained."""
        self._pinned.add(instance_id(cls.name, name))
        (await self.acquire(cls, name)).release()

    async def drain_and_remove(self, iid: str, timeout_s: float = 60.0) -> None:
        """Let a pool instance finish its requests in flight (up to `timeout_s`), then stop it
        and remove its container: it is gone, not asleep."""
        self._pinned.discard(iid)
        inst = self._instances.get(iid)
        if inst is None:
            return
        deadline = self._clock() + timeout_s
        while inst.in_flight > 0 and self._clock() < deadline:  # noqa: ASYNC110 - a bounded poll; no event per release
            await asyncio.sleep(0.1)
        await self._stop_instance(inst, _StopOrder("drain"))
        if inst.in_flight > 0 or inst.state is not InstanceState.STOPPED:
            return  # a request came in meanwhile; the next drain pass tries again
        if inst.container_id is not None:
            await self._runtime.remove(inst.container_id, force=True)
        self._forget(inst, "drained")
        log.info("removed pool instance %s/%s", inst.class_name, inst.name)

    async def stop(self, iid: str, signum: int | None = None, grace_s: float | None = None) -> bool:
        """Stop an instance now, requests in flight or not (an operator's or the Stop RPC's):
        `signum` (None: the image's stop signal, SIGTERM), then SIGKILL after `grace_s` (None:
        Timing.stop_grace). It keeps its container and wakes on its next request; its death is
        reported as `exited` with the code. False if this agent has no such instance."""
        inst = self._instances.get(iid)
        if inst is None:
            return False
        await self._stop_instance(inst, _StopOrder("stop", signum, grace_s))
        return True

    async def _stop_instance(self, inst: _Instance, order: _StopOrder) -> None:
        while inst.state is InstanceState.BOOTING and inst.boot is not None:
            # The boot notices within a port poll and hands the container to the stop.
            inst.abort = order
            with contextlib.suppress(PortsideError):
                await asyncio.shield(inst.boot)
        if inst.state is InstanceState.RUNNING:
            self._begin_stop(inst, order)
        if inst.stop is not None:
            await asyncio.shield(inst.stop)

    def _begin_stop(self, inst: _Instance, order: _StopOrder) -> None:
        inst.stopping_for = order.cause
        inst.upstream = None
        inst.healthy = False
        self._set_state(inst, InstanceState.STOPPING)
        inst.stop = self._spawn(self._stop(inst, order))

    async def _stop(self, inst: _Instance, order: _StopOrder) -> None:
        container_id = inst.container_id
        try:
            if container_id is not None:
                grace = self._timing.stop_grace if order.grace_s is None else order.grace_s
                code = await self._runtime.stop(container_id, grace, order.signum)
                self._container_died(inst, container_id, code)
            if order.cause == "sleep":
                metrics.SLEEPS.labels(inst.class_name).inc()
                log.info("slept %s/%s", inst.class_name, inst.name)
        except NotFound:
            self._container_died(inst, container_id, None)
            inst.container_id = None
        except Exception:
            # The next wake starts it again (a no-op if it still runs) and re-inspects its IP.
            log.exception("stopping %s/%s failed", inst.class_name, inst.name)
        finally:
            inst.stop = None
            inst.stopping_for = None
            self._set_state(inst, InstanceState.STOPPED)

    # -- the lifecycle API ----------------------------------------------------------------------

    async def start(
        self,
        cls: ContainerClass,
        name: str,
        overrides: Overrides = NO_OVERRIDES,
        *,
        wait: bool = True,
    ) -> InstanceInfo:
        """Boot (or wake) instance `name`. A container made with other overrides is stopped if
        needed, removed and made again. `wait`: until the port answers (ContainerExited,
        BootTimeout as for a request); else until docker started it (a container that already
        exited is reported in the returned state, not raised)."""
        self._started_classes[cls.name] = cls
        inst = self._instance(cls, name)
        inst.last_activity = self._clock()
        detached = not wait
        while True:
            if inst.state is InstanceState.STOPPING and inst.stop is not None:
                await asyncio.shield(inst.stop)
                continue
            if inst.state is not InstanceState.STOPPED:
                if inst.overrides_digest != overrides.digest:
                    await self._stop_instance(inst, _StopOrder("replace"))
                    continue
                break  # booting or running as asked: join it
            if inst.container_id is not None and inst.overrides_digest != overrides.digest:
                container_id, inst.container_id = inst.container_id, None
                log.info("making %s/%s again with other overrides", cls.name, name)
                await self._runtime.remove(container_id, force=True)
                continue
            inst.overrides = overrides
            self._begin_boot(inst, cls, detached=detached)
            break
        boot, started = inst.boot, inst.started
        if wait:
            if boot is not None:
                await asyncio.shield(boot)
            if inst.health is not None:  # started earlier without waiting: wait for the port
                await asyncio.shield(inst.health)
            if inst.state is InstanceState.RUNNING and not inst.healthy:
                raise BootTimeout(
                    f"{cls.name}/{name} runs, but its port "
                    f"{inst.port or cls.default_port} did not answer in time"
                )
        elif boot is not None and started is not None and not started.is_set():
            waiter = asyncio.ensure_future(started.wait())
            try:
                await asyncio.wait({waiter, boot}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if boot.done() and not boot.cancelled():
                exc = boot.exception()
                if exc is not None and not isinstance(exc, ContainerExited):
                    raise exc
        inst.last_activity = self._clock()
        return self._info(inst)

    async def signal(self, iid: str, signum: int) -> None:
        """Send `signum` to the container's main process. NotFound; FailedPrecondition when
        its container does not run."""
        inst = self._known(iid)
        if not inst.run_open or inst.container_id is None:
            raise FailedPrecondition(
                f"instance {inst.class_name}/{inst.name} is {inst.public}, "
                "not running: start it first"
            )
        await self._runtime.signal(inst.container_id, signum)

    async def destroy(self, iid: str) -> None:
        """Kill and remove the container and its writable layer, and forget the instance."""
        inst = self._known(iid)
        self._pinned.discard(iid)
        await self._stop_instance(inst, _StopOrder("destroy", grace_s=1.0))
        if inst.container_id is not None:
            inst.stopping_for = "destroy"  # its death, if it still ran, is ours
            await self._runtime.remove(inst.container_id, force=True)
        self._forget(inst, "destroyed")

    def renew(self, iid: str) -> None:
        """Push the sleep timer, as a request would. FailedPrecondition: not awake."""
        inst = self._known(iid)
        if inst.state not in (InstanceState.BOOTING, InstanceState.RUNNING):
            raise FailedPrecondition(
                f"instance {inst.class_name}/{inst.name} is {inst.public}, "
                "not running: start it first"
            )
        inst.last_activity = self._clock()

    def info(self, iid: str) -> InstanceInfo:
        return self._info(self._known(iid))

    async def exec(
        self,
        iid: str,
        command: list[str],
        env: Mapping[str, str],
        working_dir: str = "",
        stdin: bool = False,
    ) -> ExecProcess:
        """Run a command in the running container (hold the instance with `holding` meanwhile).
        FailedPrecondition when it does not run."""
        inst = self._known(iid)
        if (
            not inst.run_open
            or inst.container_id is None
            or inst.state not in (InstanceState.BOOTING, InstanceState.RUNNING)
        ):
            raise FailedPrecondition(
                f"instance {inst.class_name}/{inst.name} is {inst.public}, "
                "not running: start it first"
            )
        return await self._runtime.exec(inst.container_id, command, env, working_dir, stdin)

    @contextlib.contextmanager
    def holding(self, iid: str) -> Iterator[None]:
        """Keep the instance awake, like a request in flight (an exec session)."""
        inst = self._known(iid)
        inst.in_flight += 1
        inst.last_activity = self._clock()
        metrics.REQUESTS_IN_FLIGHT.labels(inst.class_name).inc()
        try:
            yield
        finally:
            self._release(inst)

    async def logs(self, iid: str, follow: bool, tail: int) -> AsyncIterator[tuple[Stream, bytes]]:
        """The container's output; nothing when it has none yet."""
        inst = self._known(iid)
        if inst.container_id is None:
            return
        async for item in self._runtime.logs(inst.container_id, follow, tail):
            yield item

    def _known(self, iid: str) -> _Instance:
        inst = self._instances.get(iid)
        if inst is None:
            raise NotFound(f"this agent has no instance {iid}")
        return inst

    def _forget(self, inst: _Instance, why: str) -> None:
        if self._instances.get(inst.id) is inst:
            del self._instances[inst.id]
            metrics.INSTANCES.labels(inst.state.value).dec()
        self._emit(inst, "removed", reason=why)

    def _info(self, inst: _Instance) -> InstanceInfo:
        return InstanceInfo(
            instance_id=inst.id,
            class_name=inst.class_name,
            name=inst.name,
            state=inst.public,
            exit_code=inst.exit_code if inst.state is InstanceState.STOPPED else None,
            since=inst.since,
            pool=inst.id in self._pinned,
            in_flight=inst.in_flight,
            node_id=self._node_id,
        )

    # -- deaths and events ----------------------------------------------------------------------

    def _container_died(
        self,
        inst: _Instance,
        container_id: str | None,
        exit_code: int | None,
        at: float | None = None,
    ) -> None:
        """The container of `inst` stopped, however we learned it (the engine's event, a boot's
        inspect, our own stop, the reconcile loop): report it once per run, by its cause."""
        if container_id is None or container_id != inst.container_id or not inst.run_open:
            return
        inst.run_open = False
        self._run_changed(inst, "ended", at)
        inst.exit_code = exit_code
        cause = inst.stopping_for
        if cause in (None, "stop"):
            inst.exited = cause is None
            signal = exit_code - 128 if exit_code is not None and exit_code > 128 else None
            reason = "out of memory" if inst.oom else ("stopped" if cause else "")
            self._emit(inst, "exited", exit_code=exit_code, signal=signal, reason=reason)
        elif cause == "sleep":
            self._emit(inst, "slept")
        if inst.state is InstanceState.RUNNING:
            log.warning(
                "container of %s/%s exited with code %s while running",
                inst.class_name,
                inst.name,
                exit_code,
            )
            inst.upstream = None
            inst.healthy = False
            self._set_state(inst, InstanceState.STOPPED)
        else:
            self._refresh(inst)

    def _on_container_event(self, event: ContainerEvent) -> None:
        inst = self._instances.get(event.instance_id)
        if inst is None or event.container_id != inst.container_id:
            return
        if event.kind == "die":
            self._container_died(inst, event.container_id, event.exit_code, event.time or None)
        elif event.kind == "oom":
            inst.oom = True
        elif event.kind == "destroy" and inst.stopping_for != "destroy":
            if inst.state is InstanceState.RUNNING:
                self._container_gone(inst, None)
            elif inst.state is InstanceState.STOPPED:
                inst.container_id = None

    async def _follow_engine(self) -> None:
        while True:
            try:
                async for event in self._runtime.events():
                    self._on_container_event(event)
            except PortsideError as exc:
                log.warning("cannot follow the engine's events: %s", exc)
            await asyncio.sleep(1.0)

    def _emit(
        self,
        inst: _Instance,
        kind: str,
        *,
        exit_code: int | None = None,
        signal: int | None = None,
        reason: str = "",
    ) -> None:
        metrics.LIFECYCLE_EVENTS.labels(inst.class_name, kind).inc()
        if self._on_event is None:
            return
        self._on_event(
            LifecycleEvent(
                kind=kind,
                time=self._wall(),
                class_name=inst.class_name,
                name=inst.name,
                instance_id=inst.id,
                node_id=self._node_id,
                exit_code=exit_code,
                signal=signal,
                reason=reason,
            )
        )

    def _refresh(self, inst: _Instance) -> None:
        if inst.state is InstanceState.BOOTING:
            public = "running" if inst.run_open else "starting"
        elif inst.state is InstanceState.RUNNING:
            public = "healthy" if inst.healthy else "running"
        elif inst.state is InstanceState.STOPPING:
            public = "stopping"
        else:
            public = "exited" if inst.exited else "stopped"
        if public != inst.public:
            inst.public = public
            inst.since = self._wall()

    # -- engine ---------------------------------------------------------------------------------

    async def adopt(self) -> list[InstanceSnapshot]:
        """Make Portside's networks, then take over this node's containers (by their labels) as a
        previous agent left them: running ones as running (idle from now), others as stopped,
        reused on their next wake. Nothing is stopped or removed. Call once, before serving."""
        await self._runtime.ensure_networks()
        now = self._clock()
        adopted = []
        for info in await self._runtime.list():
            if not info.instance_id or not info.class_name or info.port is None:
                log.warning("ignoring container %s: it lacks Portside's labels", info.name)
                continue
            inst = self._instances.get(info.instance_id)
            if inst is not None:
                continue
            inst = _Instance(info.instance_id, info.instance_name, info.class_name, now)
            inst.since = self._wall()
            inst.container_id, inst.port = info.id, info.port
            inst.overrides = None  # only its digest is known
            inst.overrides_digest = info.labels.get(LABEL_OVERRIDES, "")
            inst.vcpu, inst.memory_mib = _size(info.labels)
            self._instances[inst.id] = inst
            metrics.INSTANCES.labels(inst.state.value).inc()
            if info.running and info.ip is not None:
                inst.upstream = Upstream(info.ip, info.port)
                inst.ready_at = now
                inst.run_open = inst.healthy = True
                self._set_state(inst, InstanceState.RUNNING)
                self._run_changed(inst, "adopted")
            else:
                inst.exit_code = info.exit_code
            adopted.append(inst)
        log.info(
            "adopted %d containers (%d running)",
            len(adopted),
            sum(1 for i in adopted if i.state is InstanceState.RUNNING),
        )
        return [_snapshot(inst) for inst in adopted]

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self._timing.reconcile)
            try:
                await self.reconcile()
            except PortsideError as exc:
                log.warning("cannot compare instances with the engine: %s", exc)

    async def reconcile(self) -> None:
        """Notice containers that exited on their own (or were removed) while we thought them
        running, so the next request boots them again instead of failing to connect."""
        listed_at = self._clock()
        found = {info.id: info for info in await self._runtime.list()}
        for inst in self._instances.values():
            if inst.container_id is None:
                continue
            info = found.get(inst.container_id)
            if inst.state is InstanceState.RUNNING and inst.ready_at < listed_at:
                if info is None or not info.running:
                    self._container_gone(inst, info)
                elif (
                    info.ip is not None
                    and inst.upstream is not None
                    and info.ip != inst.upstream.host
                ):
                    inst.upstream = Upstream(info.ip, inst.upstream.port)
            elif inst.state is InstanceState.STOPPED and info is None:
                inst.container_id = None  # removed behind our back: the next boot creates one

    def _container_gone(self, inst: _Instance, info: ContainerInfo | None) -> None:
        self._container_died(inst, inst.container_id, info.exit_code if info is not None else None)
        inst.exit_code = info.exit_code if info is not None else None
        if info is None:
            inst.container_id = None
            log.warning("container of %s/%s was removed while running", inst.class_name, inst.name)
        inst.upstream = None
        inst.healthy = False
        self._set_state(inst, InstanceState.STOPPED)

    # -- reporting and lifetime -------------------------------------------------------------------

    def snapshot(self) -> list[InstanceSnapshot]:
        return [_snapshot(inst, inst.id in self._pinned) for inst in self._instances.values()]

    def get(self, iid: str) -> InstanceSnapshot | None:
        inst = self._instances.get(iid)
        return _snapshot(inst) if inst is not None else None

    async def close(self) -> None:
        """Cancel boots and stops in progress and wait for them; containers keep running, for the
        next agent to adopt."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _set_state(self, inst: _Instance, state: InstanceState) -> None:
        if inst.state is not state:
            metrics.INSTANCES.labels(inst.state.value).dec()
            metrics.INSTANCES.labels(state.value).inc()
            inst.state = state
            self._refresh(inst)
            if self._on_change is not None:
                self._on_change()

    def _run_changed(self, inst: _Instance, change: str, at: float | None = None) -> None:
        if self._on_run is not None:
            self._on_run(_snapshot(inst, inst.id in self._pinned), change, at)

    def _spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            # Its waiters got the error already, if it had any: don't log it as never retrieved.
            task.exception()


async def tcp_port_answers(host: str, port: int) -> bool:
    """Whether `host:port` accepts a TCP connection now (within half a second)."""
    try:
        async with asyncio.timeout(0.5):
            _reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _snapshot(inst: _Instance, pinned: bool = False) -> InstanceSnapshot:
    return InstanceSnapshot(
        id=inst.id,
        name=inst.name,
        class_name=inst.class_name,
        state=inst.state,
        container_id=inst.container_id,
        upstream=inst.upstream,
        in_flight=inst.in_flight,
        last_activity=inst.last_activity,
        exit_code=inst.exit_code,
        vcpu=inst.vcpu,
        pinned=pinned,
        memory_mib=inst.memory_mib,
    )


def _size(labels: Mapping[str, str]) -> tuple[float, int]:
    try:
        return float(labels.get(LABEL_VCPU, "0")), int(labels.get(LABEL_MEMORY_MIB, "0"))
    except ValueError:
        return 0.0, 0
