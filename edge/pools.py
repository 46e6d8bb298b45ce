"""Which instance of a pool serves a request: the nearest place with spare capacity, then the
less loaded of two random members there; and the edge's own count of requests in flight."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType

from portside.geo import Location, distance_km
from portside.instances import PoolMember

# Members closer together than this count as one place (several hosts in one city), so load,
# not a few hundred metres, decides between them. The same rule as the scheduler's.
SAME_PLACE_KM = 1.0


def member_location(member: PoolMember) -> Location:
    """Where `member` runs: its node's own coordinates."""
    return Location(member.region, member.region, member.latitude, member.longitude, area="")


def places(members: Sequence[PoolMember], near: Location) -> Iterator[list[PoolMember]]:
    """`members` grouped into places, nearest to `near` first; each place ordered by instance id.
    Lazily: a request mostly needs only the nearest place.

    The nearest member not yet placed opens a place; every other member of its region, or
    within SAME_PLACE_KM of its distance from `near`, joins it.
    """
    # On every pool request: one distance per node rather than per member, and one pass over
    # the members in distance order rather than one per place (quadratic in a pool over many
    # regions: 1.3 ms a request at 200 members, bench/world.py).
    km: dict[tuple[float, float], float] = {}
    for m in members:
        if (m.latitude, m.longitude) not in km:
            km[m.latitude, m.longitude] = distance_km(near, member_location(m))
    distance = {m.instance_id: km[m.latitude, m.longitude] for m in members}
    ordered = sorted(members, key=lambda m: (distance[m.instance_id], m.instance_id))
    by_region: dict[str, list[PoolMember]] = {}
    for m in ordered:
        if m.region:
            by_region.setdefault(m.region.lower(), []).append(m)
    taken: set[str] = set()
    start = 0
    while True:
        while start < len(ordered) and ordered[start].instance_id in taken:
            start += 1
        if start == len(ordered):
            return
        opener = ordered[start]
        reach = distance[opener.instance_id] + SAME_PLACE_KM
        # Within reach is a prefix of what is left; the opener's region may reach further.
        place = []
        for m in itertools.islice(ordered, start, None):
            if distance[m.instance_id] > reach:
                break
            place.append(m)
        place += by_region.get(opener.region.lower(), []) if opener.region else []
        joined = {m.instance_id: m for m in place if m.instance_id not in taken}
        taken.update(joined)
        yield sorted(joined.values(), key=lambda m: m.instance_id)


def choose(
    members: Sequence[PoolMember],
    near: Location,
    in_flight: Mapping[str, int],
    concurrency_limit: int,
    rng: random.Random,
    regions: frozenset[str] | None = None,
) -> PoolMember | None:
    """The member that should serve the next request from `near`, or None if none can.

    Policy:
    1. Only ready, non-draining members are eligible, and with `regions` (those the class's
       constraints allow, portside.constraints.allowed_regions) only members in one of them.
    2. They are grouped into places by distance from `near` (see `places`): one region, or
       members within ~1 km of each other, is one place.
    3. The nearest place with a member under `concurrency_limit` requests in flight wins
       (`in_flight` is this edge's own count per instance id, absent meaning 0; a limit of 0
       means no limit). A full place overflows to the next nearest, not to a random one.
    4. Inside it, power of two choices: two distinct members under the limit picked at random
       with `rng`, the one with fewer requests in flight taken (a tie: the first picked). Each
       edge sees only its own counts, so "least loaded" would send every edge to the same
       instance at once; two random picks spread them, yet almost always avoid a busy member.
    5. If every member everywhere is at the limit, the least loaded member of the nearest place
       (a tie: the lowest instance id) takes it and queues it, rather than the request failing.
    The same members, counts and rng state give the same choice, whatever the input order.
    """
    eligible = [
        m
        for m in members
        if m.ready and not m.draining and (regions is None or m.region.lower() in regions)
    ]
    if not eligible:
        return None

    def load(m: PoolMember) -> int:
        return in_flight.get(m.instance_id, 0)

    nearest: list[PoolMember] = []
    for place in places(eligible, near):
        nearest = nearest or place
        open_ = [m for m in place if concurrency_limit <= 0 or load(m) < concurrency_limit]
        if len(open_) == 1:
            return open_[0]
        if open_:
            first, second = rng.sample(open_, 2)
            return second if load(second) < load(first) else first
    return min(nearest, key=lambda m: (load(m), m.instance_id))


class InFlight(Mapping[str, int]):
    """This edge's count of requests in flight per instance id, readable as a Mapping.

    `acquire(id)` counts one request at once and returns a lease; leaving its `with` block, or
    calling `release()` on it, uncounts it exactly once. `release(id)` uncounts one directly.
    Ids whose count falls to 0 are dropped, so instances that come and go leave nothing behind.
    Not thread-safe: meant for one asyncio event loop, where nothing runs between statements.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __getitem__(self, instance_id: str) -> int:
        return self._counts[instance_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return f"InFlight({self._counts!r})"

    def acquire(self, instance_id: str) -> CountedRequest:
        """Count one request on `instance_id` now; the returned lease uncounts it."""
        self._counts[instance_id] = self._counts.get(instance_id, 0) + 1
        return CountedRequest(self, instance_id)

    def release(self, instance_id: str) -> None:
        """Uncount one request on `instance_id`; never below 0."""
        count = self._counts.get(instance_id, 0) - 1
        if count > 0:
            self._counts[instance_id] = count
        else:
            self._counts.pop(instance_id, None)


class CountedRequest:
    """One counted request; a context manager that releases it on exit, whatever the outcome."""

    def __init__(self, counter: InFlight, instance_id: str) -> None:
        self.instance_id = instance_id
        self._counter: InFlight | None = counter

    def release(self) -> None:
        """Uncount the request; a second call does nothing, so cleanup paths may overlap."""
        if self._counter is not None:
            self._counter.release(self.instance_id)
            self._counter = None

    def __enter__(self) -> CountedRequest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
