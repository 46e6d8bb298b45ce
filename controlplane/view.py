"""The control plane's in-memory view of the store: classes, routes, live nodes and placed
instances, loaded once and then kept current by one watch (like a Kubernetes informer).

Capacity is accounted by what is awake: the instances each node's heartbeat reports booting,
running or stopping, plus placements too recent to have been reported yet. A paused instance
(sleep_mode "pause") holds its memory but none of its CPU; a sleeping instance keeps its node but
uses none of it (portside.capacity.held)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane import records
from controlplane.records import Demand, InstanceRecord, Replica
from controlplane.store import KeyValue, Store, WatchEvent
from portside.capacity import Resources, held
from portside.instances import InstanceStatus
from portside.spec import Config, ContainerClass, Gateway, Node, Route
from portside.states import InstanceState
from portside.tokens import TokenRecord

log = logging.getLogger(__name__)

# A placement counts against its node this long, or until the node reports the instance awake:
# it covers the time from placement to the first request's boot and the heartbeat after it.
PENDING_S = 15.0

_VIEWED = (
    records.CLASSES,
    records.ROUTES,
    records.NODES,
    records.INSTANCES,
    records.DEMAND,
    records.REPLICAS,
    records.TOKENS,
    records.GATEWAY,
)
_NOT_VIEWED = (
    records.EVENTS,
    records.STATE,
    records.USAGE,
    records.CA,
    records.SNAPSHOTS,
    records.SCHEDULES,  # controlplane.scheduleloop keeps its own copy
    records.SECRETS,  # never decrypted into the view: controlplane.secrets reads them
    records.RATE_LIMITS,
    records.OUTBOUND,
)


@dataclass
class NodeUse:
    """What a node's awake (or freshly placed) instances take of it, and how many they are."""

    used: Resources = field(default_factory=Resources)
    instances: int = 0


@dataclass
class ClusterView:
    """Readers get consistent-enough snapshots; writers are the watch loop and `note_placed`,
    which applies the control plane's own placement at once so back-to-back placements see it."""

    store: Store
    classes: dict[str, ContainerClass] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)  # store key -> route
    gateway: Gateway | None = None  # the last deploy's gateway module
    nodes: dict[str, Node] = field(default_factory=dict)
    instances: dict[str, InstanceRecord] = field(default_factory=dict)  # store key -> record
    by_id: dict[str, InstanceRecord] = field(default_factory=dict)
    # The pool instances among them (store key -> record) and the count of each class's: every
    # heartbeat reply lists its node's pool members and the gauges count by class each second,
    # which a walk over a million named instances would make cost tens of ms (bench/scale.py).
    pool_records: dict[str, InstanceRecord] = field(default_factory=dict)
    placed_count: dict[str, int] = field(default_factory=dict)
    awake: dict[str, frozenset[str]] = field(default_factory=dict)  # node id -> instance ids
    paused: dict[str, frozenset[str]] = field(default_factory=dict)  # node id -> instance ids
    # node -> instance id -> its status as the node's last heartbeat reported it
    statuses: dict[str, dict[str, InstanceStatus]] = field(default_factory=dict)
    demand: dict[str, Demand] = field(default_factory=dict)  # edge id -> its last report
    replicas: dict[str, Replica] = field(default_factory=dict)  # control-plane replicas by id
    # API and join tokens by id (digests only): every call's credential is checked here, so a
    # revocation (the key's delete) reaches this replica with the watch, in milliseconds.
    tokens: dict[str, TokenRecord] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)  # instance ids ever reported awake
    # Placement reads use per node and awake count per class on every resolve, so both are kept
    # up to date as events arrive instead of being summed over all instances each time.
    pending: dict[str, InstanceRecord] = field(default_factory=dict)  # placed, not yet reported
    pending_use: dict[str, NodeUse] = field(default_factory=dict)
    pending_class: dict[str, int] = field(default_factory=dict)
    awake_use: dict[str, NodeUse] = field(default_factory=dict)
    awake_class: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> class -> n
    clock: Callable[[], float] = time.time
    revision: int = 0
    config_changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    config_version: int = 0
    # Pool members (instances and their nodes) changed: edges' pool watches resend.
    pools_changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    pools_version: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Called with every event the watch delivers, after the view applied it (route changes).
    listeners: list[Callable[[WatchEvent], None]] = field(default_factory=list)
    # Futures waiting for the view to reach a revision (`caught_up`), oldest revision first.
    _waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)

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
            for listener in self.listeners:
                listener(event)
            self.revision = max(self.revision, event.kv.mod_revision)
            while self._waiters and self._waiters[0][0] <= self.revision:
                _, waiter = self._waiters.pop(0)
                if not waiter.done():
                    waiter.set_result(None)
            if changed == "config":
                async with self.config_changed:
                    self.config_version += 1
                    self.config_changed.notify_all()
            elif changed == "pools":
                async with self.pools_changed:
                    self.pools_version += 1
                    self.pools_changed.notify_all()

    async def caught_up(self, revision: int) -> None:
        """Wait until the view has applied every change up to `revision` (the revision of a
        write of this replica's own): a read of the view after this sees everything committed
        before that write, as a read of the store would. Callers bound the wait."""
        if self.revision >= revision:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, waiter))
        self._waiters.sort(key=lambda w: w[0])
        await waiter

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
            if key == records.GATEWAY:
                self.gateway = None if deleted else records.decode_gateway(kv.value)
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
                    self.paused.pop(node_id, None)
                    self.statuses.pop(node_id, None)
                else:
                    self.nodes[node_id], statuses = records.decode_node(kv.value)
                    self.statuses[node_id] = statuses
                    awake = frozenset(i for i, st in statuses.items() if st.state.awake)
                    paused = frozenset(
                        i for i, st in statuses.items() if st.state is InstanceState.PAUSED
                    )
                    if awake != self.awake.get(node_id) or paused != self.paused.get(node_id):
                        self.awake[node_id], self.paused[node_id] = awake, paused
                        for iid in (awake | paused) - self.reported:
                            self.reported.add(iid)
                            rec = self.by_id.get(iid)
                            if rec is not None:
                                self._unpend(records.instance_key(rec.class_name, iid))
                self._recount(node_id)
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
            elif key.startswith(records.REPLICAS):
                replica_id = key[len(records.REPLICAS) :]
                if deleted:
                    self.replicas.pop(replica_id, None)
                else:
                    self.replicas[replica_id] = Replica.decode(kv.value)
            elif key.startswith(records.TOKENS):
                token_id = key[len(records.TOKENS) :]
                if deleted:
                    self.tokens.pop(token_id, None)
                else:
                    self.tokens[token_id] = records.decode_token(token_id, kv.value)
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
        self._unpend(key)
        if old is not None:
            self.by_id.pop(old.instance_id, None)
            self.pool_records.pop(key, None)
            self.placed_count[old.class_name] -= 1
            if record is None:
                self.reported.discard(old.instance_id)
        if record is not None:
            if old is None or old.placed_at != record.placed_at:
                self.reported.discard(record.instance_id)  # a new placement: not reported yet
            self.instances[key] = record
            self.by_id[record.instance_id] = record
            if record.pool:
                self.pool_records[key] = record
            self.placed_count[record.class_name] = self.placed_count.get(record.class_name, 0) + 1
            if (
                record.instance_id not in self.reported
                and self.clock() - record.placed_at < PENDING_S
            ):
                self._pend(key, record)
        for node_id in {r.node_id for r in (old, record) if r is not None}:
            if node_id in self.awake:
                self._recount(node_id)

    def _pend(self, key: str, rec: InstanceRecord) -> None:
        self.pending[key] = rec
        self._count(self.pending_use.setdefault(rec.node_id, NodeUse()), rec, +1)
        self.pending_class[rec.class_name] = self.pending_class.get(rec.class_name, 0) + 1

    def _unpend(self, key: str) -> None:
        rec = self.pending.pop(key, None)
        if rec is not None:
            self._count(self.pending_use[rec.node_id], rec, -1)
            self.pending_class[rec.class_name] -= 1

    def _expire_pending(self) -> None:
        # Placements enter in time order, so the expired ones are at the front.
        now = self.clock()
        while self.pending:
            key, rec = next(iter(self.pending.items()))
            if now - rec.placed_at < PENDING_S:
                break
            self._unpend(key)

    @staticmethod
    def _count(use: NodeUse, rec: InstanceRecord, sign: int) -> None:
        taken = Resources(rec.vcpu, rec.memory_mib)
        use.used = use.used + taken if sign > 0 else use.used - taken
        use.instances += sign

    def _recount(self, node_id: str) -> None:
        """Sum what the node's awake instances take, and its paused ones' memory, after its report
        or their records changed."""
        use, classes = NodeUse(), dict[str, int]()
        for iid in self.awake.get(node_id, frozenset()):
            rec = self.by_id.get(iid)
            if rec is not None and rec.node_id == node_id:
                self._count(use, rec, +1)
                classes[rec.class_name] = classes.get(rec.class_name, 0) + 1
        for iid in self.paused.get(node_id, frozenset()):
            rec = self.by_id.get(iid)
            if rec is not None and rec.node_id == node_id:
                use.used += held(InstanceState.PAUSED, Resources(rec.vcpu, rec.memory_mib))
        if node_id in self.nodes:
            self.awake_use[node_id], self.awake_class[node_id] = use, classes
        else:
            self.awake_use.pop(node_id, None)
            self.awake_class.pop(node_id, None)

    def config(self) -> Config:
        return Config(
            classes=tuple(self.classes[k] for k in sorted(self.classes)),
            routes=tuple(self.routes[k] for k in sorted(self.routes)),
            gateway=self.gateway,
        )

    def use_of(self, node_id: str) -> NodeUse:
        """What the node's awake and pending instances take of it."""
        self._expire_pending()
        awake = self.awake_use.get(node_id) or NodeUse()
        pending = self.pending_use.get(node_id) or NodeUse()
        return NodeUse(awake.used + pending.used, awake.instances + pending.instances)

    def free_on(self, node: Node) -> Resources:
        """What is left of `node` for one more awake instance."""
        return Resources(node.vcpu, node.memory_mib) - self.use_of(node.id).used

    def instances_of(self, class_name: str) -> int:
        """Awake and pending instances of the class, cluster-wide: what max_instances limits."""
        self._expire_pending()
        awake = sum(classes.get(class_name, 0) for classes in self.awake_class.values())
        return awake + self.pending_class.get(class_name, 0)

    def pool_members(self, class_name: str | None = None) -> list[InstanceRecord]:
        """Pool instances placed on live nodes (draining ones included), by name."""
        return sorted(
            (
                r
                for r in self.pool_records.values()
                if r.node_id in self.nodes and (class_name is None or r.class_name == class_name)
            ),
            key=lambda r: r.name,
        )

    def status_of(self, rec: InstanceRecord) -> InstanceStatus | None:
        """The instance as its node's last heartbeat reported it (None: not reported)."""
        return self.statuses.get(rec.node_id, {}).get(rec.instance_id)

    def demand_by_region(self, class_name: str) -> dict[str, float]:
        """Requests per second for the class, by the region of the edge that saw them."""
        out: dict[str, float] = {}
        for d in self.demand.values():
            rate = d.requests_per_second.get(class_name, 0.0)
            if rate > 0:
                out[d.region] = out.get(d.region, 0.0) + rate
        return out

    def placed_by_class(self) -> dict[str, int]:
        return dict(self.placed_count)
