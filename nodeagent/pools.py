"""The agent's side of pools and autoscaling: start and drain the pool instances the control
plane assigns to this node, and sample every running container's CPU and memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any

from nodeagent import metrics
from nodeagent.instances import InstanceManager
from nodeagent.runtime import ContainerRuntime
from nodeagent.stats import CgroupSampler, cpu_percent
from portside.errors import NotFound, PortsideError
from portside.instances import PoolAssignment
from portside.spec import CPU_SAMPLE_INTERVAL_S, ContainerClass
from portside.ticks import until_next

log = logging.getLogger(__name__)


# How long a pushed assignment (PoolKeeper.assign) stands without a heartbeat reply listing it:
# a reply from a replica whose view has not caught up with the placement yet, or one made just
# before it, must not drain the instance the push started. The view lags by milliseconds.
PUSH_GRACE_S = 5.0


class PoolKeeper:
    """Makes this node run what the control plane assigns: every assigned pool instance
    started and kept awake, every draining or unassigned one drained and removed. A start
    that fails is retried with backoff (2 s doubling to 60 s), like a crash loop.

    Assignments come whole in every heartbeat reply (`apply`); the leader also pushes each new
    one as it places it (`assign`), which starts it at once instead of up to a heartbeat later."""

    def __init__(
        self, manager: InstanceManager, get_class: Callable[[str], ContainerClass | None]
    ) -> None:
        self.manager = manager
        self.get_class = get_class
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.failures: dict[str, tuple[int, float]] = {}  # id -> (count, retry not before)
        # Pushed assignments no heartbeat reply has listed yet: id -> (assignment, kept until).
        self.pushed: dict[str, tuple[PoolAssignment, float]] = {}
        self.closed = False

    def assign(self, a: PoolAssignment) -> None:
        """One new assignment, pushed by the leader (the AssignPool RPC): start it now."""
        if self.closed or a.draining:
            return
        now = time.monotonic()
        self.pushed[a.instance_id] = (a, now + PUSH_GRACE_S)
        self._keep_running(a, self.manager.pinned, self._awake(), now)

    def apply(self, assignments: list[PoolAssignment]) -> None:
        if self.closed:  # the agent shuts down: what it stops must not be started again
            return
        now = time.monotonic()
        wanted = {a.instance_id: a for a in assignments}
        self.pushed = {
            iid: (a, until)
            for iid, (a, until) in self.pushed.items()
            if iid not in wanted and until > now
        }
        wanted.update((iid, a) for iid, (a, _) in self.pushed.items())
        awake = self._awake()
        pinned = self.manager.pinned
        for a in wanted.values():
            if a.draining:
                if a.instance_id in pinned or a.instance_id in awake:
                    self._spawn(a.instance_id, self.manager.drain_and_remove(a.instance_id))
                continue
            self._keep_running(a, pinned, awake, now)
        for iid in pinned - wanted.keys():
            self._spawn(iid, self.manager.drain_and_remove(iid))

    def _awake(self) -> set[str]:
        return {s.id for s in self.manager.snapshot() if s.state.awake}

    def _keep_running(
        self, a: PoolAssignment, pinned: Collection[str], awake: Collection[str], now: float
    ) -> None:
        """Start `a` unless it runs, its class is unknown here, or a failed start backs off."""
        if a.instance_id in pinned and a.instance_id in awake:
            return
        cls = self.get_class(a.class_name)
        _count, not_before = self.failures.get(a.instance_id, (0, 0.0))
        if cls is None or now < not_before:
            return
        self._spawn(a.instance_id, self._start(cls, a))

    async def _start(self, cls: ContainerClass, a: PoolAssignment) -> None:
        try:
            await self.manager.start_pinned(cls, a.name)
            self.failures.pop(a.instance_id, None)
        except PortsideError as exc:
            count = self.failures.get(a.instance_id, (0, 0.0))[0] + 1
            delay = min(60.0, 2.0**count)
            self.failures[a.instance_id] = (count, time.monotonic() + delay)
            log.warning(
                "pool instance %s/%s did not start (%s); retrying in %gs",
                cls.name,
                a.name,
                exc,
                delay,
            )

    def _spawn(self, iid: str, work: Coroutine[Any, Any, None]) -> None:
        if iid in self.tasks:
            work.close()  # one task per instance at a time; the next heartbeat looks again
            return
        task = asyncio.create_task(work)
        self.tasks[iid] = task
        task.add_done_callback(lambda t: self._done(iid, t))

    def _done(self, iid: str, task: asyncio.Task[None]) -> None:
        self.tasks.pop(iid, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("pool work on %s failed", iid, exc_info=task.exception())

    async def close(self) -> None:
        """Cancel the work in progress; assignments that come later are ignored."""
        self.closed = True
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class Sample:
    """One instance's CPU (of its type's vCPU over the last interval, at most 100) and memory."""

    cpu_percent: float | None
    memory_bytes: int


class UsageSampler:
    """CPU and memory of every running instance every `every_s`, from cgroup counters (about
    40 µs a container); each container's PID is looked up once, when it is first seen.

    A pool's average CPU is only meaningful over one interval for all its instances: instances
    sampled over staggered intervals can each look busy while one request moves between them.
    Sampling on wall-clock boundaries lines the intervals up across nodes (NTP keeps them within
    milliseconds); each sample of a pool instance goes to the control plane at once, and the
    autoscaler ticks just after the boundary (controlplane.pools.SAMPLE_DELIVERY_S)."""

    def __init__(
        self,
        manager: InstanceManager,
        runtime: ContainerRuntime,
        every_s: float = CPU_SAMPLE_INTERVAL_S,
    ) -> None:
        self.manager = manager
        self.runtime = runtime
        self.every_s = every_s
        self.sampler = CgroupSampler()
        self.pids: dict[str, int] = {}
        self.latest: dict[str, Sample] = {}  # instance id -> usage
        self.pool_sampled = False  # the last sample covers a pool instance (pinned) running here
        self.exported: set[tuple[str, str]] = set()  # (class, name) series on /metrics

    async def run(self, on_sample: Callable[[], None] | None = None) -> None:
        """Sample at wall-clock multiples of `every_s`, so that every node's interval is the
        same one and the autoscaler averages like with like; `on_sample` sends them on."""
        while True:
            await asyncio.sleep(until_next(self.every_s))
            await self.sample()
            if on_sample is not None:
                on_sample()

    async def sample(self) -> None:
        running = [s for s in self.manager.snapshot() if s.state.running and s.container_id]
        for snap in running:
            cid = snap.container_id
            assert cid is not None
            if cid not in self.pids:
                try:
                    info = await self.runtime.inspect(cid)
                except NotFound:
                    continue
                if info.pid:
                    self.pids[cid] = info.pid
        usage = self.sampler.sample(
            {
                s.container_id: self.pids[s.container_id]
                for s in running
                if s.container_id in self.pids
            }
        )
        for cid in list(self.pids):
            if cid not in usage:
                del self.pids[cid]  # stopped or restarted: look its PID up again when it runs
        latest = {}
        exported: set[tuple[str, str]] = set()
        for snap in running:
            u = usage.get(snap.container_id or "")
            if u is not None:
                cpu = cpu_percent(u, snap.vcpu) if snap.vcpu > 0 else None
                # The CPU quota holds use at 100% of the instance type; a reading above it is the
                # jitter of two short intervals, and at a 50% target 101% would ask for 3, not 2.
                latest[snap.id] = Sample(
                    cpu_percent=None if cpu is None else min(cpu, 100.0),
                    memory_bytes=u.memory_bytes,
                )
                labels = (snap.class_name, snap.name)
                exported.add(labels)
                if cpu is not None:
                    metrics.INSTANCE_CPU.labels(*labels).set(cpu / 100.0)
                else:
                    with contextlib.suppress(KeyError):  # its first sample: no interval yet
                        metrics.INSTANCE_CPU.remove(*labels)
                metrics.INSTANCE_MEMORY.labels(*labels).set(u.memory_bytes)
        self.latest = latest
        self.pool_sampled = any(s.pinned and s.id in latest for s in running)
        # Instances that stopped or left the node leave /metrics too, not a frozen last value.
        for labels in self.exported - exported:
            for gauge in (metrics.INSTANCE_CPU, metrics.INSTANCE_MEMORY):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self.exported = exported
