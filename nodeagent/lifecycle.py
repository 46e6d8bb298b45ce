"""The lifecycle of one instance on its node, as a pure transition table: (state, trigger) → (state,
effects, events). No I/O and no asyncio: the instance manager feeds it what happened (a boot
asked for, docker's answers, the engine's events) and carries out what it answers.

Its states are the public `InstanceState`s, so the manager reports its state as it is:

    placed, sleeping, stopped,   ──boot──▶ starting ──started──▶ running ──answered──▶ healthy
    stopped_with_code                        │                    │                      │
                                  boot-failed│  boot-failed, stop │           stop(cause)│
                                             └──────────▶ stopping ◀─────────────────────┘
                                                             │ died, removed, stop-failed
                                                             ▼
                                  sleeping (after a sleep) | stopped (after any other stop)

    running, healthy ──died, removed──▶ stopped_with_code (it exited by itself)
    running, healthy ──engine-stopped──▶ stopped (the engine restarted under it)
    healthy ──check-failed──▶ running ──check-passed──▶ healthy (its health checks; see
                                                       nodeagent.health for when each fires)

    healthy ──pause──▶ paused ──thawed──▶ healthy     (sleep_mode "pause": frozen, not stopped)
    running, healthy ──found-paused──▶ paused         (docker pause behind the agent's back)
    paused ──stop(cause)──▶ stopping                  (pause_max passed: a sleep; or any stop)
    paused ──died, removed──▶ stopped_with_code; paused ──engine-stopped──▶ stopped

Pause mode (a class's sleep_mode "pause") freezes an idle healthy container instead of stopping
it: its memory and processes are kept, it uses no CPU, and its run is not metered meanwhile
(PAUSE_RUN, RESUME_RUN). Only a healthy instance pauses; one whose port never answered or whose
checks fail sleeps by stopping, so that its wake boots it afresh. A thaw makes it healthy again
(its port answered before the freeze) and its health checks begin anew. The freeze and the thaw
are calls in progress like a boot: `paused` is announced as the freeze begins, `resumed` once
docker unpause answered. After its class's pause_max, a paused instance is stopped as a sleep
(Stop with cause SLEEP: activity-expired, then slept).

A rollout's replace is a stop of its own cause (ROLLOUT: announced as `replaced` as it begins),
after which the manager boots a new container from the instance's resting state; no state of its
own is needed.

Beside the state, the machine keeps one thing: the cause of the stop in progress, which decides
the state the instance rests in and the event its container's death makes (see STOP_OUTCOMES). A
pair not in TABLE is rejected: `step` returns None and nothing changes. That is how a second
report of one death (the engine's event, then docker stop's answer) is dropped: the first one
left the instance resting, so each container run ends in at most one event.

Beside the table, `CrashLoop` keeps an instance's crash-loop backoff (like Kubernetes'
CrashLoopBackOff): rows where a container exits by itself carry BACK_OFF, and `after_exit` decides
from how long it ran whether that exit was a crash and when the next boot may be tried.

There are no internal sub-states. What the manager holds beside them are not states of the
instance but calls in progress: a boot (from starting until its port answered or it gave up;
requests join it), a stop (from stopping until `docker stop` answered: its answer reports the
death, and the engine's die event, which comes a moment earlier, only lends it its time), and in
pause mode a freeze (paused until `docker pause` answered: a request that comes meanwhile waits
for it) and a thaw (paused until `docker unpause` answered; requests join it as they would a
boot).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TypeAlias

from portside.events import EventKind
from portside.states import InstanceState

_S = InstanceState


# -- triggers: what happened ------------------------------------------------------------------


@dataclass(frozen=True)
class Boot:
    """Something wants the instance awake: a request, a Start, a pool assignment."""


@dataclass(frozen=True)
class Started:
    """`docker start` returned: its container runs."""


@dataclass(frozen=True)
class Answered:
    """Its port answered."""


@dataclass(frozen=True)
class CheckFailed:
    """Its health checks failed its class's health_check_failures times in a row; `reason` is
    the last one's failure ("answered 503", "no answer within 2s")."""

    reason: str


@dataclass(frozen=True)
class CheckPassed:
    """A health check passed while it was running but not healthy (or its class's checks were
    turned off while it was unhealthy: `reason` says which)."""

    reason: str = "its health check passed"


@dataclass(frozen=True)
class Died:
    """Its container stopped, however the manager learned it: the engine's die event, docker
    stop's answer, an inspect, the engine's listing. `oom`: the kernel's OOM killer hit this
    run; `at`: the engine's unix time of the death, when known (for metering)."""

    exit_code: int | None = None
    oom: bool = False
    at: float | None = None


@dataclass(frozen=True)
class EngineStopped:
    """Its container was found stopped after the engine came back: a restart of the engine
    (without live-restore) stopped it, not its own exit. It rests stopped and wakes on its next
    request; no crash is counted."""

    exit_code: int | None = None
    at: float | None = None


@dataclass(frozen=True)
class Removed:
    """Its container no longer exists (removed behind the agent's back)."""


@dataclass(frozen=True)
class BootFailed:
    """The boot gave up before the port answered: docker failed, the container exited, or
    boot_timeout passed. `reason` is the error's one line."""

    reason: str


@dataclass(frozen=True)
class Stop:
    """The agent stops the container, for `cause`; `reason` goes with the event a stop of that
    cause announces (a sleep's activity-expired: "idle for 2s")."""

    cause: StopCause
    reason: str = ""


@dataclass(frozen=True)
class StopFailed:
    """`docker stop` failed; the container is taken as stopped (the next boot's docker start is a
    no-op if it still runs)."""


@dataclass(frozen=True)
class Pause:
    """Its class sleeps by pausing (sleep_mode "pause"): the agent freezes it after sleep_after
    without activity; `reason` goes with the `paused` event ("idle for 2s")."""

    reason: str = ""


@dataclass(frozen=True)
class Thawed:
    """Its container runs again after a pause: docker unpause answered, or it was found running
    (unpaused behind the agent's back, or its freeze failed); `reason` says what woke it ("a
    request") and goes with the `resumed` event."""

    reason: str = ""


@dataclass(frozen=True)
class FoundPaused:
    """Its container was found paused: adoption of a previous agent's paused container, or a
    docker pause behind the agent's back (the engine's event, or a listing); `reason` goes with
    the `paused` event of the latter."""

    reason: str = ""


@dataclass(frozen=True)
class FoundRunning:
    """Adoption: a previous agent's container of this instance runs."""


@dataclass(frozen=True)
class FoundStopped:
    """Adoption: a previous agent's container of this instance is stopped."""


Trigger: TypeAlias = (
    Boot
    | Started
    | Answered
    | CheckFailed
    | CheckPassed
    | Died
    | EngineStopped
    | Removed
    | BootFailed
    | Stop
    | StopFailed
    | FoundRunning
    | FoundStopped
    | Pause
    | Thawed
    | FoundPaused
)
TRIGGERS: tuple[type[Trigger], ...] = (
    Boot,
    Started,
    Answered,
    CheckFailed,
    CheckPassed,
    Died,
    EngineStopped,
    Removed,
    BootFailed,
    Stop,
    StopFailed,
    FoundRunning,
    FoundStopped,
    Pause,
    Thawed,
    FoundPaused,
)


# -- stop causes ---------------------------------------------------------------------------------


class StopCause(enum.StrEnum):
    """Why the agent stops a container."""

    SLEEP = "sleep"  # idle for its class's sleep_after
    STOP = "stop"  # a Stop: a user, an operator, the control plane
    SHUTDOWN = "shutdown"  # the agent shuts down with --stop-on-exit
    BOOT_FAILED = "boot-failed"  # its boot gave up (timeout, docker failed)
    REPLACE = "replace"  # a Start with other overrides makes the container again
    DESTROY = "destroy"  # Destroy removes it next
    DRAIN = "drain"  # a pool instance drained; it is removed next
    ROLLOUT = "rollout"  # a rollout replaces it: a container of its class's current version next


@dataclass(frozen=True)
class StopOutcome:
    """What a stop of one cause announces when it begins, the state the instance rests in once
    its container died, and what that death announces (with `reason`)."""

    rests_as: InstanceState
    begins_with: EventKind | None = None
    ends_with: EventKind | None = None
    reason: str = ""


STOP_OUTCOMES: Mapping[StopCause, StopOutcome] = MappingProxyType(
    {
        StopCause.SLEEP: StopOutcome(_S.SLEEPING, EventKind.ACTIVITY_EXPIRED, EventKind.SLEPT),
        StopCause.STOP: StopOutcome(_S.STOPPED, ends_with=EventKind.EXITED, reason="stopped"),
        StopCause.SHUTDOWN: StopOutcome(
            _S.STOPPED, ends_with=EventKind.EXITED, reason="its agent shut down"
        ),
        # Silent deaths: the boot's `failed` event says why; `removed` follows a destroy or a
        # drain; a container made again for other overrides starts again at once.
        StopCause.BOOT_FAILED: StopOutcome(_S.STOPPED),
        StopCause.REPLACE: StopOutcome(_S.STOPPED),
        StopCause.DESTROY: StopOutcome(_S.STOPPED),
        StopCause.DRAIN: StopOutcome(_S.STOPPED),
        # Announced as it begins, with the versions as the reason; the new container's
        # starting and ready follow, and its old container's death says nothing.
        StopCause.ROLLOUT: StopOutcome(_S.STOPPED, begins_with=EventKind.REPLACED),
    }
)


ENGINE_RESTARTED = "its container engine restarted"

# -- the table -------------------------------------------------------------------------------------


class Effect(enum.Enum):
    """What the manager must do, besides announcing events."""

    BEGIN_RUN = "begin-run"  # meter its container's run from now
    ADOPT_RUN = "adopt-run"  # the same, for a run that began before this agent
    END_RUN = "end-run"  # its run ended (at the death's time when known)
    STOP_CONTAINER = "stop-container"  # docker stop it in the background; report Died after
    FORGET_CONTAINER = "forget-container"  # it no longer exists: the next boot creates one
    BACK_OFF = "back-off"  # it exited by itself: `after_exit` says if it was a crash
    FREEZE_CONTAINER = "freeze-container"  # docker pause it in the background; Thawed if it fails
    PAUSE_RUN = "pause-run"  # its run is frozen: not metered until it resumes
    RESUME_RUN = "resume-run"  # its frozen run goes on from now (its counters are not at zero)


class Say(enum.Enum):
    """Which event a row announces; `step` fills in the details."""

    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"  # its checks failed: the last failure as the reason
    HEALTHY = "healthy"  # a check passed again
    EXITED = "exited"  # it exited by itself: its code, signal, "out of memory"
    FAILED = "failed"  # the boot failed: its reason
    STOP_BEGINS = "stop-begins"  # what the stop's cause begins with, if anything
    STOP_ENDS = "stop-ends"  # what the stop's cause ends with, if anything
    PAUSED = "paused"  # frozen: the trigger's reason (idle for 2s, paused outside Portside)
    RESUMED = "resumed"  # thawed: what woke it


class Rest(enum.Enum):
    """A row's target that depends on the stop in progress."""

    BY_CAUSE = "as the stop's cause rests"


@dataclass(frozen=True)
class Row:
    to: InstanceState | Rest
    effects: tuple[Effect, ...] = ()
    says: tuple[Say, ...] = ()


_RESTING = (_S.PLACED, _S.SLEEPING, _S.STOPPED, _S.STOPPED_WITH_CODE)
_RAN = (_S.SLEEPING, _S.STOPPED, _S.STOPPED_WITH_CODE)  # resting, with a container
_UP = (_S.RUNNING, _S.HEALTHY)

_EXITED = Row(_S.STOPPED_WITH_CODE, (Effect.BACK_OFF, Effect.END_RUN), (Say.EXITED,))
_GONE = Row(_S.STOPPED_WITH_CODE, (Effect.END_RUN, Effect.FORGET_CONTAINER), (Say.EXITED,))
_STOP = Row(_S.STOPPING, (Effect.STOP_CONTAINER,), (Say.STOP_BEGINS,))
_FAILED = Row(_S.STOPPING, (Effect.STOP_CONTAINER,), (Say.FAILED,))
_FROZEN = Row(_S.PAUSED, (Effect.PAUSE_RUN,), (Say.PAUSED,))

TABLE: Mapping[tuple[InstanceState, type[Trigger]], Row] = MappingProxyType(
    {
        **{(s, Boot): Row(_S.STARTING, says=(Say.STARTING,)) for s in _RESTING},
        (_S.STARTING, Started): Row(_S.RUNNING, (Effect.BEGIN_RUN,)),
        (_S.RUNNING, Answered): Row(_S.HEALTHY, says=(Say.READY,)),
        # Health checks move it between the two states of a running container, and nothing else:
        # its container, its run and its sleep timer are left as they are.
        (_S.HEALTHY, CheckFailed): Row(_S.RUNNING, says=(Say.UNHEALTHY,)),
        (_S.RUNNING, CheckPassed): Row(_S.HEALTHY, says=(Say.HEALTHY,)),
        # A die while starting is the previous run's, or comes with docker start's answer:
        # the boot reports that one (Started, then Died), so the pair is rejected.
        **{(s, Died): _EXITED for s in _UP},
        **{(s, EngineStopped): Row(_S.STOPPED, (Effect.END_RUN,), (Say.EXITED,)) for s in _UP},
        (_S.STOPPING, Died): Row(Rest.BY_CAUSE, (Effect.END_RUN,), (Say.STOP_ENDS,)),
        **{(s, Removed): _GONE for s in _UP},
        (_S.STOPPING, Removed): Row(
            Rest.BY_CAUSE, (Effect.END_RUN, Effect.FORGET_CONTAINER), (Say.STOP_ENDS,)
        ),
        **{(s, Removed): Row(s, (Effect.FORGET_CONTAINER,)) for s in _RAN},
        # A boot that gave up stops what it may have started (a create or start that answered
        # too late); one whose container exited only says why it failed.
        (_S.STARTING, BootFailed): _FAILED,
        (_S.RUNNING, BootFailed): _FAILED,
        (_S.STOPPED_WITH_CODE, BootFailed): Row(_S.STOPPED_WITH_CODE, says=(Say.FAILED,)),
        **{(s, Stop): _STOP for s in _UP},
        (_S.STOPPING, StopFailed): Row(_S.STOPPED, (Effect.END_RUN,)),
        (_S.PLACED, FoundRunning): Row(_S.HEALTHY, (Effect.ADOPT_RUN,)),
        (_S.PLACED, FoundStopped): Row(_S.STOPPED),
        # Pause mode. Its run was paused with it (PAUSE_RUN), so its end meters nothing more;
        # a paused container cannot exit by itself (frozen), so no exit of one is a crash.
        (_S.HEALTHY, Pause): Row(
            _S.PAUSED, (Effect.FREEZE_CONTAINER, Effect.PAUSE_RUN), (Say.PAUSED,)
        ),
        **{(s, FoundPaused): _FROZEN for s in _UP},
        (_S.PLACED, FoundPaused): Row(_S.PAUSED),  # adopted frozen: no run to meter
        (_S.PAUSED, Thawed): Row(_S.HEALTHY, (Effect.RESUME_RUN,), (Say.RESUMED,)),
        (_S.PAUSED, Stop): _STOP,
        (_S.PAUSED, Died): Row(_S.STOPPED_WITH_CODE, (Effect.END_RUN,), (Say.EXITED,)),
        (_S.PAUSED, Removed): Row(
            _S.STOPPED_WITH_CODE, (Effect.END_RUN, Effect.FORGET_CONTAINER), (Say.EXITED,)
        ),
        (_S.PAUSED, EngineStopped): Row(_S.STOPPED, (Effect.END_RUN,), (Say.EXITED,)),
    }
)


# -- stepping ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Announce:
    """An event to emit, as the table resolved it."""

    kind: EventKind
    exit_code: int | None = None
    signal: int | None = None  # code - 128 for a code above 128
    reason: str = ""


@dataclass(frozen=True)
class Step:
    """An accepted trigger: the new state, the cause of the stop in progress (stopping only),
    what to do, and what to announce, in order."""

    state: InstanceState
    cause: StopCause | None
    effects: tuple[Effect, ...]
    events: tuple[Announce, ...]


def step(state: InstanceState, cause: StopCause | None, trigger: Trigger) -> Step | None:
    """Where `trigger` takes an instance in `state` (stopping for `cause`); None when the table
    rejects the pair, and nothing changes."""
    row = TABLE.get((state, type(trigger)))
    if row is None:
        return None
    if isinstance(trigger, Stop):
        cause = trigger.cause
    elif isinstance(trigger, BootFailed):
        cause = StopCause.BOOT_FAILED
    if isinstance(row.to, Rest):
        if cause is None:  # stopping always has its cause; a caller's bug otherwise
            raise ValueError(f"{state} without the cause of its stop")
        to = STOP_OUTCOMES[cause].rests_as
    else:
        to = row.to
    events = tuple(e for say in row.says if (e := _announce(say, cause, trigger)) is not None)
    return Step(to, cause if to is _S.STOPPING else None, row.effects, events)


def _announce(say: Say, cause: StopCause | None, trigger: Trigger) -> Announce | None:
    if say is Say.STARTING:
        return Announce(EventKind.STARTING)
    if say is Say.READY:
        return Announce(EventKind.READY)
    if say is Say.UNHEALTHY:
        return Announce(EventKind.UNHEALTHY, reason=getattr(trigger, "reason", ""))
    if say is Say.HEALTHY:
        return Announce(EventKind.HEALTHY, reason=getattr(trigger, "reason", ""))
    if say is Say.FAILED:
        return Announce(EventKind.FAILED, reason=getattr(trigger, "reason", ""))
    if say is Say.PAUSED:
        return Announce(EventKind.PAUSED, reason=getattr(trigger, "reason", ""))
    if say is Say.RESUMED:
        return Announce(EventKind.RESUMED, reason=getattr(trigger, "reason", ""))
    if say is Say.EXITED:
        return _exit(trigger, "")
    outcome = STOP_OUTCOMES[cause] if cause is not None else None
    if say is Say.STOP_BEGINS:
        if outcome is None or outcome.begins_with is None:
            return None
        return Announce(outcome.begins_with, reason=getattr(trigger, "reason", ""))
    if outcome is None or outcome.ends_with is None:
        return None
    if outcome.ends_with is EventKind.EXITED:
        return _exit(trigger, outcome.reason)
    return Announce(outcome.ends_with, reason=outcome.reason)


def _exit(trigger: Trigger, reason: str) -> Announce:
    """`exited` with the death's code and signal; "out of memory" outranks any other reason."""
    code = trigger.exit_code if isinstance(trigger, Died | EngineStopped) else None
    oom = isinstance(trigger, Died) and trigger.oom
    if isinstance(trigger, EngineStopped):
        reason = ENGINE_RESTARTED
    signal = code - 128 if code is not None and code > 128 else None
    return Announce(
        EventKind.EXITED, exit_code=code, signal=signal, reason="out of memory" if oom else reason
    )


# -- crash-loop backoff ----------------------------------------------------------------------------

CRASH_WINDOW_S = 10.0  # an exit this soon after its start, before it served a request, is a crash
STEADY_S = 600.0  # a run this long forgives the crashes before it
BACKOFF_FIRST_S = 1.0  # the wait after the first crash; it doubles with each crash in a row
BACKOFF_MOST_S = 300.0


@dataclass(frozen=True)
class RunEnd:
    """How a container's run ended by itself: its exit code; how long it ran (None: unknown, an
    adopted run); whether its port had answered (False: it died during its boot); whether it had
    answered a request."""

    exit_code: int | None
    ran_s: float | None
    answered: bool
    served: bool

    @property
    def crashed(self) -> bool:
        """Died during its boot, or soon after it without ever serving: it cannot stay up. A run
        that served a request and then died is booted again at once on the next request."""
        if not self.answered:
            return True
        return self.ran_s is not None and self.ran_s < CRASH_WINDOW_S and not self.served


@dataclass(frozen=True)
class CrashLoop:
    """An instance's crash-loop backoff: `crashes` in a row, the last one's `exit_code`, and
    `retry_at`, the time (on the manager's clock) before which no boot is tried."""

    crashes: int = 0
    exit_code: int | None = None
    retry_at: float = 0.0
    delay_s: float = 0.0  # the wait the last crash set

    def wait_s(self, now: float) -> float:
        """Seconds until the next boot may be tried; 0.0: now."""
        return max(0.0, self.retry_at - now)

    def holds_back(self, now: float) -> bool:
        return self.wait_s(now) > 0.0

    def refusal(self, now: float) -> str:
        """What a request refused during the wait is told: "exited with code 3 at start; next
        try in 4s" (whole seconds, rounded up)."""
        return (
            f"exited with code {self.exit_code} at start; "
            f"next try in {math.ceil(self.wait_s(now))}s"
        )

    def ran_steadily(self, up_s: float) -> CrashLoop:
        """A run up for `up_s` so far: past STEADY_S the crashes before it are forgiven."""
        return CrashLoop() if self.crashes and up_s >= STEADY_S else self


def backoff_delay(crashes: int) -> float:
    """The wait after `crashes` crashes in a row: 1 s, 2, 4 … capped at 5 minutes."""
    if crashes <= 0:
        return 0.0
    return min(BACKOFF_FIRST_S * 2.0 ** min(crashes - 1, 30), BACKOFF_MOST_S)


def after_exit(loop: CrashLoop, end: RunEnd, now: float) -> CrashLoop:
    """The backoff after a run ended by itself at `now`. A crash counts and waits twice as long
    as the last one; any other exit waits for nothing, and a run of STEADY_S or more also
    forgets the count (as a Start or a deploy does: `CrashLoop()`)."""
    if end.crashed:
        crashes = loop.crashes + 1
        delay = backoff_delay(crashes)
        return CrashLoop(crashes, end.exit_code, now + delay, delay)
    if end.ran_s is not None and end.ran_s >= STEADY_S:
        return CrashLoop()
    return replace(loop, retry_at=0.0, delay_s=0.0)


__all__ = [
    "BACKOFF_FIRST_S",
    "BACKOFF_MOST_S",
    "CRASH_WINDOW_S",
    "STEADY_S",
    "STOP_OUTCOMES",
    "TABLE",
    "TRIGGERS",
    "Announce",
    "Answered",
    "Boot",
    "BootFailed",
    "CheckFailed",
    "CheckPassed",
    "CrashLoop",
    "Died",
    "ENGINE_RESTARTED",
    "Effect",
    "EngineStopped",
    "FoundPaused",
    "FoundRunning",
    "FoundStopped",
    "Pause",
    "Removed",
    "Rest",
    "Row",
    "RunEnd",
    "Say",
    "Started",
    "Step",
    "Stop",
    "StopCause",
    "StopFailed",
    "StopOutcome",
    "Thawed",
    "Trigger",
    "after_exit",
    "backoff_delay",
    "step",
]
