"""The instance lifecycle's transition table, row by row, and the pairs it rejects: no Docker, no
asyncio, only `step(state, cause, trigger)`."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest

from nodeagent.lifecycle import (
    STOP_OUTCOMES,
    TABLE,
    TRIGGERS,
    Announce,
    Answered,
    Boot,
    BootFailed,
    Died,
    Effect,
    FoundRunning,
    FoundStopped,
    Removed,
    Started,
    Step,
    Stop,
    StopCause,
    StopFailed,
    Trigger,
    step,
)
from portside.events import EventKind
from portside.states import InstanceState

S = InstanceState
K = EventKind
C = StopCause
BEGIN, ADOPT, END = Effect.BEGIN_RUN, Effect.ADOPT_RUN, Effect.END_RUN
STOP_IT, FORGET = Effect.STOP_CONTAINER, Effect.FORGET_CONTAINER


def rests(state: InstanceState, *effects: Effect, says: tuple[Announce, ...] = ()) -> Step:
    return Step(state, None, effects, says)


# (state, cause of the stop in progress, trigger) → the step the table must answer.
ROWS: list[tuple[InstanceState, StopCause | None, Trigger, Step]] = [
    # Something wants it awake: from any resting state a boot begins.
    (S.PLACED, None, Boot(), rests(S.STARTING, says=(Announce(K.STARTING),))),
    (S.SLEEPING, None, Boot(), rests(S.STARTING, says=(Announce(K.STARTING),))),
    (S.STOPPED, None, Boot(), rests(S.STARTING, says=(Announce(K.STARTING),))),
    (S.STOPPED_WITH_CODE, None, Boot(), rests(S.STARTING, says=(Announce(K.STARTING),))),
    # docker start answered, then the port did.
    (S.STARTING, None, Started(), rests(S.RUNNING, BEGIN)),
    (S.RUNNING, None, Answered(), rests(S.HEALTHY, says=(Announce(K.READY),))),
    # It exited by itself: its code, the signal above 128, and out of memory when the kernel
    # said so.
    (
        S.RUNNING,
        None,
        Died(137, at=5.0),
        rests(S.STOPPED_WITH_CODE, END, says=(Announce(K.EXITED, 137, 9),)),
    ),
    (S.HEALTHY, None, Died(3), rests(S.STOPPED_WITH_CODE, END, says=(Announce(K.EXITED, 3),))),
    (
        S.RUNNING,
        None,
        Removed(),
        rests(S.STOPPED_WITH_CODE, END, FORGET, says=(Announce(K.EXITED),)),
    ),
    (
        S.HEALTHY,
        None,
        Removed(),
        rests(S.STOPPED_WITH_CODE, END, FORGET, says=(Announce(K.EXITED),)),
    ),
    # The agent stops it: a sleep announces itself, other causes do not.
    (
        S.HEALTHY,
        None,
        Stop(C.SLEEP, "idle for 2s"),
        Step(
            S.STOPPING, C.SLEEP, (STOP_IT,), (Announce(K.ACTIVITY_EXPIRED, reason="idle for 2s"),)
        ),
    ),
    (S.RUNNING, None, Stop(C.STOP), Step(S.STOPPING, C.STOP, (STOP_IT,), ())),
    # Its death while stopping: the cause decides where it rests and what it says.
    (S.STOPPING, C.SLEEP, Died(143), rests(S.SLEEPING, END, says=(Announce(K.SLEPT),))),
    (
        S.STOPPING,
        C.STOP,
        Died(143),
        rests(S.STOPPED, END, says=(Announce(K.EXITED, 143, 15, "stopped"),)),
    ),
    (
        S.STOPPING,
        C.SHUTDOWN,
        Died(143),
        rests(S.STOPPED, END, says=(Announce(K.EXITED, 143, 15, "its agent shut down"),)),
    ),
    (S.STOPPING, C.BOOT_FAILED, Died(143), rests(S.STOPPED, END)),
    (S.STOPPING, C.SLEEP, Removed(), rests(S.SLEEPING, END, FORGET, says=(Announce(K.SLEPT),))),
    (S.STOPPING, C.SLEEP, StopFailed(), rests(S.STOPPED, END)),
    # A container removed while it rests: only forgotten, the next boot creates one.
    (S.SLEEPING, None, Removed(), rests(S.SLEEPING, FORGET)),
    (S.STOPPED, None, Removed(), rests(S.STOPPED, FORGET)),
    (S.STOPPED_WITH_CODE, None, Removed(), rests(S.STOPPED_WITH_CODE, FORGET)),
    # A boot that gave up stops what it may have started; one whose container exited only says
    # why.
    (
        S.STARTING,
        None,
        BootFailed("no image"),
        Step(S.STOPPING, C.BOOT_FAILED, (STOP_IT,), (Announce(K.FAILED, reason="no image"),)),
    ),
    (
        S.RUNNING,
        None,
        BootFailed("timeout"),
        Step(S.STOPPING, C.BOOT_FAILED, (STOP_IT,), (Announce(K.FAILED, reason="timeout"),)),
    ),
    (
        S.STOPPED_WITH_CODE,
        None,
        BootFailed("exited with code 3"),
        rests(S.STOPPED_WITH_CODE, says=(Announce(K.FAILED, reason="exited with code 3"),)),
    ),
    # Adoption of a previous agent's containers.
    (S.PLACED, None, FoundRunning(), rests(S.HEALTHY, ADOPT)),
    (S.PLACED, None, FoundStopped(), rests(S.STOPPED)),
]


@pytest.mark.parametrize(
    ("state", "cause", "trigger", "expected"),
    ROWS,
    ids=[f"{s}-{c or ''}-{type(t).__name__}" for s, c, t, _ in ROWS],
)
def test_each_row(
    state: InstanceState, cause: StopCause | None, trigger: Trigger, expected: Step
) -> None:
    assert step(state, cause, trigger) == expected


def test_the_rows_cover_the_table() -> None:
    assert {(s, type(t)) for s, _, t, _ in ROWS} == set(TABLE)
    assert set(TRIGGERS) == set(get_args(Trigger)) == {type(t) for t in ONE_OF_EACH}


@pytest.mark.parametrize("cause", list(StopCause))
def test_every_cause_rests_as_its_outcome_says(cause: StopCause) -> None:
    outcome = STOP_OUTCOMES[cause]
    stopping = step(S.HEALTHY, None, Stop(cause, "why"))
    assert stopping is not None and (stopping.state, stopping.cause) == (S.STOPPING, cause)
    begins = (outcome.begins_with,) if outcome.begins_with else ()
    assert tuple(e.kind for e in stopping.events) == begins
    died = step(S.STOPPING, cause, Died(143))
    assert died is not None and (died.state, died.cause) == (outcome.rests_as, None)
    ends = (outcome.ends_with,) if outcome.ends_with else ()
    assert tuple(e.kind for e in died.events) == ends
    # Only a sleep rests asleep; every other stop, the agent's or a user's, rests stopped.
    assert (outcome.rests_as is S.SLEEPING) == (cause is StopCause.SLEEP)


def test_out_of_memory_outranks_the_reason_of_a_stop() -> None:
    died = step(S.STOPPING, C.STOP, Died(137, oom=True))
    assert died is not None
    assert died.events == (Announce(K.EXITED, 137, 9, "out of memory"),)
    crashed = step(S.HEALTHY, None, Died(137, oom=True))
    assert crashed is not None and crashed.events[0].reason == "out of memory"


ONE_OF_EACH: list[Trigger] = [
    Boot(),
    Started(),
    Answered(),
    Died(0),
    Removed(),
    BootFailed("x"),
    Stop(C.STOP),
    StopFailed(),
    FoundRunning(),
    FoundStopped(),
]
REJECTED = [
    (state, trigger)
    for state, trigger in itertools.product(InstanceState, ONE_OF_EACH)
    if (state, type(trigger)) not in TABLE
]


@pytest.mark.parametrize(
    ("state", "trigger"), REJECTED, ids=[f"{s}-{type(t).__name__}" for s, t in REJECTED]
)
def test_pairs_outside_the_table_are_rejected(state: InstanceState, trigger: Trigger) -> None:
    cause = StopCause.SLEEP if state is S.STOPPING else None
    assert step(state, cause, trigger) is None


def test_the_rejections_that_keep_the_promises() -> None:
    # Each run ends in one event: a second report of a death finds the instance resting.
    assert step(S.SLEEPING, None, Died(143)) is None
    assert step(S.STOPPED_WITH_CODE, None, Died(143)) is None
    # A die while starting is an earlier run's, or comes with docker start's own answer.
    assert step(S.STARTING, None, Died(0)) is None
    # One boot for all: a boot is joined, never begun twice.
    assert all(step(s, None, Boot()) is None for s in (S.STARTING, S.RUNNING, S.HEALTHY))
    # A stop in progress is waited for; a boot in progress is aborted by the manager first.
    assert step(S.STOPPING, C.SLEEP, Stop(C.STOP)) is None
    assert step(S.STARTING, None, Stop(C.STOP)) is None
    # Adoption happens once, on an instance the agent did not know.
    assert step(S.STOPPED, None, FoundRunning()) is None


def test_a_sleep_from_request_to_rest_and_back() -> None:
    """A walk through the table as the manager feeds it, one run's worth."""
    walk: list[tuple[Trigger, InstanceState]] = [
        (Boot(), S.STARTING),
        (Started(), S.RUNNING),
        (Answered(), S.HEALTHY),
        (Stop(C.SLEEP, "idle for 1s"), S.STOPPING),
        (Died(143, at=10.0), S.SLEEPING),  # the engine's die event
        (Boot(), S.STARTING),
    ]
    state, cause = S.PLACED, None
    kinds: list[EventKind] = []
    for trigger, expected in walk:
        taken = step(state, cause, trigger)
        assert taken is not None, (state, trigger)
        state, cause = taken.state, taken.cause
        kinds += [e.kind for e in taken.events]
        assert state is expected
        if state is S.SLEEPING:  # docker stop's own answer, after the engine's die event
            assert step(state, cause, Died(143)) is None
    assert kinds == [K.STARTING, K.READY, K.ACTIVITY_EXPIRED, K.SLEPT, K.STARTING]


def test_stopping_without_its_cause_is_a_bug() -> None:
    with pytest.raises(ValueError, match="without the cause"):
        step(S.STOPPING, None, Died(0))
