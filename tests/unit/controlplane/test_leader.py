"""Leader election over a store that fails: it steps down before its lease can expire, never
stops trying, and takes its own key up again when the store returns. A fake store, no I/O."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from controlplane import records
from controlplane.leader import LeaderElection
from controlplane.store import KeyValue
from portside.errors import StoreError


class FlakyStore:
    """The few calls an election makes, in memory; `down` fails them all, `lose_answer` applies
    the next compare-and-swap and then fails it (its answer lost), `hang` holds refreshes."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[bytes, int]] = {}
        self.leases: set[int] = set()
        self.down = False
        self.lose_answer = False
        self.hang = False
        self._next = 0

    def _check(self) -> None:
        if self.down:
            raise StoreError("etcd has no quorum: 2 of 3 members unreachable")

    async def get(self, key: str) -> KeyValue | None:
        self._check()
        if key not in self.keys:
            return None
        value, lease = self.keys[key]
        return KeyValue(key, value, 1, 1, lease)

    async def grant_lease(self, ttl_s: int) -> int:
        self._check()
        self._next += 1
        self.leases.add(self._next)
        return self._next

    async def compare_and_swap(
        self, key: str, mod_revision: int, value: bytes | None, lease: int = 0
    ) -> bool:
        self._check()
        if key in self.keys:
            return False
        assert value is not None
        self.keys[key] = (value, lease)
        if self.lose_answer:
            self.lose_answer = False
            raise StoreError("etcd did not answer")
        return True

    async def refresh_lease(self, lease: int) -> bool:
        self._check()
        if self.hang:
            await asyncio.sleep(3600)
        return lease in self.leases

    async def revoke_lease(self, lease: int) -> None:
        self._check()
        self.leases.discard(lease)
        self.keys = {k: v for k, v in self.keys.items() if v[1] != lease}


def election(store: FlakyStore, clock: list[float]) -> LeaderElection:
    return LeaderElection(cast(Any, store), "r1", ttl_s=5, clock=lambda: clock[0])


async def test_a_store_outage_steps_down_and_the_own_key_is_taken_up_again() -> None:
    store, clock = FlakyStore(), [0.0]
    leader = election(store, clock)
    await leader._turn()
    assert leader.is_leader and store.keys[records.LEADER][0] == b"r1"
    store.down = True
    try:
        await leader._turn()
    except StoreError:
        leader._step_down("store error")
    assert not leader.is_leader
    store.down = False  # quorum back; the lease lived on (a new etcd leader renews them all)
    await leader._turn()
    assert leader.is_leader and leader.lease == store.keys[records.LEADER][1]
    assert len(store.leases) == 1  # no second lease: the key was taken up, not made anew


async def test_a_create_whose_answer_was_lost_is_found_and_taken_up() -> None:
    store, clock = FlakyStore(), [0.0]
    leader = election(store, clock)
    store.lose_answer = True
    try:
        await leader._turn()
    except StoreError:
        leader._step_down("store error")
    assert not leader.is_leader and store.keys[records.LEADER][0] == b"r1"
    await leader._turn()
    assert leader.is_leader


async def test_a_refresh_that_does_not_answer_steps_down_before_the_lease_can_expire() -> None:
    store, clock = FlakyStore(), [100.0]
    leader = election(store, clock)
    await leader._turn()
    assert leader.is_leader
    clock[0] = 104.4  # 0.6 s of the 5 s lease left, less the 0.5 s margin: 0.1 s to answer
    store.hang = True
    started = asyncio.get_running_loop().time()
    await leader._turn()
    assert not leader.is_leader
    assert asyncio.get_running_loop().time() - started < 0.5
    clock[0] = 104.6  # past the margin: no refresh is even tried
    leader.is_leader = True
    await leader._turn()
    assert not leader.is_leader


async def test_someone_elses_key_is_left_alone() -> None:
    store, clock = FlakyStore(), [0.0]
    store.keys[records.LEADER] = (b"r2", 99)
    leader = election(store, clock)
    await leader._turn()
    assert not leader.is_leader and store.leases == set()  # not even a lease granted
