"""Tests for edge.pools: table-driven choices of a pool member, and the in-flight counter.

No network: each case is a hint, members, in-flight counts, a limit and the expected member.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import pytest

from edge.pools import InFlight, choose, member_location, places
from portside import geo
from portside.instances import PoolMember


def member(
    instance_id: str,
    region: str,
    *,
    north_km: float = 0.0,
    draining: bool = False,
    ready: bool = True,
) -> PoolMember:
    """A member on a node in `region`, optionally moved `north_km` north of the city centre."""
    city = geo.REGIONS[region]
    return PoolMember(
        class_name="Pool",
        instance_id=instance_id,
        name=f"{instance_id}-name",
        node_id=f"node-{instance_id}",
        data_address=f"{instance_id}:8000",
        region=region,
        latitude=city.latitude + north_km / 111.195,  # km per degree of latitude
        longitude=city.longitude,
        draining=draining,
        ready=ready,
    )


@dataclass(frozen=True)
class Case:
    name: str
    near: str
    members: list[PoolMember]
    chosen: str | None  # expected instance id
    in_flight: Mapping[str, int] = field(default_factory=dict)
    limit: int = 0


CASES = [
    Case(
        "nearest region wins",
        "fra",
        [member("iad-1", "iad"), member("ams-1", "ams"), member("sin-1", "sin")],
        chosen="ams-1",
    ),
    Case(
        "area hint apac prefers apac members",
        "apac",
        [member("fra-1", "fra"), member("sin-1", "sin"), member("iad-1", "iad")],
        chosen="sin-1",
    ),
    Case(
        "draining member skipped",
        "fra",
        [member("fra-1", "fra", draining=True), member("ams-1", "ams")],
        chosen="ams-1",
    ),
    Case(
        "unready member skipped",
        "fra",
        [member("fra-1", "fra", ready=False), member("ams-1", "ams")],
        chosen="ams-1",
    ),
    Case(
        "busy but under the limit stays near",
        "fra",
        [member("fra-1", "fra"), member("ams-1", "ams")],
        chosen="fra-1",
        in_flight={"fra-1": 9},
        limit=10,
    ),
    Case(
        "no limit: load never sends a request away",
        "fra",
        [member("fra-1", "fra"), member("ams-1", "ams")],
        chosen="fra-1",
        in_flight={"fra-1": 1_000},
    ),
    Case(
        "overflow to the next nearest when all nearest are at the limit",
        "fra",
        [member("fra-1", "fra"), member("fra-2", "fra"), member("ams-1", "ams")],
        chosen="ams-1",
        in_flight={"fra-1": 2, "fra-2": 3},
        limit=2,
    ),
    Case(
        "overflow skips a full second place too",
        "fra",
        [member("fra-1", "fra"), member("ams-1", "ams"), member("lhr-1", "lhr")],
        chosen="lhr-1",
        in_flight={"fra-1": 2, "ams-1": 2},
        limit=2,
    ),
    Case(
        "only the open member of a place is taken",
        "fra",
        [member("fra-1", "fra"), member("fra-2", "fra"), member("fra-3", "fra")],
        chosen="fra-3",
        in_flight={"fra-1": 2, "fra-2": 2, "fra-3": 1},
        limit=2,
    ),
    Case(
        "all full: least loaded of the nearest place queues it",
        "fra",
        [member("fra-1", "fra"), member("fra-2", "fra"), member("ams-1", "ams")],
        chosen="fra-2",
        in_flight={"fra-1": 5, "fra-2": 3, "ams-1": 2},
        limit=2,
    ),
    Case(
        "all full, equal load: lowest instance id",
        "fra",
        [member("fra-b", "fra"), member("fra-a", "fra")],
        chosen="fra-a",
        in_flight={"fra-a": 1, "fra-b": 1},
        limit=1,
    ),
    Case(
        "same region a few km apart is one place, so load decides",
        "fra",
        [member("fra-1", "fra"), member("fra-2", "fra", north_km=20)],
        chosen="fra-2",
        in_flight={"fra-1": 1},
        limit=1,
    ),
    Case(
        "different regions within 1 km are one place",
        "fra",
        [member("fra-1", "fra"), member("lab-1", "fra", north_km=0.5)],
        chosen="lab-1",
        in_flight={"fra-1": 1},
        limit=1,
    ),
    Case("one member", "sin", [member("fra-1", "fra")], chosen="fra-1"),
    Case("empty pool", "fra", [], chosen=None),
    Case(
        "no eligible member",
        "fra",
        [member("fra-1", "fra", draining=True), member("fra-2", "fra", ready=False)],
        chosen=None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_choose(case: Case) -> None:
    got = choose(case.members, geo.lookup(case.near), case.in_flight, case.limit, random.Random(0))
    assert (got.instance_id if got else None) == case.chosen


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_choice_ignores_member_order(case: Case) -> None:
    near = geo.lookup(case.near)
    for seed in range(20):
        forward = choose(case.members, near, case.in_flight, case.limit, random.Random(seed))
        backward = choose(case.members[::-1], near, case.in_flight, case.limit, random.Random(seed))
        assert forward == backward


def test_places_group_a_region_and_order_nearest_first() -> None:
    members = [
        member("sin-1", "sin"),
        member("fra-2", "fra", north_km=30),
        member("ams-1", "ams"),
        member("fra-1", "fra"),
    ]
    grouped = [[m.instance_id for m in p] for p in places(members, geo.lookup("fra"))]
    assert grouped == [["fra-1", "fra-2"], ["ams-1"], ["sin-1"]]


def places_by_definition(members: list[PoolMember], near: geo.Location) -> list[list[str]]:
    """`places`' rule spelled out member by member: the nearest left opens a place, its region
    and everything within 1 km of its distance join."""
    rest = sorted(members, key=lambda m: (geo.distance_km(near, member_location(m)), m.instance_id))
    grouped = []
    while rest:
        reach = geo.distance_km(near, member_location(rest[0])) + 1.0
        place = [
            m
            for m in rest
            if m.region == rest[0].region or geo.distance_km(near, member_location(m)) <= reach
        ]
        grouped.append(sorted(m.instance_id for m in place))
        rest = [m for m in rest if m not in place]
    return grouped


@pytest.mark.parametrize("seed", range(30))
def test_places_follow_the_rule_on_large_pools(seed: int) -> None:
    rng = random.Random(seed)
    codes = rng.sample(sorted(geo.REGIONS), 12)
    members = [
        member(f"m{i}", rng.choice(codes), north_km=rng.choice([0.0, 0.0, 0.4, 30.0]))
        for i in range(rng.randint(1, 120))
    ]
    near = geo.REGIONS[rng.choice(sorted(geo.REGIONS))]
    got = [[m.instance_id for m in p] for p in places(members, near)]
    assert got == places_by_definition(members, near)


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        # The draw with seed 0 picks b then a (see test_p2c_draw_is_replayable).
        ({"a": 1, "b": 4}, "a"),
        ({"a": 4, "b": 1}, "b"),
        ({"a": 2, "b": 2}, "b"),  # tie: the first picked
    ],
)
def test_p2c_takes_the_less_loaded_of_two(loads: dict[str, int], expected: str) -> None:
    two = [member("a", "fra"), member("b", "fra")]
    assert random.Random(0).sample(["a", "b"], 2) == ["b", "a"]
    got = choose(two, geo.lookup("fra"), loads, 0, random.Random(0))
    assert got is not None and got.instance_id == expected


def test_p2c_draw_is_replayable() -> None:
    pool = [member(f"fra-{i}", "fra") for i in range(8)]
    near = geo.lookup("fra")
    loads = {f"fra-{i}": i % 3 for i in range(8)}

    def run(seed: int) -> list[str]:
        rng = random.Random(seed)
        picks = (choose(pool, near, loads, 0, rng) for _ in range(50))
        return [m.instance_id for m in picks if m is not None]

    assert run(7) == run(7)


def test_a_busy_member_is_chosen_far_less_often() -> None:
    pool = [member(f"fra-{i}", "fra") for i in range(4)]
    loads = {"fra-0": 5, "fra-1": 1, "fra-2": 1, "fra-3": 1}
    rng = random.Random(42)
    counts = Counter(
        m.instance_id
        for m in (choose(pool, geo.lookup("fra"), loads, 0, rng) for _ in range(1_000))
        if m is not None
    )
    # Uniform would give the busy one ~250; p2c takes it only against an equally busy member.
    assert counts["fra-0"] < 50
    for idle in ("fra-1", "fra-2", "fra-3"):
        assert counts[idle] > 250


def test_a_busy_member_draws_fewer_requests_as_the_counter_tracks_them() -> None:
    # Live counts: requests never finish, so every choice raises the chosen member's load.
    pool = [member(f"fra-{i}", "fra") for i in range(4)]
    in_flight = InFlight()
    for _ in range(40):
        in_flight.acquire("fra-0")
    rng = random.Random(1)
    for _ in range(60):
        chosen = choose(pool, geo.lookup("fra"), in_flight, 0, rng)
        assert chosen is not None
        in_flight.acquire(chosen.instance_id)
    # 60 requests spread over the three idle members, about 20 each; none went to fra-0.
    assert in_flight["fra-0"] == 40
    assert all(15 <= in_flight[f"fra-{i}"] <= 25 for i in (1, 2, 3))


def test_in_flight_counts_and_releases() -> None:
    counts = InFlight()
    assert counts.get("a", 0) == 0 and "a" not in counts
    with counts.acquire("a"):
        with counts.acquire("a"):
            assert counts["a"] == 2
        assert dict(counts) == {"a": 1}
    assert dict(counts) == {} and len(counts) == 0


def test_in_flight_releases_on_error() -> None:
    counts = InFlight()
    with pytest.raises(RuntimeError), counts.acquire("a"):
        assert counts["a"] == 1
        raise RuntimeError("upstream failed")
    assert "a" not in counts


def test_in_flight_lease_releases_once() -> None:
    counts = InFlight()
    lease = counts.acquire("a")
    counts.acquire("a")
    lease.release()
    lease.release()  # a second cleanup path must not uncount someone else's request
    with lease:
        pass
    assert counts["a"] == 1
    counts.release("a")
    counts.release("a")  # never below 0
    assert "a" not in counts


def test_in_flight_is_what_choose_reads() -> None:
    counts = InFlight()
    fra = [member("fra-1", "fra"), member("ams-1", "ams")]
    with counts.acquire("fra-1"):
        got = choose(fra, geo.lookup("fra"), counts, 1, random.Random(0))
        assert got is not None and got.instance_id == "ams-1"
    got = choose(fra, geo.lookup("fra"), counts, 1, random.Random(0))
    assert got is not None and got.instance_id == "fra-1"


def test_member_is_immutable() -> None:
    m = member("fra-1", "fra")
    assert replace(m, draining=True).draining
    with pytest.raises(AttributeError):
        m.draining = True  # type: ignore[misc]
