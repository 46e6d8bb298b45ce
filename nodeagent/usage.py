"""Usage metering: each instance's running time in 10 ms steps, split at UTC midnight and
multiplied by its instance type, plus CPU used and egress bytes; sent on the heartbeat.

A run is metered from the moment docker reports its container running (a boot's start, or an
adopted container) until it died (sleep, stop, exit; at the engine's time of death when its die
event says, which comes a few tens of ms before docker's stop call returns): the time Docker
shows between State.StartedAt and State.FinishedAt. Elapsed time comes from the monotonic clock;
the wall clock only says which UTC day a 10 ms step falls on. Steps are counted whole while the
run goes on (floor) and a started step is counted at its end (ceil). A sleeping instance has no
run: it costs nothing. Nor does a paused one (sleep_mode "pause"): its run stops at the freeze and
goes on at the thaw; frozen, it uses no CPU, though it holds its memory, which its node's
capacity counts. Between an agent's stop and the next agent's adoption nothing is metered.

CPU used is the growth of the container's cgroup CPU counter and egress the growth of its eth0
tx_bytes (enable_internet classes only), read every sample (2 s): what a run does after its last
sample is not seen. A container the agent adopted is counted from its first sample.

Delivery: deltas accumulate per (class, instance, day); each heartbeat message takes them as one
batch numbered (source, sequence), `source` a random id of this agent process. A reply
acknowledges the oldest batch in flight; when the stream breaks, unacknowledged batches are sent
again unchanged, in order, before anything newer. The control plane adds a batch to a key only
if that key's last sequence from this source is lower, so a batch it handled whose reply was lost
is not counted twice. Nothing is dropped while the control plane is away (pending deltas merge).
"""

from __future__ import annotations

import collections
import datetime
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from prometheus_client import Counter

from nodeagent.instances import InstanceManager, InstanceSnapshot
from nodeagent.lifecycle import Effect
from nodeagent.pools import UsageSampler
from portside.usage import Usage

log = logging.getLogger(__name__)

TICK_S = 0.01  # the metering step: Cloudflare bills every 10 ms of a running instance
_DAY_S = 86_400
_EPSILON = 1e-4  # of a step (1 µs): float noise (unix times are ~0.2 µs apart) adds no step

_LABELS = ["class", "instance_name"]
VCPU_SECONDS = Counter(
    "portside_agent_usage_vcpu_seconds_total",
    "Provisioned vCPU-seconds of running instances: running time (10 ms steps) x the type's vCPU.",
    _LABELS,
)
MEMORY_GIB_SECONDS = Counter(
    "portside_agent_usage_memory_gib_seconds_total",
    "Provisioned GiB-seconds of memory of running instances: running time x the type's GiB.",
    _LABELS,
)
DISK_GB_SECONDS = Counter(
    "portside_agent_usage_disk_gb_seconds_total",
    "Provisioned GB-seconds of disk of running instances: running time x the type's disk in GB.",
    _LABELS,
)
CPU_SECONDS_USED = Counter(
    "portside_agent_usage_cpu_seconds_used_total",
    "CPU time running instances actually used (cgroup counters, read every sample).",
    _LABELS,
)
EGRESS_BYTES = Counter(
    "portside_agent_usage_egress_bytes_total",
    "Bytes instances of enable_internet classes sent (their eth0 tx_bytes).",
    _LABELS,
)


@dataclass(frozen=True)
class Size:
    """What one running instance is billed for per second. `known` False: its class (disk,
    enable_internet) is not known yet, as for a container adopted before the first config."""

    vcpu: float
    memory_mib: int
    disk_mb: int
    internet: bool = False
    known: bool = True


@dataclass(frozen=True)
class UsageKey:
    class_name: str
    instance_id: str
    day: str  # UTC, YYYY-MM-DD

    def zero(self) -> Usage:
        return Usage(self.class_name, self.day, self.instance_id)


@dataclass(frozen=True)
class UsageBatch:
    """The usage one heartbeat message carries, named for the control plane's deduplication."""

    source: str
    sequence: int
    totals: dict[UsageKey, Usage]


def utc_day(wall_s: float) -> str:
    return datetime.datetime.fromtimestamp(wall_s, datetime.UTC).strftime("%Y-%m-%d")


def ticks_by_day(start_wall: float, first: int, end: int) -> list[tuple[str, int]]:
    """Steps `first` .. `end - 1` of a run that began at unix time `start_wall`, counted per UTC
    day; step i covers [start_wall + i * TICK_S, + TICK_S) and belongs to the day it begins in."""
    out: list[tuple[str, int]] = []
    i = first
    while i < end:
        begins = start_wall + i * TICK_S
        day_end = (math.floor(begins / _DAY_S) + 1) * _DAY_S
        # The first step that begins at or after midnight (at least one step further: float
        # rounding must not stall the loop).
        boundary = max(i + 1, math.ceil((day_end - start_wall) / TICK_S - _EPSILON))
        stop = min(end, boundary)
        out.append((utc_day(begins), stop - i))
        i = stop
    return out


@dataclass
class _Run:
    """One container run being metered: from `started` (monotonic) and `started_wall`."""

    class_name: str
    instance_name: str
    container_id: str | None
    size: Size
    started: float
    started_wall: float
    ticks: int = 0  # steps already counted
    cpu_ns: int | None = 0  # the counter's last reading; None: not read yet (adopted)
    tx_bytes: int | None = 0


@dataclass
class UsageMeter:
    """Meters runs as the instance manager reports them (`run_began`, `run_ended`) and readings
    as the sampler makes them (`observe`); `take` / `acknowledge` / `stream_lost` pair with the
    heartbeat's messages and replies like the EventOutbox."""

    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    source: str = field(default_factory=lambda: uuid.uuid4().hex)
    # A class's (disk_mb, enable_internet) by name, None when unknown; asked again for a run
    # whose size is not known yet.
    class_size: Callable[[str], tuple[int, bool] | None] = lambda _name: None
    _runs: dict[str, _Run] = field(default_factory=dict)  # instance id -> open run
    _pending: dict[UsageKey, Usage] = field(default_factory=dict)
    _in_flight: collections.deque[UsageBatch | None] = field(default_factory=collections.deque)
    _resend: collections.deque[UsageBatch] = field(default_factory=collections.deque)
    _unsure: set[int] = field(default_factory=set)  # sequences sent on a stream that broke
    _sequence: int = 0

    # -- runs -----------------------------------------------------------------------------------

    def run_began(
        self,
        instance_id: str,
        class_name: str,
        instance_name: str,
        container_id: str | None,
        size: Size,
        *,
        adopted: bool = False,
        at_wall: float | None = None,
    ) -> None:
        """The container of `instance_id` runs from now (`at_wall`: from when, as the engine
        says: docker's StartedAt, a few tens of ms before its start call answered). `adopted`:
        it ran before this agent started, so its counters are not at zero."""
        if instance_id in self._runs:
            self.run_ended(instance_id)
        now, now_wall = self.clock(), self.wall_clock()
        began_wall = now_wall if at_wall is None else at_wall
        self._runs[instance_id] = _Run(
            class_name,
            instance_name,
            container_id,
            size,
            now - self._ago(now_wall, began_wall),
            began_wall,
            cpu_ns=None if adopted else 0,
            tx_bytes=None if adopted else 0,
        )

    @staticmethod
    def _ago(now_wall: float, at_wall: float) -> float:
        # A short span by the wall clock, which its adjustments hardly touch; bounded, so a
        # clock step cannot turn into hours of use.
        return min(max(0.0, now_wall - at_wall), 5.0)

    def run_ended(self, instance_id: str, at_wall: float | None = None) -> None:
        """The container stopped (`at_wall`: when, as the engine says, which may be a few tens
        of ms before we heard of it; None: now): count its time through the step it stopped
        in."""
        run = self._runs.pop(instance_id, None)
        if run is None:
            return
        elapsed = self.clock() - run.started
        if at_wall is not None:
            elapsed -= self._ago(self.wall_clock(), at_wall)
        steps = max(0.0, elapsed) / TICK_S
        # Steps a heartbeat counted after the death (before the agent heard of it) are taken
        # back: the run is metered to the step it stopped in, not to when the news came.
        self._count(instance_id, run, math.ceil(steps - _EPSILON))

    @property
    def running(self) -> frozenset[str]:
        return frozenset(self._runs)

    def accrue(self) -> None:
        """Count every open run's whole steps up to now."""
        for iid, run in self._runs.items():
            self._count(iid, run, math.floor(self._elapsed_steps(run) + _EPSILON))

    def _elapsed_steps(self, run: _Run) -> float:
        return max(0.0, self.clock() - run.started) / TICK_S

    def _size(self, run: _Run) -> Size:
        if not run.size.known:
            found = self.class_size(run.class_name)
            if found is not None:
                run.size = Size(run.size.vcpu, run.size.memory_mib, found[0], found[1])
        return run.size

    def _count(self, iid: str, run: _Run, upto: int) -> None:
        """Count the run's steps up to `upto`; below what was counted already, take the excess
        back (a negative delta; Prometheus counters only grow, so they keep it)."""
        if upto == run.ticks:
            return
        size = self._size(run)
        sign = 1 if upto > run.ticks else -1
        for day, count in ticks_by_day(
            run.started_wall, min(upto, run.ticks), max(upto, run.ticks)
        ):
            steps = sign * count
            seconds = steps * TICK_S
            key = UsageKey(run.class_name, iid, day)
            delta = replace(
                key.zero(),
                running_ms=steps * int(TICK_S * 1000),
                vcpu_seconds=seconds * size.vcpu,
                memory_gib_seconds=seconds * size.memory_mib / 1024,
                disk_gb_seconds=seconds * size.disk_mb / 1000,
            )
            self._add(key, delta)
            if sign > 0:
                labels = (run.class_name, run.instance_name)
                VCPU_SECONDS.labels(*labels).inc(delta.vcpu_seconds)
                MEMORY_GIB_SECONDS.labels(*labels).inc(delta.memory_gib_seconds)
                DISK_GB_SECONDS.labels(*labels).inc(delta.disk_gb_seconds)
        run.ticks = upto

    # -- readings -------------------------------------------------------------------------------

    def observe(
        self, instance_id: str, container_id: str, cpu_ns: int | None, tx_bytes: int | None
    ) -> None:
        """The cumulative counters of a running container, as the sampler read them (None:
        not read). A counter that went back belongs to a new cgroup or interface: all of it
        is new."""
        run = self._runs.get(instance_id)
        if run is None or (run.container_id is not None and run.container_id != container_id):
            return
        day = utc_day(self.wall_clock())
        key = UsageKey(run.class_name, instance_id, day)
        labels = (run.class_name, run.instance_name)
        if cpu_ns is not None:
            if run.cpu_ns is not None:
                used_ns = cpu_ns - run.cpu_ns if cpu_ns >= run.cpu_ns else cpu_ns
                if used_ns > 0:
                    self._add(key, replace(key.zero(), cpu_seconds_used=used_ns / 1e9))
                    CPU_SECONDS_USED.labels(*labels).inc(used_ns / 1e9)
            run.cpu_ns = cpu_ns
        if tx_bytes is not None and self._size(run).internet:
            if run.tx_bytes is not None:
                sent = tx_bytes - run.tx_bytes if tx_bytes >= run.tx_bytes else tx_bytes
                if sent > 0:
                    self._add(key, replace(key.zero(), egress_bytes=sent))
                    EGRESS_BYTES.labels(*labels).inc(sent)
            run.tx_bytes = tx_bytes

    def internet(self, instance_id: str) -> bool:
        run = self._runs.get(instance_id)
        return run is not None and self._size(run).internet

    def _add(self, key: UsageKey, delta: Usage) -> None:
        self._pending[key] = self._pending.get(key, key.zero()) + delta

    # -- delivery -------------------------------------------------------------------------------

    def take(self) -> UsageBatch | None:
        """The batch for a heartbeat message about to be sent (None: nothing to send); call once
        per message so that replies and batches pair up. A batch sent before, unacknowledged,
        goes first and unchanged."""
        self.accrue()
        batch: UsageBatch | None
        if self._resend:
            batch = self._resend.popleft()
        elif self._pending:
            self._sequence += 1
            batch = UsageBatch(self.source, self._sequence, self._pending)
            self._pending = {}
        else:
            batch = None
        self._in_flight.append(batch)
        return batch

    @property
    def has_usage(self) -> bool:
        """Something to send: a run going on, deltas, or batches to send again."""
        return bool(self._runs or self._pending or self._resend)

    def acknowledge(self) -> None:
        """A reply came: the control plane added the oldest batch in flight."""
        if self._in_flight:
            batch = self._in_flight.popleft()
            if batch is not None:
                self._unsure.discard(batch.sequence)

    def refused(self) -> None:
        """A reply came, but the control plane added nothing of the oldest batch in flight (its
        store was unreachable). Its totals go back into the pending deltas, to go out under a
        new, higher sequence: a later batch may already have been added, and the control plane
        skips a sequence not above the last it added.

        A batch that went out before on a stream that broke may have been added then: it
        keeps its sequence and goes again first (never counted twice; were a later batch added
        before it gets through, it would be skipped — a store that flaps within one message).
        """
        if self._in_flight:
            batch = self._in_flight.popleft()
            if batch is None:
                return
            if batch.sequence in self._unsure:
                self._resend.appendleft(batch)
                return
            for key, delta in batch.totals.items():
                self._add(key, delta)

    def stream_lost(self) -> None:
        """Batches not acknowledged go again, first, with their numbers."""
        while self._in_flight:
            batch = self._in_flight.pop()
            if batch is not None:
                self._resend.appendleft(batch)
                self._unsure.add(batch.sequence)


def follow_runs(meter: UsageMeter) -> Callable[[InstanceSnapshot, Effect, float | None], None]:
    """The InstanceManager's `on_run` hook that meters each container run."""

    def on_run(snap: InstanceSnapshot, change: Effect, at: float | None) -> None:
        # A paused container's run is not metered: it uses no CPU while frozen (it holds its
        # memory, which the node's capacity counts). Its thaw goes on with counters not at zero.
        if change in (Effect.END_RUN, Effect.PAUSE_RUN):
            meter.run_ended(snap.id, at)
            return
        found = meter.class_size(snap.class_name)
        size = Size(
            snap.vcpu,
            snap.memory_mib,
            found[0] if found else 0,
            found[1] if found else False,
            known=found is not None,
        )
        meter.run_began(
            snap.id,
            snap.class_name,
            snap.name,
            snap.container_id,
            size,
            adopted=change in (Effect.ADOPT_RUN, Effect.RESUME_RUN),
            at_wall=at,
        )

    return on_run


def observe_sample(
    meter: UsageMeter, sampler: UsageSampler, manager: InstanceManager, proc: str = "/proc"
) -> None:
    """After the sampler's round: add each metered run's CPU (the counters the sampler read) and
    egress; end runs of instances the manager no longer has (a safety net: it reports ends)."""
    known = {s.id: s for s in manager.snapshot()}
    for iid in meter.running - known.keys():
        meter.run_ended(iid)
    for iid in meter.running:
        cid = known[iid].container_id
        pid = sampler.pids.get(cid) if cid is not None else None
        if cid is None or pid is None:
            continue
        tx = read_tx_bytes(pid, proc=proc) if meter.internet(iid) else None
        meter.observe(iid, cid, sampler.sampler.cpu_ns(cid), tx)


def read_tx_bytes(pid: int, interface: str = "eth0", proc: str = "/proc") -> int | None:
    """Bytes `interface` sent, from /proc/<pid>/net/dev (the process's network namespace);
    None when the process or interface is gone."""
    try:
        with open(f"{proc}/{pid}/net/dev") as f:
            text = f.read()
    except OSError:
        return None
    return parse_tx_bytes(text, interface)


def parse_tx_bytes(net_dev: str, interface: str = "eth0") -> int | None:
    for line in net_dev.splitlines():
        name, sep, counters = line.partition(":")
        if sep and name.strip() == interface:
            fields = counters.split()
            # receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes
            if len(fields) >= 9 and fields[8].isdigit():
                return int(fields[8])
    return None


__all__ = [
    "CPU_SECONDS_USED",
    "DISK_GB_SECONDS",
    "EGRESS_BYTES",
    "MEMORY_GIB_SECONDS",
    "TICK_S",
    "VCPU_SECONDS",
    "Size",
    "UsageBatch",
    "UsageKey",
    "UsageMeter",
    "follow_runs",
    "observe_sample",
    "parse_tx_bytes",
    "read_tx_bytes",
    "ticks_by_day",
    "utc_day",
]
