"""The cluster page's recent events: the newest ones already stored are loaded, new ones follow
from the watch, at most `size` are kept, newest first; on the embedded SQLite store (the etcd
backend honours the same contract, and the e2e test runs the page on etcd)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from controlplane.events import EventLog
from controlplane.store import open_store
from controlplane.ui import RecentEvents
from portside.events import Event, EventKind
from tests.support import eventually

pytestmark = pytest.mark.integration


def event(kind: str, name: str, at: float) -> Event:
    return Event(EventKind(kind), at, "Echo", name, "id-" + name, "n1")


async def test_recent_events_load_then_follow_the_store(tmp_path: Path) -> None:
    store = await open_store(f"sqlite://{tmp_path / 'state.db'}")
    log = EventLog(store)
    # Stored before the page starts, in another instance's key order than their time order.
    for name, at in (("b", 1003.0), ("a", 1001.0), ("c", 1002.0), ("a", 1004.0)):
        await log.write(event("ready", name, at))
    recent = RecentEvents(store, size=3)
    follow = asyncio.create_task(recent.follow())
    try:
        await eventually(
            lambda: len(recent.latest()) == 3, within=5, what="the stored events loaded"
        )
        assert [e.time for e in recent.latest()] == [1004.0, 1003.0, 1002.0]
        await log.write(event("slept", "d", 1005.0))
        await eventually(
            lambda: recent.latest()[0].kind == "slept", within=5, what="the new event followed"
        )
        assert [(e.name, e.time) for e in recent.latest()] == [
            ("d", 1005.0),
            ("a", 1004.0),
            ("b", 1003.0),
        ]
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await store.close()
