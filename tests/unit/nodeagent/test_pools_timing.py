"""The usage sampler's schedule: samples fall on wall-clock multiples of the period, and a timer
that fires a little early never makes a second sample right after the first."""

from __future__ import annotations

import pytest

from portside.ticks import until_next


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (100.0, 2.0),  # on a boundary: the next one
        (100.5, 1.5),
        (101.8, 0.2),  # a tenth of the period away: slept
        (101.999, 2.001),  # woken 1 ms early: the sliver is skipped, not slept
        (101.8005, 2.1995),  # less than a tenth away: the boundary after
    ],
)
def test_until_next_boundary(now: float, expected: float) -> None:
    assert until_next(2.0, now=now) == pytest.approx(expected, abs=1e-6)


def test_a_sample_just_before_the_boundary_waits_a_whole_period() -> None:
    # Two samples never come closer than 0.9 periods: the first at 1 ms before the boundary
    # (an early timer), the next at the boundary after.
    first = 101.999
    second = first + until_next(2.0, now=first)
    assert second - first >= 1.8
    assert second == pytest.approx(104.0)
