"""The agent's fencing clock: when a node may serve named instances (pure, on a fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from nodeagent import fence as fence_module
from nodeagent.fence import Fence
from portside.errors import NodeFenced
from portside.spec import instance_id


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def serving(clock: Clock, fence_after_s: float = 7.0) -> Fence:
    fence = Fence(fence_after_s, clock=clock)
    fence.sent()
    fence.replied(confirmed=True)
    fence.reconciled(set())
    return fence


def test_a_fresh_agent_is_fenced_until_its_first_reconcile() -> None:
    clock = Clock()
    fence = Fence(7.0, clock=clock)
    assert fence.fenced
    fence.sent()
    fence.replied(confirmed=True)
    assert fence.fenced, "a confirmed lease alone does not vouch for adopted containers"
    fence.reconciled(set())
    assert not fence.fenced


def test_the_fence_closes_fence_after_the_send_of_the_last_confirmed_message() -> None:
    clock = Clock()
    fence = serving(clock)
    clock.now += 7.0
    assert fence.allows_named()
    clock.now += 0.01
    assert not fence.allows_named()
    assert "last confirmed 7.0s ago" in fence.reason()


def test_time_counts_from_the_send_not_from_the_reply() -> None:
    clock = Clock()
    fence = serving(clock)
    fence.sent()  # sent at 1000, answered only 6 s later
    clock.now += 6.0
    fence.replied(confirmed=True)
    clock.now += 1.5  # 7.5 s after that send
    assert fence.fenced


def test_an_unconfirmed_reply_does_not_move_the_fence() -> None:
    clock = Clock()
    fence = serving(clock)
    clock.now += 3.0
    fence.sent()
    fence.replied(confirmed=False)
    clock.now += 4.5
    assert fence.fenced


def test_replies_pair_with_messages_in_order() -> None:
    clock = Clock()
    fence = serving(clock)
    fence.sent()  # at 1000
    clock.now += 2.0
    fence.sent()  # at 1002
    fence.replied(confirmed=False)  # the first: not confirmed
    fence.replied(confirmed=True)  # the second, sent at 1002
    clock.now = 1002.0 + 7.0
    assert fence.allows_named()
    clock.now += 0.1
    assert fence.fenced


def test_a_lost_stream_forgets_its_unanswered_messages() -> None:
    clock = Clock()
    fence = serving(clock)
    clock.now += 5.0
    fence.sent()
    fence.stream_lost()
    fence.replied(confirmed=True)  # a reply of the new stream, with no message: nothing moves
    clock.now += 2.5
    assert fence.fenced


def test_instances_placed_elsewhere_stay_refused_until_removed() -> None:
    clock = Clock()
    fence = serving(clock)
    moved = instance_id("chat", "moved")
    fence.sent()
    fence.replied(confirmed=True)
    fence.reconciled({moved})
    assert not fence.allows_named(moved)
    assert fence.allows_named(instance_id("chat", "stayed"))
    assert "placed this instance on another node" in fence.reason(moved)
    fence.removed(moved)
    assert fence.allows_named(moved)


def test_the_window_follows_the_control_plane() -> None:
    clock = Clock()
    fence = serving(clock)
    fence.sent()
    fence.replied(confirmed=True, fence_after_s=2.0)
    clock.now += 2.1
    assert fence.fenced


def test_admit_refuses_with_node_fenced_naming_the_instance() -> None:
    clock = Clock()
    fence = serving(clock)
    clock.now += 8.0

    with pytest.raises(NodeFenced, match="chat/alice may be placed elsewhere"):
        asyncio.run(fence.admit("chat", "alice"))


def test_admit_waits_briefly_for_the_first_reconcile(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    fence = Fence(7.0, clock=clock)

    async def scenario() -> None:
        async def reconcile_soon() -> None:
            await asyncio.sleep(0.05)
            fence.sent()
            fence.replied(confirmed=True)
            fence.reconciled(set())

        task = asyncio.create_task(reconcile_soon())
        await fence.admit("chat", "alice")
        await task

    asyncio.run(scenario())

    monkeypatch.setattr(fence_module, "STARTUP_WAIT_S", 0.05)
    never = Fence(7.0, clock=clock)
    with pytest.raises(NodeFenced, match="not yet checked its instances"):
        asyncio.run(never.admit("chat", "alice"))
