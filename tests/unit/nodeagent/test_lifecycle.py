"""The instance lifecycle's transition table, row by row, and the pairs it rejects, and the
crash-loop backoff beside it: no Docker, no asyncio, only `step(state, cause, trigger)` and
`after_exit(loop, end, now)`."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest

from nodeagent.lifecycle import (
    BACKOFF_MOST_S,
    ENGINE_RESTARTED,
    STEADY_S,
    STOP_OUTCOMES,
    TABLE,
    TRIGGERS,
    Announce,
    Answered,
    Boot,
    BootFailed,
    CheckFailed,
    CheckPassed,
    CrashLoop,
    Died,
    Effect,
    EngineStopped,
    FoundPaused,
    FoundRunning,
    FoundStopped,
    Pause,
    Removed,
    RunEnd,
    Started,
    Step,
    Stop,
    StopCause,
    StopFailed,
    Thawed,
    Trigger,
    after_exit,
    backoff_delay,
    step,
)
from portside.events import EventKind
from portside.states import InstanceState

S = InstanceState
K = EventKind
C = StopCause
BEGIN, ADOPT, END = Effect.BEGIN_RUN, Effect.ADOPT_RUN, Effect.END_RUN
STOP_IT, FORGET, BACK_OFF = Effect.STOP_CONTAINER, Effect.FORGET_CONTAINER, Effect.BACK_OFF
FREEZE, PAUSE_RUN, RESUME_RUN = Effect.FREEZE_CONTAINER, Effect.PAUSE_RUN, Effect.RESUME_RUN


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
    # Health checks: failures in a row make it running (unhealthy), a pass healthy again; its
    # container, its run and its sleep timer are left alone (no effects).
    (
        S.HEALTHY,
        None,
        CheckFailed("answered 503"),
        rests(S.RUNNING, says=(Announce(K.UNHEALTHY, reason="answered 503"),)),
    ),
    (
        S.RUNNING,
        None,
        CheckPassed(),
        rests(S.HEALTHY, says=(Announce(K.HEALTHY, reason="its health check passed"),)),
    ),
    # It exited by itself: its code, the signal above 128, and out of memory when the kernel
    # said so.
    (
        S.RUNNING,
        None,
        Died(137, at=5.0),
        rests(S.STOPPED_WITH_CODE, BACK_OFF, END, says=(Announce(K.EXITED, 137, 9),)),
    ),
    (
        S.HEALTHY,
        None,
        Died(3),
        rests(S.STOPPED_WITH_CODE, BACK_OFF, END, says=(Announce(K.EXITED, 3),)),
    ),
    # The engine restarted under it (no live-restore): it rests stopped, no crash is counted.
    (
        S.RUNNING,
        None,
        EngineStopped(143),
        rests(S.STOPPED, END, says=(Announce(K.EXITED, 143, 15, ENGINE_RESTARTED),)),
    ),
    (
        S.HEALTHY,
        None,
        EngineStopped(0, at=5.0),
        rests(S.STOPPED, END, says=(Announce(K.EXITED, 0, reason=ENGINE_RESTARTED),)),
    ),
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
    # A rollout's replace: announced as it begins, with the versions; the old container's death
    # is silent (the new container's starting and ready follow).
    (
        S.HEALTHY,
        None,
        Stop(C.ROLLOUT, "version 1 → 2"),
        Step(S.STOPPING, C.ROLLOUT, (STOP_IT,), (Announce(K.REPLACED, reason="version 1 → 2"),)),
    ),
    (
        S.RUNNING,
        None,
        Stop(C.ROLLOUT, "version 1 → 2"),
        Step(S.STOPPING, C.ROLLOUT, (STOP_IT,), (Announce(K.REPLACED, reason="version 1 → 2"),)),
    ),
    (S.STOPPING, C.ROLLOUT, Died(143), rests(S.STOPPED, END)),
    (S.STOPPING, C.ROLLOUT, Removed(), rests(S.STOPPED, END, FORGET)),
    (S.STOPPING, C.ROLLOUT, StopFailed(), rests(S.STOPPED, END)),
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
    # Pause mode: an idle healthy instance is frozen (its run no longer metered), and thawed
    # healthy again by what woke it.
    (
        S.HEALTHY,
        None,
        Pause("idle for 2s"),
        rests(S.PAUSED, FREEZE, PAUSE_RUN, says=(Announce(K.PAUSED, reason="idle for 2s"),)),
    ),
    (
        S.PAUSED,
        None,
        Thawed("a request"),
        rests(S.HEALTHY, RESUME_RUN, says=(Announce(K.RESUMED, reason="a request"),)),
    ),
    # Frozen behind the agent's back (docker pause): paused, nothing to freeze; adopted frozen:
    # paused, without a run to meter or an event.
    (
        S.HEALTHY,
        None,
        FoundPaused("paused outside Portside"),
        rests(S.PAUSED, PAUSE_RUN, says=(Announce(K.PAUSED, reason="paused outside Portside"),)),
    ),
    (
        S.RUNNING,
        None,
        FoundPaused("paused outside Portside"),
        rests(S.PAUSED, PAUSE_RUN, says=(Announce(K.PAUSED, reason="paused outside Portside"),)),
    ),
    (S.PLACED, None, FoundPaused(), rests(S.PAUSED)),
    # pause_max passed (a sleep: activity-expired, then slept), or any other stop of a paused
    # instance: stopped like a running one.
    (
        S.PAUSED,
        None,
        Stop(C.SLEEP, "paused for 4s"),
        Step(
            S.STOPPING,
            C.SLEEP,
            (STOP_IT,),
            (Announce(K.ACTIVITY_EXPIRED, reason="paused for 4s"),),
        ),
    ),
    # Its end: never a crash (a frozen container does not exit by itself); the run's end meters
    # nothing more, as the pause ended its metering.
    (
        S.PAUSED,
        None,
        Died(137),
        rests(S.STOPPED_WITH_CODE, END, says=(Announce(K.EXITED, 137, 9),)),
    ),
    (
        S.PAUSED,
        None,
        Removed(),
        rests(S.STOPPED_WITH_CODE, END, FORGET, says=(Announce(K.EXITED),)),
    ),
    (
        S.PAUSED,
        None,
        EngineStopped(137),
        rests(S.STOPPED, END, says=(Announce(K.EXITED, 137, 9, ENGINE_RESTARTED),)),
    ),
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
    CheckFailed("x"),
    CheckPassed(),
    Died(0),
    EngineStopped(0),
    Removed(),
    BootFailed("x"),
    Stop(C.STOP),
    StopFailed(),
    FoundRunning(),
    FoundStopped(),
    Pause(),
    Thawed(),
    FoundPaused(),
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


def test_the_rejections_of_pause_mode() -> None:
    # Only a healthy instance pauses: one whose port never answered or whose checks fail sleeps
    # by stopping, and its wake boots it afresh.
    assert step(S.RUNNING, None, Pause("idle for 2s")) is None
    # A paused instance is thawed, not booted: a Boot would start a second run of it.
    assert step(S.PAUSED, None, Boot()) is None
    # Its own freeze's and thaw's engine events come back as found-paused and thawed: the state
    # already says so, and nothing is announced twice.
    assert step(S.PAUSED, None, FoundPaused()) is None
    assert step(S.HEALTHY, None, Thawed()) is None
    # A health check that answered before the freeze judges nothing: no check runs on it.
    assert step(S.PAUSED, None, CheckFailed("no answer within 2s")) is None
    assert step(S.PAUSED, None, CheckPassed()) is None
    # A stop in progress is not thawed under it.
    assert step(S.STOPPING, C.SLEEP, Thawed()) is None


def test_a_pause_from_request_to_freeze_and_back_then_pause_max() -> None:
    """A walk through pause mode as the manager feeds it: frozen, thawed, frozen again, then
    stopped after pause_max and asleep, then booted."""
    walk: list[tuple[Trigger, InstanceState]] = [
        (Pause("idle for 1s"), S.PAUSED),
        (Thawed("a request"), S.HEALTHY),
        (Pause("idle for 1s"), S.PAUSED),
        (Stop(C.SLEEP, "paused for 4s"), S.STOPPING),
        (Died(143), S.SLEEPING),
        (Boot(), S.STARTING),
    ]
    state: InstanceState = S.HEALTHY
    cause: StopCause | None = None
    kinds: list[EventKind] = []
    effects: list[Effect] = []
    for trigger, expected in walk:
        taken = step(state, cause, trigger)
        assert taken is not None, (state, trigger)
        state, cause = taken.state, taken.cause
        kinds += [e.kind for e in taken.events]
        effects += taken.effects
        assert state is expected
    assert kinds == [K.PAUSED, K.RESUMED, K.PAUSED, K.ACTIVITY_EXPIRED, K.SLEPT, K.STARTING]
    # Metering: each pause ends what a resume began; the last pause's end meters nothing more.
    assert [e for e in effects if e in (PAUSE_RUN, RESUME_RUN)] == [
        PAUSE_RUN, RESUME_RUN, PAUSE_RUN
    ]  # fmt: skip
    assert BACK_OFF not in effects


def test_stopping_without_its_cause_is_a_bug() -> None:
    with pytest.raises(ValueError, match="without the cause"):
        step(S.STOPPING, None, Died(0))


# -- crash-loop backoff --------------------------------------------------------------------------

BOOTING = RunEnd(3, ran_s=0.2, answered=False, served=False)


@pytest.mark.parametrize(
    ("end", "crashed"),
    [
        (BOOTING, True),  # exited before its port answered
        (RunEnd(3, ran_s=40.0, answered=False, served=False), True),  # a slow boot, still a boot
        (RunEnd(1, ran_s=2.0, answered=True, served=False), True),  # answered, then fell over
        (RunEnd(143, ran_s=2.0, answered=True, served=True), False),  # it served: wakes at once
        (RunEnd(0, ran_s=11.0, answered=True, served=False), False),  # past the crash window
        (RunEnd(0, ran_s=None, answered=True, served=False), False),  # adopted: unknown start
    ],
)
def test_which_exits_are_crashes(end: RunEnd, crashed: bool) -> None:
    assert end.crashed is crashed


def test_the_backoff_doubles_from_one_second_up_to_five_minutes() -> None:
    assert [backoff_delay(n) for n in range(12)] == [
        0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0
    ]  # fmt: skip
    assert backoff_delay(10_000) == BACKOFF_MOST_S


def test_a_crash_loop_step_by_step() -> None:
    loop, now = CrashLoop(), 100.0
    assert not loop.holds_back(now)
    loop = after_exit(loop, BOOTING, now)
    assert (loop.crashes, loop.exit_code, loop.retry_at, loop.delay_s) == (1, 3, 101.0, 1.0)
    assert loop.holds_back(100.5) and loop.refusal(100.5) == (
        "exited with code 3 at start; next try in 1s"
    )
    assert not loop.holds_back(101.0)  # the next boot may be tried
    loop = after_exit(loop, BOOTING, 101.5)
    assert (loop.crashes, loop.retry_at) == (2, 103.5)
    loop = after_exit(loop, BOOTING, 104.0)
    assert (loop.crashes, loop.retry_at) == (3, 108.0)
    assert loop.refusal(104.5) == "exited with code 3 at start; next try in 4s"  # 3.5 rounded up
    # An exit after it served waits for nothing, but the count stays until a steady run.
    served = after_exit(loop, RunEnd(143, 30.0, answered=True, served=True), 200.0)
    assert (served.crashes, served.holds_back(200.0)) == (3, False)
    assert after_exit(served, BOOTING, 201.0).delay_s == 8.0
    # A run of ten minutes forgives everything before it, whether it ended or still runs.
    assert after_exit(loop, RunEnd(0, STEADY_S, answered=True, served=True), 900.0) == CrashLoop()
    assert loop.ran_steadily(STEADY_S - 1) is loop
    assert loop.ran_steadily(STEADY_S) == CrashLoop()


def test_only_an_exit_of_its_own_counts_against_the_loop() -> None:
    # Rows that carry BACK_OFF: a container that was up and exited by itself. A stop of the
    # agent's, a removal or the engine's restart never does.
    backing_off = {key for key, row in TABLE.items() if Effect.BACK_OFF in row.effects}
    assert backing_off == {(S.RUNNING, Died), (S.HEALTHY, Died)}
    # BACK_OFF comes before END_RUN, which forgets when the run began.
    row = TABLE[(S.HEALTHY, Died)]
    assert row.effects.index(BACK_OFF) < row.effects.index(END)
