"""Usage metering arithmetic with a fake clock: 10 ms steps, the split at UTC midnight, nothing
for a sleeping instance, CPU and egress deltas, and batches that pair with heartbeat replies."""

from __future__ import annotations

import datetime

import pytest

from nodeagent.usage import (
    Size,
    UsageKey,
    UsageMeter,
    parse_tx_bytes,
    ticks_by_day,
)
from portside.usage import Usage

# 2026-11-27 23:59:58 UTC
NEAR_MIDNIGHT = datetime.datetime(2026, 11, 27, 23, 59, 58, tzinfo=datetime.UTC).timestamp()
NOON = datetime.datetime(2026, 11, 27, 12, 0, 0, tzinfo=datetime.UTC).timestamp()
BASIC = Size(vcpu=0.25, memory_mib=1024, disk_mb=4000)


class Clocks:
    """A monotonic and a wall clock that move together."""

    def __init__(self, wall: float) -> None:
        self.mono = 100.0
        self.wall = wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def meter_at(wall: float) -> tuple[UsageMeter, Clocks]:
    clocks = Clocks(wall)
    meter = UsageMeter(clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall, source="s")
    return meter, clocks


def totals(meter: UsageMeter) -> dict[UsageKey, Usage]:
    batch = meter.take()
    meter.acknowledge()
    return {} if batch is None else batch.totals


def test_running_time_is_counted_in_10ms_steps_and_a_started_step_counts_at_the_end() -> None:
    meter, clocks = meter_at(NOON)
    meter.run_began("i1", "C", "a", "c1", BASIC)
    clocks.advance(1.234)
    mid = totals(meter)  # while it runs: whole steps only
    assert mid[UsageKey("C", "i1", "2026-11-27")].running_ms == 1230
    clocks.advance(0.001)  # stops 1.235 s after it began: the step it stopped in counts
    meter.run_ended("i1")
    end = totals(meter)[UsageKey("C", "i1", "2026-11-27")]
    assert end.running_ms == 10
    assert end.vcpu_seconds == pytest.approx(0.01 * 0.25)
    assert end.memory_gib_seconds == pytest.approx(0.01 * 1.0)
    assert end.disk_gb_seconds == pytest.approx(0.01 * 4.0)


def test_a_run_is_metered_from_dockers_start_to_its_death_however_late_the_news() -> None:
    meter, clocks = meter_at(NOON)
    clocks.advance(0.08)  # docker's start call answers 80 ms after the container started
    meter.run_began("i1", "C", "a", "c1", BASIC, at_wall=NOON)
    clocks.advance(2.0)
    died = clocks.wall
    clocks.advance(0.3)  # a heartbeat counts up to now before the agent hears of the death...
    sent = totals(meter)[UsageKey("C", "i1", "2026-11-27")].running_ms
    assert sent == 2380
    meter.run_ended("i1", at_wall=died)  # ...which it takes back: 2.08 s ran
    correction = totals(meter)[UsageKey("C", "i1", "2026-11-27")]
    assert sent + correction.running_ms == 2080
    assert correction.vcpu_seconds == pytest.approx(-0.3 * 0.25)


def test_provisioned_use_is_running_time_times_the_instance_type() -> None:
    meter, clocks = meter_at(NOON)
    meter.run_began("i1", "C", "a", "c1", Size(vcpu=2.0, memory_mib=8192, disk_mb=16_000))
    clocks.advance(5.0)
    meter.run_ended("i1")
    t = totals(meter)[UsageKey("C", "i1", "2026-11-27")]
    assert t.running_ms == 5000
    assert t.vcpu_seconds == pytest.approx(10.0)
    assert t.memory_gib_seconds == pytest.approx(40.0)  # 8 GiB
    assert t.disk_gb_seconds == pytest.approx(80.0)  # 16 GB


def test_a_run_over_midnight_is_split_between_the_two_days() -> None:
    meter, clocks = meter_at(NEAR_MIDNIGHT)
    meter.run_began("i1", "C", "a", "c1", BASIC)
    clocks.advance(5.0)  # 2 s on the 27th, 3 s on the 28th
    meter.run_ended("i1")
    t = totals(meter)
    assert t[UsageKey("C", "i1", "2026-11-27")].running_ms == 2000
    assert t[UsageKey("C", "i1", "2026-11-28")].running_ms == 3000


def test_the_split_does_not_depend_on_when_the_heartbeat_takes_the_usage() -> None:
    meter, clocks = meter_at(NEAR_MIDNIGHT)
    meter.run_began("i1", "C", "a", "c1", BASIC)
    by_day: dict[str, int] = {}
    for _ in range(7):
        clocks.advance(0.7371)
        for key, t in totals(meter).items():
            by_day[key.day] = by_day.get(key.day, 0) + t.running_ms
    meter.run_ended("i1")
    for key, t in totals(meter).items():
        by_day[key.day] = by_day.get(key.day, 0) + t.running_ms
    assert by_day == {"2026-11-27": 2000, "2026-11-28": 3160}  # 5.1597 s: 516 steps


def test_ticks_by_day_with_a_start_between_steps_and_midnight() -> None:
    start = NEAR_MIDNIGHT + 1.995  # midnight falls half way through step 0
    assert ticks_by_day(start, 0, 3) == [("2026-11-27", 1), ("2026-11-28", 2)]
    assert ticks_by_day(start, 1, 1) == []


def test_a_sleeping_instance_costs_nothing() -> None:
    meter, clocks = meter_at(NOON)
    meter.run_began("i1", "C", "a", "c1", BASIC)
    clocks.advance(2.0)
    meter.run_ended("i1")  # slept
    assert totals(meter)[UsageKey("C", "i1", "2026-11-27")].running_ms == 2000
    clocks.advance(3600.0)
    assert totals(meter) == {}
    meter.observe("i1", "c1", 10**9, None)  # a late reading of a stopped container: ignored
    assert totals(meter) == {}
    meter.run_began("i1", "C", "a", "c1", BASIC)  # woke
    clocks.advance(1.5)
    meter.run_ended("i1")
    assert totals(meter)[UsageKey("C", "i1", "2026-11-27")].running_ms == 1500


def test_cpu_used_and_egress_are_counter_deltas_egress_only_with_internet() -> None:
    meter, clocks = meter_at(NOON)
    meter.run_began("net", "N", "a", "c1", Size(0.25, 1024, 4000, internet=True))
    meter.run_began("int", "I", "b", "c2", BASIC)
    meter.observe("net", "c1", 500_000_000, 1000)  # counters start at zero with the container
    meter.observe("int", "c2", 250_000_000, 1000)
    meter.observe("net", "c1", 700_000_000, 1500)
    meter.observe("net", "other", 9 * 10**9, 10**9)  # another container: not this run's
    t = totals(meter)
    assert t[UsageKey("N", "net", "2026-11-27")].cpu_seconds_used == pytest.approx(0.7)
    assert t[UsageKey("N", "net", "2026-11-27")].egress_bytes == 1500
    assert t[UsageKey("I", "int", "2026-11-27")].cpu_seconds_used == pytest.approx(0.25)
    assert t[UsageKey("I", "int", "2026-11-27")].egress_bytes == 0


def test_an_adopted_container_is_counted_from_its_first_reading() -> None:
    meter, clocks = meter_at(NOON)
    meter.run_began("i1", "C", "a", "c1", BASIC, adopted=True)
    meter.observe("i1", "c1", 50 * 10**9, None)
    meter.observe("i1", "c1", 51 * 10**9, None)
    assert totals(meter)[UsageKey("C", "i1", "2026-11-27")].cpu_seconds_used == pytest.approx(1.0)


def test_a_size_unknown_at_adoption_is_looked_up_later() -> None:
    sizes: dict[str, tuple[int, bool]] = {}
    meter, clocks = meter_at(NOON)
    meter.class_size = sizes.get
    meter.run_began("i1", "C", "a", "c1", Size(0.25, 1024, 0, known=False), adopted=True)
    sizes["C"] = (4000, False)
    clocks.advance(1.0)
    t = totals(meter)[UsageKey("C", "i1", "2026-11-27")]
    assert t.disk_gb_seconds == pytest.approx(4.0)


def test_unacknowledged_batches_go_again_unchanged_before_newer_use() -> None:
    meter, clocks = meter_at(NOON)
    meter.run_began("i1", "C", "a", "c1", BASIC)
    clocks.advance(1.0)
    first = meter.take()
    clocks.advance(1.0)
    second = meter.take()
    meter.acknowledge()  # the first
    meter.stream_lost()  # the second's reply never came
    clocks.advance(1.0)
    again = meter.take()
    newer = meter.take()
    assert first is not None and second is not None and again is not None and newer is not None
    assert (first.sequence, second.sequence) == (1, 2)
    assert again == second
    assert newer.sequence == 3
    assert newer.totals[UsageKey("C", "i1", "2026-11-27")].running_ms == 1000


def test_messages_without_usage_pair_with_their_replies() -> None:
    meter, clocks = meter_at(NOON)
    assert meter.take() is None
    meter.run_began("i1", "C", "a", "c1", BASIC)
    clocks.advance(0.5)
    batch = meter.take()
    meter.acknowledge()  # the reply to the empty message
    meter.stream_lost()
    assert meter.take() == batch


def test_parse_tx_bytes() -> None:
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets\n"
        "    lo:       0       0    0    0    0     0          0         0        0       0\n"
        "  eth0:    1296      16    0    0    0     0          0         0     4242      12"
        "    0    0    0     0       0          0\n"
    )
    assert parse_tx_bytes(text) == 4242
    assert parse_tx_bytes(text, "eth1") is None


def test_a_run_ends_when_the_engine_says_the_container_died() -> None:
    meter, clocks = meter_at(NOON)
    meter.run_began("i1", "C", "a", "c1", BASIC)
    clocks.advance(3.0)
    died = clocks.wall
    clocks.advance(0.04)  # the die event came 40 ms later
    meter.run_ended("i1", died)
    assert totals(meter)[UsageKey("C", "i1", "2026-11-27")].running_ms == 3000
