"""The route change log behind WatchRoutes: which store events are route changes, resuming from
a revision, and a reset when the changes since it are not known. Events are applied by hand."""

from __future__ import annotations

import asyncio

from controlplane import records
from controlplane.records import InstanceRecord
from controlplane.routewatch import RouteChangeLog, route_updates
from controlplane.store import KeyValue, WatchEvent
from portside.routechanges import RouteChange, RouteChangeKind
from portside.spec import Node

LOST, MOVED, REMOVED = (
    RouteChangeKind.NODE_LOST,
    RouteChangeKind.INSTANCE_MOVED,
    RouteChangeKind.INSTANCE_REMOVED,
)


def node(node_id: str) -> Node:
    return Node(node_id, "127.0.0.1:1", "127.0.0.1:2", "fra", 50.0, 8.6, 2.0, 4096)


def record(name: str, node_id: str, pool: bool = False) -> InstanceRecord:
    return InstanceRecord("Echo", name, "id-" + name, node_id, 0.5, 256, 1.0, pool=pool)


def put_node(log: RouteChangeLog, node_id: str, revision: int) -> None:
    kv = KeyValue(records.node_key(node_id), records.encode_node(node(node_id)), 1, revision)
    log.apply(WatchEvent("put", kv))


def put_instance(log: RouteChangeLog, rec: InstanceRecord, revision: int) -> None:
    key = records.instance_key(rec.class_name, rec.instance_id)
    log.apply(WatchEvent("put", KeyValue(key, rec.encode(), 1, revision)))


def delete(log: RouteChangeLog, key: str, revision: int) -> None:
    log.apply(WatchEvent("delete", KeyValue(key, b"", 0, revision)))


def started_at_10() -> RouteChangeLog:
    """A replica that loaded the view at revision 10: nodes a and b, alice on a."""
    alice = record("alice", "a")
    key = records.instance_key("Echo", alice.instance_id)
    return RouteChangeLog(10, nodes=["a", "b"], instances=[(key, alice)])


def test_store_events_become_route_changes() -> None:
    log = started_at_10()
    put_node(log, "a", 11)  # a heartbeat: no change
    put_instance(log, record("bob", "b"), 12)  # a new placement: nothing cached anywhere yet
    put_instance(log, record("alice", "b"), 13)  # alice moved from a to b
    delete(log, records.instance_key("Echo", "id-bob"), 14)
    put_instance(log, record("pooled", "a", pool=True), 15)  # pool members: the pool watch's
    delete(log, records.instance_key("Echo", "id-pooled"), 16)
    delete(log, records.node_key("a"), 17)  # its lease expired
    delete(log, records.node_key("a"), 18)  # said twice (a replayed event): once is enough
    update = log.since(10)
    assert not update.reset
    assert update.revision == 18
    assert update.changes == (
        RouteChange(MOVED, "a", "Echo", "alice"),
        RouteChange(REMOVED, "b", "Echo", "bob"),
        RouteChange(LOST, "a"),
    )
    assert log.live_nodes == ("b",)


def test_a_resume_gets_exactly_what_it_missed() -> None:
    log = started_at_10()
    delete(log, records.node_key("a"), 12)
    put_node(log, "c", 13)
    delete(log, records.node_key("b"), 15)
    assert log.since(12).changes == (RouteChange(LOST, "b"),)
    assert log.since(11).changes == (RouteChange(LOST, "a"), RouteChange(LOST, "b"))
    latest = log.since(15)
    assert latest.changes == () and not latest.reset and latest.revision == 15
    # A replica behind the edge (it saw 20 elsewhere) sends what comes after 20, nothing older.
    assert log.since(20).changes == ()


def test_reset_when_what_was_missed_is_not_known() -> None:
    log = started_at_10()
    for revision, name in enumerate("cdef", start=11):
        put_node(log, name, revision)
    first = log.since(0)  # a new edge
    assert first.reset and first.revision == 14 and first.live_nodes == tuple("abcdef")
    assert log.since(9).reset  # from before this replica loaded its view
    assert not log.since(10).reset


def test_reset_when_older_than_the_ring() -> None:
    log = RouteChangeLog(10, nodes=[f"n{i}" for i in range(5)], capacity=3)
    for i in range(5):
        delete(log, records.node_key(f"n{i}"), 11 + i)  # n0..n4 lost at 11..15; n0, n1 evicted
    assert log.since(11).reset  # n1's loss (12) is no longer known
    kept = log.since(12)
    assert not kept.reset
    assert kept.changes == tuple(RouteChange(LOST, f"n{i}") for i in (2, 3, 4))


async def test_wait_returns_at_a_change_or_after_the_bound() -> None:
    log = started_at_10()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await log.wait(10, 0.05)  # nothing happens
    assert loop.time() - started >= 0.05
    waiting = asyncio.create_task(log.wait(10, 5.0))
    await asyncio.sleep(0)
    delete(log, records.node_key("b"), 11)
    await asyncio.wait_for(waiting, 1.0)
    await asyncio.wait_for(log.wait(10, 5.0), 0.1)  # already past 10: at once


async def test_a_stream_speaks_at_least_every_bound_even_with_nothing_new() -> None:
    # While the store makes no progress (no quorum) the edge must still hear from the replica,
    # or it would take a reachable control plane for a lost one (edge/main.py Heard).
    log = started_at_10()
    stream = route_updates(log, 10, 0.05)
    first = await anext(stream)
    assert first.revision == 10 and not first.changes
    loop = asyncio.get_running_loop()
    started = loop.time()
    quiet = await asyncio.wait_for(anext(stream), 1.0)
    assert quiet.revision == 10 and not quiet.changes and not quiet.reset
    assert loop.time() - started >= 0.04
    delete(log, records.node_key("b"), 11)
    changed = await asyncio.wait_for(anext(stream), 1.0)
    assert changed.revision == 11 and changed.changes == (RouteChange(LOST, "b"),)
