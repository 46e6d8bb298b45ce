"""The pure parts of health checks: what an answer means, the run of failures that makes an
instance unhealthy and the pass that makes it healthy again, and when the next check is due.
No sockets: tests/integration/test_health_checks.py checks real containers."""

from __future__ import annotations

import pytest

from nodeagent.health import (
    CheckResult,
    Streak,
    due,
    judge,
    outcome,
    parse_status_line,
    soonest,
)
from nodeagent.lifecycle import CheckFailed, CheckPassed
from portside.states import InstanceState

S = InstanceState
FAIL = CheckResult(False, reason="answered 503")
PASS = CheckResult(True, 200)


@pytest.mark.parametrize("status", [100, 200, 204, 301, 304, 400, 401, 403, 404, 429, 499])
def test_any_answer_below_500_passes(status: int) -> None:
    # 404 above all: an image without the default /ping is healthy.
    assert outcome(status) == CheckResult(True, status)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_a_5xx_fails_and_says_which(status: int) -> None:
    assert outcome(status) == CheckResult(False, status, f"answered {status}")


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"HTTP/1.1 200 OK\r\n", 200),
        (b"HTTP/1.0 404 Not Found\r\n", 404),
        (b"HTTP/1.1 503\r\n", 503),
        (b"HTTP/2 500 oops\n", 500),
        (b"", None),  # closed without answering
        (b"SSH-2.0-OpenSSH_9.2\r\n", None),
        (b"HTTP/1.1 2000 OK\r\n", None),
        (b"HTTP/1.1 abc OK\r\n", None),
        (b"HTTP/1.1 099 Low\r\n", None),
        (b"hello world\n", None),
    ],
)
def test_the_status_line(line: bytes, status: int | None) -> None:
    assert parse_status_line(line) == status


def test_failures_in_a_row_make_a_healthy_instance_unhealthy_at_the_threshold() -> None:
    streak = Streak()
    streak, verdict = judge(streak, FAIL, 3, S.HEALTHY)
    assert (streak.failures, verdict) == (1, None)
    streak, verdict = judge(streak, FAIL, 3, S.HEALTHY)
    assert (streak.failures, verdict) == (2, None)
    streak, verdict = judge(streak, FAIL, 3, S.HEALTHY)
    assert streak == Streak(3, "answered 503")
    assert verdict == CheckFailed("3 health checks in a row failed; the last: answered 503")


def test_a_pass_between_failures_starts_the_count_again() -> None:
    streak = Streak()
    for result in (FAIL, FAIL, PASS, FAIL, FAIL):
        streak, verdict = judge(streak, result, 3, S.HEALTHY)
        assert verdict is None
    assert streak.failures == 2
    streak, verdict = judge(streak, FAIL, 3, S.HEALTHY)
    assert isinstance(verdict, CheckFailed)


def test_a_threshold_of_one_turns_on_the_first_failure() -> None:
    streak, verdict = judge(Streak(), CheckResult(False, reason="connection refused"), 1, S.HEALTHY)
    assert streak.failures == 1
    assert verdict == CheckFailed("its health check failed: connection refused")


def test_an_unhealthy_instance_stays_so_while_checks_fail_and_one_pass_heals_it() -> None:
    streak = Streak(3, "answered 503")
    for _ in range(5):
        streak, verdict = judge(streak, FAIL, 3, S.RUNNING)
        assert verdict is None  # already running: nothing more to tell the table
    assert streak.failures == 8
    streak, verdict = judge(streak, PASS, 3, S.RUNNING)
    assert (streak, verdict) == (Streak(), CheckPassed())


def test_a_pass_while_healthy_changes_nothing() -> None:
    assert judge(Streak(2, "x"), PASS, 3, S.HEALTHY) == (Streak(), None)


@pytest.mark.parametrize("state", [S.PLACED, S.STARTING, S.STOPPING, S.SLEEPING, S.STOPPED])
def test_only_a_running_container_changes_health(state: InstanceState) -> None:
    # The manager does not check these; a late result must not move them either.
    assert judge(Streak(5), FAIL, 3, state)[1] is None
    assert judge(Streak(5), PASS, 3, state)[1] is None


def test_when_checks_are_due() -> None:
    assert not due(None, 100.0)  # not scheduled yet
    assert not due(100.5, 100.0)
    assert due(100.0, 100.0)
    assert due(99.0, 100.0)


def test_the_loop_sleeps_until_the_soonest_check_within_its_tick() -> None:
    assert soonest([None, 100.3, 100.2], now=100.0, most=0.5) == pytest.approx(0.2)
    assert soonest([None, 107.0], now=100.0, most=0.5) == 0.5
    assert soonest([], now=100.0, most=0.5) == 0.5
    assert soonest([99.0], now=100.0, most=0.5) == 0.001  # overdue: at once, never negative
