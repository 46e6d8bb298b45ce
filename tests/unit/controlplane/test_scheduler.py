"""Tests for controlplane.scheduler: table-driven placements over fake node snapshots.

No store, no I/O: each case is a hint, a list of node states and the expected decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from controlplane.scheduler import (
    REFUSED_MAX_INSTANCES,
    REFUSED_NO_CAPACITY,
    REFUSED_NO_NODES,
    REJECT_CPU,
    REJECT_MEMORY,
    NodeState,
    PlacementRequest,
    node_location,
    place,
)
from portside import geo
from portside.capacity import Resources
from portside.spec import INSTANCE_TYPES, InstanceType, Node

BASIC = INSTANCE_TYPES["basic"]  # 0.25 vCPU, 1024 MiB


def node(
    node_id: str,
    region: str,
    *,
    vcpu: float = 4.0,
    memory_mib: int = 8_192,
    north_km: float = 0.0,
) -> Node:
    """A node in `region`, optionally moved `north_km` north of the city's coordinates."""
    city = geo.REGIONS[region]
    return Node(
        id=node_id,
        data_address=f"{node_id}:8000",
        api_address=f"{node_id}:9000",
        region=region,
        latitude=city.latitude + north_km / 111.195,  # km per degree of latitude
        longitude=city.longitude,
        vcpu=vcpu,
        memory_mib=memory_mib,
    )


def state(
    n: Node,
    *,
    used_vcpu: float = 0.0,
    used_memory_mib: int = 0,
    instances: int = 0,
) -> NodeState:
    return NodeState(n, Resources(used_vcpu, used_memory_mib), instances)


def request(
    near: str = "fra",
    *,
    instance_type: InstanceType = BASIC,
    class_instances: int = 0,
    max_instances: int = 0,
) -> PlacementRequest:
    return PlacementRequest(
        "CodeExecutor", instance_type, geo.lookup(near), class_instances, max_instances
    )


@dataclass(frozen=True)
class Case:
    name: str
    request: PlacementRequest
    nodes: list[NodeState]
    placed: str | None  # expected node id, None when nothing fits
    reason: str = ""
    rejected: Mapping[str, str] = field(default_factory=dict)
    refusal: str = ""


CASES = [
    Case(
        "nearest wins",
        request("fra"),
        [state(node("iad-1", "iad")), state(node("sin-1", "sin")), state(node("ams-1", "ams"))],
        placed="ams-1",
    ),
    Case(
        "hint sin picks the sin node",
        request("sin"),
        [state(node("fra-1", "fra")), state(node("sin-1", "sin")), state(node("iad-1", "iad"))],
        placed="sin-1",
    ),
    Case(
        "hint is an area: its centroid counts",
        request("enam"),
        [state(node("fra-1", "fra")), state(node("iad-1", "iad")), state(node("sjc-1", "sjc"))],
        placed="iad-1",
    ),
    Case(
        "node without free vCPU skipped",
        request("fra"),
        [state(node("fra-1", "fra", vcpu=2), used_vcpu=1.9), state(node("ams-1", "ams"))],
        placed="ams-1",
        rejected={"fra-1": REJECT_CPU},
    ),
    Case(
        "node without free memory skipped",
        request("fra"),
        [
            state(node("fra-1", "fra", memory_mib=2_048), used_memory_mib=1_536),
            state(node("ams-1", "ams")),
        ],
        placed="ams-1",
        rejected={"fra-1": REJECT_MEMORY},
    ),
    Case(
        "a node full on both counts is rejected by the first filter: vCPU",
        request("fra"),
        [state(node("fra-1", "fra", vcpu=1, memory_mib=1_024), used_vcpu=1.0, used_memory_mib=1)],
        placed=None,
        reason=(
            "no node has capacity for instance type basic (0.25 vCPU, 1024 MiB): fra-1 full (vCPU)"
        ),
        rejected={"fra-1": REJECT_CPU},
        refusal=REFUSED_NO_CAPACITY,
    ),
    Case(
        "exactly full after inexact float sums still fits the last quarter",
        request("fra"),
        [state(node("fra-1", "fra", vcpu=1), used_vcpu=0.1 + 0.2 + 0.45)],
        placed="fra-1",
    ),
    Case(
        "same place: tie broken by fewer instances",
        request("fra"),
        [
            state(node("fra-1", "fra"), instances=3, used_vcpu=0.75),
            state(node("fra-2", "fra"), instances=1, used_vcpu=2.0),
        ],
        placed="fra-2",
    ),
    Case(
        "same place, same count: tie broken by lower vCPU fraction",
        request("fra"),
        [
            state(node("fra-1", "fra", vcpu=2), instances=2, used_vcpu=1.0),  # 50%
            state(node("fra-2", "fra", vcpu=8), instances=2, used_vcpu=2.0),  # 25%
        ],
        placed="fra-2",
    ),
    Case(
        "same place, same load: lowest node id",
        request("fra"),
        [state(node("fra-b", "fra")), state(node("fra-a", "fra")), state(node("fra-c", "fra"))],
        placed="fra-a",
    ),
    Case(
        "within 1 km counts as the same place",
        request("fra"),
        [
            state(node("fra-1", "fra"), instances=5),
            state(node("fra-2", "fra", north_km=0.5), instances=0),
        ],
        placed="fra-2",
    ),
    Case(
        "a few km nearer beats less load",
        request("fra"),
        [
            state(node("fra-1", "fra"), instances=5),
            state(node("fra-2", "fra", north_km=5), instances=0),
        ],
        placed="fra-1",
    ),
    Case(
        "nearer and busy beats far and empty",
        request("fra"),
        [state(node("ams-1", "ams")), state(node("fra-1", "fra"), instances=40, used_vcpu=3)],
        placed="fra-1",
    ),
    Case(
        "max_instances reached",
        request("fra", class_instances=50, max_instances=50),
        [state(node("fra-1", "fra"))],
        placed=None,
        reason="class CodeExecutor is at max_instances (50)",
        refusal=REFUSED_MAX_INSTANCES,
    ),
    Case(
        "max_instances not yet reached",
        request("fra", class_instances=49, max_instances=50),
        [state(node("fra-1", "fra"))],
        placed="fra-1",
    ),
    Case(
        "max_instances 0 means unlimited",
        request("fra", class_instances=10_000, max_instances=0),
        [state(node("fra-1", "fra"))],
        placed="fra-1",
    ),
    Case(
        "no nodes at all",
        request("fra"),
        [],
        placed=None,
        reason="no node agent has registered: start one and point it at the control plane",
        refusal=REFUSED_NO_NODES,
    ),
    Case(
        "all full: the reason lists the nodes, nearest first",
        request("fra"),
        [
            state(node("sin-1", "sin", memory_mib=1_024), used_memory_mib=512),
            state(node("fra-1", "fra", vcpu=1), used_vcpu=1.0),
            state(node("iad-1", "iad", memory_mib=1_024), used_memory_mib=1_024),
        ],
        placed=None,
        reason=(
            "no node has capacity for instance type basic (0.25 vCPU, 1024 MiB): "
            "fra-1 full (vCPU), iad-1 full (memory), sin-1 full (memory)"
        ),
        rejected={"fra-1": REJECT_CPU, "iad-1": REJECT_MEMORY, "sin-1": REJECT_MEMORY},
        refusal=REFUSED_NO_CAPACITY,
    ),
    Case(
        "all full on a big cluster: the reason stays one short line",
        request("fra", instance_type=INSTANCE_TYPES["lite"]),
        [state(node(f"fra-{i}", "fra"), used_vcpu=4.0) for i in range(1, 8)],
        placed=None,
        reason=(
            "no node has capacity for instance type lite (0.0625 vCPU, 256 MiB): "
            "fra-1 full (vCPU), fra-2 full (vCPU), fra-3 full (vCPU), fra-4 full (vCPU), "
            "fra-5 full (vCPU), and 2 more"
        ),
        rejected={f"fra-{i}": REJECT_CPU for i in range(1, 8)},
        refusal=REFUSED_NO_CAPACITY,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_place(case: Case) -> None:
    result = place(case.request, case.nodes)
    assert (result.node.id if result.node else None) == case.placed
    assert result.reason == case.reason
    assert dict(result.rejected) == dict(case.rejected)
    assert result.refusal == case.refusal


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_place_ignores_snapshot_order(case: Case) -> None:
    assert place(case.request, case.nodes) == place(case.request, case.nodes[::-1])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_scores_cover_feasible_nodes_and_the_chosen_one_scores_highest(case: Case) -> None:
    result = place(case.request, case.nodes)
    feasible = {s.node.id for s in case.nodes} - set(result.rejected)
    if result.node is None:
        assert dict(result.scores) == {}
        return
    assert set(result.scores) == feasible
    assert result.scores[result.node.id] == max(result.scores.values())


def test_scores_are_minus_km_then_load() -> None:
    nodes = [
        state(node("fra-1", "fra")),
        state(node("fra-2", "fra"), instances=1),
        state(node("ams-1", "ams")),
    ]
    scores = place(request("fra"), nodes).scores
    assert scores["fra-1"] == 0.0
    assert -1 < scores["fra-2"] < 0
    ams_km = geo.distance_km(geo.REGIONS["fra"], geo.REGIONS["ams"])
    assert scores["ams-1"] == pytest.approx(-ams_km)


def test_decision_is_immutable() -> None:
    result = place(request("fra"), [state(node("fra-1", "fra"), used_vcpu=4.0)])
    with pytest.raises(TypeError):
        result.rejected["fra-1"] = "x"  # type: ignore[index]


@pytest.mark.parametrize(
    ("region", "name", "area"),
    [("fra", "Frankfurt", "weur"), ("SIN", "Singapore", "apac"), ("home-lab", "home-lab", "")],
)
def test_node_location_uses_the_nodes_own_coordinates(region: str, name: str, area: str) -> None:
    n = Node("n1", "n1:8000", "n1:9000", region, 12.5, 34.5, vcpu=1, memory_mib=1_024)
    location = node_location(n)
    assert (location.code, location.name, location.area) == (region, name, area)
    assert (location.latitude, location.longitude) == (12.5, 34.5)
