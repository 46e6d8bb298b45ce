"""The pool manager's pure choices: where the next instance goes, which ones drain first, and
how much room the nodes have. The view is filled by hand; no store."""

from __future__ import annotations

from typing import Any, cast

import pytest

from controlplane import records
from controlplane.pools import drain_order, rebalance_move, room_for, target_region
from controlplane.records import InstanceRecord
from controlplane.store import KeyValue, WatchEvent
from controlplane.view import ClusterView
from portside.instances import InstanceStatus
from portside.spec import INSTANCE_TYPES, Node
from tests.support import reported


def node(node_id: str, region: str, vcpu: float = 1.0, memory_mib: int = 4096) -> Node:
    return Node(
        id=node_id,
        data_address="127.0.0.1:1",
        api_address="127.0.0.1:2",
        region=region,
        latitude=0.0,
        longitude=0.0,
        vcpu=vcpu,
        memory_mib=memory_mib,
    )


def view_with(nodes: list[Node], members: list[tuple[str, str, str]]) -> ClusterView:
    """members: (name, node id, state) of pool instances of class P, each 0.25 vCPU."""
    view = ClusterView(store=cast(Any, None), clock=lambda: 0.0)
    stats: dict[str, dict[str, InstanceStatus]] = {n.id: {} for n in nodes}
    for name, node_id, state in members:
        rec = InstanceRecord(
            class_name="P",
            name=name,
            instance_id="id-" + name,
            node_id=node_id,
            vcpu=0.25,
            memory_mib=1024,
            placed_at=-1000.0,
            pool=True,
        )
        view._apply(
            WatchEvent(
                "put", KeyValue(records.instance_key("P", rec.instance_id), rec.encode(), 1, 1)
            )
        )
        stats[node_id][rec.instance_id] = reported(rec.instance_id, state, pool=True)
    for n in nodes:
        view._apply(
            WatchEvent(
                "put", KeyValue(records.node_key(n.id), records.encode_node(n, stats[n.id]), 1, 1)
            )
        )
    return view


@pytest.mark.parametrize(
    ("demand", "members", "regions", "expected"),
    [
        ({}, {}, {"sin", "fra"}, "fra"),  # no demand, no members: spread, by name for ties
        ({}, {"fra": 1}, {"sin", "fra"}, "sin"),  # no demand: the emptiest region
        ({"sin": 10.0}, {"fra": 1}, {"sin", "fra"}, "sin"),
        ({"sin": 10.0, "fra": 10.0}, {"sin": 1}, {"sin", "fra"}, "fra"),
        ({"sin": 30.0, "fra": 10.0}, {"sin": 1}, {"sin", "fra"}, "sin"),  # 15 per vs 10 per
        ({}, {}, set(), "iad"),  # nothing known: the default
    ],
)
def test_target_region(
    demand: dict[str, float], members: dict[str, int], regions: set[str], expected: str
) -> None:
    assert target_region(demand, members, regions, "iad") == expected


def test_drain_order_retires_unready_then_least_wanted_then_idle() -> None:
    view = view_with(
        [node("f", "fra"), node("s", "sin")],
        [
            ("a", "f", "healthy"),
            ("b", "f", "starting"),
            ("c", "s", "healthy"),
            ("d", "s", "healthy"),
        ],
    )
    members = view.pool_members("P")
    order = [r.name for r in drain_order(members, view, {"fra": 20.0, "sin": 10.0})]
    assert order[0] == "b"  # not ready yet
    assert order[1:3] == ["c", "d"]  # sin has 5 requests/s per instance, fra 10


def test_room_counts_whole_instances_that_fit_by_cpu_and_memory() -> None:
    view = view_with(
        [node("f", "fra", vcpu=1.0), node("s", "sin", vcpu=2.0, memory_mib=1024)],
        [("a", "f", "healthy")],
    )
    # f: 0.75 vCPU free -> 3 basic (0.25 vCPU, 1 GiB); s: 2 vCPU but 1 GiB -> 1.
    assert room_for(view, INSTANCE_TYPES["basic"]) == 4


ROOM = {"fra", "sin", "iad"}


@pytest.mark.parametrize(
    ("demand", "members", "room", "expected"),
    [
        # The sun moved from sin to fra: sin's spare members go where the demand is now.
        ({"fra": 30.0, "sin": 2.0}, {"sin": 4, "fra": 1}, ROOM, ("sin", "fra")),
        ({"fra": 30.0}, {"sin": 2, "fra": 1}, ROOM, ("sin", "fra")),  # no demand left in sin
        # A region's last member stays, demand or not: no move at all here.
        ({"fra": 30.0}, {"sin": 1, "iad": 1, "fra": 1}, ROOM, None),
        # Demand per member matches: nothing pays, steady load never moves a member.
        ({"fra": 20.0, "sin": 20.0}, {"fra": 2, "sin": 2}, ROOM, None),
        # Within the margin: 10 a member in fra after a move, 12 for the one left in sin.
        ({"fra": 20.0, "sin": 12.0}, {"fra": 1, "sin": 2}, ROOM, None),
        # The region that wants one is full: a move would land beside it, so none is made.
        ({"fra": 30.0}, {"sin": 3, "fra": 1}, {"sin", "iad"}, None),
        ({}, {"sin": 3, "fra": 1}, ROOM, None),  # no demand reported: nothing to follow
    ],
)
def test_rebalance_move(
    demand: dict[str, float],
    members: dict[str, int],
    room: set[str],
    expected: tuple[str, str] | None,
) -> None:
    assert rebalance_move(demand, members, room) == expected


def test_rebalance_moves_settle() -> None:
    """Under one demand, moves go one way and stop after a few: no flapping."""
    demand = {"fra": 30.0, "sin": 9.0, "iad": 14.0}
    members = {"fra": 1, "sin": 5, "iad": 3}
    moves = []
    while (move := rebalance_move(demand, members, ROOM)) is not None:
        source, target = move
        members = {**members, source: members[source] - 1, target: members.get(target, 0) + 1}
        moves.append(move)
        assert len(moves) < 10, moves
    assert moves and all(target == "fra" for _, target in moves)
