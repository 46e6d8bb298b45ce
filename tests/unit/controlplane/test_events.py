"""Lifecycle events: key layout, the stored record, the shared rotating lease, and the view's
indifference to event and state keys. A fake store stands in for the lease and put calls."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from controlplane import records
from controlplane.events import EVENT_TTL_S, LEASE_ROTATE_S, EventLog, decode_event
from controlplane.store import KeyValue, Store, WatchEvent
from controlplane.view import ClusterView
from portside.errors import StoreError
from portside.events import Event, EventKind


def test_event_keys_sort_by_time_under_their_instance() -> None:
    key = records.event_key("Echo", "abc", 1_700_000_000_123_456_789, 7)
    assert key == "/portside/events/Echo/abc/01700000000123456789-000007"
    earlier = records.event_key("Echo", "abc", 999_999_999, 999_999)
    assert earlier < key  # zero-padded: string order is time order
    assert key.startswith(records.events_prefix("Echo", "abc"))
    assert key.startswith(records.events_prefix("Echo"))
    assert key.startswith(records.events_prefix())


def test_a_class_prefix_does_not_match_a_longer_class_name() -> None:
    key = records.event_key("EchoX", "abc", 1, 1)
    assert not key.startswith(records.events_prefix("Echo"))


def test_a_stored_event_round_trips_with_its_revision() -> None:
    event = Event(
        kind=EventKind.EXITED,
        time=1.5,
        class_name="Echo",
        name="a",
        instance_id="abc",
        node_id="n1",
        exit_code=143,
        signal=15,
        reason="",
    )
    value = records.encode_event(event)
    assert b"revision" not in value  # the store's own revision is the event's
    stored = decode_event(KeyValue("/portside/events/Echo/abc/1-1", value, 3, 9))
    assert stored == dataclasses.replace(event, revision=9)
    assert decode_event(KeyValue("/portside/events/Echo/abc/1-2", b"{not json", 3, 9)) is None


class LeaseStore:
    def __init__(self) -> None:
        self.leases: list[int] = []
        self.puts: list[tuple[str, int]] = []
        self.fail_next_put = False

    async def grant_lease(self, ttl_s: int) -> int:
        assert ttl_s == EVENT_TTL_S
        self.leases.append(len(self.leases) + 1)
        return self.leases[-1]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        if self.fail_next_put:
            self.fail_next_put = False
            raise StoreError("lease not found")
        self.puts.append((key, lease))
        return len(self.puts)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def event(n: int) -> Event:
    return Event(EventKind.READY, 1000.0 + n, "Echo", "a", "abc", "n1")


async def test_one_lease_serves_many_events_and_is_replaced_every_ten_minutes() -> None:
    store, clock = LeaseStore(), Clock()
    log = EventLog(cast(Store, store), clock=clock)
    for n in range(5):
        await log.write(event(n))
    assert store.leases == [1] and {lease for _, lease in store.puts} == {1}
    clock.now = LEASE_ROTATE_S
    await log.write(event(5))
    assert store.leases == [1, 2] and store.puts[-1][1] == 2
    assert len({key for key, _ in store.puts}) == 6  # no two events share a key


async def test_a_lost_lease_is_replaced_and_the_event_still_written() -> None:
    store = LeaseStore()
    log = EventLog(cast(Store, store), clock=Clock())
    await log.write(event(0))
    store.fail_next_put = True
    await log.write(event(1))
    assert store.leases == [1, 2] and store.puts[-1][1] == 2


def test_the_view_ignores_event_and_state_keys_without_decoding_them() -> None:
    view = ClusterView(store=cast(Any, None))
    for key in (
        records.event_key("Echo", "abc", 1, 1),
        records.state_key("Echo", "abc", "k"),
    ):
        # Not JSON: decoding would log an error; ignoring it changes nothing.
        assert view._apply(WatchEvent("put", KeyValue(key, b"\xff binary", 1, 1))) == ""
    assert not view.instances and not view.classes and not view.nodes
