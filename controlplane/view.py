"""The control plane's in-memory view of the store: classes, routes, live nodes and placed
instances, loaded once and then kept current by one watch (like a Kubernetes informer).

Capacity is accounted by what is awake: the instances each node's heartbeat reports booting,
running or stopping, plus placements too recent to have been reported yet. A sleeping instance
keeps its node but uses none of it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane import records
from controlplane.records import Demand, InstanceRecord, InstanceStat
from controlplane.store import KeyValue, Store, WatchEvent
from portside.spec import Config, ContainerClass, Node, Route

log = logging.getLogger(__name__)

# A placement counts against its node this long, or until the node reports the instance awake:
# it covers the time from placement to the first request's boot and the heartbeat after it.
PENDING_S = 15.0

_VIEWED = (records.CLASSES, records.ROUTES, records.NODES, records.INSTANCES, records.DEMAND)
_NOT_VIEWED = (records.EVENTS, records.STATE)


@dataclass
class NodeUse:
    vcpu: float = 0.0
    memory_mib: int = 0
    instances: int = 0


@dataclass
class ClusterView:
    """Readers get consistent-enough snapshots; writers are the watch loop and `note_placed`,
    which applies the control plane's own placement at once so back-to-back placements see it."""

    store: Store
    classes: dict[str, ContainerClass] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)  # store key -> route
    nodes: dict[str, Node] = field(default_factory=dict)
    instances: dict[str, InstanceRecord] = field(default_factory=dict)  # store key -> record
    by_id: dict[str, InstanceRecord] = field(default_factory=dict)
    awake: dict[str, frozenset[str]] = field(default_factory=dict)  # node id -> instance ids
    stats: dict[str, dict[str, InstanceStat]] = field(default_factory=dict)  # node -> id -> stat
    demand: dict[str, Demand] = field(default_factory=dict)  # edge id -> its last report
    recent: dict[str, InstanceRecord] = field(default_factory=dict)  # placed within PENDING_S
    reported: set[str] = field(default_factory=set)  # instance ids ever reported awake
    clock: Callable[[], float] = time.time
    revision: int = 0
    config_changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    config_version: int = 0
    # Pool members (instances and their nodes) changed: edges' pool watches resend.
    pools_changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    pools_version: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def load(self) -> None:
        # Prefix by prefix, not the whole root: events and state values are not the view's, and
        # may be many. Following from the oldest of the reads replays what changed in between,
        # in order, and applying a change again is harmless.
        revisions = []
        for prefix in _VIEWED:
            kvs, revision = await self.store.range(prefix)
            revisions.append(revision)
            for kv in kvs:
                self._apply(WatchEvent("put", kv))
        self.revision = min(revisions)
        self.ready.set()

    async def follow(self) -> None:
        """Apply every change after the loaded revision; runs until cancelled."""
        async for event in self.store.watch(records.ROOT, self.revision + 1):
            changed = self._apply(event)
            self.revision = max(self.revision, event.kv.mod_revision)
            if changed == "config":
                async with self.config_changed:
                    self.config_version += 1
                    self.config_changed.notify_all()
            elif changed == "pools":
                async with self.pools_changed:
                    self.pools_version += 1
                    self.pools_changed.notify_all()

    def _apply(self, event: WatchEvent) -> str:
        """Apply one event; says what it changed: "config" (classes, routes), "pools" (nodes,
        instances) or ""."""
        kv: KeyValue = event.kv
        key, deleted = kv.key, event.type == "delete"
        if key.startswith(_NOT_VIEWED):
            return ""  # the bulk of the watch's traffic: one prefix test, nothing decoded
        try:
            if key.startswith(records.CLASSES):
                name = key[len(records.CLASSES) :]
                if deleted:
                    self.classes.pop(name, None)
                else:
                    self.classes[name] = records.decode_class(kv.value)
                return "config"
            if key.startswith(records.ROUTES):
                if deleted:
                    self.routes.pop(key, None)
                else:
                    self.routes[key] = records.decode_route(kv.value)
                return "config"
            if key.startswith(records.NODES):
                node_id = key[len(records.NODES) :]
                if deleted:
                    self.nodes.pop(node_id, None)
                    self.awake.pop(node_id, None)
                    self.stats.pop(node_id, None)
                else:
                    self.nodes[node_id], stats = records.decode_node(kv.value)
                    self.stats[node_id] = stats
                    self.awake[node_id] = frozenset(i for i, st in stats.items() if st.awake)
                    self.reported |= self.awake[node_id]
                return "pools"
            elif key.startswith(records.INSTANCES):
                self._set_instance(key, None if deleted else InstanceRecord.decode(kv.value))
                return "pools"
            elif key.startswith(records.DEMAND):
                edge_id = key[len(records.DEMAND) :]
                if deleted:
                    self.demand.pop(edge_id, None)
                else:
                    self.demand[edge_id] = Demand.decode(kv.value)
        except (ValueError, TypeError, KeyError) as exc:
            # A record this version cannot read must not stop the view; it is skipped loudly.
            log.error("skipping unreadable store key %s: %s", key, exc)
        return ""

    def note_placed(self, key: str, record: InstanceRecord) -> None:
        self._set_instance(key, record)

    def note_removed(self, key: str) -> None:
        """Apply a destroy at once, so that a Start right after it places the instance anew."""
        self._set_instance(key, None)

    def _set_instance(self, key: str, record: InstanceRecord | None) -> None:
        old = self.instances.pop(key, None)
        if old is not None:
            self.by_id.pop(old.instance_id, None)
            self.recent.pop(key, None)
            if record is None:
                self.reported.discard(old.instance_id)
        if record is not None:
            if old is None or old.placed_at != record.placed_at:
                self.reported.discard(record.instance_id)  # a new placement: not reported yet
            self.instances[key] = record
            self.by_id[record.instance_id] = record
            if self.clock() - record.placed_at < PENDING_S:
                self.recent[key] = record

    def _pending(self) -> list[InstanceRecord]:
        """Recent placements that their node has never reported awake yet."""
        now = self.clock()
        for key in [k for k, r in self.recent.items() if now - r.placed_at >= PENDING_S]:
            del self.recent[key]
        return [r for r in self.recent.values() if r.instance_id not in self.reported]

    def config(self) -> Config:
        return Config(
            classes=tuple(self.classes[k] for k in sorted(self.classes)),
            routes=tuple(self.routes[k] for k in sorted(self.routes)),
        )

    def use_of(self, node_id: str) -> NodeUse:
        """What the node's awake and pending instances take of it."""
        use = NodeUse()
        counted = [self.by_id.get(iid) for iid in self.awake.get(node_id, frozenset())]
        counted += [r for r in self._pending() if r.node_id == node_id]
        for rec in counted:
            if rec is not None and rec.node_id == node_id:
                use.vcpu += rec.vcpu
                use.memory_mib += rec.memory_mib
                use.instances += 1
        return use

    def instances_of(self, class_name: str) -> int:
        """Awake and pending instances of the class, cluster-wide: what max_instances limits."""
        awake = sum(
            1
            for node_id, ids in self.awake.items()
            for iid in ids
            if (rec := self.by_id.get(iid)) is not None
            and rec.class_name == class_name
            and rec.node_id == node_id
        )
        return awake + sum(1 for r in self._pending() if r.class_name == class_name)

    def pool_members(self, class_name: str | None = None) -> list[InstanceRecord]:
        """Pool instances placed on live nodes (draining ones included), by name."""
        return sorted(
            (
                r
                for r in self.instances.values()
                if r.pool
                and r.node_id in self.nodes
                and (class_name is None or r.class_name == class_name)
            ),
            key=lambda r: r.name,
        )

    def stat_of(self, rec: InstanceRecord) -> InstanceStat | None:
        return self.stats.get(rec.node_id, {}).get(rec.instance_id)

    def demand_by_region(self, class_name: str) -> dict[str, float]:
        """Requests per second for the class, by the region of the edge that saw them."""
        out: dict[str, float] = {}
        for d in self.demand.values():
            rate = d.requests_per_second.get(class_name, 0.0)
            if rate > 0:
                out[d.region] = out.get(d.region, 0.0) + rate
        return out

    def placed_by_class(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in self.instances.values():
            counts[rec.class_name] = counts.get(rec.class_name, 0) + 1
        return counts
