"""Resolving a named instance to its node: read the placement, or decide one with the scheduler
and write it with create-if-absent, so racing resolves of one name all get the same node."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from controlplane import records
from controlplane.metrics import PLACEMENTS
from controlplane.records import InstanceRecord
from controlplane.scheduler import NodeState, PlacementRequest, place
from controlplane.store import Store
from controlplane.view import ClusterView
from portside import geo
from portside.errors import InvalidArgument, NoCapacity, NotFound, StoreError
from portside.spec import Node, instance_id

log = logging.getLogger(__name__)

_MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class Resolved:
    record: InstanceRecord
    node: Node
    placed: bool


async def resolve_named_instance(
    store: Store, view: ClusterView, class_name: str, name: str, hint: str, default_hint: str
) -> Resolved:
    cls = view.classes.get(class_name)
    if cls is None:
        raise NotFound(f"unknown class {class_name!r}: deploy it with `portside deploy`")
    if not name:
        raise InvalidArgument("instance_name: must not be empty")
    near = geo.lookup(hint or default_hint)
    iid = instance_id(class_name, name)
    key = records.instance_key(class_name, iid)

    # Fast path: the view knows the placement and its node is alive.
    known = view.instances.get(key)
    if known is not None and known.node_id in view.nodes:
        return Resolved(known, view.nodes[known.node_id], placed=False)

    for _ in range(_MAX_ATTEMPTS):
        kv = await store.get(key)
        previous_node = ""
        if kv is not None:
            current = InstanceRecord.decode(kv.value)
            node = view.nodes.get(current.node_id)
            if node is not None:
                return Resolved(current, node, placed=False)
            previous_node = current.node_id  # its node's lease expired: place it again
        # Only awake instances (and fresh placements) use capacity; a dead node's are gone.
        states = [
            NodeState(
                node=n,
                alive=True,
                used_vcpu=view.use_of(n.id).vcpu,
                used_memory_mib=view.use_of(n.id).memory_mib,
                instances=view.use_of(n.id).instances,
            )
            for n in view.nodes.values()
        ]
        request = PlacementRequest(
            class_name=class_name,
            instance_type=cls.instance_type,
            near=near,
            class_instances=view.instances_of(class_name),
            max_instances=cls.max_instances,
        )
        decision = place(request, states)
        if decision.node is None:
            PLACEMENTS.labels(class_name, "rejected", _reason_label(decision.reason)).inc()
            log.info("placement of %s/%s rejected: %s", class_name, name, decision.reason)
            raise NoCapacity(decision.reason)
        record = InstanceRecord(
            class_name=class_name,
            name=name,
            instance_id=iid,
            node_id=decision.node.id,
            vcpu=cls.instance_type.vcpu,
            memory_mib=cls.instance_type.memory_mib,
            placed_at=time.time(),
        )
        expected = kv.mod_revision if kv is not None else 0
        if await store.compare_and_swap(key, expected, record.encode()):
            view.note_placed(key, record)
            outcome = "replaced" if previous_node else "placed"
            PLACEMENTS.labels(class_name, outcome, "").inc()
            log.info(
                "%s %s/%s on %s (hint %s; scores %s)",
                outcome,
                class_name,
                name,
                decision.node.id,
                near.code,
                dict(decision.scores),
            )
            return Resolved(record, decision.node, placed=True)
        # Someone else placed (or moved) it first: read theirs on the next turn.
    raise StoreError(f"could not place {class_name}/{name}: {_MAX_ATTEMPTS} conflicting writes")


def _reason_label(reason: str) -> str:
    # Metric labels must have few values: keep the reason's kind, not its node list.
    if "max_instances" in reason:
        return "max_instances"
    if "no live node" in reason or "no node" in reason:
        return "no_capacity"
    return "other"
