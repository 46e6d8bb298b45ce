"""Regression check of world traffic (issue 15, goal 3): a small seeded run of bench/world.py,
whose requests are placed and routed by Portside's own scheduler, autoscaler and edge choice.

Steady load on a cluster with room to spare: at least 99% of requests must be served from the
nearest region with room. A change to placement that ranks nodes by anything but distance from
the hint, or spills a full region's instances anywhere but next door, fails it.
"""

from __future__ import annotations

from bench import world

GOAL = 0.99
# Half the slots in use, regional capacity within ±20% of the population served.
STEADY = world.Settings(seed=7, requests=1_500, slots=600, load=0.5, jitter=0.2)


def share(tally: world.Tally) -> float:
    assert tally.requests > 0 and tally.refused == 0
    return tally.nearest / tally.requests


def test_named_instances_are_served_from_the_nearest_region_with_room() -> None:
    tally = world.run_named(world.cities(), STEADY, sun=False)
    assert tally.requests >= 1_400
    assert share(tally) >= GOAL, (share(tally), sorted(tally.extra)[-5:])


def test_a_region_without_nodes_is_served_next_door() -> None:
    """Tokyo's edge has no nodes in its region: its requests go to the nearest one that has."""
    full = world.Settings(
        seed=7, requests=300, slots=600, load=0.05, jitter=0.0, region_slots={"nrt": 0}
    )
    tally = world.run_named(world.cities(), full, sun=False)
    assert share(tally) >= GOAL
    assert max(tally.extra, default=0.0) < 1_000


def test_pool_edges_send_requests_to_the_nearest_member_with_room() -> None:
    small = world.Settings(seed=7, requests=1_500, slots=120, load=0.5, jitter=0.2)
    routing, placement = world.run_pool(world.cities(), small, sun=False)
    assert routing.requests == placement.requests > 2_000
    # Routing only has to beat the nearest member with a free slot, as seen from the edge's
    # region: the few misses are clients nearer another region than their edge's.
    assert share(routing) >= 0.95
    assert share(placement) <= share(routing)
