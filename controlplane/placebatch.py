"""Placements written to the store in groups (group commit): those that resolves decide while
another group is being written go together in the next transaction, each checked on its own key.

Each placement is written with its "placed" event and reads the instance's own outbound policy
in the same nested transaction, so a placement costs a share of one store round trip instead of
three. See docs/architecture.md, "Placement writes", for why exactly-once placement holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from controlplane.events import EventLog
from controlplane.store import MAX_SWAPS, LeaseNotFound, Store, Swap, Swapped
from portside.events import Event


@dataclass(frozen=True)
class PlacementWrite:
    """A placement's record at `key`, written only if the key is at `expected_revision`
    (0: absent) and the key `absent` (a lost node's) does not exist; with it, `event` and a read
    of the key `read`."""

    key: str
    expected_revision: int
    record: bytes
    absent: str = ""
    event: Event | None = None
    read: str = ""


async def write_placements(
    store: Store, events: EventLog | None, writes: Sequence[PlacementWrite]
) -> list[Swapped]:
    """Write `writes` in one transaction (keys distinct, at most MAX_SWAPS); one outcome each.

    A transaction refused for its event lease is sent once more under a new one: the store may
    have lost the old one (restored, or failed over), and a put under a lost lease fails the
    whole transaction. Any other failure is the resolves' at once (a store that did not answer
    would not answer a second time within their deadline either).
    Sending it again is safe: every write in it is conditional, so one that did commit the first
    time fails its check the second time, and its resolve reads the key and finds its record.
    """

    def swaps(lease: int) -> list[Swap]:
        return [
            Swap(
                w.key,
                w.expected_revision,
                w.record,
                absent=w.absent,
                also=(events.put_of(w.event, lease),) if events and w.event else (),
                read=w.read,
            )
            for w in writes
        ]

    if events is None:
        return await store.swap_all(swaps(0))
    try:
        return await store.swap_all(swaps(await events.lease()))
    except LeaseNotFound:
        return await store.swap_all(swaps(await events.lease(renew=True)))


class PlacementBatcher:
    """Writes placements through write_placements, one transaction at a time: a placement that
    arrives while none is being written goes at once (in the same loop turn as any others), and
    those that arrive during a write wait for it and then go together. At concurrency 1 this
    adds no wait; under load, groups grow until one transaction carries what arrived during the
    last (up to MAX_SWAPS)."""

    def __init__(self, store: Store, events: EventLog | None) -> None:
        self.store = store
        self.events = events
        self._queue: list[tuple[PlacementWrite, asyncio.Future[Swapped]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def write(self, placement: PlacementWrite) -> Swapped:
        """Write one placement with the others of its group; raises StoreError as the store."""
        done: asyncio.Future[Swapped] = asyncio.get_running_loop().create_future()
        self._queue.append((placement, done))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_groups(), name="placement writes")
        return await done

    async def _write_groups(self) -> None:
        """Write groups until the queue is empty. A group's fault is each of its resolves'."""
        group: list[tuple[PlacementWrite, asyncio.Future[Swapped]]] = []
        try:
            await asyncio.sleep(0)  # let the placements decided in this loop turn join
            while self._queue:
                group = self._next_group()
                try:
                    outcomes = await write_placements(
                        self.store, self.events, [w for w, _ in group]
                    )
                except Exception as exc:
                    for _, done in group:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                for (_, done), outcome in zip(group, outcomes, strict=True):
                    if not done.done():
                        done.set_result(outcome)
        finally:
            self._writer = None
            # Cancelled (the process stops): nobody waits for ever on a write never sent.
            for _, done in group + self._queue:
                done.cancel()
            self._queue = []

    def _next_group(self) -> list[tuple[PlacementWrite, asyncio.Future[Swapped]]]:
        """Up to MAX_SWAPS queued placements of distinct keys, oldest first; a second write of
        one key (a retry after a lost race) waits for the next group."""
        group: list[tuple[PlacementWrite, asyncio.Future[Swapped]]] = []
        rest: list[tuple[PlacementWrite, asyncio.Future[Swapped]]] = []
        keys: set[str] = set()
        for item in self._queue:
            if len(group) < MAX_SWAPS and item[0].key not in keys:
                group.append(item)
                keys.add(item[0].key)
            else:
                rest.append(item)
        self._queue = rest
        return group
