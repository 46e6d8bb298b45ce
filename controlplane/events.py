"""Lifecycle events in the store: agents' (from heartbeats) and the control plane's own (placed,
removed), kept about an hour under a shared lease, and watched by prefix to resume by revision."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from controlplane import records
from controlplane.store import KeyValue, Put, Store
from portside.errors import InvalidArgument, StoreError
from portside.events import Event

log = logging.getLogger(__name__)

EVENT_TTL_S = 3600  # what WatchEvents promises: events are kept for an hour
LEASE_ROTATE_S = 600.0  # so an event lives between EVENT_TTL_S - LEASE_ROTATE_S and EVENT_TTL_S


class EventLog:
    """Writes events under one lease per replica, replaced every LEASE_ROTATE_S: a lease per
    event would cost a grant per event and leave etcd tracking thousands of leases."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self._lease = 0
        self._granted_at = 0.0
        self._lock = asyncio.Lock()
        # Starting at random makes a collision between replicas writing in one nanosecond
        # (same class, instance and time) practically impossible.
        self._seq = itertools.count(secrets.randbelow(1_000_000))

    async def lease(self, renew: bool = False) -> int:
        """The lease events are written under now; with `renew`, a new one (the store may have
        lost the old one: restored, or failed over)."""
        async with self._lock:
            if renew or not self._lease or self.clock() - self._granted_at >= LEASE_ROTATE_S:
                self._lease = await self.store.grant_lease(EVENT_TTL_S)
                self._granted_at = self.clock()
            return self._lease

    def put_of(self, event: Event, lease: int) -> Put:
        """The write that stores `event` under `lease`, for a transaction of the caller's."""
        key = records.event_key(
            event.class_name,
            event.instance_id,
            int(event.time * 1e9) if event.time else time.time_ns(),
            next(self._seq) % 1_000_000,
        )
        return Put(key, records.encode_event(event), lease)

    async def write(self, event: Event) -> int:
        """Store the event; returns its revision. Raises StoreError."""
        put = self.put_of(event, await self.lease())
        try:
            return await self.store.put(put.key, put.value, put.lease)
        except StoreError:
            # The lease may have vanished under us (a store restored or failed over): a new one.
            return await self.store.put(put.key, put.value, await self.lease(renew=True))

    async def record(self, event: Event) -> None:
        """Store the event, logging a failure instead of raising: a lost event must not fail
        the placement or heartbeat that caused it."""
        try:
            await self.write(event)
        except StoreError as exc:
            log.warning(
                "could not record %s event of %s/%s: %s",
                event.kind,
                event.class_name,
                event.name,
                exc,
            )


def decode_event(kv: KeyValue) -> Event | None:
    """The event stored in `kv`, with its revision; None (and a log line) if unreadable."""
    try:
        return records.decode_event(kv.value, kv.mod_revision)
    except (ValueError, TypeError, KeyError) as exc:
        log.error("skipping unreadable event %s: %s", kv.key, exc)
        return None


async def watch_events(store: Store, prefix: str, after_revision: int) -> AsyncIterator[Event]:
    """Events under `prefix` written after `after_revision` (0: from now on). Expiries (the
    lease's deletes) are not events. Raises Compacted if that history is gone."""
    if after_revision < 0:
        raise InvalidArgument(f"after_revision: {after_revision} is negative")
    async with aclosing(store.watch(prefix, after_revision + 1 if after_revision else 0)) as watch:
        async for change in watch:
            if change.type != "put":
                continue
            event = decode_event(change.kv)
            if event is not None:
                yield event
