"""Pushed pool assignments (PoolKeeper.assign, the AssignPool RPC) over a fake runtime: a push
starts the member at once, and a heartbeat reply that does not list it yet (made before the
placement, or by a replica whose view lags) does not drain it until PUSH_GRACE_S has passed."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from nodeagent import pools
from nodeagent.pools import PoolKeeper
from portside.instances import PoolAssignment
from portside.spec import Autoscaling, instance_id
from tests.support import eventually
from tests.unit.nodeagent.test_instances import Probe
from tests.unit.nodeagent.test_replace import V1, VersionRuntime, manager_for

POOL = dataclasses.replace(V1, name="pool", autoscaling=Autoscaling(minimum_instances=1))
MEMBER = PoolAssignment("pool", "m1", instance_id("pool", "m1"), draining=False)


def running(runtime: VersionRuntime) -> int:
    return sum(1 for c in runtime.containers.values() if c.running)


async def test_a_push_starts_the_member_and_a_reply_without_it_keeps_it_within_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pools, "PUSH_GRACE_S", 1.0)
    runtime = VersionRuntime()
    manager, _ = manager_for(runtime, Probe(), {"pool": POOL})
    keeper = PoolKeeper(manager, {"pool": POOL}.get)
    try:
        keeper.assign(MEMBER)
        await eventually(lambda: MEMBER.instance_id in manager.pinned and running(runtime) == 1)
        keeper.apply([])  # a reply that does not know of it yet
        await asyncio.sleep(0.1)  # a drain, had one been started, would have stopped it by now
        assert MEMBER.instance_id in manager.pinned and running(runtime) == 1
        await eventually(lambda: not keeper.tasks)

        # Past the grace, a reply that still does not list it is the truth: drained.
        def reply_without_it() -> bool:
            keeper.apply([])
            return MEMBER.instance_id not in manager.pinned

        await eventually(reply_without_it)
        await eventually(lambda: running(runtime) == 0)
    finally:
        await keeper.close()


async def test_a_reply_that_lists_the_pushed_member_takes_over() -> None:
    runtime = VersionRuntime()
    manager, _ = manager_for(runtime, Probe(), {"pool": POOL})
    keeper = PoolKeeper(manager, {"pool": POOL}.get)
    try:
        keeper.assign(MEMBER)
        keeper.apply([MEMBER])  # listed: the push's grace is no longer needed
        assert keeper.pushed == {}
        await eventually(lambda: running(runtime) == 1)
        assert runtime.count("create") == 1, "the push and the reply start it once"
        keeper.apply([dataclasses.replace(MEMBER, draining=True)])
        await eventually(lambda: running(runtime) == 0)
    finally:
        await keeper.close()
