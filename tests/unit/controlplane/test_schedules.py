"""Per-instance schedules' pure parts: the checks of a request, the tick grid, and the decisions
and records of a claim, a run's result and a lost claim (controlplane.schedules)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controlplane.records import schedule_key, schedules_prefix
from controlplane.schedules import (
    LOST_MARGIN_S,
    Claim,
    Done,
    Due,
    Later,
    Lost,
    ScheduleRecord,
    call_result,
    check_request,
    claimed,
    decide,
    finished,
    log_action,
    lost_result,
    next_tick,
    outcome,
)
from portside.client import Schedule
from portside.errors import InvalidArgument, one_line

NOW = 1_000.0


def every(seconds: float, **fields: object) -> Schedule:
    asked = Schedule(id="h", class_name="Echo", name="s1", every_s=seconds, path="/_health")
    return check_request(replace(asked, **fields), now=NOW, generated_id="gen")  # type: ignore[arg-type]


def once(at: float) -> Schedule:
    asked = Schedule(id="", class_name="Echo", name="s1", at=at, command=("touch", "/tmp/x"))
    return check_request(asked, now=NOW, generated_id="gen")


def test_a_checked_request_is_completed() -> None:
    s = every(0.5)
    assert (s.id, s.created_at, s.next_run, s.runs, s.last_result) == ("h", NOW, NOW + 0.5, 0, "")
    one = once(NOW + 30)
    assert (one.id, one.next_run, one.done) == ("gen", NOW + 30, False)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"class_name": ""}, "instance.class_name"),
        ({"name": ""}, "instance.name"),
        ({"id": "-x"}, "id"),
        ({"id": "a/b"}, "id"),
        ({"id": "x" * 65}, "id"),
        ({"at": NOW}, "at, every_seconds"),  # both
        ({"every_s": 0.0}, "at, every_seconds"),  # neither
        ({"every_s": 0.05}, "every_seconds"),
        ({"every_s": float("inf")}, "every_seconds"),
        ({"every_s": -1.0}, "every_seconds"),
        ({"command": ("true",)}, "path, command"),  # both
        ({"path": ""}, "path, command"),  # neither
        ({"path": "health"}, "path"),
        ({"path": "", "command": ("true",), "method": "POST"}, "method"),
        ({"method": "get it"}, "method"),
    ],
)
def test_a_bad_request_names_its_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        every(0.5, **fields)
    assert str(caught.value).startswith(field + ":"), caught.value


def test_ticks_keep_their_interval_and_a_backlog_is_not_replayed() -> None:
    s = every(2.0)
    assert next_tick(s, NOW + 2, NOW + 2.01) == NOW + 4  # on time: one interval on
    assert next_tick(s, NOW + 2, NOW + 3.9) == NOW + 4  # late by less than an interval
    assert next_tick(s, NOW + 2, NOW + 4) == NOW + 6  # the next one is due too: after now
    assert next_tick(s, NOW + 2, NOW + 3600) == NOW + 3602  # an hour late: no backlog
    assert next_tick(once(NOW + 5), NOW + 5, NOW + 5) == 0.0  # a one-off has no next


def test_decide_each_state() -> None:
    s = every(0.5)
    assert decide(ScheduleRecord(s), NOW) == Later(NOW + 0.5)
    assert decide(ScheduleRecord(s), NOW + 0.5) == Due(NOW + 0.5)
    assert decide(ScheduleRecord(replace(s, next_run=0.0)), NOW) == Done()
    claim = Claim(tick=NOW + 0.5, replica="a", started=NOW + 0.5, deadline=NOW + 40)
    in_flight = ScheduleRecord(replace(s, next_run=NOW + 1), claim)
    assert decide(in_flight, NOW + 5) == Later(NOW + 40)  # at most one run in flight
    assert decide(in_flight, NOW + 40.01) == Lost(claim)
    assert decide(in_flight, NOW + 5, claimer_alive=False) == Lost(claim)  # its replica is gone


def test_a_late_tick_runs_once_and_the_next_is_after_now() -> None:
    s = every(0.5)
    late = NOW + 0.5 + 3 * 0.5 + 0.2  # three intervals late
    record = claimed(ScheduleRecord(s), now=late, replica="a", timeout_s=30)
    assert record.claim == Claim(NOW + 0.5, "a", late, late + 30 + LOST_MARGIN_S)
    assert record.schedule.next_run == late + 0.5
    assert decide(record, late) == Later(record.claim.deadline)


def test_a_result_drops_the_claim_and_a_long_run_skips_the_ticks_it_overlapped() -> None:
    s = every(0.5)
    record = claimed(ScheduleRecord(s), now=NOW + 0.5, replica="a", timeout_s=30)
    assert record.claim is not None and record.schedule.next_run == NOW + 1.0
    done = finished(record, record.claim, "200", NOW + 1.7)  # ran 1.2 s: two ticks overlapped
    assert done.claim is None
    assert (done.schedule.runs, done.schedule.last_result) == (1, "200")
    assert done.schedule.last_run == NOW + 0.5
    assert done.schedule.next_run == NOW + 2.2  # one interval after its end


def test_a_one_off_is_done_after_its_run_and_stays() -> None:
    record = claimed(ScheduleRecord(once(NOW + 5)), now=NOW + 5.01, replica="a", timeout_s=30)
    assert record.schedule.next_run == 0.0 and record.claim is not None
    ran = finished(record, record.claim, "exit 0", NOW + 5.2)
    assert ran.schedule.done and ran.schedule.runs == 1
    assert decide(ran, NOW + 100) == Done()


def test_two_replicas_never_run_one_tick_and_a_dead_claimers_tick_is_lost() -> None:
    """The store's compare-and-swap, modelled by a revision: of two claims made from one read,
    only the first is written. The winner dies; the other replica waits out its deadline,
    records the tick lost (not run again) and claims the next tick."""
    stored, revision = ScheduleRecord(every(1.0)), 1

    def swap(expected: int, record: ScheduleRecord) -> bool:
        nonlocal stored, revision
        if expected != revision:
            return False
        stored, revision = record, revision + 1
        return True

    read, at = (stored, revision), NOW + 1.0
    assert decide(read[0], at) == Due(NOW + 1.0)
    assert swap(read[1], claimed(read[0], now=at, replica="a", timeout_s=5))
    assert not swap(read[1], claimed(read[0], now=at, replica="b", timeout_s=5))
    assert stored.claim is not None and stored.claim.replica == "a"
    claim = stored.claim
    # Replica a died with its run in flight: b sees the claim, and waits for its deadline.
    assert decide(stored, NOW + 3.0) == Later(claim.deadline)
    assert decide(stored, claim.deadline + 0.1) == Lost(claim)
    assert swap(revision, finished(stored, claim, lost_result(claim), claim.deadline + 0.1))
    assert stored.schedule.last_result.startswith("lost: replica a claimed the tick due at")
    assert stored.schedule.runs == 1 and stored.claim is None
    assert decide(stored, claim.deadline + 0.1) == Later(stored.schedule.next_run)
    assert stored.schedule.next_run > claim.deadline + 0.1


def test_records_round_trip() -> None:
    s = every(0.5, no_wake=True, no_activity=True)
    claim = Claim(1.0, "r", 2.0, 3.0)
    for record in (ScheduleRecord(s), ScheduleRecord(once(NOW + 1), claim)):
        assert ScheduleRecord.decode(record.encode()) == record


@pytest.mark.parametrize("data", [b"[1, 2]", b'"text"', b"3", b"null", b"{not json", b'{"id": 1}'])
def test_an_unreadable_record_is_a_value_error_not_a_crash(data: bytes) -> None:
    """The loop skips what decode refuses (ValueError, TypeError, KeyError); any other exception
    would escape the watch's listener and end the view's watch."""
    with pytest.raises((ValueError, TypeError, KeyError)):
        ScheduleRecord.decode(data)


def test_keys() -> None:
    assert schedules_prefix() == "/portside/schedules/"
    assert schedules_prefix("Echo") == "/portside/schedules/Echo/"
    assert schedule_key("Echo", "iid", "h") == "/portside/schedules/Echo/iid/h"


@pytest.mark.parametrize(
    ("result", "label"),
    [
        ("200", "ok"),
        ("302", "ok"),
        ("503", "error"),
        ("503 draining", "error"),
        ("204 ", "ok"),
        ("exit 0", "ok"),
        ("exit 2", "error"),
        ("skipped: sleeping", "skipped"),
        ("failed: no node", "failed"),
        ("lost: replica a", "lost"),
    ],
)
def test_outcome(result: str, label: str) -> None:
    assert outcome(result) == label


def test_one_line() -> None:
    assert one_line("first\nsecond") == "first"
    assert one_line("x" * 300) == "x" * 199 + "…"
    assert one_line("x" * 300, most=0) == "x" * 300
    assert one_line("") == "no reason given"
    assert one_line("  \n ") == "no reason given"


def test_a_failed_calls_result_says_why_in_one_line() -> None:
    assert call_result(200, b"ok\n") == "200"  # a success's body is not its result
    assert call_result(503, b"") == "503"
    assert call_result(503, b"draining: back soon\n<html>...") == "503 draining: back soon"
    assert call_result(500, b"x" * 4096) == "500 " + "x" * 99 + "…"
    assert outcome(call_result(503, b"draining")) == "error"


@pytest.mark.parametrize(
    ("fields", "logged"),
    [
        ({"path": "/hook?token=s3cret"}, "GET /hook"),
        ({"path": "/hook", "method": "POST"}, "POST /hook"),
        ({"path": "", "command": ("curl", "-H", "Authorization: s3cret", "x")}, "exec curl"),
    ],
)
def test_a_log_line_holds_no_argument_or_query(fields: dict[str, object], logged: str) -> None:
    s = every(1.0, **fields)
    assert log_action(s) == logged
