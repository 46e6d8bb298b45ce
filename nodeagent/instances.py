"""The node agent's instance manager: boots a named instance's container on demand (one boot for
all concurrent requests), tracks requests in flight, sleeps idle containers, adopts survivors.

Each instance's state follows the pure table in `nodeagent.lifecycle`; this module is the I/O
around it. It feeds the table what happened (a boot asked for, docker's answers, the port probe,
the engine's events, the reconcile loop's listing) and carries out what the table answers: stop
the container, meter its run, forget a removed container, announce events.

    placed ─▶ starting ─▶ running ─▶ healthy ─idle for sleep_after─▶ stopping ─▶ sleeping
                 └─ its port stays silent, docker fails ─▶ stopping ─▶ stopped
    running, healthy ─ its container exits by itself ─▶ stopped_with_code
    running, healthy ─ the engine restarted under it ─▶ stopped
    healthy ─ its health checks fail N times in a row ─▶ running ─ one passes ─▶ healthy
    healthy ─idle for sleep_after (sleep_mode "pause")─▶ paused ─a request─▶ healthy
    paused ─pause_max─▶ stopping ─▶ sleeping

Pause mode freezes an idle healthy container (docker pause) instead of stopping it; the next
request, Start or pool assignment thaws it (docker unpause) through the boot path: waiters join
the thaw as they would a boot, and a request that comes while the freeze is in progress waits
for it, then thaws. A paused instance holds its memory on the node but not its CPU, is never
health-checked, and is stopped as a sleep after its class's pause_max.

Health checks (nodeagent.health) GET its class's ping_endpoint straight from the container, one
at a time per instance, from one loop for the node: they never wake an instance, never hold it
awake and never count as activity for sleep_after, and a stop cancels the check in flight.

A rollout replaces a running instance (`replace`, once per instance and class version): requests
wait at its gate from then on, those in flight on the old container finish (up to the class's
stop_timeout, 15 min by default), then SIGTERM, SIGKILL after what is left of stop_timeout (at least
Timing.stop_grace), removal, and a container of the current version boots; the waiters join that
boot as they would a wake, so the replace itself never fails a request. The old container is gone
before the new one is created: never two copies. A stop, destroy or drain ends a replace under way.
A resting instance whose container is older than its class's wake_min_version wakes in a new
container instead (`replaced`: its writable layer starts fresh).

A container that exits at start (during its boot, or within seconds and before serving a request)
is not booted again until its crash-loop backoff has passed (1 s, 2, 4 … 5 min; see
`lifecycle.CrashLoop`): requests meanwhile get ContainerExited at once, without touching Docker. A
Start, or a class changed by a deploy, begins afresh.

When the engine's event stream breaks (the engine restarted or went away), the manager waits for
the engine with backoff, takes the state of every container again (`readopt`) and follows the
events anew: no agent restart is needed.

Besides the state, an instance holds the calls in progress: a boot (requests join it), a stop (a
boot waits for it), and after a Start without waiting, the probe of its port. Every change is
reported as an `Event` through `on_event` (kinds in portside.events). Each container run ends in
at most one event, however many parts report its death; the agent's own stops (a boot that gave
up, a container made again for other overrides, a destroy or a drain) end in none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, NamedTuple, TypeVar

from nodeagent import health, lifecycle, metrics
from nodeagent.health import CheckResult, HealthCheck, Streak
from nodeagent.images import ImageSupply
from nodeagent.lifecycle import (
    Announce,
    Answered,
    Boot,
    BootFailed,
    CheckFailed,
    CheckPassed,
    CrashLoop,
    Died,
    Effect,
    EngineStopped,
    FoundPaused,
    FoundRunning,
    FoundStopped,
    Pause,
    Removed,
    RunEnd,
    Started,
    Stop,
    StopCause,
    StopFailed,
    Thawed,
    Trigger,
)
from nodeagent.runtime import (
    NO_OVERRIDES,
    ContainerEvent,
    ContainerEventKind,
    ContainerInfo,
    ContainerRuntime,
    ExecProcess,
    Overrides,
    Stream,
)
from nodeagent.snapshots import (
    SnapshotService,
    Source,
    from_snapshot,
    restore_class,
)
from portside.build import human_size
from portside.capacity import Resources, held
from portside.daemon import Children
from portside.errors import (
    BootTimeout,
    ContainerExited,
    EngineUnavailable,
    FailedPrecondition,
    NoCapacity,
    NotFound,
    NotRunning,
    PortsideError,
    Unavailable,
)
from portside.events import Event, EventKind
from portside.instances import InstanceInfo
from portside.rpc import Backoff
from portside.snapshots import CREATE, SLEEP, Snapshot
from portside.spec import (
    DEFAULT_PAUSE_MAX_S,
    DEFAULT_SLEEP_AFTER_S,
    DEFAULT_STOP_TIMEOUT_S,
    ContainerClass,
    instance_id,
)
from portside.states import InstanceState
from portside.terminal import TerminalSize

log = logging.getLogger(__name__)

_IN_FLIGHT: Final = Children(metrics.REQUESTS_IN_FLIGHT)  # per request: no labels() lock
# The reasons of the events when someone pauses or unpauses a container with docker itself.
_PAUSED_OUTSIDE = "paused outside Portside (docker pause)"
_UNPAUSED_OUTSIDE = "unpaused outside Portside (docker unpause)"
_T = TypeVar("_T")


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
class _StopOrder:
    """A stop the agent asks for: its cause (which decides what its death says), and how."""

    cause: StopCause
    signum: int | None = None  # None: the image's stop signal (SIGTERM)
    grace_s: float | None = None  # None: Timing.stop_grace
    reason: str = ""  # for the event the stop's cause begins with (a rollout's versions)


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
    # While the engine is away: the first and the longest wait between tries to reach it.
    engine_retry_first: float = 0.1
    engine_retry_most: float = 2.0
    # The health loop's longest sleep: a new instance's first check is scheduled within this.
    health_tick: float = 0.5


class _Instance:
    """One instance: its lifecycle state, its container, and the calls in progress on it. Only
    the event loop's thread touches it."""

    def __init__(self, iid: str, name: str, class_name: str, now: float, wall: float) -> None:
        self.id = iid
        self.name = name
        self.class_name = class_name
        self.state = InstanceState.PLACED
        self.cause: StopCause | None = None  # of the stop in progress (stopping only)
        self.since = wall  # unix time of the last state change
        self.container_id: str | None = None
        self.port: int | None = None  # the container's port, fixed when it was created
        self.upstream: Upstream | None = None
        self.in_flight = 0
        self.last_activity = now
        # Its open exec sessions: each event is set when it stops running (the session is over).
        self.sessions: set[asyncio.Event] = set()
        # When its boot, freeze or thaw ended (or it was found paused or thawed): engine listings
        # taken before then are stale.
        self.ready_at = 0.0
        self.exit_code: int | None = None
        self.vcpu = 0.0  # the instance type it runs with; counts against the node while awake
        self.memory_mib = 0
        # What a Start asked for when the container was made (None: unknown, adopted), and its
        # digest, which the container keeps.
        self.overrides: Overrides | None = NO_OVERRIDES
        self.overrides_digest = ""
        self.version = 0  # the class version its container was made from (0: unknown)
        # The current run: when the engine started it (unix; 0.0 unknown, None: no run), so an
        # earlier run's late die event is not taken for its death; and whether the kernel's OOM
        # killer hit it.
        self.run_started: float | None = None
        self.oom = False
        # The engine's time of a death that came while a stop call was in progress: the call's
        # answer reports the death (the engine lists the container as running a moment longer).
        self.died_at: float | None = None
        self.boot: asyncio.Task[Upstream] | None = None
        self.started: asyncio.Event | None = None  # set once the boot's docker start returned
        self.abort: _StopOrder | None = None  # set by a stop that comes while it boots
        self.health: asyncio.Task[bool] | None = None  # port probe after a no-wait start
        # Health checks while it runs: the check in flight, when the next one is due (on the
        # manager's clock; None: not scheduled), the failures in a row, and whether the checks
        # made it unhealthy.
        self.check: asyncio.Task[None] | None = None
        self.next_check: float | None = None
        self.streak = Streak()
        self.sick = False
        self.stop: asyncio.Task[None] | None = None
        # Snapshots (nodeagent.snapshots): set while its container is being committed (a boot
        # waits for it); whether it ran since its last snapshot, and that snapshot's top layer
        # (a sleep's snapshot is skipped when the layer is the same); the snapshot its next
        # container is made from (a Start's); and whether it never had a container here, which
        # then starts from its latest snapshot if it was placed anew after its node was lost.
        self.committing: asyncio.Event | None = None
        self.ran_since_snapshot = False
        self.snapshot_layer = ""
        self.restore: Snapshot | None = None
        self.first_container = False
        # Pause mode: the freeze in progress (docker pause; a thaw is a boot: `boot`), since when
        # it is paused (on the manager's clock, for pause_max; None while not paused), and the
        # unix time its last freeze or thaw was answered: the engine's pause and unpause events
        # stamped before it are the agent's own (or older), not news.
        self.freeze: asyncio.Task[None] | None = None
        self.paused_at: float | None = None
        self.froze_or_thawed = 0.0
        # A rollout's replace in progress. Requests and Starts wait at its gate (opened once the
        # new container's boot began, or the replace gave up) and are not in flight on the old
        # container: `waiting` of `in_flight` are parked there. `drained` is set when the old
        # container's last request ends. `replaced_to`: the version the last replace was for
        # (a rollout asks on every heartbeat reply; each version is replaced once).
        self.replacing: asyncio.Task[None] | None = None
        self.replace_gate: asyncio.Event | None = None
        self.waiting = 0
        self.drained: asyncio.Event | None = None
        self.replaced_to = 0
        # Crash-loop backoff: its state, the class its last boot ran (a deploy that changes it
        # begins afresh), the unix time of its next try, and whether this run served a request.
        self.crash = CrashLoop()
        self.booted_as: ContainerClass | None = None
        self.backoff_until = 0.0
        self.served = False


class Hold:
    """An instance held awake by one request or WebSocket; `release()` it exactly once (extra
    calls are ignored), or use it as `async with hold as upstream:`."""

    __slots__ = ("_manager", "_instance", "upstream", "container_id", "_released", "_activity")

    def __init__(
        self,
        manager: InstanceManager,
        instance: _Instance,
        upstream: Upstream,
        activity: bool = True,
    ) -> None:
        self._manager = manager
        self._instance = instance
        self.upstream = upstream
        self.container_id = instance.container_id
        self._released = False
        self._activity = activity

    @property
    def instance_id(self) -> str:
        return self._instance.id

    def served(self) -> None:
        """Its container answered this request: it runs well enough not to be crash-looping."""
        self._instance.served = True

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self._instance, self._activity)

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
        on_event: Callable[[Event], None] | None = None,
        on_run: Callable[[InstanceSnapshot, Effect, float | None], None] | None = None,
        node_id: str = "",
        wall_clock: Callable[[], float] = time.time,
        images: ImageSupply | None = None,
        health_check: HealthCheck | None = None,
        snapshots: SnapshotService | None = None,
    ) -> None:
        self._runtime = runtime
        self._health_check = health_check or health.http_check
        # Makes sure the engine has a class's image before its container is created (pulled
        # from the control plane or a registry); None: the image must be there already.
        self._images = images
        # Takes snapshots and finds the one a container starts from; None: no snapshots (an
        # agent without a control plane, tests).
        self._snapshots = snapshots
        self._on_event = on_event
        # A container run began (BEGIN_RUN, ADOPT_RUN) or ended (END_RUN, with the engine's unix
        # time of the death when known): metering follows the time docker ran it.
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
        # Since when (on the clock) the engine is out of reach, from the moment its event stream
        # broke until its containers were taken again; None while it answers.
        self._engine_lost: float | None = None

    # -- requests -----------------------------------------------------------------------------

    async def acquire(
        self, cls: ContainerClass, name: str, *, activity: bool = True, why: str = "a request"
    ) -> Hold:
        """Hold instance `name` of `cls` awake, booting (or thawing) it first if needed
        (concurrent callers share one boot). Without `activity` (a scheduled call with
        no_activity) it is held the same, but neither the acquire nor the release restarts its
        sleep timer. `why` is what a thaw's `resumed` event says woke it. Raises
        ContainerExited, BootTimeout, ImageUnavailable, NoCapacity or Unavailable."""
        inst = self._instance(cls, name)
        inst.in_flight += 1
        if activity:
            inst.last_activity = self._clock()
        _IN_FLIGHT(inst.class_name).inc()
        try:
            upstream = await self._ready(inst, cls, why)
        except BaseException:
            # Also on cancellation (the client went away): it must not keep the instance awake.
            self._release(inst, activity)
            raise
        return Hold(self, inst, upstream, activity)

    @contextlib.asynccontextmanager
    async def use(self, cls: ContainerClass, name: str) -> AsyncIterator[Upstream]:
        """`async with manager.use(cls, name) as upstream:` — acquire, then release on exit."""
        hold = await self.acquire(cls, name)
        try:
            yield hold.upstream
        finally:
            hold.release()

    def frozen_upstream(self, class_name: str, name: str) -> Upstream | None:
        """The address of instance `name` while it is paused (or being frozen), which a
        request's acquire thaws: the frozen container keeps it, and its kernel accepts
        connections to its port meanwhile, so the request can connect while docker unpauses."""
        inst = self._instances.get(instance_id(class_name, name))
        if inst is None or inst.state is not InstanceState.PAUSED:
            return None
        return inst.upstream

    def _instance(self, cls: ContainerClass, name: str) -> _Instance:
        iid = instance_id(cls.name, name)
        inst = self._instances.get(iid)
        if inst is None:
            inst = self._add(_Instance(iid, name, cls.name, self._clock(), self._wall()))
            inst.first_container = True
        return inst

    def _add(self, inst: _Instance) -> _Instance:
        self._instances[inst.id] = inst
        metrics.INSTANCES.labels(inst.state.value).inc()
        return inst

    def _release(self, inst: _Instance, activity: bool = True) -> None:
        inst.in_flight -= 1
        if activity:
            inst.last_activity = self._clock()
        _IN_FLIGHT(inst.class_name).dec()
        if inst.drained is not None and inst.in_flight <= inst.waiting:
            inst.drained.set()

    async def _ready(self, inst: _Instance, cls: ContainerClass, why: str) -> Upstream:
        while True:
            if inst.replace_gate is not None:
                await self._wait_for_replace(inst, inst.replace_gate)
                continue
            if inst.stop is not None:
                # Shielded: a caller that gives up must not cancel the stop for everyone.
                await asyncio.shield(inst.stop)
                continue
            if inst.freeze is not None:
                # A request that comes while it is being frozen waits for the freeze, then thaws
                # it: it never fails for the pause.
                await asyncio.shield(inst.freeze)
                continue
            if inst.boot is None:
                if inst.state.running and inst.upstream is not None:
                    return inst.upstream
                if inst.state.awake:  # unreachable: starting has its boot, stopping its stop
                    raise Unavailable(f"instance {cls.name}/{inst.name} is {inst.state} idle")
                if self._thaws_anew(inst, cls):
                    await self._stop_instance(inst, _StopOrder(StopCause.REPLACE))
                    continue
                self._begin_boot(inst, cls, detached=False, why=why)
            assert inst.boot is not None
            # Every waiter gets the boot's result or its error; none of them owns the boot.
            upstream = await asyncio.shield(inst.boot)
            if inst.health is not None:
                # Started without waiting for its port: a request waits for it like a boot.
                await asyncio.shield(inst.health)
            return upstream

    def _begin_boot(
        self, inst: _Instance, cls: ContainerClass, *, detached: bool, why: str = "a request"
    ) -> None:
        if inst.state is InstanceState.PAUSED:
            # Its container and its port are there, frozen: the boot is a thaw, which waiters
            # join as they would a boot.
            self._check_capacity(inst, cls)
            inst.boot = self._spawn(self._thaw(inst, cls, why))
            return
        self._check_backoff(inst, cls)
        self._check_capacity(inst, cls)
        inst.vcpu, inst.memory_mib = cls.instance_type.vcpu, cls.instance_type.memory_mib
        inst.started = asyncio.Event()
        inst.abort = None
        inst.run_started = inst.died_at = None
        inst.served = False
        inst.booted_as = cls
        if inst.crash.crashes:
            metrics.CRASH_RESTARTS.labels(cls.name).inc()
        self._fire(inst, Boot())
        inst.boot = self._spawn(self._boot(inst, cls, detached))

    def _check_backoff(self, inst: _Instance, cls: ContainerClass) -> None:
        """A crash-looping container is not started again before its backoff has passed: the
        caller hears why at once, and Docker hears nothing. A deploy that changed its class
        begins afresh."""
        if inst.crash.crashes and inst.booted_as is not None and inst.booted_as != cls:
            self._forgive(inst)
        if inst.crash.holds_back(self._clock()):
            raise ContainerExited(
                f"container for {cls.name}/{inst.name} {inst.crash.refusal(self._clock())}",
                exit_code=inst.crash.exit_code,
            )

    def _forgive(self, inst: _Instance) -> None:
        """Forget its crash loop (a Start, a deploy, a long enough run)."""
        if inst.crash.crashes:
            with contextlib.suppress(KeyError):
                metrics.CRASH_BACKOFF.remove(inst.class_name, inst.name)
        inst.crash, inst.backoff_until = CrashLoop(), 0.0

    def _back_off(self, inst: _Instance, trigger: Trigger) -> None:
        """Its container exited by itself: a crash when it died during its boot or soon after
        without serving (lifecycle.RunEnd); then no boot before the backoff has passed."""
        exit_code = trigger.exit_code if isinstance(trigger, Died) else None
        ran_s = None
        if inst.run_started:  # 0.0: an adopted run, whose start is unknown
            died = trigger.at if isinstance(trigger, Died) and trigger.at else self._wall()
            ran_s = max(0.0, died - inst.run_started)
        end = RunEnd(exit_code, ran_s, answered=inst.boot is None, served=inst.served)
        before = inst.crash
        inst.crash = lifecycle.after_exit(before, end, self._clock())
        if inst.crash.crashes > before.crashes:
            inst.backoff_until = self._wall() + inst.crash.delay_s
            metrics.CRASH_BACKOFF.labels(inst.class_name, inst.name).set(inst.crash.delay_s)
            log.warning(
                "%s/%s exited with code %s at start (%d in a row); next try in %gs",
                inst.class_name,
                inst.name,
                exit_code,
                inst.crash.crashes,
                inst.crash.delay_s,
            )
        elif not inst.crash.crashes:
            self._forgive(inst)
        else:
            inst.backoff_until = 0.0
            metrics.CRASH_BACKOFF.labels(inst.class_name, inst.name).set(0)

    def _check_capacity(self, inst: _Instance, cls: ContainerClass) -> None:
        """Awake instances may not use more than the node offers. The control plane places with
        the same rule, but a sleeping instance wakes here without asking it, so the agent checks.
        A paused one's memory is counted already: its thaw needs only its CPU back."""
        if self._capacity is None:
            return
        cap = self._capacity
        used = self.awake_use()
        need = Resources.of(cls.instance_type)
        if inst.state is InstanceState.PAUSED:
            need = Resources(inst.vcpu, 0)
        if not (Resources(cap.vcpu, cap.memory_mib) - used).fits(need):
            awake = sum(1 for i in self._instances.values() if i.state.awake)
            paused = sum(1 for i in self._instances.values() if i.state is InstanceState.PAUSED)
            raise NoCapacity(
                f"node {cap.node_id} is full: {awake} awake "
                + (f"and {paused} paused " if paused else "")
                + "instances use "
                f"{used.vcpu:g}/{cap.vcpu:g} vCPU and {used.memory_mib}/{cap.memory_mib} MiB; "
                f"{cls.name}/{inst.name} can wake when others sleep"
            )

    def awake_use(self) -> Resources:
        """The instance types of every awake instance (starting, running, healthy, stopping),
        and the memory of every paused one (frozen, it keeps its memory but uses no CPU)."""
        return sum(
            (held(i.state, Resources(i.vcpu, i.memory_mib)) for i in self._instances.values()),
            Resources(),
        )

    async def recheck(self, hold: Hold) -> ContainerInfo | None:
        """After a request to `hold`'s container failed to connect or was cut: inspect it, and if
        it no longer runs, take it as exited so the next acquire boots it again. Returns the
        container as found, or None when it no longer exists."""
        inst = hold._instance
        if hold.container_id is None:
            return None
        try:
            info: ContainerInfo | None = await self._runtime.inspect(hold.container_id)
        except NotFound:
            info = None
        if inst.state.running and inst.container_id == hold.container_id:
            self._notice(inst, info)
        return info

    # -- boot ---------------------------------------------------------------------------------

    async def _boot(self, inst: _Instance, cls: ContainerClass, detached: bool) -> Upstream:
        """Start the container and wait for its port. `detached` (a Start without waiting):
        done once the container runs; the port is probed in the background, and a port that
        never answers leaves it running (a job need not serve HTTP) instead of stopping it."""
        started = self._clock()
        woke = inst.container_id is not None and not _below_wake_floor(inst, cls)
        if woke:
            metrics.WAKES.labels(cls.name).inc()
        outcome = "error"
        try:
            async with asyncio.timeout(cls.boot_timeout_s):
                upstream, answered = await self._start_and_wait(inst, cls, detached)
            outcome = "ok"
        except TimeoutError:
            outcome = "timeout"
            port = inst.port or cls.default_port
            if inst.container_id is not None:
                what = f"port {port} did not answer"
            elif self._images is not None and self._images.pulling(cls):
                what = (
                    f"its image {cls.run_image} was not pulled (the pull goes "
                    "on; the next boot finds it)"
                )
            else:
                what = "docker did not create its container"
            failure = f"container for {cls.name}/{inst.name}: {what} within {cls.boot_timeout_s:g}s"
            # Stopped in the background: the waiters hear of the timeout now, and a request that
            # comes during the stop waits for it and then boots afresh.
            self._fire(inst, BootFailed(failure))
            raise BootTimeout(failure) from None
        except _Aborted:
            outcome = "aborted"
            order = inst.abort or _StopOrder(StopCause.STOP)
            self._fire(inst, Stop(order.cause), order)
            raise Unavailable(
                f"{cls.name}/{inst.name} was stopped ({order.cause}) while it "
                "started; start it again"
            ) from None
        except PortsideError as exc:
            outcome = "exited" if isinstance(exc, ContainerExited) else "error"
            self._fire(inst, BootFailed(str(exc)))
            raise
        except Exception as exc:
            log.exception("boot of %s/%s failed", cls.name, inst.name)
            failure = f"boot of {cls.name}/{inst.name} failed: {exc}"
            self._fire(inst, BootFailed(failure))
            raise Unavailable(failure) from exc
        finally:
            metrics.BOOTS.labels(cls.name, outcome).inc()
            inst.boot = None
            inst.abort = None
            if inst.started is not None:
                inst.started.set()
        now = self._clock()
        inst.upstream = upstream
        inst.ready_at = inst.last_activity = now
        if answered:
            metrics.BOOT_SECONDS.labels(cls.name).observe(now - started)
            self._fire(inst, Answered())
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
        while inst.committing is not None:  # a snapshot's commit: its container must not start
            await inst.committing.wait()
        if inst.container_id is not None and _below_wake_floor(inst, cls):
            await self._wake_fresh(inst, cls)
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
            restore = await self._restore_from(inst, cls)
            made_from = cls if restore is None else restore_class(cls, restore[0])
            if self._images is not None:  # within the boot's deadline: a pull counts
                await self._images.ensure(made_from)
            inst.container_id = await self._runtime.create(
                cls,
                inst.name,
                overrides,
                from_snapshot=None if restore is None else from_snapshot(restore[0]),
            )
            inst.first_container, inst.restore, inst.snapshot_layer = False, None, ""
            if restore is not None:
                self._restored(inst, *restore)
            inst.overrides_digest = overrides.digest
            inst.version = cls.version
            inst.port = cls.default_port
            info = await self._runtime.start(inst.container_id)
        assert info is not None
        inst.oom = False
        inst.exit_code = None
        inst.run_started = info.started_at.timestamp() if info.started_at is not None else 0.0
        inst.ran_since_snapshot = True
        self._fire(inst, Started())
        if not info.running:  # it exited already: its run began and ended
            self._notice(inst, info)
        if inst.started is not None:
            inst.started.set()
        port = inst.port or cls.default_port
        next_inspect = self._clock() + self._timing.exit_poll
        while True:
            if inst.abort is not None:
                raise _Aborted()
            if inst.state is not InstanceState.RUNNING:  # its death was noticed
                wait = inst.crash.wait_s(self._clock())
                raise ContainerExited(
                    f"container for {cls.name}/{inst.name} exited with code {inst.exit_code} "
                    f"before its port {port} answered"
                    + (f"; next try in {math.ceil(wait)}s" if wait > 0 else ""),
                    exit_code=inst.exit_code,
                )
            if detached and info.ip is not None:
                return Upstream(info.ip, port), False
            if info.ip is not None and await self._port_answers(info.ip, port):
                return Upstream(info.ip, port), True
            await asyncio.sleep(self._timing.port_poll)
            if self._clock() >= next_inspect:
                info = await self._runtime.inspect(inst.container_id)
                self._notice(inst, info)
                next_inspect = self._clock() + self._timing.exit_poll

    async def _wake_fresh(self, inst: _Instance, cls: ContainerClass) -> None:
        """Its container is older than the class's wake_min_version (a rollout moved the class
        on while it slept): remove it, so the boot makes one of the current version; its
        writable layer starts fresh, as the event says."""
        old, was = inst.container_id, inst.version
        assert old is not None
        await self._runtime.remove(old, force=True)  # a failure fails the boot; nothing changed
        inst.container_id = None
        metrics.WAKES_NEW_VERSION.labels(cls.name).inc()
        reason = (
            f"version {was} → {cls.version} at its wake: a new container, "
            "its writable layer starts fresh"
        )
        self._emit(inst, Announce(EventKind.REPLACED, reason=reason))
        log.info("%s/%s: %s", cls.name, inst.name, reason)

    async def _probe(self, inst: _Instance, upstream: Upstream, deadline: float) -> bool:
        """After a no-wait start: whether the port answers before `deadline` (then: healthy)."""
        try:
            while self._clock() < deadline:
                if inst.state is not InstanceState.RUNNING or inst.upstream != upstream:
                    return False
                if await self._port_answers(upstream.host, upstream.port):
                    return self._fire(inst, Answered())
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

    async def _thaw(self, inst: _Instance, cls: ContainerClass, why: str) -> Upstream:
        """Thaw its paused container (docker unpause): healthy again at once, as its port
        answered before the freeze, so no probe delays the request that woke it. A container
        that was unpaused behind the agent's back counts as thawed; one that is gone or exited
        fails this thaw (it rests, and the next request boots it)."""
        started = self._clock()
        container_id = inst.container_id
        assert container_id is not None  # paused: it has a container
        try:
            try:
                await self._runtime.unpause(container_id)
            except PortsideError as exc:
                info = await self._inspect(container_id)
                if info is None or not info.running:
                    if info is None or not info.paused:
                        self._notice(inst, info)
                    metrics.THAWS.labels(cls.name, "error").inc()
                    raise Unavailable(f"could not thaw {cls.name}/{inst.name}: {exc}") from exc
            upstream = inst.upstream
            if upstream is None:  # adopted paused, its address not listed
                ip = (await self._runtime.inspect(container_id)).ip
                if ip is None:
                    raise Unavailable(f"{cls.name}/{inst.name} was thawed without an address")
                upstream = inst.upstream = Upstream(ip, inst.port or cls.default_port)
        finally:
            inst.boot = None
        inst.froze_or_thawed = self._wall()
        now = self._clock()
        inst.last_activity = now
        self._fire(inst, Thawed(why))
        metrics.THAWS.labels(cls.name, "ok").inc()
        metrics.THAW_SECONDS.labels(cls.name).observe(now - started)
        log.info("thawed %s/%s in %.1f ms (%s)", cls.name, inst.name, (now - started) * 1e3, why)
        return upstream

    async def _inspect(self, container_id: str) -> ContainerInfo | None:
        """The container as the engine has it now; None when it no longer exists."""
        try:
            return await self._runtime.inspect(container_id)
        except NotFound:
            return None

    def _thaws_anew(self, inst: _Instance, cls: ContainerClass, digest: str | None = None) -> bool:
        """A paused instance that a wake must not thaw: its container is older than its class's
        wake floor (see `_below_wake_floor`), or made with other overrides than a Start's
        (`digest`). It is stopped first (silently), and the boot makes it again."""
        if inst.state is not InstanceState.PAUSED:
            return False
        return _below_wake_floor(inst, cls) or (
            digest is not None and inst.overrides_digest != digest
        )

    # -- sleep --------------------------------------------------------------------------------

    async def run(self) -> None:
        """The sleep loop and the periodic check against the engine; runs until cancelled
        (give it to the agent's TaskGroup)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._sleep_loop())
            group.create_task(self._reconcile_loop())
            group.create_task(self._follow_engine())
            group.create_task(self._health_loop())

    async def _sleep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._timing.sleep_check)
            self.sleep_idle()

    def sleep_idle(self) -> list[str]:
        """Begin stopping every running instance that has nothing in flight and has been idle for
        its class's sleep_after, or freezing it when its class sleeps by pausing and it is
        healthy; and stopping, as a sleep, every paused one paused for its class's pause_max.
        Returns their ids. Synchronous, so no request slips in between the decision and the
        state change."""
        now = self._clock()
        stopping = []
        for inst in list(self._instances.values()):
            if inst.crash.crashes and inst.state.running and inst.run_started:
                if not inst.crash.ran_steadily(self._wall() - inst.run_started).crashes:
                    self._forgive(inst)
            if inst.state is InstanceState.PAUSED:
                if self._pause_ended(inst, now):
                    stopping.append(inst.id)
                continue
            if not inst.state.running or inst.boot is not None or inst.in_flight > 0:
                continue
            if inst.committing is not None:  # frozen for a snapshot: it sleeps after
                continue
            if inst.id in self._pinned or inst.replacing is not None:
                continue
            cls = self._class_of(inst)
            sleep_after = cls.sleep_after_s if cls is not None else DEFAULT_SLEEP_AFTER_S
            if now - inst.last_activity >= sleep_after:
                idle = f"idle for {sleep_after:g}s"
                pauses = cls is not None and cls.sleep_mode == "pause"
                # An unhealthy one (or one whose port never answered) sleeps by stopping: a
                # frozen broken process is of no use, its wake boots it afresh.
                if not (pauses and self._fire(inst, Pause(idle))):
                    self._fire(inst, Stop(StopCause.SLEEP, reason=idle))
                stopping.append(inst.id)
        return stopping

    def _pause_ended(self, inst: _Instance, now: float) -> bool:
        """Stop (as a sleep) a paused instance paused for its class's pause_max, with no thaw,
        freeze or request under way; True when its stop began."""
        if inst.paused_at is None or inst.boot is not None or inst.freeze is not None:
            return False
        if inst.in_flight > 0:
            return False
        cls = self._class_of(inst)
        pause_max = cls.pause_max_s if cls is not None else DEFAULT_PAUSE_MAX_S
        if now - inst.paused_at < pause_max:
            return False
        return self._fire(inst, Stop(StopCause.SLEEP, reason=f"paused for {pause_max:g}s"))

    async def _freeze(self, inst: _Instance) -> None:
        """Freeze its container (docker pause), in the background of the sleep loop's decision:
        a request that comes meanwhile waits for this, then thaws it. A freeze that fails leaves
        it running (`resumed`, with the failure), unless its container is gone."""
        container_id = inst.container_id
        assert container_id is not None  # healthy: it has a container
        try:
            await self._runtime.pause(container_id)
            inst.froze_or_thawed = self._wall()
            inst.ready_at = self._clock()
            metrics.PAUSES.labels(inst.class_name).inc()
            log.info("paused %s/%s", inst.class_name, inst.name)
        except NotFound:
            self._fire(inst, Removed())
        except Exception as exc:  # noqa: BLE001 - whatever failed, it was not frozen: it runs
            log.warning("cannot pause %s/%s (it stays awake): %s", inst.class_name, inst.name, exc)
            self._fire(inst, Thawed(f"its pause failed: {exc}"))
        finally:
            if inst.freeze is asyncio.current_task():
                inst.freeze = None

    def _class_of(self, inst: _Instance) -> ContainerClass | None:
        return self._class_named(inst.class_name)

    def _class_named(self, class_name: str) -> ContainerClass | None:
        """The class as the control plane's config has it, else as a Start gave it."""
        return self._get_class(class_name) or self._started_classes.get(class_name)

    # -- health checks --------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            now = self._clock()
            self.schedule_checks(now)
            nexts = (inst.next_check for inst in self._instances.values())
            await asyncio.sleep(health.soonest(nexts, now, self._timing.health_tick))

    def schedule_checks(self, now: float) -> list[str]:
        """Begin the checks due at `now` and schedule the next ones; returns the ids checked.
        Only an instance whose container runs, with no boot, port probe or stop in progress, is
        checked; its first check comes one interval after it was first seen so. One still in
        flight when the next is due makes that one skipped, so checks never pile up."""
        begun = []
        for inst in list(self._instances.values()):
            if not self._checkable(inst):
                inst.next_check = None
                continue
            assert inst.upstream is not None  # checkable
            cls = self._class_of(inst)
            if cls is None or not cls.health_checked:
                inst.next_check = None
                if inst.sick:  # its checks were turned off: what they said no longer holds
                    self._turn(inst, CheckPassed("its class has no health checks any more"))
                continue
            if inst.next_check is None:
                inst.next_check = now + cls.health_check_interval_s
                continue
            if not health.due(inst.next_check, now):
                continue
            inst.next_check = now + cls.health_check_interval_s
            if inst.check is not None:
                metrics.HEALTH_CHECKS.labels(cls.name, "skipped").inc()
                continue
            inst.check = self._spawn(self._check(inst, cls, inst.upstream))
            begun.append(inst.id)
        return begun

    @staticmethod
    def _checkable(inst: _Instance) -> bool:
        return (
            inst.state.running
            and inst.upstream is not None
            and inst.boot is None
            and inst.health is None
            and inst.stop is None
            and inst.committing is None  # frozen for a snapshot's commit
        )

    async def _check(self, inst: _Instance, cls: ContainerClass, upstream: Upstream) -> None:
        started = time.perf_counter()
        timeout = cls.health_check_timeout_s
        try:
            # The check keeps its own timeout; this one holds a check function that does not.
            async with asyncio.timeout(timeout + 0.5):
                result = await self._health_check(
                    upstream.host, upstream.port, cls.ping_endpoint, timeout
                )
        except TimeoutError:
            result = CheckResult(False, reason=f"no answer within {timeout:g}s")
        finally:
            if inst.check is asyncio.current_task():
                inst.check = None
        metrics.HEALTH_CHECK_SECONDS.labels(cls.name).observe(time.perf_counter() - started)
        metrics.HEALTH_CHECKS.labels(cls.name, "pass" if result.passed else "fail").inc()
        if self._checkable(inst) and inst.upstream == upstream:  # still the run it checked
            self._judge(inst, cls, result)

    def _judge(self, inst: _Instance, cls: ContainerClass, result: CheckResult) -> None:
        """Count `result` in the instance's streak; a streak that reached the class's threshold
        makes it unhealthy (running), a check that passes after that makes it healthy again."""
        threshold = cls.health_check_failures
        inst.streak, verdict = health.judge(inst.streak, result, threshold, inst.state)
        if verdict is not None:
            self._turn(inst, verdict)

    def _turn(self, inst: _Instance, verdict: CheckFailed | CheckPassed) -> None:
        if not self._fire(inst, verdict):
            return
        inst.sick = isinstance(verdict, CheckFailed)
        if not inst.sick:
            inst.streak = Streak()
        metrics.HEALTH_TRANSITIONS.labels(
            inst.class_name, "unhealthy" if inst.sick else "healthy"
        ).inc()
        if inst.sick:
            log.warning("%s/%s is unhealthy: %s", inst.class_name, inst.name, inst.streak.reason)
        else:
            log.info("%s/%s is healthy again", inst.class_name, inst.name)

    def _end_checks(self, inst: _Instance) -> None:
        """Its container no longer runs: the check in flight is cancelled, the streak forgotten."""
        if inst.check is not None:
            inst.check.cancel()
            inst.check = None
        inst.next_check = None
        inst.streak = Streak()
        inst.sick = False

    # -- pools ----------------------------------------------------------------------------------

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pinned)

    async def start_pinned(self, cls: ContainerClass, name: str) -> None:
        """Boot a pool instance now (not on a request) and keep it awake until it is drained."""
        self._pinned.add(instance_id(cls.name, name))
        (await self.acquire(cls, name, why="a pool assignment")).release()

    async def drain_and_remove(self, iid: str, timeout_s: float = 60.0) -> None:
        """Let a pool instance finish its requests in flight (up to `timeout_s`), then stop it
        and remove its container: it is gone, not asleep."""
        self._pinned.discard(iid)
        inst = self._instances.get(iid)
        if inst is None:
            return
        await self._end_replace(inst)
        deadline = self._clock() + timeout_s
        while inst.in_flight > 0 and self._clock() < deadline:  # noqa: ASYNC110 - a bounded poll; no event per release
            await asyncio.sleep(0.1)
        await self._stop_instance(inst, _StopOrder(StopCause.DRAIN))
        if inst.in_flight > 0 or inst.state.awake:
            return  # a request came in meanwhile; the next drain pass tries again
        if inst.container_id is not None:
            await self._runtime.remove(inst.container_id, force=True)
        self._forget(inst, "drained")
        log.info("removed pool instance %s/%s", inst.class_name, inst.name)

    # -- stops ----------------------------------------------------------------------------------

    async def stop(self, iid: str, signum: int | None = None, grace_s: float | None = None) -> bool:
        """Stop an instance now, requests in flight or not (an operator's or the Stop RPC's):
        `signum` (None: the image's stop signal, SIGTERM), then SIGKILL after `grace_s` (None:
        Timing.stop_grace). It keeps its container and wakes on its next request; its death is
        reported as `exited` with the code. False if this agent has no such instance."""
        inst = self._instances.get(iid)
        if inst is None:
            return False
        await self._end_replace(inst)
        await self._stop_instance(inst, _StopOrder(StopCause.STOP, signum, grace_s))
        return True

    async def stop_all(self, timeout_s: float | None = None) -> list[str]:
        """Stop every awake (or paused) instance of this node at once, as the agent shuts down
        (--stop-on-exit): docker stop with Timing.stop_grace, all within `timeout_s` (None: the
        grace plus 10 s). Containers and their writable layers are kept: the next agent adopts
        them stopped and wakes each on its next request. Returns the ids still awake when the
        time ran out (none, normally)."""
        for inst in self._instances.values():
            if inst.replacing is not None:
                inst.replacing.cancel()  # the old container stops below; no new one is made
        awake = [
            inst
            for inst in self._instances.values()
            if inst.state.awake or inst.state is InstanceState.PAUSED
        ]
        limit = self._timing.stop_grace + 10.0 if timeout_s is None else timeout_s
        order = _StopOrder(StopCause.SHUTDOWN)
        try:
            async with asyncio.timeout(limit):
                await asyncio.gather(
                    *(self._stop_instance(inst, order) for inst in awake), return_exceptions=True
                )
        except TimeoutError:
            pass
        left = [inst.id for inst in awake if inst.state.awake]
        log.info("stopped %d of %d awake containers", len(awake) - len(left), len(awake))
        if left:
            log.warning("%d containers were not stopped within %gs: %s", len(left), limit, left)
        return left

    async def _stop_instance(self, inst: _Instance, order: _StopOrder) -> None:
        while inst.boot is not None:
            # The boot notices within a port poll and hands the container to the stop.
            inst.abort = order
            with contextlib.suppress(PortsideError):
                await asyncio.shield(inst.boot)
        if inst.freeze is not None:
            await asyncio.shield(inst.freeze)  # a freeze is quick; the stop follows it
        if inst.state.running or inst.state is InstanceState.PAUSED:
            # A paused container stops as a running one: docker thaws it to deliver the signal.
            self._fire(inst, Stop(order.cause, order.reason), order)
        if inst.stop is not None:
            await asyncio.shield(inst.stop)

    async def _stop(self, inst: _Instance, order: _StopOrder) -> None:
        container_id = inst.container_id
        try:
            if container_id is None:  # a boot that gave up before docker created it
                self._fire(inst, Died())
                return
            grace = self._timing.stop_grace if order.grace_s is None else order.grace_s
            info = await self._runtime.stop(container_id, grace, order.signum)
            # Metered to the death's time as docker recorded it (FinishedAt; its die event is
            # stamped a little later, and may even come after this answer); the meter takes
            # back what a heartbeat counted in between.
            at = inst.died_at
            if info is not None and info.finished_at is not None:
                at = info.finished_at.timestamp()
            self._fire(inst, Died(info.exit_code if info else None, oom=inst.oom, at=at))
            if order.cause is StopCause.SLEEP:
                metrics.SLEEPS.labels(inst.class_name).inc()
                log.info("slept %s/%s", inst.class_name, inst.name)
                self._snapshot_after_sleep(inst)
        except NotFound:
            self._fire(inst, Removed())
        except EngineUnavailable as exc:
            log.warning("cannot stop %s/%s: %s", inst.class_name, inst.name, exc)
            self._fire(inst, StopFailed())
        except Exception:
            log.exception("stopping %s/%s failed", inst.class_name, inst.name)
            self._fire(inst, StopFailed())
        finally:
            if inst.stop is asyncio.current_task():
                inst.stop = None

    # -- replaces (rollouts) ------------------------------------------------------------------

    def replace(self, iid: str) -> bool:
        """A rollout asks for instance `iid` on its class's current version: replace it in the
        background, unless a replace of it is under way, one was begun for that version
        already, or its container is of that version; True when one began. A resting instance
        is left as it is: its next wake follows the class's wake_min_version."""
        inst = self._instances.get(iid)
        cls = self._class_of(inst) if inst is not None else None
        if inst is None or cls is None or inst.replacing is not None:
            return False
        # Any other version is replaced, a newer one too: a rollback moves instances back.
        if inst.version == cls.version or inst.replaced_to == cls.version:
            return False
        if not inst.state.awake:
            return False
        inst.replaced_to = cls.version
        inst.replacing = self._spawn(self._replace(inst))
        return True

    def refuse_replace(self, iid: str) -> None:
        """A rollout asked while this node is fenced: nothing is replaced (counted)."""
        inst = self._instances.get(iid)
        metrics.REPLACEMENTS.labels(inst.class_name if inst else "", "fenced").inc()

    async def _replace(self, inst: _Instance) -> None:
        """Requests wait at the gate from now on; those in flight on the old container finish
        (up to the class's stop_timeout), then it gets SIGTERM, SIGKILL after what is left of
        stop_timeout (at least Timing.stop_grace), and is removed; then a container of the
        current version boots, and the waiters join its boot as they would a wake. One
        container at a time: the old one is gone before the new one is created."""
        started = self._clock()
        gate = inst.replace_gate = asyncio.Event()
        outcome = "error"
        class_name = inst.class_name
        try:
            outcome = await self._replace_container(inst, gate)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except PortsideError as exc:
            log.warning("could not replace %s/%s: %s", inst.class_name, inst.name, exc)
        except Exception:
            log.exception("replacing %s/%s failed", inst.class_name, inst.name)
        finally:
            _open(inst, gate)
            if inst.replacing is asyncio.current_task():
                inst.replacing = None
            metrics.REPLACEMENTS.labels(class_name, outcome).inc()
            metrics.REPLACE_SECONDS.labels(class_name).observe(self._clock() - started)

    async def _replace_container(self, inst: _Instance, gate: asyncio.Event) -> str:
        """The steps of `_replace`; returns its outcome (see metrics.REPLACEMENTS)."""
        while (busy := inst.boot or inst.stop) is not None:
            # What is under way ends first (a wake of the old container, a sleep).
            with contextlib.suppress(PortsideError):
                await asyncio.shield(busy)
        cls = self._class_of(inst)
        if cls is None or inst.version == cls.version or not inst.state.running:
            return "current"
        if self._images is not None:
            # Before the old container stops: the pull's time is not a gap, and an image that
            # cannot be had leaves the old version serving.
            try:
                await self._images.ensure(cls)
            except PortsideError as exc:
                log.warning("not replacing %s/%s: %s", cls.name, inst.name, exc)
                return "failed"
        timeout = stop_timeout_of(cls)
        deadline = self._clock() + timeout
        drained = await self._drain(inst, timeout)
        metrics.REPLACE_DRAINS.labels(cls.name, "drained" if drained else "timeout").inc()
        if not drained:
            log.warning(
                "%s/%s: %d requests still in flight after %gs; stopping its old container",
                cls.name,
                inst.name,
                inst.in_flight - inst.waiting,
                timeout,
            )
        grace = max(deadline - self._clock(), min(self._timing.stop_grace, timeout))
        was = inst.version
        reason = f"version {was} → {cls.version}: a new container, its writable layer starts fresh"
        await self._stop_instance(inst, _StopOrder(StopCause.ROLLOUT, grace_s=grace, reason=reason))
        if self._instances.get(inst.id) is not inst:
            return "current"  # forgotten meanwhile
        old, inst.container_id = inst.container_id, None
        if old is not None:
            try:
                await self._runtime.remove(old, force=True)
            except BaseException:
                inst.container_id = old  # it may still exist: a wake starts it again
                raise
        cls = self._class_of(inst) or cls
        inst.overrides = inst.overrides or NO_OVERRIDES  # an adopted one's are not known
        try:
            self._begin_boot(inst, cls, detached=False)
        except PortsideError as exc:
            log.warning("%s/%s: its new container cannot boot: %s", cls.name, inst.name, exc)
            return "failed"
        boot = inst.boot
        assert boot is not None
        _open(inst, gate)  # the waiters join the new container's boot
        try:
            await asyncio.shield(boot)
        except PortsideError:
            return "failed"
        log.info("replaced %s/%s: version %d → %d", cls.name, inst.name, was, inst.version)
        return "ok"

    async def _drain(self, inst: _Instance, timeout_s: float) -> bool:
        """Wait until no request is in flight on its container (those waiting at the replace's
        gate are not); False when `timeout_s` passed first."""
        if inst.in_flight <= inst.waiting:
            return True
        inst.drained = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await inst.drained.wait()
            return True
        except TimeoutError:
            return False
        finally:
            inst.drained = None

    async def _wait_for_replace(self, inst: _Instance, gate: asyncio.Event) -> None:
        inst.waiting += 1
        try:
            await gate.wait()
        finally:
            inst.waiting -= 1

    async def _end_replace(self, inst: _Instance) -> None:
        """A stop, destroy or drain overrides a replace in progress: no new container is made
        (a stop already begun goes on; what waited at the gate is let through)."""
        task = inst.replacing
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- snapshots (nodeagent.snapshots) --------------------------------------------------------

    async def take_snapshot(
        self, iid: str, name: str = "", trigger: str = CREATE
    ) -> Snapshot | None:
        """Snapshot the instance's filesystem now: its container's writable layer, committed
        (a running one is frozen meanwhile), pushed to the image store and recorded. A boot
        that comes during the commit waits for it: the container never starts while it is
        committed. NotFound; FailedPrecondition when it has no container or this agent takes
        no snapshots. None: a sleep's snapshot that was not needed (it woke meanwhile, or its
        layer did not change)."""
        inst = self._known(iid)
        if self._snapshots is None:
            raise FailedPrecondition(f"node {self._node_id} takes no snapshots")
        # Under way first: a boot, a stop, a freeze, another snapshot's commit.
        while (busy := inst.boot or inst.stop or inst.freeze) or inst.committing:
            if busy is None:
                assert inst.committing is not None
                await inst.committing.wait()
                continue
            with contextlib.suppress(PortsideError):
                await asyncio.shield(busy)
        if trigger == SLEEP and (inst.state.awake or inst.state is InstanceState.PAUSED):
            return None  # it woke: it sleeps again later, and is snapshotted then
        if inst.container_id is None:
            raise FailedPrecondition(
                f"instance {inst.class_name}/{inst.name} has no container yet: start it first"
            )
        cls = self._class_of(inst)
        source = Source(
            inst.container_id,
            inst.class_name,
            inst.name,
            inst.id,
            inst.version,
            class_image="" if cls is None else cls.run_image,
        )
        running = inst.state.running  # it may change its layer after the commit
        # Set with no await since the checks above: no boot can begin in between.
        committing = inst.committing = asyncio.Event()

        def committed() -> None:
            if inst.committing is committing:
                inst.committing = None
                # The engine's pause and unpause of the commit are not news.
                inst.froze_or_thawed, inst.ready_at = self._wall(), self._clock()
                if not running:  # its next run (Started) says it may have changed again
                    inst.ran_since_snapshot = False
            committing.set()

        try:
            taken = await self._snapshots.take(
                source, name, trigger, committed=committed, unchanged=inst.snapshot_layer
            )
        except BaseException:
            committed()
            inst.ran_since_snapshot = True  # nothing was recorded: the next sleep tries again
            raise
        committed()
        inst.snapshot_layer = taken.top_layer
        if taken.snapshot is not None:
            reason = f"{taken.snapshot.id} ({human_size(taken.snapshot.layer_bytes)})"
            self._emit(inst, Announce(EventKind.SNAPSHOT_TAKEN, reason=reason))
        return taken.snapshot

    def _snapshot_after_sleep(self, inst: _Instance) -> None:
        """Its container was stopped for a sleep: if its class asks and it ran since its last
        snapshot, take one in the background (the sleep is done; a wake waits for the commit
        only)."""
        cls = self._class_of(inst)
        if self._snapshots is None or cls is None or not cls.snapshot_on_sleep:
            return
        if inst.ran_since_snapshot:
            self._spawn(self._sleep_snapshot(inst))

    async def _sleep_snapshot(self, inst: _Instance) -> None:
        try:
            await self.take_snapshot(inst.id, trigger=SLEEP)
        except Exception as exc:  # noqa: BLE001 - logged and counted; the sleep stands
            log.warning(
                "%s/%s: no snapshot after its sleep: %s",
                inst.class_name,
                inst.name,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )

    async def _restore_from(
        self, inst: _Instance, cls: ContainerClass
    ) -> tuple[Snapshot, str] | None:
        """The snapshot a new container of `inst` is made from, and why: a Start's; else, for
        a named instance's first container on this node, its latest if it was placed anew after
        its node was lost (Unavailable when the control plane cannot be asked). Nothing is
        remembered of an answer: a destroyed instance's snapshots are the control plane's to
        refuse."""
        if inst.restore is not None:
            return inst.restore, "start"
        if self._snapshots is None or not inst.first_container or cls.pool:
            return None
        found = await self._snapshots.latest(cls, inst.name)
        return None if found is None else (found, "replaced")

    def _restored(self, inst: _Instance, snapshot: Snapshot, cause: str) -> None:
        metrics.SNAPSHOT_RESTORES.labels(inst.class_name, cause).inc()
        reason = f"{snapshot.id} ({snapshot.name})"
        if cause == "replaced":
            reason += ": placed anew after its node was lost"
        self._emit(inst, Announce(EventKind.SNAPSHOT_RESTORED, reason=reason))
        log.info("%s/%s: container made from snapshot %s", inst.class_name, inst.name, reason)

    async def _make_again_from(self, inst: _Instance, snapshot: Snapshot) -> None:
        """A Start from `snapshot`: its container, if any, is removed, and the boot makes one
        from the snapshot. FailedPrecondition while it runs (or starts, stops, is paused)."""
        if (
            inst.state.awake
            or inst.state is InstanceState.PAUSED
            or inst.boot is not None
            or inst.stop is not None
        ):
            raise FailedPrecondition(
                f"instance {inst.class_name}/{inst.name} is {inst.state}: stop it before starting "
                f"it from snapshot {snapshot.id}"
            )
        while inst.committing is not None:
            await inst.committing.wait()
        inst.restore = snapshot
        if inst.container_id is not None:
            old, inst.container_id = inst.container_id, None
            await self._runtime.remove(old, force=True)

    # -- the lifecycle API ----------------------------------------------------------------------

    async def start(
        self,
        cls: ContainerClass,
        name: str,
        overrides: Overrides = NO_OVERRIDES,
        *,
        wait: bool = True,
        snapshot: Snapshot | None = None,
    ) -> InstanceInfo:
        """Boot (or wake) instance `name`. A container made with other overrides is stopped if
        needed, removed and made again. `wait`: until the port answers (ContainerExited,
        BootTimeout as for a request); else until docker started it (a container that already
        exited is reported in the returned state, not raised). `snapshot`: its container is
        removed and made again from the snapshot (FailedPrecondition while it runs)."""
        self._started_classes[cls.name] = cls
        inst = self._instance(cls, name)
        inst.last_activity = self._clock()
        self._forgive(inst)  # a Start is an operator's try: no crash-loop backoff holds it
        if snapshot is not None:
            await self._make_again_from(inst, snapshot)
        while True:
            if inst.replace_gate is not None:
                await inst.replace_gate.wait()
                continue
            if inst.stop is not None:
                await asyncio.shield(inst.stop)
                continue
            if inst.freeze is not None:
                await asyncio.shield(inst.freeze)
                continue
            if inst.state.awake or inst.boot is not None:  # a boot of a paused one: its thaw
                if inst.overrides_digest != overrides.digest:
                    await self._stop_instance(inst, _StopOrder(StopCause.REPLACE))
                    continue
                break  # booting or running as asked: join it
            if self._thaws_anew(inst, cls, overrides.digest):
                await self._stop_instance(inst, _StopOrder(StopCause.REPLACE))
                continue
            if inst.container_id is not None and inst.overrides_digest != overrides.digest:
                container_id, inst.container_id = inst.container_id, None
                log.info("making %s/%s again with other overrides", cls.name, name)
                await self._runtime.remove(container_id, force=True)
                continue
            inst.overrides = overrides
            self._begin_boot(inst, cls, detached=not wait, why="a Start")
            break
        boot, started = inst.boot, inst.started
        if wait or inst.state is InstanceState.PAUSED:  # a thaw is quick: even no_wait waits
            if boot is not None:
                await asyncio.shield(boot)
            if inst.health is not None:  # started earlier without waiting: wait for the port
                await asyncio.shield(inst.health)
            if inst.state is InstanceState.RUNNING and not inst.sick:  # sick: its port answered
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
        if inst.container_id is None or not (
            inst.state.running or inst.state is InstanceState.STOPPING
        ):
            raise _not_running(inst)
        await self._runtime.signal(inst.container_id, signum)

    async def destroy(self, iid: str) -> None:
        """Kill and remove the container and its writable layer, and forget the instance."""
        inst = self._known(iid)
        self._pinned.discard(iid)
        await self._end_replace(inst)
        await self._stop_instance(inst, _StopOrder(StopCause.DESTROY, grace_s=1.0))
        if inst.container_id is not None:
            await self._runtime.remove(inst.container_id, force=True)
        self._forget(inst, "destroyed")

    def renew(self, iid: str) -> None:
        """Push the sleep timer, as a request would. FailedPrecondition: not awake."""
        inst = self._known(iid)
        if not inst.state.awake or inst.state is InstanceState.STOPPING:
            raise _not_running(inst)
        inst.last_activity = self._clock()

    def info(self, iid: str) -> InstanceInfo:
        return self._info(self._known(iid))

    def infos(self) -> list[InstanceInfo]:
        """Every instance this agent knows, as the lifecycle API reports it."""
        return [self._info(inst) for inst in self._instances.values()]

    async def exec(
        self,
        iid: str,
        command: list[str],
        env: Mapping[str, str],
        working_dir: str = "",
        stdin: bool = False,
        *,
        tty: TerminalSize | None = None,
        user: str = "",
    ) -> ExecProcess:
        """Run a command in the running container (within an `exec_session`), as `user`, with a
        pseudo-terminal of size `tty` if given. NotRunning when it does not run."""
        inst = self._known(iid)
        if inst.container_id is None or not inst.state.running:
            raise NotRunning(
                f"instance {inst.class_name}/{inst.name} is {inst.state}, not running: exec "
                "does not wake it unless asked (exec --wake boots it first)"
            )
        return await self._runtime.exec(
            inst.container_id, command, env, working_dir, stdin, tty=tty, user=user
        )

    @contextlib.asynccontextmanager
    async def exec_session(
        self, class_name: str, name: str, *, wake: bool = False, activity: bool = False
    ) -> AsyncIterator[asyncio.Event]:
        """An exec session on instance `name` of `class_name`, while the block runs.

        By default it neither keeps the instance awake nor counts as activity for sleep_after:
        the instance may go to sleep under it. `wake`: boot it first if it does not run (as a
        request would: its own container, with the overrides it was made with) and hold it
        awake until the block ends. `activity`: the session's start and end count as activity
        (the sleep timer restarts when it ends). The event yielded is set when the instance
        stops running (asleep, paused, stopped): the session is over then. NotFound: an
        instance (without `wake`) or a class (with it) this agent does not know; with `wake`,
        what `acquire` raises."""
        hold: Hold | None = None
        if wake:
            cls = self._class_named(class_name)
            if cls is None:
                raise NotFound(f"class {class_name} is not deployed (this agent does not know it)")
            hold = await self.acquire(cls, name, activity=activity, why="an exec")
        inst = hold._instance if hold is not None else self._known(instance_id(class_name, name))
        ended = asyncio.Event()
        inst.sessions.add(ended)
        if activity:
            inst.last_activity = self._clock()
        try:
            yield ended
        finally:
            inst.sessions.discard(ended)
            if hold is not None:
                hold.release()
            elif activity:
                inst.last_activity = self._clock()

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
            self._forgive(inst)
        self._emit(inst, Announce(EventKind.REMOVED, reason=why))

    def _info(self, inst: _Instance) -> InstanceInfo:
        return InstanceInfo(
            instance_id=inst.id,
            class_name=inst.class_name,
            name=inst.name,
            state=inst.state,
            exit_code=None if inst.state.awake else inst.exit_code,
            since=inst.since,
            pool=inst.id in self._pinned,
            in_flight=inst.in_flight,
            node_id=self._node_id,
            backoff_until=inst.backoff_until if inst.crash.holds_back(self._clock()) else 0.0,
            restarts=inst.crash.crashes,
            version=inst.version,
        )

    # -- the table ----------------------------------------------------------------------------

    def _fire(self, inst: _Instance, trigger: Trigger, order: _StopOrder | None = None) -> bool:
        """Feed `trigger` to the lifecycle table and carry out its answer; False when the table
        rejects it (nothing changes). `order` says how to stop, when the step stops."""
        step = lifecycle.step(inst.state, inst.cause, trigger)
        if step is None:
            log.debug("%s/%s: %s ignored while %s", inst.class_name, inst.name, trigger, inst.state)
            return False
        if (
            inst.state.running
            and inst.boot is None  # a crash at start is logged with its backoff
            and step.state is InstanceState.STOPPED_WITH_CODE
        ):
            exit_code = trigger.exit_code if isinstance(trigger, Died) else None
            log.warning(
                "container of %s/%s %s while running",
                inst.class_name,
                inst.name,
                f"exited with code {exit_code}" if isinstance(trigger, Died) else "was removed",
            )
        inst.cause = step.cause
        if not step.state.running:
            if step.state is not InstanceState.PAUSED:  # a frozen container keeps its address
                inst.upstream = None  # reached only while its container runs
            self._end_checks(inst)
            for ended in inst.sessions:
                ended.set()
        if step.state is not inst.state:
            metrics.INSTANCES.labels(inst.state.value).dec()
            metrics.INSTANCES.labels(step.state.value).inc()
            if InstanceState.PAUSED in (inst.state, step.state):
                inst.ready_at = self._clock()  # listings from before the freeze or thaw are stale
            inst.paused_at = self._clock() if step.state is InstanceState.PAUSED else None
            inst.state = step.state
            inst.since = self._wall()
            if self._on_change is not None:
                self._on_change()
        for effect in step.effects:
            if effect is Effect.STOP_CONTAINER:
                cause = step.cause or StopCause.STOP
                inst.stop = self._spawn(self._stop(inst, order or _StopOrder(cause)))
            elif effect is Effect.FREEZE_CONTAINER:
                inst.freeze = self._spawn(self._freeze(inst))
            elif effect is Effect.FORGET_CONTAINER:
                inst.container_id = None
            elif effect is Effect.BACK_OFF:
                self._back_off(inst, trigger)  # before END_RUN, which forgets the run's start
            elif effect is Effect.END_RUN:
                death = trigger if isinstance(trigger, Died | EngineStopped) else None
                inst.exit_code = death.exit_code if death is not None else None
                inst.run_started = None
                self._run_changed(inst, effect, death.at if death is not None else None)
            elif effect is Effect.BEGIN_RUN:
                # From docker's StartedAt: a little before its start call answered.
                self._run_changed(inst, effect, inst.run_started or None)
            else:
                self._run_changed(inst, effect)
        for announce in step.events:
            self._emit(inst, announce)
        return True

    def _notice(
        self, inst: _Instance, info: ContainerInfo | None, *, engine_restarted: bool = False
    ) -> None:
        """What an inspect or a listing found of `inst`'s container: gone, paused or unpaused
        behind the agent's back, or stopped (by the engine's restart, when it is out of reach or
        was just found again)."""
        if info is None:
            self._fire(inst, Removed())
        elif info.paused:
            if inst.committing is None:  # a snapshot's commit freezes a running container
                self._fire(inst, FoundPaused(_PAUSED_OUTSIDE))
        elif info.running:
            if inst.state is InstanceState.PAUSED and self._fire(inst, Thawed(_UNPAUSED_OUTSIDE)):
                inst.last_activity = self._clock()  # whoever thawed it wants it awake a while
        else:
            at = info.finished_at.timestamp() if info.finished_at is not None else None
            if inst.boot is None and (engine_restarted or self._engine_lost is not None):
                self._fire(inst, EngineStopped(info.exit_code, at=at))
            else:
                self._fire(inst, Died(info.exit_code, oom=inst.oom, at=at))

    def _emit(self, inst: _Instance, announce: Announce) -> None:
        metrics.LIFECYCLE_EVENTS.labels(inst.class_name, announce.kind.value).inc()
        if self._on_event is None:
            return
        self._on_event(
            Event(
                kind=announce.kind,
                time=self._wall(),
                class_name=inst.class_name,
                name=inst.name,
                instance_id=inst.id,
                node_id=self._node_id,
                exit_code=announce.exit_code,
                signal=announce.signal,
                reason=announce.reason,
            )
        )

    # -- engine ---------------------------------------------------------------------------------

    def _on_container_event(self, event: ContainerEvent) -> None:
        inst = self._instances.get(event.instance_id)
        if inst is None or event.container_id != inst.container_id:
            return
        if event.kind is ContainerEventKind.DIE:
            if inst.run_started is None or (event.time and event.time < inst.run_started):
                return  # an earlier run's death, or one that docker start's answer reports
            if inst.stop is not None:
                inst.died_at = event.time or None  # the stop's answer reports it
                return
            self._fire(inst, Died(event.exit_code, oom=inst.oom, at=event.time or None))
        elif event.kind is ContainerEventKind.OOM:
            inst.oom = True
        elif event.kind is ContainerEventKind.DESTROY:
            self._fire(inst, Removed())
        elif event.kind in (ContainerEventKind.PAUSE, ContainerEventKind.UNPAUSE):
            self._on_freezer_event(inst, event)

    def _on_freezer_event(self, inst: _Instance, event: ContainerEvent) -> None:
        """A pause or unpause of its container. The agent's own come while its call is under
        way or are stamped before its answer (docker stop thaws a paused container too): the
        call reports them. Others were done behind its back, with docker itself: a paused
        container is taken as paused (the next request thaws it), a thawed one as awake."""
        if inst.freeze is not None or inst.boot is not None or inst.stop is not None:
            return
        if inst.committing is not None:  # a snapshot's commit freezes a running container
            return
        if event.time and event.time <= inst.froze_or_thawed:
            return
        if event.kind is ContainerEventKind.PAUSE:
            self._fire(inst, FoundPaused(_PAUSED_OUTSIDE))
        elif self._fire(inst, Thawed(_UNPAUSED_OUTSIDE)):
            inst.last_activity = self._clock()  # whoever thawed it wants it awake a while

    async def _follow_engine(self) -> None:
        """Follow the engine's events. When the stream breaks, the engine restarted or went
        away: wait for it (with backoff, logged once each way), take every container's state
        again, and follow anew from just before that listing, so nothing falls in between."""
        since: float | None = None
        # Between streams that break at once (an engine that answers pings but not events).
        again = Backoff(self._timing.engine_retry_first, self._timing.engine_retry_most)
        while True:
            if self._engine_lost is not None:
                await again.wait()
                await self.reach_engine()
                since = self._wall()
                try:
                    await self.readopt()
                except PortsideError as exc:
                    log.debug("cannot take the engine's containers again yet: %s", exc)
                    continue
            opened = self._clock()
            try:
                async for event in self._runtime.events(since):
                    self._on_container_event(event)
                why = "its event stream ended"
            except PortsideError as exc:
                why = str(exc)
            if self._clock() - opened > 10 * self._timing.engine_retry_most:
                again.reset()
            if self._engine_lost is None:
                self._engine_lost = self._clock()
                metrics.ENGINE_UP.set(0)
                log.warning("lost the container engine (%s); reconnecting", why)

    async def reach_engine(self) -> None:
        """Return once the engine answers, trying with exponential backoff."""
        backoff = Backoff(self._timing.engine_retry_first, self._timing.engine_retry_most)
        while True:
            try:
                await self._runtime.ping()
                return
            except PortsideError:
                await backoff.wait()

    async def readopt(self) -> None:
        """After the engine was out of reach: take every container's state again. Running ones
        stay (live-restore kept them) with their new address if it changed; those it stopped
        rest stopped and wake on their next request; removed ones are forgotten. The networks
        (and their packet filter) are ensured again: the engine may have made them anew."""
        await self._runtime.ensure_networks()
        await self.reconcile(engine_restarted=True)
        lost, self._engine_lost = self._engine_lost, None
        metrics.ENGINE_UP.set(1)
        if lost is not None:
            metrics.ENGINE_RECONNECTS.inc()
            running = sum(1 for i in self._instances.values() if i.state.running)
            log.warning(
                "the container engine is back after %.1fs; %d instances run, the others wake "
                "on their next request",
                self._clock() - lost,
                running,
            )

    async def adopt(self) -> list[InstanceSnapshot]:
        """Make Portside's networks, then take over this node's containers as a previous agent
        left them: running ones as healthy (idle from now), paused ones as paused (their
        pause_max counted from now: the engine does not say when they were frozen), others as
        stopped, reused on their next wake. Nothing is stopped or removed. Call once, before
        serving."""
        await self._runtime.ensure_networks()
        now = self._clock()
        adopted = []
        for info in await self._runtime.list():
            if not info.instance_id or not info.class_name or info.port is None:
                log.warning("ignoring container %s: it lacks Portside's labels", info.name)
                continue
            if info.instance_id in self._instances:
                continue
            inst = _Instance(
                info.instance_id, info.instance_name, info.class_name, now, self._wall()
            )
            inst.container_id, inst.port = info.id, info.port
            inst.overrides = None  # only its digest is known
            inst.overrides_digest = info.overrides_digest
            inst.version = info.version
            inst.vcpu, inst.memory_mib = info.vcpu, info.memory_mib
            inst.ran_since_snapshot = info.running or info.paused
            self._add(inst)
            if info.running and info.ip is not None:
                inst.upstream = Upstream(info.ip, info.port)
                inst.ready_at = now
                inst.run_started = 0.0  # its start time is not listed: any die is this run's
                self._fire(inst, FoundRunning())
            elif info.paused:
                inst.upstream = Upstream(info.ip, info.port) if info.ip is not None else None
                inst.ready_at = now
                inst.run_started = 0.0
                self._fire(inst, FoundPaused())
            else:
                inst.exit_code = info.exit_code
                self._fire(inst, FoundStopped())
            adopted.append(inst)
        metrics.ENGINE_UP.set(1)
        log.info(
            "adopted %d containers (%d running)",
            len(adopted),
            sum(1 for i in adopted if i.state.running),
        )
        return [self._snapshot(inst) for inst in adopted]

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self._timing.reconcile)
            if self._engine_lost is not None:
                continue  # the engine's return is handled by readopt
            try:
                await self.reconcile()
            except EngineUnavailable as exc:
                log.debug("cannot compare instances with the engine: %s", exc)
            except PortsideError as exc:
                log.warning("cannot compare instances with the engine: %s", exc)

    async def reconcile(self, *, engine_restarted: bool = False) -> None:
        """Notice containers that exited on their own (or were removed) while we thought them
        running, so the next request boots them again instead of failing to connect.
        `engine_restarted`: the engine was out of reach; what stopped meanwhile, it stopped."""
        listed_at = self._clock()
        found = {info.id: info for info in await self._runtime.list()}
        for inst in list(self._instances.values()):
            if inst.container_id is None:
                continue
            info = found.get(inst.container_id)
            if inst.state.running and inst.boot is None and inst.ready_at < listed_at:
                self._notice(inst, info, engine_restarted=engine_restarted)
                if (
                    info is not None
                    and info.running
                    and info.ip is not None
                    and inst.upstream is not None
                    and info.ip != inst.upstream.host
                ):
                    inst.upstream = Upstream(info.ip, inst.upstream.port)
            elif (
                inst.state is InstanceState.PAUSED
                and inst.boot is None
                and inst.freeze is None
                and inst.ready_at < listed_at
            ):
                self._notice(inst, info, engine_restarted=engine_restarted)
            elif info is None and not inst.state.awake and inst.stop is None:
                self._fire(inst, Removed())  # removed behind our back: the next boot creates one

    # -- reporting and lifetime -------------------------------------------------------------------

    def snapshot(self) -> list[InstanceSnapshot]:
        return [self._snapshot(inst) for inst in self._instances.values()]

    def get(self, iid: str) -> InstanceSnapshot | None:
        inst = self._instances.get(iid)
        return self._snapshot(inst) if inst is not None else None

    async def close(self) -> None:
        """Cancel boots and stops in progress and wait for them; containers keep running (or
        stopped, after stop_all), for the next agent to adopt."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _snapshot(self, inst: _Instance) -> InstanceSnapshot:
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
            pinned=inst.id in self._pinned,
            memory_mib=inst.memory_mib,
        )

    def _run_changed(self, inst: _Instance, change: Effect, at: float | None = None) -> None:
        if self._on_run is not None:
            self._on_run(self._snapshot(inst), change, at)

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


def stop_timeout_of(cls: ContainerClass) -> float:
    """Seconds a replaced container's requests and SIGTERM get before SIGKILL: the class's
    stop_timeout, 15 minutes when unset (as Cloudflare's)."""
    return cls.stop_timeout_s if cls.stop_timeout_s > 0 else DEFAULT_STOP_TIMEOUT_S


def _open(inst: _Instance, gate: asyncio.Event) -> None:
    """Let what waits at a replace's gate through (once it is open, nothing else waits there)."""
    if inst.replace_gate is gate:
        inst.replace_gate = None
    gate.set()


def _below_wake_floor(inst: _Instance, cls: ContainerClass) -> bool:
    """Its container (of version 0: unknown) is older than the class's wake_min_version (0: wake
    what is there), or newer than the class's version (a rollback moved the class back): a wake
    makes a new one instead."""
    if inst.container_id is None:
        return False
    floor = cls.wake_min_version
    below = floor > 0 and inst.version < floor
    return below or (cls.version > 0 and inst.version > cls.version)


def _not_running(inst: _Instance) -> FailedPrecondition:
    return FailedPrecondition(
        f"instance {inst.class_name}/{inst.name} is {inst.state}, not running: start it first"
    )


async def tcp_port_answers(host: str, port: int) -> bool:
    """Whether `host:port` accepts a TCP connection now (within half a second)."""
    try:
        async with asyncio.timeout(0.5):
            _reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


__all__ = [
    "Capacity",
    "Hold",
    "InstanceManager",
    "InstanceSnapshot",
    "InstanceState",
    "Timing",
    "Upstream",
    "stop_timeout_of",
    "tcp_port_answers",
]
