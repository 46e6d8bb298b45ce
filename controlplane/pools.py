"""The autoscaler's loop, on the leader only: every tick, for each pool, gather CPU samples from
the view, let `autoscaler.decide` pick a count, then place new instances near the demand (and
tell their agents at once) or drain the ones least needed; drained instances leave the store once
their agent stopped them.

Rollouts replace pool members here by surge (`replace_members`): one new member of the class's
version beyond the count, then, once it is ready, one old member drained: never below the count.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from controlplane import records
from controlplane.agents import AgentClients
from controlplane.autoscaler import (
    InstanceSample,
    PoolState,
    Recommendation,
    decide,
    pool_maximum,
)
from controlplane.events import EventLog
from controlplane.leader import LeaderElection
from controlplane.metrics import (
    POOL_CURRENT,
    POOL_DESIRED,
    POOL_MAX,
    POOL_SURGES,
    POOL_UTILISATION,
    SCALE_EVENTS,
)
from controlplane.placement import Resolved, place_instance
from controlplane.records import InstanceRecord
from controlplane.store import Store
from controlplane.view import PENDING_S, ClusterView
from portside import constraints, geo
from portside.api.v1 import nodeagent_pb2 as na
from portside.capacity import Resources
from portside.convert import pool_assignment_to_pb
from portside.errors import NoCapacity, PortsideError, StoreError
from portside.instances import PoolAssignment
from portside.spec import CPU_SAMPLE_INTERVAL_S, ContainerClass, InstanceType, Node
from portside.ticks import until_next

log = logging.getLogger(__name__)

# The autoscaler ticks this long after the agents' sampling instants (wall-clock multiples of
# CPU_SAMPLE_INTERVAL_S): an agent sends a pool sample within 10 ms of taking it, and it is in the
# view a store write later. A sample that comes later (a node far away) counts at the next tick.
SAMPLE_DELIVERY_S = 0.25
# How long the leader waits for an agent to take a pushed assignment (AssignPool).
PUSH_DEADLINE_S = 2.0


def room_for(view: ClusterView, itype: InstanceType) -> int:
    """How many more instances of this type the live nodes can hold now."""
    need = Resources.of(itype)
    return sum(view.free_on(node).how_many(need) for node in view.nodes.values())


def target_region(
    demand: dict[str, float],
    members_by_region: dict[str, int],
    node_regions: set[str],
    default: str,
) -> str:
    """Where the next instance should go: the region whose demand has the least instances per
    request (members in the region + 1); with no demand, the node region with the fewest
    members (spread), then the default."""
    if demand:
        return max(sorted(demand), key=lambda r: demand[r] / (members_by_region.get(r, 0) + 1))
    if node_regions:
        return min(sorted(node_regions), key=lambda r: members_by_region.get(r, 0))
    return default


# A member moves only where it would serve this many times the demand per member of the region
# it leaves: a margin, so that the reverse move never pays while the demand holds (bench/world.py:
# no moves under steady load; under follow-the-sun load 85% of requests served from the nearest
# region with room rather than 45%).
REBALANCE_MARGIN = 2.0


def rebalance_move(
    demand: dict[str, float],
    members_by_region: dict[str, int],
    regions_with_room: set[str],
) -> tuple[str, str] | None:
    """A member to move, as (from region, to region), when a pool's count is right but its
    members are not where its demand is (follow-the-sun: the count stays, the demand travels);
    None when no move pays.

    The region to gain one is `target_region`'s choice among regions whose nodes have room (a
    move into a full region would land next door, in the region it left or beside it); the
    region to lose one is the member region whose members would each serve the least demand
    after the move. A region's last member always stays: a pool keeps its footprint (and its
    spread over regions for availability); it moves only members a region has to spare.
    """
    wanted = {r: rate for r, rate in demand.items() if r in regions_with_room}
    if not wanted:
        return None
    to = target_region(wanted, members_by_region, set(), "")
    gain = wanted[to] / (members_by_region.get(to, 0) + 1)

    def left(region: str) -> float:
        rate, count = demand.get(region, 0.0), members_by_region[region]
        return rate / (count - 1) if count > 1 else math.inf

    sources = [r for r in sorted(members_by_region) if r != to and members_by_region[r] > 0]
    if not sources:
        return None
    source = min(sources, key=left)
    return (source, to) if gain > REBALANCE_MARGIN * left(source) else None


def drain_order(
    members: list[InstanceRecord],
    view: ClusterView,
    demand: dict[str, float],
    version: int = 0,
) -> list[InstanceRecord]:
    """Which instances to retire first: not ready, then those on another version than the
    class's `version` (a rollout would replace them anyway), then in regions with the least
    demand per instance, then the least busy."""
    per_region: dict[str, int] = {}
    for r in members:
        region = view.nodes[r.node_id].region
        per_region[region] = per_region.get(region, 0) + 1

    def cost(r: InstanceRecord) -> tuple[int, int, float, int, str]:
        status = view.status_of(r)
        region = view.nodes[r.node_id].region
        return (
            1 if status is not None and status.state.ready else 0,
            1 if not version or (status is not None and status.info.version == version) else 0,
            demand.get(region, 0.0) / per_region[region],
            status.info.in_flight if status else 0,
            r.name,
        )

    return sorted(members, key=cost)


@dataclass(frozen=True)
class Surge:
    """A new member placed beyond a pool's count to replace `old_id` (on an older version) with
    one of `version`; the old one is drained once the new one is ready."""

    old_id: str
    new_id: str
    version: int
    placed_at: float


class PoolManager:
    def __init__(
        self,
        store: Store,
        view: ClusterView,
        leader: LeaderElection,
        *,
        default_region: str,
        tick_s: float = CPU_SAMPLE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        events: EventLog | None = None,
        agents: AgentClients | None = None,
    ) -> None:
        self.store = store
        self.agents = agents  # None: new members wait for their agent's next heartbeat
        self.events = events
        self.view = view
        self.leader = leader
        self.default_region = default_region
        self.tick_s = tick_s
        self.clock = clock
        self.history: dict[str, tuple[Recommendation, ...]] = {}
        self.panic_until: dict[str, float] = {}  # class -> end of its panic window
        self.pushes: set[asyncio.Task[None]] = set()
        self.last_logged: dict[str, tuple[int, int]] = {}
        self.surges: dict[str, Surge] = {}  # class -> its surge in progress (at most one)

    async def run(self) -> None:
        while True:
            # Just after the agents' sampling instants: every node's latest sample then covers
            # the same interval (see nodeagent.pools.UsageSampler).
            await asyncio.sleep(until_next(self.tick_s, SAMPLE_DELIVERY_S))
            if not self.leader.is_leader:
                self.history.clear()  # a new leader starts its stabilisation window afresh
                self.panic_until.clear()
                self.surges.clear()
                continue
            try:
                await self.tick()
            except StoreError as exc:
                log.warning("autoscaler tick failed: %s", exc)

    async def tick(self) -> None:
        pools = {c.name: c for c in self.view.classes.values() if c.autoscaling is not None}
        for rec in self.view.pool_members():
            cls = pools.get(rec.class_name)
            if rec.draining:
                continue
            if cls is None:
                await self._drain(rec, "its class is no longer an autoscaled pool")
            elif not constraints.allows_node(cls.constraints, self.view.nodes[rec.node_id]):
                # Its class's constraints changed: drained before the count, which replaces it.
                await self._drain(rec, "its node is outside its class's constraints")
        for cls in pools.values():
            await self._scale(cls)
        await self._remove_drained()

    async def _scale(self, cls: ContainerClass) -> None:
        assert cls.autoscaling is not None
        # A rollout's surge member is beyond the count: the autoscaler neither counts it nor
        # drains it (its old member leaves when it is ready).
        surge = self.surges.get(cls.name)
        members = [
            r
            for r in self.view.pool_members(cls.name)
            if not r.draining and (surge is None or r.instance_id != surge.new_id)
        ]
        samples = []
        for r in members:
            status = self.view.status_of(r)
            ready = status is not None and status.state.ready
            cpu = status.cpu_percent if status is not None and ready else None
            samples.append(InstanceSample(r.instance_id, cpu))
        state = PoolState(
            class_name=cls.name,
            autoscaling=cls.autoscaling,
            max_instances=cls.max_instances,
            samples=tuple(samples),
            room=room_for(self.view, cls.instance_type),
        )
        decision = decide(
            state,
            self.history.get(cls.name, ()),
            self.clock(),
            panic_until=self.panic_until.get(cls.name),
        )
        self.history[cls.name] = decision.history
        if decision.panic_until is None:
            self.panic_until.pop(cls.name, None)
        else:
            self.panic_until[cls.name] = decision.panic_until
        POOL_DESIRED.labels(cls.name).set(decision.desired)
        POOL_CURRENT.labels(cls.name).set(decision.current)
        POOL_MAX.labels(cls.name).set(pool_maximum(state)[0])
        if decision.utilisation is not None:
            POOL_UTILISATION.labels(cls.name).set(decision.utilisation)
        if (decision.current, decision.desired) != self.last_logged.get(cls.name):
            log.info("autoscaler %s: %s", cls.name, decision.reason)
            self.last_logged[cls.name] = (decision.current, decision.desired)
        # Demand from outside the constraints is served from the allowed region nearest to it.
        demand = constraints.moved_demand(cls.constraints, self.view.demand_by_region(cls.name))
        if decision.desired > decision.current:
            await self._grow(cls, members, decision.desired - decision.current, demand)
        elif decision.desired < decision.current:
            victims = drain_order(members, self.view, demand, cls.version)[
                : decision.current - decision.desired
            ]
            for rec in victims:
                await self._drain(rec, f"autoscaler wants {decision.desired}")
        elif surge is None:
            await self._rebalance(cls, members, demand)

    def _by_region(self, members: list[InstanceRecord]) -> dict[str, int]:
        """How many of `members` each node region holds."""
        by_region: dict[str, int] = {}
        for r in members:
            region = self.view.nodes[r.node_id].region
            by_region[region] = by_region.get(region, 0) + 1
        return by_region

    async def _rebalance(
        self, cls: ContainerClass, members: list[InstanceRecord], demand: dict[str, float]
    ) -> None:
        """The count is right, but the demand may have moved (follow-the-sun): move one member
        towards it when `rebalance_move` finds a move that pays, the new one placed first."""
        need = Resources.of(cls.instance_type)
        with_room = {
            n.region
            for n in self.view.nodes.values()
            if n.region.lower() in geo.REGIONS
            and constraints.allows_node(cls.constraints, n)
            and self.view.free_on(n).fits(need)
        }
        move = rebalance_move(demand, self._by_region(members), with_room)
        if move is None:
            return
        source, target = move
        try:
            placed = await self._add_member(cls, target)
        except NoCapacity as exc:
            log.warning("autoscaler %s: cannot move an instance to %s: %s", cls.name, target, exc)
            return
        if placed is None:
            return
        SCALE_EVENTS.labels(cls.name, "up").inc()  # and "down" with the drain: a move is both
        log.info(
            "autoscaler %s: added %s on %s to move one from %s towards the demand (%s)",
            cls.name,
            placed.record.name,
            placed.node.id,
            source,
            demand,
        )
        leaving = [r for r in members if self.view.nodes[r.node_id].region == source]
        await self._drain(
            drain_order(leaving, self.view, demand, cls.version)[0],
            f"moved towards the demand in {target}",
        )

    async def _grow(
        self,
        cls: ContainerClass,
        members: list[InstanceRecord],
        count: int,
        demand: dict[str, float],
    ) -> None:
        by_region = self._by_region(members)
        node_regions = {
            n.region
            for n in self.view.nodes.values()
            if constraints.allows_node(cls.constraints, n)
        }
        for _ in range(count):
            region = target_region(demand, by_region, node_regions, self.default_region)
            try:
                placed = await self._add_member(cls, region)
            except NoCapacity as exc:
                log.warning("autoscaler %s: cannot add an instance: %s", cls.name, exc)
                return
            if placed is None:
                continue
            placed_region = placed.node.region
            by_region[placed_region] = by_region.get(placed_region, 0) + 1
            SCALE_EVENTS.labels(cls.name, "up").inc()
            log.info(
                "autoscaler %s: added %s on %s (near %s; demand %s)",
                cls.name,
                placed.record.name,
                placed.node.id,
                region,
                demand or "none",
            )

    async def _add_member(self, cls: ContainerClass, near: str) -> Resolved | None:
        """Place a new member of pool `cls` near region `near` and tell its agent at once; None
        if the placement lost a race. Raises NoCapacity."""
        name = f"{cls.name}-{secrets.token_hex(4)}"
        placed = await place_instance(
            self.store, self.view, cls, name, geo.lookup(near), pool=True, events=self.events
        )
        if placed is not None:
            self._push(placed.node, placed.record)
        return placed

    def _push(self, node: Node, rec: InstanceRecord) -> None:
        """Tell `node`'s agent of its new member now, in the background: its heartbeat reply
        would tell it up to a heartbeat later. A push that fails costs only that wait."""
        if self.agents is None:
            return
        task = asyncio.create_task(self._assign(self.agents, node, rec))
        self.pushes.add(task)
        task.add_done_callback(self.pushes.discard)

    @staticmethod
    async def _assign(agents: AgentClients, node: Node, rec: InstanceRecord) -> None:
        a = PoolAssignment(rec.class_name, rec.name, rec.instance_id, rec.draining)
        request = na.AgentAssignPoolRequest(assignment=pool_assignment_to_pb(a))
        try:
            await agents.call(
                node, "assign a pool instance", lambda s: s.AssignPool, request, PUSH_DEADLINE_S
            )
        except PortsideError as exc:
            log.info("%s/%s waits for its agent's heartbeat: %s", rec.class_name, rec.name, exc)

    async def replace_members(self, cls: ContainerClass, old_ids: tuple[str, ...]) -> None:
        """A rollout wants these members of pool `cls` (on older versions) replaced: finish the
        surge in progress — drain its old member once the new one is ready (on the class's
        version, health checks passing) — else start one for the first listed. Called by the
        rollout loop every tick, on the leader."""
        surge = self.surges.get(cls.name)
        if surge is not None:
            await self._follow_surge(cls, surge)
            return
        for old_id in old_ids:
            old = self.view.by_id.get(old_id)
            if old is None or not old.pool or old.draining or old.node_id not in self.view.nodes:
                continue
            region = self.view.nodes[old.node_id].region
            try:
                placed = await self._add_member(cls, region)
            except NoCapacity as exc:
                POOL_SURGES.labels(cls.name, "no_capacity").inc()
                log.warning("rollout of %s: no room for a surge member: %s", cls.name, exc)
                return
            if placed is None:
                return
            self.surges[cls.name] = Surge(
                old_id, placed.record.instance_id, cls.version, self.clock()
            )
            POOL_SURGES.labels(cls.name, "placed").inc()
            log.info(
                "rollout of %s: added %s on %s (version %d) to replace %s",
                cls.name,
                placed.record.name,
                placed.node.id,
                cls.version,
                old.name,
            )
            return

    async def _follow_surge(self, cls: ContainerClass, surge: Surge) -> None:
        new = self.view.by_id.get(surge.new_id)
        old = self.view.by_id.get(surge.old_id)
        if new is None or new.draining or new.node_id not in self.view.nodes:
            del self.surges[cls.name]
            POOL_SURGES.labels(cls.name, "abandoned").inc()
            log.info("rollout of %s: surge member %s is gone", cls.name, surge.new_id)
            return
        if cls.version != surge.version:
            # The class moved on (a rollback, a newer deploy): its member is of a version no
            # longer wanted, and the pool has one more than its count.
            del self.surges[cls.name]
            POOL_SURGES.labels(cls.name, "abandoned").inc()
            await self._drain(new, f"surge of version {surge.version} no longer wanted")
            return
        status = self.view.status_of(new)
        if status is None or not status.state.ready or status.info.version != surge.version:
            return
        del self.surges[cls.name]
        POOL_SURGES.labels(cls.name, "completed").inc()
        if old is not None and not old.draining:
            await self._drain(old, f"replaced by {new.name} (version {surge.version})")

    async def _drain(self, rec: InstanceRecord, why: str) -> None:
        key = records.instance_key(rec.class_name, rec.instance_id)
        kv = await self.store.get(key)
        if kv is None:
            return
        current = InstanceRecord.decode(kv.value)
        drained = replace(current, draining=True)
        if await self.store.compare_and_swap(key, kv.mod_revision, drained.encode()):
            self.view.note_placed(key, drained)
            SCALE_EVENTS.labels(rec.class_name, "down").inc()
            log.info(
                "autoscaler %s: draining %s on %s (%s)", rec.class_name, rec.name, rec.node_id, why
            )

    async def _remove_drained(self) -> None:
        """A draining instance leaves the store once its agent no longer has it awake (it finished
        its requests and stopped), or once its node is gone. Pool records only: walking every
        named instance each tick took 3/4 of a core at a million of them (bench/scale.py)."""
        now = time.time()
        for key, rec in list(self.view.pool_records.items()):
            if not rec.draining:
                continue
            status = self.view.status_of(rec)
            gone = rec.node_id not in self.view.nodes or status is None or not status.state.awake
            if gone and (rec.instance_id in self.view.reported or now - rec.placed_at > PENDING_S):
                await self.store.delete(key)
                log.info("removed drained pool instance %s/%s", rec.class_name, rec.name)
