"""Unit tests of the agent's event outbox: order, one batch per heartbeat message, resending what
the control plane did not acknowledge, and the bound that drops the oldest."""

from __future__ import annotations

from nodeagent import events as outbox_module
from nodeagent.events import EventOutbox
from portside.events import Event, EventKind


def event(n: int) -> Event:
    return Event(
        kind=EventKind.STARTING,
        time=float(n),
        class_name="c",
        name=f"i{n}",
        instance_id=f"id{n}",
        node_id="n1",
    )


def times(batch: list[Event]) -> list[int]:
    return [int(e.time) for e in batch]


def test_events_go_out_in_order_and_wake_the_sender() -> None:
    woken = []
    box = EventOutbox(wake=lambda: woken.append(1))
    for n in range(3):
        box.put(event(n))
    assert len(woken) == 3 and box.has_pending
    assert times(box.take()) == [0, 1, 2]
    assert times(box.take()) == [] and not box.has_pending


def test_unacknowledged_batches_are_sent_again_after_the_stream_is_lost() -> None:
    box = EventOutbox()
    box.put(event(0))
    first = box.take()
    box.put(event(1))
    second = box.take()
    box.put(event(2))
    assert times(first) == [0] and times(second) == [1]
    box.acknowledge()  # the reply to the first message
    box.stream_lost()
    assert times(box.take()) == [1, 2]
    box.acknowledge()
    box.stream_lost()
    assert times(box.take()) == [] and len(box) == 0


def test_a_full_outbox_drops_the_oldest() -> None:
    box = EventOutbox(limit=3)
    for n in range(5):
        box.put(event(n))
    assert times(box.take()) == [2, 3, 4] and box.dropped == 2


def test_a_message_carries_at_most_one_batch() -> None:
    box = EventOutbox()
    for n in range(outbox_module.MAX_PER_MESSAGE + 2):
        box.put(event(n))
    assert len(box.take()) == outbox_module.MAX_PER_MESSAGE
    assert box.has_pending and len(box.take()) == 2
