"""Tests for controlplane.rollouts: the planner over fake snapshots of a class's instances, the
record's encoding, and the user's pause/resume/abort. No store, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controlplane.rollouts import (
    ABORTED,
    DONE,
    IMMEDIATE,
    PAUSED,
    ROLLBACK,
    ROLLED_BACK,
    ROLLING,
    WAITING,
    RolloutInstance,
    RolloutPolicy,
    RolloutRecord,
    control,
    counted,
    deploy_mode,
    from_versions,
    has_awake_old,
    plan_rollout,
    rollout_key,
    steps_for,
    target_count,
)
from portside.errors import InvalidArgument
from portside.spec import ContainerClass
from portside.states import InstanceState as S

T0 = 1_000.0
POLICY = RolloutPolicy(
    grace_s=0.0, health_deadline_s=60.0, on_unhealthy="rollback", stall_s=600.0, pool=False
)


def inst(
    n: int, version: int = 1, state: S = S.HEALTHY, in_flight: int = 0, *, pool: bool = False
) -> RolloutInstance:
    return RolloutInstance(
        instance_id=f"id-{n:02d}",
        name=f"web-{n:02d}",
        node_id=f"node-{n % 2}",
        version=version,
        state=state,
        in_flight=in_flight,
        pool=pool,
    )


def rollout(steps: tuple[int, ...] = (10, 100), **kw: object) -> RolloutRecord:
    base = RolloutRecord(
        class_name="web",
        to_version=2,
        from_versions=(1,),
        steps=steps,
        started_at=T0,
        step_started_at=T0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def moved(
    instances: list[RolloutInstance], ids: tuple[str, ...], state: S = S.HEALTHY
) -> list[RolloutInstance]:
    """The snapshot after the agents replaced `ids`: those on version 2 in `state`."""
    return [replace(i, version=2, state=state) if i.instance_id in ids else i for i in instances]


@pytest.mark.parametrize(
    ("percentage", "n", "want"),
    [(10, 10, 1), (10, 1, 1), (10, 25, 3), (50, 3, 2), (100, 7, 7), (10, 0, 0), (1, 500, 5)],
)
def test_target_count_is_the_ceiling_and_at_least_one(percentage: int, n: int, want: int) -> None:
    assert target_count(percentage, n) == want


def test_ten_instances_in_steps_of_10_and_100_move_one_then_all() -> None:
    fleet = [inst(n, in_flight=n) for n in range(10)]
    first = plan_rollout(rollout(), POLICY, fleet, T0 + 1)
    assert first.record.state == ROLLING
    assert first.record.replace == ("id-00",)  # the idlest
    assert first.asked == ("id-00",)
    assert (first.record.instances, first.record.updated) == (10, 0)

    fleet = moved(fleet, first.record.replace)
    second = plan_rollout(first.record, POLICY, fleet, T0 + 5)
    # Reached, no grace, healthy: the next step begins at once with its replacements.
    assert second.record.step == 1
    assert second.record.state == ROLLING
    assert second.record.step_started_at == T0 + 5
    assert len(second.record.replace) == 9
    assert "id-00" not in second.record.replace  # already on the version: never asked again
    assert second.steps_done == 1

    fleet = moved(fleet, second.record.replace)
    third = plan_rollout(second.record, POLICY, fleet, T0 + 9)
    assert third.record.state == DONE
    assert third.outcome == "done"
    assert third.record.replace == ()
    assert (third.record.instances, third.record.updated, third.record.healthy) == (10, 10, 10)


def test_one_instance_with_one_step_is_replaced_and_done() -> None:
    record = rollout(steps=(100,))
    plan = plan_rollout(record, POLICY, [inst(0)], T0)
    assert plan.record.replace == ("id-00",)
    done = plan_rollout(plan.record, POLICY, moved([inst(0)], ("id-00",)), T0 + 3)
    assert done.record.state == DONE


def test_a_step_waits_its_grace_period_before_the_next() -> None:
    policy = replace(POLICY, grace_s=30.0)
    fleet = moved([inst(n) for n in range(10)], ("id-00",))
    reached = plan_rollout(rollout(), policy, fleet, T0 + 2)
    assert reached.outcome == "reached"
    assert reached.record.state == WAITING
    assert reached.record.step_reached_at == T0 + 2
    assert reached.record.replace == ()
    still = plan_rollout(reached.record, policy, fleet, T0 + 31)
    assert still.record.state == WAITING and still.record.step == 0
    after = plan_rollout(reached.record, policy, fleet, T0 + 32)
    assert after.record.step == 1 and after.outcome == "step"


def test_unhealthy_new_instances_past_the_deadline_roll_back() -> None:
    fleet = moved([inst(n) for n in range(10)], ("id-00",), state=S.STOPPED_WITH_CODE)
    record = rollout(from_versions=(0, 1), state=WAITING, step_reached_at=T0 + 2)
    waiting = plan_rollout(record, POLICY, fleet, T0 + 61)
    assert waiting.record.state == WAITING and waiting.outcome == ""
    plan = plan_rollout(record, POLICY, fleet, T0 + 62)
    assert plan.outcome == "rollback"
    assert plan.rollback_to == 1
    assert plan.cause == "unhealthy"
    assert plan.record.state == ROLLED_BACK
    assert "web-00 (stopped_with_code) on version 2 not healthy within 60s" in plan.record.reason


def test_unhealthy_with_on_unhealthy_pause_pauses() -> None:
    fleet = moved([inst(n) for n in range(10)], ("id-00",), state=S.RUNNING)
    record = rollout(state=WAITING, step_reached_at=T0)
    plan = plan_rollout(record, replace(POLICY, on_unhealthy="pause"), fleet, T0 + 60)
    assert plan.outcome == "paused"
    assert plan.record.state == PAUSED
    assert "web-00 (running)" in plan.record.reason


def test_a_rollback_rollout_never_rolls_itself_back() -> None:
    fleet = [inst(0, version=2), inst(1, version=1, state=S.STARTING)]
    record = RolloutRecord(
        class_name="web",
        to_version=1,
        from_versions=(2,),
        mode=ROLLBACK,
        steps=(100,),
        state=WAITING,
        step_reached_at=T0,
        started_at=T0,
        step_started_at=T0,
    )
    plan = plan_rollout(record, POLICY, fleet, T0 + 100)
    assert plan.outcome == "paused"


def test_a_rollback_rollout_ends_rolled_back() -> None:
    record = RolloutRecord(
        class_name="web", to_version=1, from_versions=(2,), mode=ROLLBACK, steps=(100,)
    )
    plan = plan_rollout(record, POLICY, [inst(0, version=1)], T0)
    assert plan.record.state == ROLLED_BACK
    assert plan.outcome == "done"


def test_a_step_that_never_reaches_its_count_stalls() -> None:
    fleet = [inst(n) for n in range(10)]  # the asked one never moved
    record = rollout(replace=("id-00",))
    assert plan_rollout(record, POLICY, fleet, T0 + 599).record.state == ROLLING
    plan = plan_rollout(record, POLICY, fleet, T0 + 600)
    assert plan.outcome == "rollback"
    assert plan.cause == "stalled"
    assert "has 0 of its 1 instances on version 2 after 600s" in plan.record.reason


@pytest.mark.parametrize("state", [PAUSED, ABORTED, DONE, ROLLED_BACK])
def test_a_rollout_not_moving_does_nothing(state: str) -> None:
    record = rollout(state=state, replace=("id-03",))
    plan = plan_rollout(record, POLICY, [inst(n) for n in range(10)], T0 + 10_000)
    assert plan.outcome == ""
    assert plan.record == replace(record, replace=())
    assert plan.asked == ()


def test_sleeping_instances_are_neither_replaced_nor_counted() -> None:
    fleet = [inst(n, state=S.SLEEPING) for n in range(6)]
    fleet += [inst(n) for n in range(6, 10)]
    plan = plan_rollout(rollout(steps=(50, 100)), POLICY, fleet, T0)
    assert plan.record.instances == 4  # the awake ones
    assert set(plan.record.replace) == {"id-06", "id-07"}


def test_a_class_with_nothing_awake_is_done_at_once() -> None:
    fleet = [inst(n, state=S.SLEEPING) for n in range(3)] + [inst(9, version=0, state=S.PLACED)]
    plan = plan_rollout(rollout(), POLICY, fleet, T0)
    assert plan.record.state == DONE
    assert plan.steps_done == 2
    assert plan.record.instances == 0


def test_idle_instances_are_replaced_first() -> None:
    fleet = [inst(0, in_flight=5), inst(1, in_flight=0), inst(2, in_flight=2), inst(3, in_flight=1)]
    plan = plan_rollout(rollout(steps=(50, 100)), POLICY, fleet, T0)
    assert plan.record.replace == ("id-01", "id-03")


def test_asked_instances_stay_listed_while_they_are_old_and_are_not_asked_again() -> None:
    fleet = [inst(n, in_flight=10 - n) for n in range(4)]
    record = rollout(steps=(50, 100), replace=("id-00",))
    plan = plan_rollout(record, POLICY, fleet, T0 + 1)
    assert plan.record.replace == ("id-00", "id-03")  # kept, then the idlest of the rest
    assert plan.asked == ("id-03",)
    # Being replaced: its old container stopping (still version 1) is still listed.
    fleet = [replace(fleet[0], state=S.STOPPING)] + fleet[1:]
    again = plan_rollout(plan.record, POLICY, fleet, T0 + 2)
    assert again.record.replace == ("id-00", "id-03")
    assert again.asked == ()


def test_a_pool_is_replaced_one_member_at_a_time() -> None:
    policy = replace(POLICY, pool=True)
    fleet = [inst(n, pool=True) for n in range(4)]
    record = rollout(steps=(100,), mode=IMMEDIATE)
    first = plan_rollout(record, policy, fleet, T0)
    assert first.record.replace == ("id-00",)
    # The surge member (version 2, booting) is counted; the old one is still listed.
    surge = RolloutInstance("id-90", "web-90", "node-0", 2, S.STARTING, pool=True)
    second = plan_rollout(first.record, policy, [*fleet, surge], T0 + 1)
    assert second.record.replace == ("id-00",)
    assert (second.record.instances, second.record.updated) == (5, 1)
    # Ready: the pool manager drains the old member; the next one is listed.
    drained = replace(fleet[0], draining=True)
    ready = replace(surge, state=S.HEALTHY)
    third = plan_rollout(second.record, policy, [drained, *fleet[1:], ready], T0 + 2)
    assert third.record.replace == ("id-01",)
    assert third.record.instances == 4


def test_counted_and_from_versions() -> None:
    fleet = [
        inst(0, version=1),
        inst(1, version=3, state=S.SLEEPING),
        inst(2, version=2, state=S.SLEEPING),
        inst(3, version=0, state=S.PLACED),
        inst(4, version=0, state=S.HEALTHY),
        replace(inst(5, version=1), draining=True),
    ]
    assert [i.name for i in counted(fleet, 2)] == ["web-00", "web-02"]
    assert from_versions(fleet, 2) == (1,)
    assert has_awake_old(fleet, 2)
    assert not has_awake_old(fleet, 1)


def test_record_round_trips_and_reads_a_newer_records_fields() -> None:
    record = rollout(replace=("a", "b"), step_reached_at=T0 + 1, previous_wake_min_version=3)
    assert RolloutRecord.decode(record.encode()) == record
    newer = record.encode().replace(b"{", b'{"surge_budget":2,', 1)
    assert RolloutRecord.decode(newer) == record
    message = record.to_pb()
    assert list(message.steps) == [10, 100]
    assert (message.to_version, message.state, message.mode) == (2, ROLLING, "gradual")
    assert rollout_key("web") == "/portside/rollouts/web"


def test_pause_resume_abort() -> None:
    record = rollout(state=WAITING, step_reached_at=T0, replace=("x",))
    paused = control(record, "pause", T0 + 5)
    assert (paused.state, paused.replace) == (PAUSED, ())
    with pytest.raises(ValueError, match="nothing to pause"):
        control(paused, "pause", T0 + 6)
    resumed = control(paused, "resume", T0 + 7)
    assert (resumed.state, resumed.step_started_at, resumed.step_reached_at) == (
        ROLLING,
        T0 + 7,
        0.0,
    )
    with pytest.raises(ValueError, match="not paused"):
        control(resumed, "resume", T0 + 8)
    aborted = control(resumed, "abort", T0 + 9)
    assert aborted.state == ABORTED
    with pytest.raises(ValueError, match="aborted: nothing to abort"):
        control(aborted, "abort", T0 + 10)
    with pytest.raises(InvalidArgument):
        control(record, "restart", T0)


def test_deploy_mode_and_steps() -> None:
    assert deploy_mode("") == "gradual"
    assert deploy_mode("none") == "none"
    with pytest.raises(InvalidArgument, match="one of gradual, immediate, none"):
        deploy_mode("fast")
    many = ContainerClass(name="web", image="x", max_instances=5)
    assert steps_for(many, "gradual") == (10, 100)
    assert steps_for(many, "immediate") == (100,)
    assert steps_for(ContainerClass(name="one", image="x", max_instances=1), "gradual") == (100,)
    custom = replace(many, rollout_step_percentage=(25, 50, 100))
    assert steps_for(custom, "gradual") == (25, 50, 100)
    assert steps_for(custom, ROLLBACK) == (100,)
