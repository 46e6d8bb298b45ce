"""Per-instance schedules in the store (issue 13): the record (a schedule and the claim of the
tick being run; its key is controlplane.records.schedule_key), the checks of a Schedule request,
and the pure tick logic that the leader's loop (controlplane.scheduleloop) applies with
compare-and-swap.

A tick is claimed before it runs: one compare-and-swap moves the record's next_run from the tick
to the next one and writes the claim (tick, replica, deadline). Only the claimer runs the tick,
so no tick runs twice however many replicas think they lead. The claimer records the result and
drops the claim; a claim still there after its deadline was a run whose claimer died, and is
recorded as lost instead of being run again (it may or may not have reached the instance), and so
is one whose claimer is gone (its registration expired) before that: each tick runs at most once,
and a tick that may not have run is reported (docs/architecture.md, "Schedules").
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import asdict, dataclass, replace
from typing import Any

from portside.client import Schedule
from portside.errors import InvalidArgument, one_line

MIN_EVERY_S = 0.1
# A run's own deadline (its HTTP request or command), plus the class's boot_timeout when it may
# wake the instance.
RUN_TIMEOUT_S = 30.0
# A claim is taken for lost this long after its run's deadline: the claimer's run has ended by
# then (its deadline passed) even if the replicas' clocks disagree by up to this much.
LOST_MARGIN_S = 10.0

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_METHOD = re.compile(r"[A-Z]{1,16}")

SKIPPED_SLEEPING = "skipped: sleeping"
SKIPPED_DELETED = "skipped: deleted"
BODY_MOST = 100  # of a failed HTTP run's body, what its result shows


@dataclass(frozen=True)
class Claim:
    """The tick a replica is running: claimed at `started` (unix seconds), due at `tick`; past
    `deadline` without a result, the run is lost."""

    tick: float
    replica: str
    started: float
    deadline: float


@dataclass(frozen=True)
class ScheduleRecord:
    """What the store keeps under a schedule's key (JSON)."""

    schedule: Schedule
    claim: Claim | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = asdict(self.schedule)
        if self.claim is not None:
            body["claim"] = asdict(self.claim)
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> ScheduleRecord:
        """ValueError, TypeError or KeyError for a record this version cannot read."""
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError(f"not a JSON object: {type(body).__name__}")
        claim = body.pop("claim", None)
        body["command"] = tuple(body.get("command", ()))
        return cls(Schedule(**body), Claim(**claim) if claim is not None else None)


def new_schedule_id() -> str:
    """The id of a schedule whose request named none: 8 hex digits."""
    return secrets.token_hex(4)


def check_request(s: Schedule, *, now: float, generated_id: str) -> Schedule:
    """A new schedule as the request gave it, checked and completed: its id (`generated_id` when
    the request gave none), created_at, next_run. InvalidArgument names the field at fault."""
    if not s.class_name:
        raise InvalidArgument("instance.class_name: required")
    if not s.name:
        raise InvalidArgument("instance.name: required")
    schedule_id = s.id or generated_id
    if not _ID.fullmatch(schedule_id):
        raise InvalidArgument(
            f"id: {schedule_id!r} is not an id (1-64 letters, digits, '.', '_', '-', starting "
            "with a letter or digit)"
        )
    for field, value in (("at", s.at), ("every_seconds", s.every_s)):
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"{field}: {value} is not a time")
    if bool(s.at) == bool(s.every_s):
        raise InvalidArgument(
            "at, every_seconds: give exactly one (at: once then; every_seconds: repeatedly)"
        )
    if s.every_s and s.every_s < MIN_EVERY_S:
        raise InvalidArgument(f"every_seconds: {s.every_s:g} is below {MIN_EVERY_S:g}")
    if bool(s.path) == bool(s.command):
        raise InvalidArgument("path, command: give exactly one (an HTTP request or a command)")
    if s.path and not s.path.startswith("/"):
        raise InvalidArgument(f"path: {s.path!r} must start with '/'")
    if s.method and not s.path:
        raise InvalidArgument("method: only with path (an HTTP request)")
    if s.method and not _METHOD.fullmatch(s.method):
        raise InvalidArgument(f"method: {s.method!r} is not an HTTP method such as GET or POST")
    checked = replace(
        s, id=schedule_id, created_at=now, next_run=0.0, last_run=0.0, last_result="", runs=0
    )
    return replace(checked, next_run=s.at or now + s.every_s)


def next_tick(s: Schedule, tick: float, now: float) -> float:
    """The tick after `tick`, claimed at `now` (0 for a one-off: done): one interval on; or, when
    that has passed too (the tick ran late: an outage, a leader change), one interval after
    `now`. Missed ticks are never made up, and a late run is not followed at once by another."""
    if not s.every_s:
        return 0.0
    return tick + s.every_s if tick + s.every_s > now else now + s.every_s


@dataclass(frozen=True)
class Due:
    """Run now: claim the tick."""

    tick: float


@dataclass(frozen=True)
class Later:
    """Nothing to do before `at` (a run in flight reports `at` as its deadline)."""

    at: float


@dataclass(frozen=True)
class Lost:
    """A claim past its deadline without a result: record it lost."""

    claim: Claim


@dataclass(frozen=True)
class Done:
    """A one-off that ran: nothing more, ever."""


Decision = Due | Later | Lost | Done


def decide(record: ScheduleRecord, now: float, *, claimer_alive: bool = True) -> Decision:
    """What the leader does with one schedule at `now`: at most one run in flight, so a claimed
    schedule waits for its result until its claim's deadline, or until its claimer is known
    to be gone (`claimer_alive` false: the replica's registration expired, or this replica
    restarted since it claimed)."""
    if record.claim is not None:
        if now > record.claim.deadline or not claimer_alive:
            return Lost(record.claim)
        return Later(record.claim.deadline)
    if record.schedule.done:
        return Done()
    if record.schedule.next_run <= now:
        return Due(record.schedule.next_run)
    return Later(record.schedule.next_run)


def claimed(
    record: ScheduleRecord, *, now: float, replica: str, timeout_s: float
) -> ScheduleRecord:
    """The record with its due tick claimed by `replica` and next_run moved on (a one-off is
    done: next_run 0). A late tick runs once; the ticks it was late by are skipped."""
    s = record.schedule
    claim = Claim(
        tick=s.next_run, replica=replica, started=now, deadline=now + timeout_s + LOST_MARGIN_S
    )
    return ScheduleRecord(replace(s, next_run=next_tick(s, s.next_run, now)), claim)


def finished(record: ScheduleRecord, claim: Claim, result: str, now: float) -> ScheduleRecord:
    """The record with `claim`'s result: counted, and the claim dropped. A run longer than its
    interval skips the ticks it overlapped: the next comes one interval after its end."""
    s = record.schedule
    next_run = s.next_run if s.next_run > now or not s.next_run else now + s.every_s
    ran = replace(s, next_run=next_run, last_run=claim.started, last_result=result, runs=s.runs + 1)
    return ScheduleRecord(ran)


def lost_result(claim: Claim) -> str:
    return (
        f"lost: replica {claim.replica} claimed the tick due at {claim.tick:.3f} and stopped "
        "before recording its result (it may or may not have run)"
    )


def call_result(status: int, body: bytes) -> str:
    """An HTTP run's result: its status ("200"), and for a status of 400 or more the first line
    of the body's excerpt too ("503 draining"), so that `last_result` says why."""
    if status < 400 or not body.strip():
        return str(status)
    return f"{status} {one_line(body.decode(errors='replace'), BODY_MOST)}"


def outcome(result: str) -> str:
    """A result's metric label: ok (an HTTP status below 400, exit 0), error (any other status
    or exit code), skipped, failed, lost."""
    for prefix in ("skipped", "failed", "lost"):
        if result.startswith(prefix + ":"):
            return prefix
    if result.startswith("exit "):
        return "ok" if result == "exit 0" else "error"
    status = result.split(" ", 1)[0]
    return "ok" if status.isdigit() and int(status) < 400 else "error"


def log_action(s: Schedule) -> str:
    """What a run does, for a log line: the method and the path without its query, or the
    command's program only. Arguments and query strings often carry tokens; no log holds them."""
    if s.path:
        return f"{s.method or 'GET'} {s.path.partition('?')[0]}"
    return f"exec {s.command[0]}" if s.command else "exec"
