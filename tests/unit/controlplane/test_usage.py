"""Usage in the store: batches added once per key however often they come, per class and day."""

from __future__ import annotations

import pytest

from controlplane.usage import ClassDay, add_batch, parse_day
from portside.errors import InvalidArgument
from portside.usage import Usage

ONE = Usage(
    class_name="C",
    day="2026-11-27",
    instance_id="i1",
    running_ms=1000,
    vcpu_seconds=0.25,
    memory_gib_seconds=1.0,
    disk_gb_seconds=4.0,
    cpu_seconds_used=0.1,
    egress_bytes=10,
)


def test_a_batch_is_added_once_per_source_and_sequence() -> None:
    day = ClassDay.empty("C", "2026-11-27")
    day = add_batch(day, ONE, "agent-a", 1) or day
    assert add_batch(day, ONE, "agent-a", 1) is None  # sent again after a lost reply
    day = add_batch(day, ONE, "agent-b", 1) or day  # another agent process
    day = add_batch(day, ONE, "agent-a", 2) or day
    assert day.use.running_ms == 3000
    assert day.use.egress_bytes == 30
    assert dict(day.applied) == {"agent-a": 2, "agent-b": 1}


def test_an_older_batch_that_comes_late_is_not_added_again() -> None:
    day = ClassDay.empty("C", "2026-11-27")
    day = add_batch(day, ONE, "a", 1) or day
    day = add_batch(day, ONE, "a", 2) or day
    assert add_batch(day, ONE, "a", 1) is None


def test_a_record_survives_encoding() -> None:
    day = add_batch(ClassDay.empty("C", "2026-11-27"), ONE, "a", 7)
    assert day is not None
    assert ClassDay.decode("C", "2026-11-27", day.encode()) == day


def test_dates() -> None:
    assert parse_day("2026-11-27") == "2026-11-27"
    for bad in ("2026-13-01", "27.11.2026", "2026-1-1", ""):
        with pytest.raises(InvalidArgument, match="YYYY-MM-DD"):
            parse_day(bad)
