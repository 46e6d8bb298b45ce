"""Route changes for edges (WatchRoutes), derived from the store events the view applies: nodes
lost, named instances moved or removed. A bounded ring keeps the recent ones by store revision,
so an edge that reconnects gets exactly what it missed, or a reset when that is not known."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Final

from controlplane import records
from controlplane.records import InstanceRecord
from controlplane.store import WatchEvent
from controlplane.view import ClusterView
from portside.routechanges import RouteChange, RouteChangeKind, RouteUpdate

DEFAULT_CAPACITY: Final = 10_000  # changes kept: hours of churn in a large cluster


class RouteChangeLog:
    """Fed every store event of the view's watch (`apply`, sync and cheap: a prefix test for
    the heartbeats that are most of them); answers a resume (`since`) and wakes the streams.

    It keeps its own instance → (class, name, node) map rather than reading the view's: the
    view applies this replica's placements before their events arrive, so comparing with it
    would miss the move."""

    def __init__(
        self,
        revision: int,
        nodes: Iterable[str] = (),
        instances: Iterable[tuple[str, InstanceRecord]] = (),
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        # Every change after `_floor` is in the ring: at first the revision the view was loaded
        # at (what happened before this replica started is not known), later the last evicted.
        self._floor = revision
        self.revision = revision  # the last store revision applied
        self._ring: deque[tuple[int, RouteChange]] = deque()
        self._capacity = capacity
        self._live: set[str] = set(nodes)
        self._named: dict[str, tuple[str, str, str]] = {
            key: (r.class_name, r.name, r.node_id) for key, r in instances if not r.pool
        }
        self._wake = asyncio.Event()

    @property
    def live_nodes(self) -> tuple[str, ...]:
        return tuple(sorted(self._live))

    def apply(self, event: WatchEvent) -> None:
        kv = event.kv
        key, deleted = kv.key, event.type == "delete"
        revision = kv.mod_revision
        if key.startswith(records.NODES):
            node_id = key[len(records.NODES) :]
            if not deleted:
                self._live.add(node_id)
            elif node_id in self._live:
                self._live.discard(node_id)
                self._record(revision, RouteChange(RouteChangeKind.NODE_LOST, node_id))
        elif key.startswith(records.INSTANCES):
            self._apply_instance(key, deleted, kv.value, revision)
        self.revision = max(self.revision, revision)

    def _apply_instance(self, key: str, deleted: bool, value: bytes, revision: int) -> None:
        old = self._named.get(key)
        if deleted:
            if old is not None:
                del self._named[key]
                kind = RouteChangeKind.INSTANCE_REMOVED
                self._record(revision, RouteChange(kind, old[2], old[0], old[1]))
            return
        try:
            record = InstanceRecord.decode(value)
        except (ValueError, TypeError, KeyError):
            return  # the view logs it
        if record.pool:
            return  # pool routes come from the pool watch
        self._named[key] = (record.class_name, record.name, record.node_id)
        if old is not None and old[2] != record.node_id:
            kind = RouteChangeKind.INSTANCE_MOVED
            self._record(revision, RouteChange(kind, old[2], old[0], old[1]))

    def _record(self, revision: int, change: RouteChange) -> None:
        if len(self._ring) >= self._capacity:
            self._floor = self._ring.popleft()[0]
        self._ring.append((revision, change))
        self._wake.set()
        self._wake = asyncio.Event()

    def since(self, revision: int) -> RouteUpdate:
        """What an edge that has seen everything up to `revision` missed; a reset if that is not
        known here (0, before this replica started, or older than the ring)."""
        if revision <= 0 or revision < self._floor:
            return RouteUpdate(self.revision, reset=True, live_nodes=self.live_nodes)
        return RouteUpdate(self.revision, changes=self._after(revision))

    def _after(self, revision: int) -> tuple[RouteChange, ...]:
        if not self._ring or self._ring[-1][0] <= revision:
            return ()  # the common case: nothing new
        # Walked from the newest (what a live stream asks for is at the end), then put in order.
        out = []
        for r, change in reversed(self._ring):
            if r <= revision:
                break
            out.append(change)
        out.reverse()
        return tuple(out)

    async def wait(self, after: int, at_most_s: float) -> None:
        """Until there is a change later than revision `after`, or `at_most_s` seconds pass."""
        if self._ring and self._ring[-1][0] > after:
            return
        try:
            async with asyncio.timeout(at_most_s):
                await self._wake.wait()
        except TimeoutError:
            pass


async def route_updates(
    changes: RouteChangeLog, since_revision: int, every_s: float
) -> AsyncIterator[RouteUpdate]:
    """One WatchRoutes stream: what happened after `since_revision`, then each change as it
    comes, and a message at least every `every_s` whether or not anything changed. It carries
    the revision, so an edge resumes from a recent one on whichever replica it reconnects to,
    and it tells the edge that this replica is there even while the store makes no progress
    (no quorum): the edge then goes on resolving through it (edge/main.py `Heard`)."""
    update = changes.since(since_revision)
    yield update
    sent, last = update.revision, time.monotonic()
    while True:
        await changes.wait(sent, max(0.0, last + every_s - time.monotonic()))
        update = changes.since(sent)
        if (
            update.changes
            or update.reset
            or update.revision > sent
            or time.monotonic() - last >= every_s
        ):
            sent, last = update.revision, time.monotonic()
            yield update


def follow_route_changes(view: ClusterView, capacity: int = DEFAULT_CAPACITY) -> RouteChangeLog:
    """A log of `view`'s route changes from its loaded revision on, fed by its watch."""
    changes = RouteChangeLog(view.revision, view.nodes, view.instances.items(), capacity)
    view.listeners.append(changes.apply)
    return changes
