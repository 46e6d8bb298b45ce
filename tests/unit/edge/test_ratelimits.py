"""An edge's rate-limit counting (edge/ratelimits.py), on a clock of the test's: exact per edge,
the other edges' totals from the last sync added, fixed windows, counts bounded to current
periods. The two-edge simulation checks the error bound docs/architecture.md states."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from edge.ratelimits import MAX_KEY_CHARS, MAX_SENT, EdgeRateLimits
from portside.convert import RateCounts
from portside.spec import RateLimit

LIMITER = RateLimit("LIMITER", limit=3, period_s=10.0)
T0 = 1_000_000.0  # a period starts here (divisible by 10)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def edge(*limits: RateLimit, clock: Clock | None = None) -> EdgeRateLimits:
    limits_ = EdgeRateLimits("edge-a", clock or Clock())
    limits_.set_limits(limits or (LIMITER,))
    return limits_


def admitted(limits: EdgeRateLimits, key: str, calls: int, binding: str = "LIMITER") -> int:
    return sum(limits.admit(binding, key) for _ in range(calls))


def test_admits_exactly_the_limit_per_key_alone() -> None:
    limits = edge()
    assert admitted(limits, "alice", 5) == 3
    assert admitted(limits, "bob", 5) == 3  # keys are counted apart


async def test_limit_is_the_runtime_protocol() -> None:
    limits = edge()
    assert [await limits.limit("LIMITER", "k") for _ in range(4)] == [True, True, True, False]


def test_a_new_period_starts_from_nothing_and_old_counts_go() -> None:
    clock = Clock()
    limits = edge(clock=clock)
    assert admitted(limits, "alice", 3) == 3
    assert not limits.admit("LIMITER", "alice")
    clock.now += 10.0
    assert admitted(limits, "alice", 3) == 3
    limits.forget_ended()
    assert all(period == LIMITER.period_at(clock.now) for _, _, period in limits._own)


def test_other_edges_totals_count_against_the_limit() -> None:
    limits = edge()
    period = LIMITER.period_at(T0)
    limits.take_totals({("LIMITER", "alice", period): 2})
    assert admitted(limits, "alice", 3) == 1
    assert admitted(limits, "bob", 3) == 3


def test_totals_of_ended_periods_or_unknown_limiters_are_ignored() -> None:
    limits = edge()
    period = LIMITER.period_at(T0)
    limits.take_totals({("LIMITER", "alice", period - 1): 3, ("OTHER", "alice", period): 3})
    assert admitted(limits, "alice", 3) == 3


def test_a_sync_takes_what_was_admitted_once_and_a_failed_one_gives_it_back() -> None:
    limits = edge()
    period = LIMITER.period_at(T0)
    admitted(limits, "alice", 5)  # 3 admitted, 2 limited: only the admitted count
    taken = limits.take_unsent()
    assert taken == {("LIMITER", "alice", period): 3}
    assert limits.take_unsent() == {}
    limits.give_back(taken)
    limits.admit("LIMITER", "bob")
    assert limits.take_unsent() == {
        ("LIMITER", "alice", period): 3,
        ("LIMITER", "bob", period): 1,
    }


def test_a_sync_sends_the_largest_counts_first_and_the_rest_next() -> None:
    limits = edge(RateLimit("LIMITER", limit=10, period_s=10.0))
    for i in range(MAX_SENT + 5):
        admitted(limits, f"k{i}", 2 if i < 5 else 1)
    first = limits.take_unsent()
    assert len(first) == MAX_SENT
    assert all(first[("LIMITER", f"k{i}", LIMITER.period_at(T0))] == 2 for i in range(5))
    assert len(limits.take_unsent()) == 5


def test_unsent_counts_outlive_their_period_by_one_then_go() -> None:
    clock = Clock()
    limits = edge(clock=clock)
    limits.admit("LIMITER", "alice")
    clock.now += 10.0
    limits.forget_ended()
    assert list(limits.take_unsent()) == [("LIMITER", "alice", LIMITER.period_at(T0))]
    limits.admit("LIMITER", "alice")
    clock.now += 20.0
    limits.forget_ended()
    assert limits.take_unsent() == {}
    assert limits._own == {} and limits._others == {}


def test_changing_limits_keeps_counts_unless_the_period_changes() -> None:
    limits = edge()
    admitted(limits, "alice", 3)
    limits.set_limits((RateLimit("LIMITER", limit=5, period_s=10.0),))
    assert admitted(limits, "alice", 5) == 2  # the new limit applies to the count so far
    limits.set_limits((RateLimit("LIMITER", limit=5, period_s=60.0),))
    assert admitted(limits, "alice", 6) == 5  # a new period length: a new count
    limits.set_limits(())
    assert limits._own == {} and limits._unsent == {}


def test_a_limiter_removed_while_a_call_was_in_flight_admits() -> None:
    limits = edge()
    assert admitted(limits, "alice", 5, binding="GONE") == 5
    assert limits.take_unsent() == {}


def test_long_keys_are_counted_by_their_digest() -> None:
    limits = edge()
    key = "x" * (MAX_KEY_CHARS + 1)
    assert admitted(limits, key, 5) == 3
    ((_, counted, _),) = limits.take_unsent()
    assert counted.startswith("sha256:") and len(counted) < MAX_KEY_CHARS


def test_calls_are_counted_in_the_metric_by_binding_and_result() -> None:
    limits = edge(RateLimit("METERED", limit=1, period_s=10.0))

    def value(result: str) -> float:
        labels = {"binding": "METERED", "result": result}
        return REGISTRY.get_sample_value("portside_edge_rate_limit_calls_total", labels) or 0.0

    before = value("allowed"), value("limited")
    admitted(limits, "k", 3, binding="METERED")
    assert (value("allowed") - before[0], value("limited") - before[1]) == (1, 2)


class Book:
    """The control plane's sums, as controlplane/ratelimits.py keeps them: each edge's counts
    by slot, and the other edges' totals handed back."""

    def __init__(self) -> None:
        self.counts: dict[str, RateCounts] = {}

    def sync(self, name: str, limits: EdgeRateLimits) -> None:
        mine = self.counts.setdefault(name, {})
        for slot, count in limits.take_unsent().items():
            mine[slot] = mine.get(slot, 0) + count
        others: RateCounts = {}
        for other, counts in self.counts.items():
            if other != name:
                for slot, count in counts.items():
                    others[slot] = others.get(slot, 0) + count
        limits.take_totals(others)


@pytest.mark.parametrize("edges", [2, 3, 5])
@pytest.mark.parametrize("calls_per_interval", [1, 4, 20])
def test_edges_together_exceed_the_limit_by_at_most_the_documented_bound(
    edges: int, calls_per_interval: int
) -> None:
    """Every edge admits up to `calls_per_interval` calls between its syncs, the syncs taking
    turns: at each admission an edge has missed what every other edge admitted since that edge's
    sync before its own, one interval's worth. So the total exceeds the limit by at most
    (edges - 1) x calls_per_interval (docs/architecture.md: two intervals when syncs do not take
    turns), and without the totals it would be edges x limit."""
    rule = RateLimit("LIMITER", limit=50, period_s=10.0)
    clock = Clock()
    book = Book()
    fleet = {f"edge-{i}": EdgeRateLimits(f"edge-{i}", clock) for i in range(edges)}
    for limits in fleet.values():
        limits.set_limits((rule,))
    total = 0
    for _ in range(100):  # 100 sync intervals, all in one period
        for name, limits in fleet.items():
            total += admitted(limits, "shared", calls_per_interval)
            book.sync(name, limits)
    assert total >= rule.limit
    assert total <= rule.limit + (edges - 1) * calls_per_interval
