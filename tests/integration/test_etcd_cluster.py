"""Issue 10: EtcdStore over a real 3-member etcd cluster on loopback. Killing the member in use
costs no call and no watch event; losing quorum fails every call with StoreError well within
5 s; the store recovers by itself when quorum returns."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from controlplane.store import open_store
from controlplane.store.etcd import EtcdStore
from portside.errors import StoreError
from tests.etcd_cluster import EtcdCluster
from tests.support import eventually

pytestmark = pytest.mark.integration

PREFIX = "/portside-test/cluster/"


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path) as cluster:
        yield cluster


async def leader_first(cluster: EtcdCluster) -> EtcdStore:
    """A store that uses the leader: killing it makes the others elect a new one, the harder
    case (a follower's death costs no election)."""
    leader = await asyncio.to_thread(cluster.wait_leader)
    others = [m.endpoint for m in cluster.members if m is not leader]
    store = await open_store("etcd://" + ",".join([leader.endpoint, *others]), timeout_s=5)
    assert isinstance(store, EtcdStore) and store.endpoint == leader.endpoint
    return store


class Watched:
    """Collects a watch's events in a task, for checks of "every event once, in order"."""

    def __init__(self, store: EtcdStore, start_revision: int) -> None:
        self.events: list[tuple[str, str, int]] = []
        self.error: BaseException | None = None
        self._watch = store.watch(PREFIX, start_revision)
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        try:
            async for event in self._watch:
                self.events.append((event.type, event.kv.key, event.kv.mod_revision))
        except BaseException as exc:
            self.error = exc
            raise

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StoreError):
            await self._task
        await self._watch.aclose()


async def test_killing_the_member_in_use_costs_no_call_and_no_event(etcd3: EtcdCluster) -> None:
    store = await leader_first(etcd3)
    in_use = etcd3.member(store.endpoint)
    try:
        lease = await store.grant_lease(10)  # granted through the member about to die
        start = await store.put(PREFIX + "leased", b"", lease)
        watched = Watched(store, start + 1)
        written: list[tuple[str, str, int]] = []
        slowest = 0.0

        async def timed(call: Callable[[], Awaitable[object]]) -> object:
            nonlocal slowest
            began = time.monotonic()
            result = await call()
            slowest = max(slowest, time.monotonic() - began)
            return result

        async def write(i: int) -> None:
            key = f"{PREFIX}k{i % 7}"
            revision = await timed(lambda: store.put(key, str(i).encode()))
            assert isinstance(revision, int)
            written.append(("put", key, revision))

        for i in range(20):
            await write(i)
        etcd3.kill(in_use)
        killed = time.monotonic()
        # The very next calls, of every kind, go through: no error reaches the caller.
        await write(20)
        failover_s = time.monotonic() - killed
        assert store.endpoint != in_use.endpoint
        assert await timed(lambda: store.get(PREFIX + "leased")) is not None
        assert await timed(lambda: store.refresh_lease(lease)) is True  # same lease, other member
        created = await timed(lambda: store.compare_and_swap(PREFIX + "new", 0, b"x"))
        assert created is True
        kv = await store.get(PREFIX + "new")
        assert kv is not None
        written.append(("put", PREFIX + "new", kv.mod_revision))
        listed = await timed(lambda: store.range(PREFIX))
        assert isinstance(listed, tuple) and len(listed[0]) == 9
        for i in range(21, 40):
            await write(i)
        etcd3.restart(in_use)
        for i in range(40, 60):
            await write(i)
            await asyncio.sleep(0.05)
        etcd3.wait_healthy()
        assert await store.refresh_lease(lease) is True

        # Every write arrives once, in revision order, though the watch moved member midway.
        await eventually(lambda: len(watched.events) >= len(written), what="every event")
        await asyncio.sleep(0.3)  # a repeated event would arrive now
        assert watched.error is None
        assert watched.events == sorted(written, key=lambda e: e[2])
        await watched.close()
        print(
            f"\nfailover: first call after the kill took {failover_s:.2f}s; slowest {slowest:.2f}s"
        )
        assert slowest < 5
    finally:
        await store.close()


async def test_quorum_loss_fails_calls_quickly_and_recovers_by_itself(etcd3: EtcdCluster) -> None:
    store = await leader_first(etcd3)
    try:
        lease = await store.grant_lease(10)
        start = await store.put(PREFIX + "before", b"1", lease)
        watched = Watched(store, start + 1)
        # Two of three gone, the one in use among them: the last one has no leader.
        in_use = etcd3.member(store.endpoint)
        other = next(m for m in etcd3.members if m is not in_use)
        etcd3.kill(in_use)
        etcd3.kill(other)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "get": lambda: store.get(PREFIX + "before"),
            "range": lambda: store.range(PREFIX),
            "put": lambda: store.put(PREFIX + "during", b"2"),
            "compare_and_swap": lambda: store.compare_and_swap(PREFIX + "new", 0, b"3"),
            "refresh_lease": lambda: store.refresh_lease(lease),
            "grant_lease": lambda: store.grant_lease(5),
        }
        took: dict[str, float] = {}
        for name, call in calls.items():
            began = time.monotonic()
            with pytest.raises(StoreError) as caught:
                await call()
            took[name] = time.monotonic() - began
            reason = str(caught.value)
            assert "\n" not in reason
            assert reason.startswith(("etcd has no quorum: ", "no etcd member answered within")), (
                reason
            )
        failed_after = ", ".join(f"{k} {v:.2f}s" for k, v in took.items())
        print(f"\nquorum lost: calls failed after {failed_after}")
        print(f"a reason: {reason}")
        assert max(took.values()) < 5, took
        assert watched.error is None  # the watch waits: it is no caller's error

        etcd3.restart(in_use)
        etcd3.restart(other)
        restarted = time.monotonic()

        async def writes() -> int | None:
            try:
                return await store.put(PREFIX + "after", b"4")
            except StoreError:
                return None

        after = await eventually(writes, within=30, every=0.1, what="a write after quorum")
        recovered_s = time.monotonic() - restarted
        # Nothing was reconnected by hand: the same store serves every kind of call again.
        assert await store.refresh_lease(lease) is True  # a new leader renews every lease
        assert await store.compare_and_swap(PREFIX + "new", 0, b"3") is True
        assert (await store.get(PREFIX + "before")) is not None
        await eventually(
            lambda: ("put", PREFIX + "after", after) in watched.events, what="the watch resumed"
        )
        assert watched.error is None
        assert [e[1] for e in watched.events][:1] == [PREFIX + "after"]  # nothing before it
        await watched.close()
        print(f"recovery: first write {recovered_s:.2f}s after the members were started again")
    finally:
        await store.close()
