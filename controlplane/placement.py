"""Resolving an instance to its node: read the placement, or decide one with the scheduler and
write it with create-if-absent, so racing resolves of one name all get the same node."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from controlplane import records
from controlplane.events import EventLog
from controlplane.metrics import PLACEMENTS
from controlplane.outbound import decode_policy, outbound_key
from controlplane.placebatch import PlacementBatcher, PlacementWrite, write_placements
from controlplane.records import InstanceRecord
from controlplane.scheduler import NodeState, PlacementRequest, node_location, place
from controlplane.store import Store
from controlplane.view import ClusterView
from portside import constraints, geo
from portside.errors import InvalidArgument, NoCapacity, NotFound, StoreError, Unavailable
from portside.events import Event, EventKind
from portside.spec import ContainerClass, Node, OutboundPolicy, instance_id

log = logging.getLogger(__name__)

_MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class Resolved:
    record: InstanceRecord
    node: Node
    placed: bool
    # A new placement's own outbound policy, read with it: its node must learn it first.
    own_outbound: OutboundPolicy | None = None


def node_states(view: ClusterView) -> list[NodeState]:
    """The scheduler's snapshot: live nodes and what their awake instances take of them."""
    states = []
    for n in view.nodes.values():
        use = view.use_of(n.id)
        states.append(NodeState(node=n, used=use.used, instances=use.instances))
    return states


async def resolve_instance(
    store: Store,
    view: ClusterView,
    class_name: str,
    name: str,
    hint: str,
    default_hint: str,
    events: EventLog | None = None,
    batch: PlacementBatcher | None = None,
) -> Resolved:
    """The node of instance `name` of a class; for a pool (empty name) the nearest member,
    starting one if the pool has none. With `batch`, placements are written in its groups."""
    cls = view.classes.get(class_name)
    if cls is None:
        raise NotFound(f"unknown class {class_name!r}: deploy it with `portside deploy`")
    near = geo.lookup(hint or default_hint)
    if cls.autoscaling is not None:
        if not name:
            return await _resolve_pool(store, view, cls, near, events, batch)
        member = view.instances.get(records.instance_key(cls.name, instance_id(cls.name, name)))
        if member is None or member.node_id not in view.nodes:
            raise Unavailable(f"pool instance {name} of {cls.name} is gone; send the request again")
        return Resolved(member, view.nodes[member.node_id], placed=False)
    if not name:
        raise InvalidArgument(f"instance_name: must not be empty (class {class_name} is no pool)")
    return await resolve_named(store, view, cls, name, near, events=events, batch=batch)


async def _resolve_pool(
    store: Store,
    view: ClusterView,
    cls: ContainerClass,
    near: geo.Location,
    events: EventLog | None,
    batch: PlacementBatcher | None,
) -> Resolved:
    members = [
        r
        for r in view.pool_members(cls.name)
        if not r.draining and constraints.allows_node(cls.constraints, view.nodes[r.node_id])
    ]
    if members:
        nearest = min(
            members, key=lambda r: geo.distance_km(near, node_location(view.nodes[r.node_id]))
        )
        return Resolved(nearest, view.nodes[nearest.node_id], placed=False)
    # An empty pool (minimum 0): one instance with a fixed name, so that racing first requests
    # from several edges start one instance, not one each. The autoscaler takes it from there.
    return await resolve_named(
        store, view, cls, f"{cls.name}-0", near, pool=True, events=events, batch=batch
    )


async def resolve_named(
    store: Store,
    view: ClusterView,
    cls: ContainerClass,
    name: str,
    near: geo.Location,
    *,
    pool: bool = False,
    events: EventLog | None = None,
    batch: PlacementBatcher | None = None,
) -> Resolved:
    key = records.instance_key(cls.name, instance_id(cls.name, name))
    known = view.instances.get(key)
    if known is not None and known.node_id in view.nodes and not known.draining:
        return Resolved(known, view.nodes[known.node_id], placed=False)
    if known is None:
        # Unknown to the view: most likely a new name. Try to create it first (one store round
        # trip); only a lost race or a placement the view has not seen yet costs a read.
        resolved = await place_instance(
            store, view, cls, name, near, pool=pool, events=events, batch=batch
        )
        if resolved is not None:
            return resolved
    for _ in range(_MAX_ATTEMPTS):
        kv = await store.get(key)
        replaced = gone = ""
        if kv is not None:
            current = InstanceRecord.decode(kv.value)
            node = view.nodes.get(current.node_id)
            if node is not None and not current.draining:
                return Resolved(current, node, placed=False)
            replaced = current.node_id  # its node died (or it drains): place it again
            # Fencing: a move off a dead node commits only if that node's key is still gone
            # in the store, not merely in this replica's view. A node that re-registered
            # meanwhile has already been told (reconciled) that the instance is its own.
            gone = "" if node is not None else records.node_key(current.node_id)
        resolved = await place_instance(
            store,
            view,
            cls,
            name,
            near,
            pool=pool,
            expected_revision=kv.mod_revision if kv else 0,
            replaced=replaced,
            node_gone=gone,
            events=events,
            batch=batch,
        )
        if resolved is not None:
            return resolved
        # Someone else placed (or moved) it first: read theirs on the next turn.
    raise StoreError(f"could not place {cls.name}/{name}: {_MAX_ATTEMPTS} conflicting writes")


async def place_instance(
    store: Store,
    view: ClusterView,
    cls: ContainerClass,
    name: str,
    near: geo.Location,
    *,
    pool: bool,
    expected_revision: int = 0,
    replaced: str = "",
    node_gone: str = "",
    events: EventLog | None = None,
    batch: PlacementBatcher | None = None,
) -> Resolved | None:
    """Choose a node and write the placement if the key is still at `expected_revision`
    (0: absent) — and, for a move off a lost node, only if that node's key `node_gone` is still
    absent — with its "placed" event to `events`, in one transaction (in a group of `batch`'s, if
    given). None if another writer got there first (or the node came back); NoCapacity if no
    node can take it."""
    decision = place(
        PlacementRequest(
            class_name=cls.name,
            instance_type=cls.instance_type,
            near=near,
            class_instances=view.instances_of(cls.name),
            max_instances=0 if pool else cls.max_instances,  # the autoscaler clamps pools itself
            constraints=cls.constraints,
        ),
        node_states(view),
    )
    if decision.node is None:
        PLACEMENTS.labels(cls.name, "rejected", decision.refusal).inc()
        log.info("placement of %s/%s rejected: %s", cls.name, name, decision.reason)
        raise NoCapacity(decision.reason)
    record = InstanceRecord(
        class_name=cls.name,
        name=name,
        instance_id=instance_id(cls.name, name),
        node_id=decision.node.id,
        vcpu=cls.instance_type.vcpu,
        memory_mib=cls.instance_type.memory_mib,
        placed_at=time.time(),
        pool=pool,
        # Moved off a lost node: its first container there starts from its latest snapshot.
        restore=bool(node_gone),
    )
    key = records.instance_key(cls.name, record.instance_id)
    write = PlacementWrite(
        key,
        expected_revision,
        record.encode(),
        absent=node_gone,
        event=Event(
            kind=EventKind.PLACED,
            time=record.placed_at,
            class_name=cls.name,
            name=name,
            instance_id=record.instance_id,
            node_id=decision.node.id,
            reason=f"moved from node {replaced}" if replaced else "",
        ),
        read=outbound_key(cls.name, record.instance_id),
    )
    if batch is not None:
        written = await batch.write(write)
    else:
        (written,) = await write_placements(store, events, [write])
    if not written.succeeded:
        return None
    view.note_placed(key, record)
    outcome = "replaced" if replaced else "placed"
    PLACEMENTS.labels(cls.name, outcome, "").inc()
    # Debug, not info: at thousands a second the line would cost more than the placement's
    # decision, and its "placed" event (portside events) records the same.
    log.debug(
        "%s %s/%s on %s (near %s; scores %s)",
        outcome,
        cls.name,
        name,
        decision.node.id,
        near.code,
        dict(decision.scores),
    )
    own = decode_policy(written.read.value) if written.read is not None else None
    return Resolved(record, decision.node, placed=True, own_outbound=own)
