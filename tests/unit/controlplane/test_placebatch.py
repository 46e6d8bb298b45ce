"""Placement writes in groups: what goes in one transaction, and what each resolve gets back.
A fake store records each swap_all and answers create-if-absent from a dict."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import pytest

from controlplane.events import EventLog
from controlplane.placebatch import PlacementBatcher, PlacementWrite
from controlplane.store import MAX_SWAPS, LeaseNotFound, Store, Swap, Swapped
from portside.errors import StoreError
from portside.events import Event, EventKind


class SwapStore:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.batches: list[list[Swap]] = []
        self.leases = 0
        self.fail_next = False
        self.release = asyncio.Event()
        self.release.set()

    async def grant_lease(self, ttl_s: int) -> int:
        self.leases += 1
        return self.leases

    async def swap_all(self, swaps: Sequence[Swap]) -> list[Swapped]:
        await self.release.wait()
        if self.fail_next:
            self.fail_next = False
            raise LeaseNotFound("lease not found")
        self.batches.append(list(swaps))
        out = []
        for s in swaps:
            ok = s.key not in self.values
            if ok:
                self.values[s.key] = s.value
                self.values.update({p.key: p.value for p in s.also})
            out.append(Swapped(ok))
        return out


def write(key: str) -> PlacementWrite:
    event = Event(EventKind.PLACED, 1.0, "Echo", key, key, "n1")
    return PlacementWrite(key, 0, b"record", event=event)


def batcher(store: SwapStore) -> PlacementBatcher:
    return PlacementBatcher(cast(Store, store), EventLog(cast(Store, store)))


async def test_placements_of_one_turn_go_in_one_transaction_with_their_events() -> None:
    store = SwapStore()
    b = batcher(store)
    results = await asyncio.gather(*(b.write(write(f"k{i}")) for i in range(5)))
    assert [len(x) for x in store.batches] == [5]
    assert [r.succeeded for r in results] == [True] * 5
    assert all(len(s.also) == 1 and s.also[0].lease == 1 for s in store.batches[0])


async def test_those_arriving_during_a_write_wait_and_go_together() -> None:
    store = SwapStore()
    b = batcher(store)
    store.release.clear()
    first = asyncio.ensure_future(b.write(write("a")))
    await asyncio.sleep(0.01)  # "a" is being written
    later = [asyncio.ensure_future(b.write(write(k))) for k in ("b", "c", "d")]
    await asyncio.sleep(0.01)
    store.release.set()
    await asyncio.gather(first, *later)
    assert [[s.key for s in x] for x in store.batches] == [["a"], ["b", "c", "d"]]


async def test_a_key_written_twice_waits_for_the_next_group_and_loses() -> None:
    store = SwapStore()
    b = batcher(store)
    results = await asyncio.gather(b.write(write("a")), b.write(write("a")), b.write(write("b")))
    assert [r.succeeded for r in results] == [True, False, True]
    assert [[s.key for s in x] for x in store.batches] == [["a", "b"], ["a"]]


async def test_groups_are_at_most_max_swaps() -> None:
    store = SwapStore()
    b = batcher(store)
    await asyncio.gather(*(b.write(write(f"k{i}")) for i in range(MAX_SWAPS + 3)))
    assert [len(x) for x in store.batches] == [MAX_SWAPS, 3]


async def test_a_failed_group_is_sent_again_under_a_new_event_lease() -> None:
    store = SwapStore()
    b = batcher(store)
    await b.write(write("a"))
    store.fail_next = True
    assert (await b.write(write("b"))).succeeded
    assert store.leases == 2 and store.batches[-1][0].also[0].lease == 2


async def test_a_store_fault_reaches_every_resolve_of_the_group() -> None:
    class Down(SwapStore):
        async def swap_all(self, swaps: Sequence[Swap]) -> list[Swapped]:
            raise StoreError("etcd is unreachable")

    down = Down()
    b = batcher(down)
    results = await asyncio.gather(b.write(write("a")), b.write(write("b")), return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results)
    assert down.leases == 1  # not sent again: a store that did not answer, not a lost lease
    with pytest.raises(StoreError):
        await b.write(write("c"))  # and the batcher still serves the next one
