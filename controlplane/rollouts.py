"""Rollouts (issue 12): the record of a class's rollout to a version, kept in the store, and the
pure planner that moves it on from a snapshot of the class's instances (no I/O, no clock).

Keys: /portside/rollouts/<class> → the class's latest rollout (JSON), written with
compare-and-swap by the leader's loop (controlplane.rolloutloop) and by ControlRollout/Rollback.

A rollout counts the class's awake instances and those already on `to_version`; sleeping ones on
an older version are not counted and not waited for: they move at their next wake (the class's
wake_min_version). Step k wants ceil(steps[k]% × N) of them (at least 1 when N > 0) on
`to_version`, then waits the grace period, then wants every instance on `to_version` healthy
within the health deadline; otherwise it rolls back (or pauses). A rollback rollout (mode
"rollback") ends in the state "rolled_back" instead of "done", and never rolls itself back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from controlplane.records import ROOT
from portside.api.v1 import controlplane_pb2 as cp
from portside.client import Rollout
from portside.convert import rollout_to_pb
from portside.errors import InvalidArgument
from portside.spec import ContainerClass
from portside.states import InstanceState

ROLLOUTS = ROOT + "rollouts/"

GRADUAL, IMMEDIATE, NONE, ROLLBACK = "gradual", "immediate", "none", "rollback"
DEPLOY_MODES = (GRADUAL, IMMEDIATE, NONE)  # what DeployRequest.rollout may say
ROLLING, WAITING, PAUSED = "rolling", "waiting", "paused"
DONE, ABORTED, ROLLED_BACK = "done", "aborted", "rolled_back"
MOVING = frozenset((ROLLING, WAITING))  # the leader's loop drives these
IN_PROGRESS = frozenset((ROLLING, WAITING, PAUSED))  # not ended: pause, resume, abort apply

# New-version instances in these states fail a step's health check: not serving yet (starting,
# or running with failing checks or a port that does not answer) or exited by themselves.
_FAILING = frozenset(
    (InstanceState.STARTING, InstanceState.RUNNING, InstanceState.STOPPED_WITH_CODE)
)
_NAMES_IN_REASON = 3  # instances named in a reason, the rest counted


def rollout_key(class_name: str) -> str:
    return ROLLOUTS + class_name


def deploy_mode(text: str) -> str:
    """DeployRequest.rollout read: "" is gradual; InvalidArgument for another word."""
    mode = text or GRADUAL
    if mode not in DEPLOY_MODES:
        raise InvalidArgument(
            f"rollout: {text!r} is not a rollout mode; one of gradual, immediate, none"
        )
    return mode


@dataclass(frozen=True)
class RolloutRecord:
    """The proto Rollout's fields, plus what the loop needs between ticks: when the step reached
    its count (its grace period and health deadline count from then), the instances to replace
    now (every replica's heartbeat replies read them: a node's stream may be on any replica),
    and the class's wake_min_version before the rollout (an abort puts it back)."""

    class_name: str
    to_version: int
    from_versions: tuple[int, ...] = ()
    mode: str = GRADUAL
    steps: tuple[int, ...] = (100,)
    step: int = 0
    state: str = ROLLING
    reason: str = ""
    started_at: float = 0.0
    step_started_at: float = 0.0
    instances: int = 0
    updated: int = 0
    healthy: int = 0
    step_reached_at: float = 0.0  # 0: the step has not reached its count yet
    replace: tuple[str, ...] = ()  # instance ids
    previous_wake_min_version: int = 0

    @property
    def moving(self) -> bool:
        return self.state in MOVING

    @property
    def in_progress(self) -> bool:
        return self.state in IN_PROGRESS

    @property
    def percentage(self) -> int:
        return self.steps[min(self.step, len(self.steps) - 1)]

    def encode(self) -> bytes:
        body = asdict(self)
        for name in ("from_versions", "steps", "replace"):
            body[name] = list(body[name])
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> RolloutRecord:
        body: dict[str, Any] = json.loads(data)
        known = {f for f in cls.__dataclass_fields__}
        body = {k: v for k, v in body.items() if k in known}  # a newer control plane's fields
        for name in ("from_versions", "steps", "replace"):
            if name in body:
                body[name] = tuple(body[name])
        return cls(**body)

    def to_pb(self) -> cp.Rollout:
        """What the API says of it: the public Rollout's fields (the contract, portside/)."""
        public = {f.name: getattr(self, f.name) for f in fields(Rollout)}
        return rollout_to_pb(Rollout(**public))


@dataclass(frozen=True)
class RolloutPolicy:
    """What the class says about moving its instances. `stall_s`: a step that has not reached
    its count this long after it began (a replacement waits at most stop_timeout for the old
    container, then boot_timeout for the new one) counts as unhealthy too."""

    grace_s: float
    health_deadline_s: float
    on_unhealthy: str  # rollback | pause
    stall_s: float
    pool: bool  # a pool is replaced one member at a time, by surge (controlplane.pools)

    @classmethod
    def of(cls, c: ContainerClass) -> RolloutPolicy:
        return cls(
            grace_s=c.rollout_active_grace_period_s,
            health_deadline_s=c.rollout_health_deadline_s,
            on_unhealthy=c.rollout_on_unhealthy,
            stall_s=c.stop_timeout_s + c.boot_timeout_s + c.rollout_health_deadline_s,
            pool=c.pool,
        )


def steps_for(c: ContainerClass, mode: str) -> tuple[int, ...]:
    """Gradual: the class's steps (its default: [10, 100] when it may have 2 or more
    instances, else [100]); immediate and rollback: one step of 100%."""
    return c.rollout_steps() if mode == GRADUAL else (100,)


@dataclass(frozen=True)
class RolloutInstance:
    """One of the class's instances as the planner sees it: from its node's last heartbeat
    (state PLACED and version 0 before its first report; STOPPED when its node is gone)."""

    instance_id: str
    name: str
    node_id: str
    version: int
    state: InstanceState
    in_flight: int = 0
    pool: bool = False
    draining: bool = False


def from_versions(instances: Iterable[RolloutInstance], to_version: int) -> tuple[int, ...]:
    """The versions the class's awake instances run other than `to_version`, ascending."""
    return tuple(
        sorted({i.version for i in instances if i.state.awake and i.version not in (0, to_version)})
    )


def counted(instances: Iterable[RolloutInstance], to_version: int) -> list[RolloutInstance]:
    """The instances a rollout counts: those on `to_version` (whatever their state) and the
    awake ones on other versions; not draining pool members, not sleeping old ones."""
    return [
        i
        for i in instances
        if not i.draining and (i.version == to_version or (i.state.awake and i.version != 0))
    ]


def has_awake_old(instances: Iterable[RolloutInstance], to_version: int) -> bool:
    """Whether a rollout to `to_version` would have anything to replace now."""
    return any(
        i.state.awake and not i.draining and i.version not in (0, to_version) for i in instances
    )


@dataclass(frozen=True)
class Plan:
    """The planner's answer. `record`: the rollout's next record (`record.replace`: the instances
    to replace now). `outcome`: what this tick decided, for logs and metrics: "" (nothing
    new), "reached" (the step has its count: grace and health next), "step" (a step done, the
    next begun), "done", "paused", "rollback" (roll back to `rollback_to`, the loop does it).
    `asked`: instances listed now that were not listed before. `cause` of a pause or rollback:
    "unhealthy" (new instances failing past the deadline) or "stalled" (a step short of its
    count)."""

    record: RolloutRecord
    outcome: str = ""
    rollback_to: int = 0
    cause: str = ""
    asked: tuple[str, ...] = ()
    steps_done: int = 0


def target_count(percentage: int, n: int) -> int:
    """How many of `n` instances a step of `percentage` wants on the new version: the ceiling,
    at least 1 when there is any, never more than n."""
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(percentage * n / 100)))


def plan_rollout(
    record: RolloutRecord,
    policy: RolloutPolicy,
    instances: Sequence[RolloutInstance],
    now: float,
) -> Plan:
    """Move the rollout on by what the snapshot shows (see the module docstring). A rollout
    that is not rolling or waiting is left as it is, with nothing to replace."""
    if not record.moving:
        return Plan(replace(record, replace=()) if record.replace else record)
    # A step that reaches its count with no grace period to wait is checked at once, and a
    # finished step starts the next at once (its replacements too): a class with nothing awake
    # goes through every step in one tick.
    current = _plan_step(record, policy, instances, now)
    outcome, asked, steps_done = current.outcome, list(current.asked), 0
    while current.outcome in ("step", "reached"):
        steps_done += current.outcome == "step"
        current = _plan_step(current.record, policy, instances, now)
        asked += current.asked
        outcome = current.outcome or outcome
    steps_done += outcome == "done"
    return replace(
        current, outcome=outcome, asked=tuple(dict.fromkeys(asked)), steps_done=steps_done
    )


def _plan_step(
    record: RolloutRecord,
    policy: RolloutPolicy,
    instances: Sequence[RolloutInstance],
    now: float,
) -> Plan:
    to = record.to_version
    population = counted(instances, to)
    updated = [i for i in population if i.version == to]
    old = [i for i in population if i.version != to]
    healthy = [i for i in updated if i.state is InstanceState.HEALTHY]
    failing = [i for i in updated if i.state in _FAILING]
    target = target_count(record.percentage, len(population))
    need = max(0, target - len(updated))

    # Replacements: those asked before and still old stay listed (their agent may be in the
    # middle of one: stop_timeout can be long); then the idlest of the rest. A pool moves one
    # member at a time (its surge), named instances as many as the step needs.
    listed = set(record.replace)
    keep = [i.instance_id for i in old if i.instance_id in listed] if need else []
    room = (1 if policy.pool else need) - len(keep)
    fresh = sorted(
        (i for i in old if i.instance_id not in listed), key=lambda i: (i.in_flight, i.name)
    )
    picks = [i.instance_id for i in fresh[: max(0, room)]] if need else []
    counts = replace(
        record,
        instances=len(population),
        updated=len(updated),
        healthy=len(healthy),
        replace=tuple(keep + picks),
    )
    asked = tuple(picks)

    reached_at = record.step_reached_at
    if not reached_at:
        if len(updated) < target:
            if now - record.step_started_at >= policy.stall_s:
                why = (
                    f"step {record.step + 1} ({record.percentage}%) has {len(updated)} of its "
                    f"{target} instances on version {to} after {policy.stall_s:g}s"
                )
                return _unhealthy(counts, policy, why, "stalled")
            return Plan(replace(counts, state=ROLLING), asked=asked)
        return Plan(replace(counts, state=WAITING, step_reached_at=now), "reached", asked=asked)

    waiting = replace(counts, state=WAITING)
    if now < reached_at + policy.grace_s:
        return Plan(waiting, asked=asked)
    if len(updated) >= target and not failing:
        if record.step + 1 >= len(record.steps):
            return Plan(
                replace(
                    waiting, state=ROLLED_BACK if record.mode == ROLLBACK else DONE, replace=()
                ),
                "done",
            )
        return Plan(
            replace(
                waiting,
                state=ROLLING,
                step=record.step + 1,
                step_started_at=now,
                step_reached_at=0.0,
                replace=(),
            ),
            "step",
        )
    if now >= reached_at + policy.grace_s + policy.health_deadline_s:
        cause = "unhealthy" if failing else "stalled"
        if failing:
            why = (
                f"{_listing(failing)} on version {to} not healthy within "
                f"{policy.health_deadline_s:g}s"
            )
        else:
            why = (
                f"step {record.step + 1} lost its count "
                f"({len(updated)} of {target} on version {to})"
            )
        return _unhealthy(counts, policy, why, cause)
    return Plan(waiting, asked=asked)


def _unhealthy(record: RolloutRecord, policy: RolloutPolicy, why: str, cause: str) -> Plan:
    """Roll back to the newest version the rollout came from, or pause: as the class says, and
    always for a rollback rollout (a rollback never rolls itself back) or one with nowhere to
    go back to."""
    if policy.on_unhealthy == "rollback" and record.mode != ROLLBACK and record.from_versions:
        back = max(record.from_versions)
        return Plan(
            replace(record, state=ROLLED_BACK, reason=why, replace=()),
            "rollback",
            rollback_to=back,
            cause=cause,
        )
    return Plan(replace(record, state=PAUSED, reason=why, replace=()), "paused", cause=cause)


def _listing(instances: Sequence[RolloutInstance]) -> str:
    named = ", ".join(f"{i.name} ({i.state.value})" for i in instances[:_NAMES_IN_REASON])
    more = len(instances) - _NAMES_IN_REASON
    return named + (f" and {more} more" if more > 0 else "")


def control(record: RolloutRecord, action: str, now: float) -> RolloutRecord:
    """The record after a user's pause, resume or abort; ValueError (the reason) when it does
    not apply. Resume starts the step's grace and health deadline afresh."""
    if action == "pause":
        if not record.moving:
            raise ValueError(
                f"the rollout of {record.class_name} is {record.state}: nothing to pause"
            )
        return replace(record, state=PAUSED, reason="paused by a user", replace=())
    if action == "resume":
        if record.state != PAUSED:
            raise ValueError(
                f"the rollout of {record.class_name} is {record.state}, not paused: "
                "nothing to resume"
            )
        return replace(
            record,
            state=ROLLING,
            reason="",
            step_started_at=now,
            step_reached_at=0.0,
        )
    if action == "abort":
        if not record.in_progress:
            raise ValueError(
                f"the rollout of {record.class_name} is {record.state}: nothing to abort"
            )
        return replace(record, state=ABORTED, reason="aborted by a user", replace=())
    raise InvalidArgument(f"action: {action!r} is not one of pause, resume, abort")
