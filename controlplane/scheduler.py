"""Placement: which node a new instance goes to, decided over an immutable snapshot.

Filters drop the nodes that cannot take it, each rejection with a reason; weighers rank the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from portside import constraints
from portside.capacity import Resources
from portside.geo import REGIONS, Location, distance_km
from portside.spec import Constraints, InstanceType, Node

# Why a node was rejected; stable strings, so metrics and logs can group by them.
REJECT_CPU = "not enough vCPU"
REJECT_MEMORY = "not enough memory"
REJECT_REGION = "outside the class's regions"
REJECT_LABELS = "lacks the class's labels"

# Why no node was chosen: the `refusal` of a Placement, a metric label.
REFUSED_MAX_INSTANCES = "max_instances"
REFUSED_NO_NODES = "no_nodes"
REFUSED_NO_CAPACITY = "no_capacity"
REFUSED_CONSTRAINTS = "constraints"
# Nodes closer together than this count as one place (several hosts in one city or region),
# so load, not a few hundred metres, decides between them.
SAME_PLACE_KM = 1.0
# A user-facing reason stays one line even on a large cluster.
MAX_NODES_IN_REASON = 5


@dataclass(frozen=True)
class NodeState:
    """A live node as the scheduler sees it: what its awake and freshly placed instances take
    of it. Only nodes whose lease is alive are given to the scheduler."""

    node: Node
    used: Resources
    instances: int

    @property
    def free(self) -> Resources:
        return Resources(self.node.vcpu, self.node.memory_mib) - self.used


@dataclass(frozen=True)
class PlacementRequest:
    """One instance of `class_name` to place, near the resolved location hint."""

    class_name: str
    instance_type: InstanceType
    near: Location
    class_instances: int  # already placed, cluster-wide
    max_instances: int  # 0: unlimited
    constraints: Constraints = Constraints()


@dataclass(frozen=True)
class Placement:
    """The decision: a node, or None, a one-line reason for the user and the `refusal` (a
    REFUSED_* constant) for metrics.

    `rejected` maps node id to a REJECT_* constant. `scores` maps every feasible node to its
    score, higher is better: minus its distance in km from the hint (nodes within SAME_PLACE_KM
    of each other share the nearest one's), minus a load fraction in [0, 1) that orders the
    nodes of one place; equal scores go to the lower node id.
    """

    node: Node | None
    reason: str
    rejected: Mapping[str, str]
    scores: Mapping[str, float]
    refusal: str = ""


def node_location(node: Node) -> Location:
    """Where `node` is: its own coordinates, named and grouped by its region if the table has it."""
    known = REGIONS.get(node.region.lower())
    if known is None:
        return Location(node.region, node.region, node.latitude, node.longitude, area="")
    return Location(
        node.region, known.name, node.latitude, node.longitude, known.area, known.country
    )


# --- filters ---------------------------------------------------------------------------------


class NodeFilter(Protocol):
    """A feasibility check: `passes` is False when the node cannot take the instance."""

    reason: str

    def passes(self, state: NodeState, request: PlacementRequest) -> bool: ...


class VcpuFilter:
    """The vCPU not yet reserved by placed instances must cover the instance type: no overcommit."""

    reason = REJECT_CPU

    def passes(self, state: NodeState, request: PlacementRequest) -> bool:
        return state.free.fits(Resources(vcpu=request.instance_type.vcpu))


class MemoryFilter:
    """The memory not yet reserved by placed instances must cover the instance type."""

    reason = REJECT_MEMORY

    def passes(self, state: NodeState, request: PlacementRequest) -> bool:
        return state.free.fits(Resources(memory_mib=request.instance_type.memory_mib))


class RegionFilter:
    """The node's region must be one the class's constraints allow (regions, jurisdiction)."""

    reason = REJECT_REGION

    def passes(self, state: NodeState, request: PlacementRequest) -> bool:
        return constraints.region_allowed(request.constraints, state.node.region)


class LabelFilter:
    """The node must carry every label the class's constraints require (`--label gpu=yes`)."""

    reason = REJECT_LABELS

    def passes(self, state: NodeState, request: PlacementRequest) -> bool:
        return not constraints.missing_labels(request.constraints, state.node.labels)


# Cheapest first; a node is rejected by the first filter it fails. The constraints come before
# capacity: a node the class may never use is not "full" for it. A class without constraints
# skips theirs (placement's hot path runs the filters on every live node).
CAPACITY_FILTERS: tuple[NodeFilter, ...] = (VcpuFilter(), MemoryFilter())
FILTERS: tuple[NodeFilter, ...] = (RegionFilter(), LabelFilter(), *CAPACITY_FILTERS)
_CONSTRAINT_REJECTS = frozenset({REJECT_REGION, REJECT_LABELS})


# --- weighers --------------------------------------------------------------------------------
# Distance to the hint ranks first (see _rank). Among the nodes of one place these raw numbers,
# lower is better, apply in order: each only separates nodes the ones before it left tied.


def instance_count(state: NodeState) -> float:
    """Fewer instances first: fewer neighbours contending for the node's CPU, disk and network."""
    return float(state.instances)


def vcpu_used_fraction(state: NodeState) -> float:
    """Then less vCPU reserved, as a fraction 0..1, so reservations spread over big and small."""
    if state.node.vcpu <= 0:
        return 1.0
    return min(1.0, max(0.0, state.used.vcpu / state.node.vcpu))


LOAD_WEIGHERS: tuple[Callable[[NodeState], float], ...] = (instance_count, vcpu_used_fraction)


def load_fraction(state: NodeState) -> float:
    """The load weighers folded into one number in [0, 1) with the same order, for `scores`."""
    # Instances dominate; the vCPU fraction, halved to stay below 1, only splits equal counts.
    load = state.instances + vcpu_used_fraction(state) / 2
    return load / (load + 1)


def _rank(
    feasible: Sequence[NodeState], near: Location
) -> tuple[list[NodeState], dict[str, float]]:
    """Feasible nodes best first, and their scores: nearest place first, then least loaded."""
    distance = {s.node.id: distance_km(near, node_location(s.node)) for s in feasible}
    by_distance = sorted(feasible, key=lambda s: (distance[s.node.id], s.node.id))
    ranked: list[NodeState] = []
    scores: dict[str, float] = {}
    while len(ranked) < len(by_distance):
        # The nearest unranked node opens a place; every node within SAME_PLACE_KM of it joins.
        rest = by_distance[len(ranked) :]
        place_km = distance[rest[0].node.id]
        same_place = [s for s in rest if distance[s.node.id] <= place_km + SAME_PLACE_KM]
        same_place.sort(key=lambda s: (*(weigh(s) for weigh in LOAD_WEIGHERS), s.node.id))
        for state in same_place:
            scores[state.node.id] = -(place_km + load_fraction(state))
        ranked.extend(same_place)
    return ranked, scores


# --- placement -------------------------------------------------------------------------------

_SHORT_REASON = {
    REJECT_CPU: "full (vCPU)",
    REJECT_MEMORY: "full (memory)",
    REJECT_REGION: "outside the constraints",
    REJECT_LABELS: "lacks the labels",
}


def _short(reject: str) -> str:
    return _SHORT_REASON.get(reject, reject)


def place(request: PlacementRequest, nodes: Sequence[NodeState]) -> Placement:
    """The node nearest to `request.near` that can take one more instance, or why there is none.
    Of a constrained class, the nearest node its constraints allow: for a hint outside them, a
    node of the allowed region nearest to it (portside.constraints.nearest_allowed) when that
    has room, else the next nearest to the hint."""
    if 0 < request.max_instances <= request.class_instances:
        return _nowhere(
            REFUSED_MAX_INSTANCES,
            f"class {request.class_name} is at max_instances ({request.max_instances})",
        )
    if not nodes:
        return _nowhere(
            REFUSED_NO_NODES,
            "no node agent has registered: start one and point it at the control plane",
        )

    rejected: dict[str, str] = {}
    feasible: list[NodeState] = []
    filters = FILTERS if request.constraints else CAPACITY_FILTERS
    for state in nodes:
        failed = next((f for f in filters if not f.passes(state, request)), None)
        if failed is None:
            feasible.append(state)
        else:
            rejected[state.node.id] = failed.reason

    if not feasible and all(r in _CONSTRAINT_REJECTS for r in rejected.values()):
        return _nowhere(REFUSED_CONSTRAINTS, _constraints_reason(request, nodes), rejected)
    if not feasible:
        return _nowhere(
            REFUSED_NO_CAPACITY, _no_capacity_reason(request, nodes, rejected), rejected
        )
    ranked, scores = _rank(feasible, request.near)
    return Placement(ranked[0].node, "", MappingProxyType(rejected), MappingProxyType(scores))


def _nowhere(refusal: str, reason: str, rejected: Mapping[str, str] | None = None) -> Placement:
    return Placement(
        None, reason, MappingProxyType(dict(rejected or {})), MappingProxyType({}), refusal
    )


def _constraints_reason(request: PlacementRequest, nodes: Sequence[NodeState]) -> str:
    # Each node with what it lacks, so the user sees which constraint no node meets.
    wanted = request.constraints
    listed = []
    for state in sorted(nodes, key=lambda s: s.node.id)[:MAX_NODES_IN_REASON]:
        node = state.node
        lacks = constraints.missing_labels(wanted, node.labels)
        if not constraints.region_allowed(wanted, node.region):
            lacks.insert(0, f"region {node.region}")
        listed.append(f"{node.id} ({', '.join(lacks)})")
    if len(nodes) > MAX_NODES_IN_REASON:
        listed.append(f"and {len(nodes) - MAX_NODES_IN_REASON} more")
    return (
        f"no node satisfies the constraints of class {request.class_name} "
        f"({constraints.describe(wanted)}): {', '.join(listed)}"
    )


def _no_capacity_reason(
    request: PlacementRequest, nodes: Sequence[NodeState], rejected: Mapping[str, str]
) -> str:
    # The nodes nearest the hint first: those are the ones the user expected to get.
    nearest = sorted(
        nodes, key=lambda s: (distance_km(request.near, node_location(s.node)), s.node.id)
    )
    listed = [f"{s.node.id} {_short(rejected[s.node.id])}" for s in nearest]
    if len(listed) > MAX_NODES_IN_REASON:
        more = len(listed) - MAX_NODES_IN_REASON
        listed = [*listed[:MAX_NODES_IN_REASON], f"and {more} more"]
    itype = request.instance_type
    return (
        f"no node has capacity for instance type {itype.name} "
        f"({itype.vcpu:g} vCPU, {itype.memory_mib} MiB): {', '.join(listed)}"
    )
