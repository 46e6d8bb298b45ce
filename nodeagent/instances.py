"""The node agent's instance manager: boots a named instance's container on demand (one boot for
all concurrent requests), tracks requests in flight, sleeps idle containers, adopts survivors.

    stopped ──acquire──▶ booting ──port answers──▶ running ──idle sleep_after──▶ stopping ─▶ stopped
                            └──exited / timeout──▶ stopped (or stopping)          ▲
                                                   running ──container exited────┘ (noticed)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from nodeagent import metrics
from nodeagent.runtime import LABEL_MEMORY_MIB, LABEL_VCPU, ContainerInfo, ContainerRuntime
from portside.errors import (
    BootTimeout,
    ContainerExited,
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

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


class InstanceManager:
    """Named instances on this node, keyed by instance id.

    `get_class` answers the current class by name (kept current by the agent from the control
    plane); it decides sleep_after for instances whose class was only known by label (adopted).
    """

    def __init__(self, runtime: ContainerRuntime,
                 get_class: Callable[[str], ContainerClass | None], *,
                 timing: Timing | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 port_probe: Callable[[str, int], Awaitable[bool]] | None = None,
                 capacity: Capacity | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self._runtime = runtime
        self._capacity = capacity
        self._on_change = on_change
        self._get_class = get_class
        self._timing = timing or Timing()
        self._clock = clock
        self._port_answers = port_probe or tcp_port_answers
        self._instances: dict[str, _Instance] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pinned: set[str] = set()  # pool instances: they never sleep, they are drained

    # -- requests -----------------------------------------------------------------------------

    async def acquire(self, cls: ContainerClass, name: str) -> Lease:
        """Hold instance `name` of `cls` awake, booting it first if needed (concurrent callers
        share one boot). Raises ContainerExited, BootTimeout or Unavailable."""
        iid = instance_id(cls.name, name)
        inst = self._instances.get(iid)
        if inst is None:
            inst = _Instance(iid, name, cls.name, self._clock())
            self._instances[iid] = inst
            metrics.INSTANCES.labels(inst.state.value).inc()
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
                self._check_capacity(inst, cls)
                inst.vcpu, inst.memory_mib = cls.instance_type.vcpu, cls.instance_type.memory_mib
                self._set_state(inst, InstanceState.BOOTING)
                inst.boot = self._spawn(self._boot(inst, cls))
            if inst.boot is None:  # unreachable: booting always has its task
                raise Unavailable(f"instance {cls.name}/{inst.name} is {inst.state} without a task")
            # Every waiter gets the boot's result or its error; none of them owns the boot.
            return await asyncio.shield(inst.boot)

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
                f"{cls.name}/{inst.name} can wake when others sleep")

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
        if (info is None or not info.running) and inst.state is InstanceState.RUNNING \
                and inst.container_id == lease.container_id:
            self._container_gone(inst, info)
        return info

    # -- boot ---------------------------------------------------------------------------------

    async def _boot(self, inst: _Instance, cls: ContainerClass) -> Upstream:
        started = self._clock()
        woke = inst.container_id is not None
        if woke:
            metrics.WAKES.labels(cls.name).inc()
        outcome = "error"
        try:
            async with asyncio.timeout(cls.boot_timeout_s):
                upstream = await self._start_and_wait(inst, cls, started)
            outcome = "ok"
        except TimeoutError:
            outcome = "timeout"
            port = inst.port or cls.default_port
            what = (f"port {port} did not answer" if inst.container_id is not None
                    else "docker did not create its container")
            # Stop it in the background: the waiters hear of the timeout now, and a request that
            # comes during the stop waits for it and then boots afresh.
            self._begin_stop(inst, idle=False)
            raise BootTimeout(f"container for {cls.name}/{inst.name}: {what} within "
                              f"{cls.boot_timeout_s:g}s") from None
        except ContainerExited:
            outcome = "exited"
            raise
        except PortsideError:
            raise
        except Exception as exc:
            log.exception("boot of %s/%s failed", cls.name, inst.name)
            raise Unavailable(f"boot of {cls.name}/{inst.name} failed: {exc}") from exc
        finally:
            metrics.BOOTS.labels(cls.name, outcome).inc()
            if outcome != "ok" and inst.state is InstanceState.BOOTING:
                self._set_state(inst, InstanceState.STOPPED)
            inst.boot = None
        now = self._clock()
        metrics.BOOT_SECONDS.labels(cls.name).observe(now - started)
        inst.upstream = upstream
        inst.exit_code = None
        inst.ready_at = inst.last_activity = now
        self._set_state(inst, InstanceState.RUNNING)
        log.info("%s %s/%s in %.0f ms at %s:%d", "woke" if woke else "booted", cls.name, inst.name,
                 (now - started) * 1000, upstream.host, upstream.port)
        return upstream

    async def _start_and_wait(self, inst: _Instance, cls: ContainerClass,
                              started: float) -> Upstream:
        info: ContainerInfo | None = None
        if inst.container_id is not None:
            try:
                info = await self._runtime.start(inst.container_id)
            except NotFound:
                log.warning("container %s of %s/%s is gone; creating a new one",
                            inst.container_id, cls.name, inst.name)
                inst.container_id = None
        if inst.container_id is None:
            inst.container_id = await self._runtime.create(cls, inst.name)
            inst.port = cls.default_port
            info = await self._runtime.start(inst.container_id)
        assert info is not None
        port = inst.port or cls.default_port
        next_inspect = self._clock() + self._timing.exit_poll
        while True:
            if not info.running:
                inst.exit_code = info.exit_code
                raise ContainerExited(
                    f"container for {cls.name}/{inst.name} exited with code {info.exit_code} "
                    f"before its port {port} answered", exit_code=info.exit_code)
            if info.ip is not None and await self._port_answers(info.ip, port):
                return Upstream(info.ip, port)
            await asyncio.sleep(self._timing.port_poll)
            if self._clock() >= next_inspect:
                info = await self._runtime.inspect(inst.container_id)
                next_inspect = self._clock() + self._timing.exit_poll

    # -- sleep --------------------------------------------------------------------------------

    async def run(self) -> None:
        """The sleep loop and the periodic check against the engine; runs until cancelled
        (give it to the agent's TaskGroup)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._sleep_loop())
            group.create_task(self._reconcile_loop())

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
            cls = self._get_class(inst.class_name)
            sleep_after = cls.sleep_after_s if cls is not None else DEFAULT_SLEEP_AFTER_S
            if now - inst.last_activity >= sleep_after:
                self._begin_stop(inst, idle=True)
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
        await self.stop(iid)
        if inst.in_flight > 0 or inst.state is not InstanceState.STOPPED:
            return  # a request came in meanwhile; the next drain pass tries again
        if inst.container_id is not None:
            await self._runtime.remove(inst.container_id, force=True)
        del self._instances[iid]
        metrics.INSTANCES.labels(inst.state.value).dec()
        log.info("removed pool instance %s/%s", inst.class_name, inst.name)

    async def stop(self, iid: str) -> bool:
        """Stop an instance now, requests in flight or not (an operator's stop); it keeps its
        container and wakes on its next request. False if this agent has no such instance."""
        inst = self._instances.get(iid)
        if inst is None:
            return False
        if inst.state is InstanceState.RUNNING:
            self._begin_stop(inst, idle=False)
        if inst.stop is not None:
            await asyncio.shield(inst.stop)
        return True

    def _begin_stop(self, inst: _Instance, *, idle: bool) -> None:
        self._set_state(inst, InstanceState.STOPPING)
        inst.upstream = None
        inst.stop = self._spawn(self._stop(inst, idle))

    async def _stop(self, inst: _Instance, idle: bool) -> None:
        try:
            if inst.container_id is not None:
                await self._runtime.stop(inst.container_id, self._timing.stop_grace)
            if idle:
                metrics.SLEEPS.labels(inst.class_name).inc()
                log.info("slept %s/%s", inst.class_name, inst.name)
        except NotFound:
            inst.container_id = None
        except Exception:
            # The next wake starts it again (a no-op if it still runs) and re-inspects its IP.
            log.exception("stopping %s/%s failed", inst.class_name, inst.name)
        finally:
            inst.stop = None
            self._set_state(inst, InstanceState.STOPPED)

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
            inst.container_id, inst.port = info.id, info.port
            inst.vcpu, inst.memory_mib = _size(info.labels)
            self._instances[inst.id] = inst
            metrics.INSTANCES.labels(inst.state.value).inc()
            if info.running and info.ip is not None:
                inst.upstream = Upstream(info.ip, info.port)
                inst.ready_at = now
                self._set_state(inst, InstanceState.RUNNING)
            else:
                inst.exit_code = info.exit_code
            adopted.append(inst)
        log.info("adopted %d containers (%d running)", len(adopted),
                 sum(1 for i in adopted if i.state is InstanceState.RUNNING))
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
                elif info.ip is not None and inst.upstream is not None \
                        and info.ip != inst.upstream.host:
                    inst.upstream = Upstream(info.ip, inst.upstream.port)
            elif inst.state is InstanceState.STOPPED and info is None:
                inst.container_id = None  # removed behind our back: the next boot creates one

    def _container_gone(self, inst: _Instance, info: ContainerInfo | None) -> None:
        inst.exit_code = info.exit_code if info is not None else None
        if info is None:
            inst.container_id = None
        log.warning("container of %s/%s %s while running", inst.class_name, inst.name,
                    "was removed" if info is None else f"exited with code {info.exit_code}")
        inst.upstream = None
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
            if self._on_change is not None:
                self._on_change()

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
        id=inst.id, name=inst.name, class_name=inst.class_name, state=inst.state,
        container_id=inst.container_id, upstream=inst.upstream, in_flight=inst.in_flight,
        last_activity=inst.last_activity, exit_code=inst.exit_code, vcpu=inst.vcpu,
        pinned=pinned,
    )


def _size(labels: Mapping[str, str]) -> tuple[float, int]:
    try:
        return float(labels.get(LABEL_VCPU, "0")), int(labels.get(LABEL_MEMORY_MIB, "0"))
    except ValueError:
        return 0.0, 0
