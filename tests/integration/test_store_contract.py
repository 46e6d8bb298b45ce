"""The store contract, run against every backend: the real etcd on loopback and SQLite in a file.

Each test writes under its own random key prefix, so tests never see each other's keys.
"""

from __future__ import annotations

import asyncio
import types
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from controlplane.store import LeaseNotFound, Put, Store, Swap, WatchEvent, open_store
from controlplane.store import etcd as etcd_store
from controlplane.store.etcd import EtcdStore
from controlplane.store.sqlite import SqliteStore
from portside.errors import StoreError
from tests.support import eventually

pytestmark = pytest.mark.integration

Backend = EtcdStore | SqliteStore
EVENT_TIMEOUT_S = 5.0


@pytest.fixture(params=["etcd", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "etcd":
        return cast(str, request.getfixturevalue("etcd_url"))
    return f"sqlite://{tmp_path / 'state.db'}"


@pytest.fixture
def prefix() -> str:
    return f"/portside-test/{uuid.uuid4().hex}/"


@pytest.fixture
async def store(store_url: str, prefix: str) -> AsyncIterator[Backend]:
    opened = cast(Backend, await open_store(store_url))
    yield opened
    await opened.close()
    if store_url.startswith("etcd://"):
        # A fresh client, since the test may have closed its own.
        cleaner = await open_store(store_url)
        kvs, _ = await cleaner.range(prefix)
        for kv in kvs:
            await cleaner.delete(kv.key)
        await cleaner.close()


async def next_event(events: AsyncGenerator[WatchEvent, None]) -> WatchEvent:
    return await asyncio.wait_for(anext(events), EVENT_TIMEOUT_S)


async def watch_from_now(store: Store, prefix: str) -> AsyncGenerator[WatchEvent, None]:
    """A watch from now that is surely live on return, with the probe events it took consumed.

    watch() does no I/O until iterated, so writing probes until one arrives is the one way,
    through the contract alone, to know that later writes happen after the watch began.
    """
    probe = prefix + "~probe"
    events = store.watch(prefix)
    first = asyncio.ensure_future(anext(events))

    async def probe_seen() -> bool:
        await store.put(probe, b"")
        await asyncio.wait({first}, timeout=0.05)
        return first.done()

    await eventually(probe_seen, within=EVENT_TIMEOUT_S, every=0, what="the watch started")
    assert first.result().kv.key == probe
    return events


async def events_except_probes(
    events: AsyncGenerator[WatchEvent, None], n: int
) -> list[WatchEvent]:
    found: list[WatchEvent] = []
    while len(found) < n:
        event = await next_event(events)
        if not event.kv.key.endswith("~probe"):
            found.append(event)
    return found


async def test_get_missing_and_present(store: Backend, prefix: str) -> None:
    assert await store.get(prefix + "missing") is None
    revision = await store.put(prefix + "a", b"1")
    kv = await store.get(prefix + "a")
    assert kv is not None
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease) == (
        prefix + "a",
        b"1",
        revision,
        revision,
        0,
    )


async def test_put_returns_increasing_revisions(store: Backend, prefix: str) -> None:
    first = await store.put(prefix + "a", b"1")
    second = await store.put(prefix + "b", b"2")
    third = await store.put(prefix + "a", b"3")
    assert first < second < third
    kv = await store.get(prefix + "a")
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision) == (b"3", first, third)


async def test_range_by_prefix_is_sorted_with_its_revision(store: Backend, prefix: str) -> None:
    for name in ["c", "a", "b/x", "b"]:
        await store.put(prefix + name, name.encode())
    last = await store.put(prefix[:-1] + "0", b"outside: same stem, next byte")
    try:
        kvs, revision = await store.range(prefix)
        assert [kv.key for kv in kvs] == [prefix + k for k in ["a", "b", "b/x", "c"]]
        assert [kv.value for kv in kvs] == [b"a", b"b", b"b/x", b"c"]
        assert revision >= last
        assert [kv.key for kv in (await store.range(prefix + "b"))[0]] == [
            prefix + "b",
            prefix + "b/x",
        ]
        assert (await store.range(prefix + "nothing"))[0] == []
    finally:
        await store.delete(prefix[:-1] + "0")


async def test_etcd_range_in_pages_is_one_snapshot(
    etcd_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range longer than a page comes whole, in order, as of its first page's revision."""
    monkeypatch.setattr(etcd_store, "RANGE_PAGE", 2)
    store = cast(EtcdStore, await open_store(etcd_url))
    real_page = etcd_store._range_page
    pages = 0

    async def page_then_write(request: object, client: object) -> object:
        nonlocal pages
        pages += 1
        if pages == 2:  # between pages: must not show, the range reads at page 1's revision
            await store.put(prefix + "e", b"late")
        return await real_page(request, client)

    monkeypatch.setattr(etcd_store, "_range_page", page_then_write)
    try:
        for name in "dcba":
            await store.put(prefix + name, name.encode())
        kvs, revision = await store.range(prefix)
        assert [kv.key for kv in kvs] == [prefix + k for k in "abcd"]
        assert [kv.value for kv in kvs] == [b"a", b"b", b"c", b"d"]
        assert pages == 2
        late = await store.get(prefix + "e")
        assert late is not None and late.mod_revision > revision
    finally:
        for name in "abcde":
            await store.delete(prefix + name)
        await store.close()


async def test_delete_says_whether_the_key_existed(store: Backend, prefix: str) -> None:
    await store.put(prefix + "a", b"1")
    assert await store.delete(prefix + "a") is True
    assert await store.get(prefix + "a") is None
    assert await store.delete(prefix + "a") is False


async def test_create_if_absent(store: Backend, prefix: str) -> None:
    assert await store.compare_and_swap(prefix + "a", 0, b"first") is True
    assert await store.compare_and_swap(prefix + "a", 0, b"second") is False
    kv = await store.get(prefix + "a")
    assert kv is not None and kv.value == b"first"


async def test_swap_only_while_another_key_is_absent(store: Backend, prefix: str) -> None:
    """A move off a lost node commits only while that node's key is still gone (fencing)."""
    revision = await store.put(prefix + "instance", b"on-a")
    await store.put(prefix + "node-a", b"back")
    assert (
        await store.compare_and_swap(
            prefix + "instance", revision, b"on-b", absent=prefix + "node-a"
        )
        is False
    )
    kv = await store.get(prefix + "instance")
    assert kv is not None and kv.value == b"on-a"
    await store.delete(prefix + "node-a")
    assert (
        await store.compare_and_swap(
            prefix + "instance", revision, b"on-b", absent=prefix + "node-a"
        )
        is True
    )


async def test_swap_only_while_another_key_is_unchanged(store: Backend, prefix: str) -> None:
    """A snapshot is recorded only while its instance's placement is the one checked."""
    placed = await store.put(prefix + "instance", b"on-a")
    await store.put(prefix + "instance", b"on-b")
    assert (
        await store.compare_and_swap(
            prefix + "snapshot", 0, b"of-a", unchanged=(prefix + "instance", placed)
        )
        is False
    )
    assert await store.get(prefix + "snapshot") is None
    kv = await store.get(prefix + "instance")
    assert kv is not None
    assert (
        await store.compare_and_swap(
            prefix + "snapshot", 0, b"of-b", unchanged=(prefix + "instance", kv.mod_revision)
        )
        is True
    )


async def test_swap_on_mod_revision(store: Backend, prefix: str) -> None:
    revision = await store.put(prefix + "a", b"1")
    assert await store.compare_and_swap(prefix + "a", revision, b"2") is True
    assert await store.compare_and_swap(prefix + "a", revision, b"stale") is False
    kv = await store.get(prefix + "a")
    assert kv is not None
    assert kv.value == b"2" and kv.mod_revision > revision and kv.create_revision == revision


async def test_swap_to_delete(store: Backend, prefix: str) -> None:
    revision = await store.put(prefix + "a", b"1")
    await store.put(prefix + "a", b"2")
    assert await store.compare_and_swap(prefix + "a", revision, None) is False
    kv = await store.get(prefix + "a")
    assert kv is not None
    assert await store.compare_and_swap(prefix + "a", kv.mod_revision, None) is True
    assert await store.get(prefix + "a") is None


async def test_fifty_concurrent_creates_have_one_winner(store: Backend, prefix: str) -> None:
    results = await asyncio.gather(
        *(store.compare_and_swap(prefix + "a", 0, str(i).encode()) for i in range(50))
    )
    assert results.count(True) == 1
    kv = await store.get(prefix + "a")
    assert kv is not None and kv.value == str(results.index(True)).encode()


async def test_swap_all_checks_each_swap_on_its_own(store: Backend, prefix: str) -> None:
    """A batch of placements: the taken key and the fenced move fail, the rest commit with
    their puts at one revision, and a swap's read sees the store as of its writes."""
    taken = await store.put(prefix + "taken", b"theirs")
    await store.put(prefix + "node-a", b"back")
    await store.put(prefix + "policy", b"own")
    results = await store.swap_all(
        [
            Swap(prefix + "new", 0, b"mine", also=(Put(prefix + "event", b"placed"),)),
            Swap(prefix + "taken", 0, b"mine", also=(Put(prefix + "lost-event", b"no"),)),
            Swap(prefix + "moved", 0, b"on-b", absent=prefix + "node-a"),
            Swap(prefix + "read", 0, b"x", read=prefix + "policy"),
            Swap(prefix + "read-none", 0, b"y", read=prefix + "no-policy"),
            Swap(prefix + "taken-2", taken, b"stale"),
        ]
    )
    assert [r.succeeded for r in results] == [True, False, False, True, True, False]
    assert results[3].read is not None and results[3].read.value == b"own"
    assert results[4].read is None
    new, event, read = [await store.get(prefix + k) for k in ("new", "event", "read")]
    assert new is not None and event is not None and read is not None
    assert new.value == b"mine" and new.mod_revision == event.mod_revision == read.mod_revision
    kv = await store.get(prefix + "taken")
    assert kv is not None and kv.value == b"theirs"
    for absent in ("lost-event", "moved", "taken-2"):
        assert await store.get(prefix + absent) is None


async def test_swap_all_refuses_a_key_written_twice(store: Backend, prefix: str) -> None:
    with pytest.raises(ValueError, match="twice"):
        await store.swap_all(
            [
                Swap(prefix + "a", 0, b"1"),
                Swap(prefix + "b", 0, b"2", also=(Put(prefix + "a", b""),)),
            ]
        )
    assert await store.swap_all([]) == []
    assert await store.get(prefix + "b") is None


async def test_concurrent_batches_have_one_winner_a_key(store: Backend, prefix: str) -> None:
    keys = [f"{prefix}{i}" for i in range(20)]
    results = await asyncio.gather(
        *(store.swap_all([Swap(k, 0, str(b).encode()) for k in keys]) for b in range(10))
    )
    for i, key in enumerate(keys):
        winners = [b for b, batch in enumerate(results) if batch[i].succeeded]
        assert len(winners) == 1
        kv = await store.get(key)
        assert kv is not None and kv.value == str(winners[0]).encode()


async def test_watch_from_now_sees_put_then_delete(store: Backend, prefix: str) -> None:
    await store.put(prefix + "before", b"not replayed")
    events = await watch_from_now(store, prefix)
    try:
        put_revision = await store.put(prefix + "a", b"1")
        await store.put(prefix[:-1] + "0", b"outside the prefix")
        await store.delete(prefix + "a")
        put, delete = await events_except_probes(events, 2)
    finally:
        await events.aclose()
        await store.delete(prefix[:-1] + "0")
    assert put.type == "put"
    assert (put.kv.key, put.kv.value, put.kv.mod_revision) == (prefix + "a", b"1", put_revision)
    assert put.kv.create_revision == put_revision
    assert delete.type == "delete"
    assert (delete.kv.key, delete.kv.value) == (prefix + "a", b"")
    assert (delete.kv.create_revision, delete.kv.lease) == (0, 0)
    assert delete.kv.mod_revision > put_revision + 1  # the put outside the prefix came between


async def test_watch_from_a_past_revision_replays(store: Backend, prefix: str) -> None:
    first = await store.put(prefix + "a", b"1")
    second = await store.put(prefix + "a", b"2")
    await store.delete(prefix + "a")
    events = store.watch(prefix, first)
    try:
        replayed = [await next_event(events) for _ in range(3)]
        live = await store.put(prefix + "b", b"3")
        after = await next_event(events)
    finally:
        await events.aclose()
    assert [(e.type, e.kv.value) for e in replayed] == [
        ("put", b"1"),
        ("put", b"2"),
        ("delete", b""),
    ]
    assert [e.kv.mod_revision for e in replayed[:2]] == [first, second]
    assert replayed[2].kv.mod_revision > second
    assert (after.type, after.kv.key, after.kv.mod_revision) == ("put", prefix + "b", live)


async def test_closing_a_watch_cancels_it(store: Backend, prefix: str) -> None:
    events = await watch_from_now(store, prefix)
    assert store.watch_count == 1
    await events.aclose()
    assert store.watch_count == 0
    if isinstance(store, EtcdStore):
        # aetcd's own registry: emptied only once it has sent etcd the WatchCancelRequest.
        assert store._client._watcher._callbacks == {}


async def test_watch_from_a_compacted_revision_raises(store: Backend, prefix: str) -> None:
    old = await store.put(prefix + "a", b"1")
    newer = await store.put(prefix + "a", b"2")
    await store.compact(newer)
    events = store.watch(prefix, old)
    with pytest.raises(StoreError, match="compacted"):
        await next_event(events)
    await events.aclose()


async def test_closing_the_store_ends_a_watch_loudly(store: Backend, prefix: str) -> None:
    events = store.watch(prefix, await store.put(prefix + "a", b"1"))
    assert (await next_event(events)).kv.key == prefix + "a"
    assert isinstance(events, types.AsyncGeneratorType)
    pending = asyncio.ensure_future(next_event(events))
    # The case that must not hang: the watch awaits its backend, not parked at a yield.
    await eventually(lambda: events.ag_await is not None, every=0.001, what="the watch waits")
    await store.close()
    with pytest.raises(StoreError):
        await pending


async def test_a_closed_store_refuses_work(store: Backend, prefix: str) -> None:
    await store.close()
    await store.close()  # twice is harmless
    with pytest.raises(StoreError, match="closed"):
        await store.get(prefix + "a")
    with pytest.raises(StoreError, match="closed"):
        await store.put(prefix + "a", b"")
    with pytest.raises(StoreError, match="closed"):
        await anext(store.watch(prefix))


async def test_lease_expires_unless_refreshed(store: Backend, prefix: str) -> None:
    # Granted first, so its original deadline passes before the other lease's.
    kept = await store.grant_lease(1)
    dropped = await store.grant_lease(1)
    await store.put(prefix + "kept", b"", kept)
    await store.put(prefix + "dropped", b"", dropped)
    kv = await store.get(prefix + "kept")
    assert kv is not None and kv.lease == kept
    refreshed: list[bool] = []

    async def dropped_expired() -> bool:
        if await store.get(prefix + "dropped") is None:
            return True
        refreshed.append(await store.refresh_lease(kept))
        return False

    # Refreshed every 0.2 s, well within its 1 s TTL, while the other lease runs out.
    await eventually(dropped_expired, within=6, every=0.2, what="the unrefreshed lease expired")
    assert all(refreshed)  # the kept lease stayed alive all along
    assert await store.get(prefix + "kept") is not None
    assert await store.refresh_lease(dropped) is False
    await store.revoke_lease(kept)


async def test_revoke_deletes_keys_at_once_with_delete_events(store: Backend, prefix: str) -> None:
    lease = await store.grant_lease(60)
    await store.put(prefix + "a", b"1", lease)
    since = await store.put(prefix + "b", b"2", lease)
    events = store.watch(prefix, since + 1)
    try:
        await store.revoke_lease(lease)
        assert (await store.range(prefix))[0] == []
        deletes = [await next_event(events) for _ in range(2)]
    finally:
        await events.aclose()
    assert [(e.type, e.kv.key) for e in deletes] == [
        ("delete", prefix + "a"),
        ("delete", prefix + "b"),
    ]
    assert deletes[0].kv.mod_revision == deletes[1].kv.mod_revision  # one revocation, one revision
    assert await store.refresh_lease(lease) is False
    await store.revoke_lease(lease)  # again: not an error


async def test_put_with_an_unknown_lease_is_refused(store: Backend, prefix: str) -> None:
    lease = await store.grant_lease(60)
    await store.revoke_lease(lease)
    with pytest.raises(LeaseNotFound, match="lease"):
        await store.put(prefix + "a", b"", lease)
    # In a group of swaps too: the whole transaction is refused (placements try again under a
    # new lease, controlplane/placebatch.py).
    with pytest.raises(LeaseNotFound, match="lease"):
        await store.swap_all([Swap(prefix + "a", 0, b"", lease=lease)])
    assert await store.get(prefix + "a") is None


# etcd only: endpoints.


async def test_etcd_connects_to_the_first_endpoint_that_answers(etcd_url: str) -> None:
    live = etcd_url.removeprefix("etcd://")
    # Port 1 on loopback refuses connections at once: a dead member.
    store = await open_store(f"etcd://127.0.0.1:1,{live}")
    try:
        assert isinstance(store, EtcdStore) and store.endpoint == live
        assert await store.get("/portside-test/none") is None
    finally:
        await store.close()


async def test_etcd_with_no_live_endpoint_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="no endpoint answered: 127.0.0.1:1: .*127.0.0.1:2: "):
        await open_store("etcd://127.0.0.1:1,127.0.0.1:2", timeout_s=2)


# SQLite only: what a file and one owning process add to the contract.


async def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    store = await SqliteStore.open(path)
    first = await store.put("/a", b"1")
    lease = await store.grant_lease(60)
    last = await store.put("/leased", b"2", lease)
    await store.close()

    store = await SqliteStore.open(path)
    try:
        kv = await store.get("/a")
        assert kv is not None and (kv.value, kv.mod_revision) == (b"1", first)
        assert (await store.range(""))[1] == last
        assert await store.put("/b", b"3") == last + 1
        assert await store.refresh_lease(lease) is True
        events = store.watch("/", first)
        assert [(await next_event(events)).kv.key for _ in range(3)] == ["/a", "/leased", "/b"]
        await events.aclose()
    finally:
        await store.close()


async def test_sqlite_refuses_a_second_opener(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    store = await SqliteStore.open(path)
    try:
        with pytest.raises(StoreError, match="in use"):
            await SqliteStore.open(path)
        assert await store.put("/a", b"") == 1  # the first owner is unharmed
    finally:
        await store.close()


async def test_sqlite_keeps_its_history_bounded(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "state.db"), history=10)
    try:
        for i in range(30):
            await store.put("/a", str(i).encode())

        async def compacted() -> bool:
            events = store.watch("/", 1)
            try:
                await next_event(events)
            except StoreError as exc:
                if "compacted" not in str(exc):
                    raise
                return True
            finally:
                await events.aclose()
            return False

        await eventually(compacted, within=3, every=0.1, what="history was compacted")
        events = store.watch("/", 20)
        assert (await next_event(events)).kv.value == b"19"
        await events.aclose()
    finally:
        await store.close()


async def test_sqlite_in_memory() -> None:
    store = await open_store("sqlite://:memory:")
    try:
        assert await store.put("/a", b"1") == 1
        assert (await store.range("/"))[0][0].value == b"1"
    finally:
        await store.close()
