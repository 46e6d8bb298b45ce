"""Gateway secrets and rate-limit counts against a real store (etcd on loopback, SQLite in a
file): sealed records, the watch that edges and agents follow, a replica with no key or another
key, and the per-edge rate-limit records with their lease."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import cast

import pytest

from controlplane import records
from controlplane.ratelimits import RateLimitBook, record_key
from controlplane.secrets import MAX_SECRETS, Secrets, SecretsKey
from controlplane.store import Store, open_store
from portside.errors import FailedPrecondition, InvalidArgument, NotFound
from portside.spec import RateLimit
from tests.support import eventually

pytestmark = pytest.mark.integration

VALUE = "integration-secret-value-7f3a"
KEY = SecretsKey(b"i" * 32)


@pytest.fixture(params=["etcd", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "etcd":
        url = cast(str, request.getfixturevalue("etcd_url"))
    else:
        url = f"sqlite://{tmp_path / 'state.db'}"
    opened = await open_store(url)
    await _clear(opened)
    try:
        yield opened
    finally:
        await _clear(opened)
        await opened.close()


async def _clear(store: Store) -> None:
    for prefix in (records.SECRETS, records.RATE_LIMITS):
        kvs, _ = await store.range(prefix)
        for kv in kvs:
            await store.delete(kv.key)


async def test_put_list_delete_and_the_store_holds_no_value(store: Store) -> None:
    secrets = Secrets(store, KEY, clock=lambda: 1000.0)
    put = await secrets.put("API_KEY", VALUE)
    assert (put.name, put.updated_at) == ("API_KEY", 1000.0)
    kvs, _ = await store.range(records.SECRETS)
    assert [kv.key for kv in kvs] == [records.SECRETS + "API_KEY"]
    assert VALUE.encode() not in kvs[0].value
    await secrets.put("API_KEY", VALUE + "2")  # a new value replaces the old
    await secrets.put("OTHER", "x")
    listed = await secrets.listing()
    assert [s.name for s in listed] == ["API_KEY", "OTHER"]
    assert listed[0].digest == KEY.digest("API_KEY", VALUE + "2") != put.digest
    assert (await secrets.delete("OTHER")).name == "OTHER"
    with pytest.raises(NotFound, match="no secret OTHER"):
        await secrets.delete("OTHER")


async def test_the_watch_sends_all_values_on_opening_and_after_each_change(store: Store) -> None:
    secrets = Secrets(store, KEY)
    await secrets.put("A", "1")
    async with aclosing(secrets.watch()) as watch:
        assert await anext(watch) == {"A": "1"}
        await secrets.put("B", "2")
        assert await asyncio.wait_for(anext(watch), 5) == {"A": "1", "B": "2"}
        await secrets.put("A", "3")
        assert await asyncio.wait_for(anext(watch), 5) == {"A": "3", "B": "2"}
        await secrets.delete("B")
        assert await asyncio.wait_for(anext(watch), 5) == {"A": "3"}


async def test_a_replica_without_the_key_lists_and_deletes_but_serves_nothing(
    store: Store,
) -> None:
    keyless = Secrets(store, None)
    assert await keyless.key_problem() is None  # nothing to serve: nothing wrong
    async with aclosing(keyless.watch()) as watch:
        assert await anext(watch) == {}
        await Secrets(store, KEY).put("API_KEY", VALUE)
        with pytest.raises(FailedPrecondition, match="without --secrets-key-file") as exc:
            await asyncio.wait_for(anext(watch), 5)
    assert VALUE not in str(exc.value)
    with pytest.raises(FailedPrecondition, match="without --secrets-key-file"):
        await keyless.put("OTHER", "x")
    problem = await keyless.key_problem()
    assert problem is not None and "holds 1 gateway secrets" in problem
    assert [s.name for s in await keyless.listing()] == ["API_KEY"]
    await keyless.delete("API_KEY")


async def test_a_replica_with_another_key_refuses_to_mix_keys(store: Store) -> None:
    await Secrets(store, KEY).put("API_KEY", VALUE)
    stranger = Secrets(store, SecretsKey(b"s" * 32))
    problem = await stranger.key_problem()
    assert problem is not None and KEY.id in problem and stranger.key is not None
    with pytest.raises(FailedPrecondition, match=f"sealed with {KEY.id}"):
        await stranger.put("OTHER", "x")
    with pytest.raises(FailedPrecondition, match="same key file"):
        async with aclosing(stranger.watch()) as watch:
            await anext(watch)


async def test_the_number_of_secrets_is_limited(store: Store) -> None:
    secrets = Secrets(store, KEY)
    for i in range(MAX_SECRETS):
        await store.put(records.SECRETS + f"S{i}", KEY.seal(f"S{i}", "v", 0).encode())
    with pytest.raises(InvalidArgument, match=f"the limit is {MAX_SECRETS}"):
        await secrets.put("ONE_MORE", "v")
    await secrets.put("S0", "replaced")  # an existing name can still change


async def test_rate_limit_syncs_add_an_edges_counts_and_return_the_others(store: Store) -> None:
    rule = RateLimit("LIMITER", limit=10, period_s=60.0)
    now = 6000.0  # period 100
    book = RateLimitBook(store, lambda: (rule,), clock=lambda: now)
    assert await book.sync("edge-a", {("LIMITER", "k", 100): 3}) == {}
    assert await book.sync("edge-b", {("LIMITER", "k", 100): 2}) == {("LIMITER", "k", 100): 3}
    assert await book.sync("edge-a", {("LIMITER", "k", 100): 1}) == {("LIMITER", "k", 100): 2}
    # Another replica answers the same: it reads the same records.
    other_replica = RateLimitBook(store, lambda: (rule,), clock=lambda: now)
    assert await other_replica.sync("edge-c", {}) == {("LIMITER", "k", 100): 6}
    kv = await store.get(record_key("LIMITER", 100, "edge-a"))
    assert kv is not None and kv.value == b'{"k":4}' and kv.lease != 0
    # Counts of a limiter not deployed, or of a period long past, are dropped.
    await book.sync("edge-a", {("GONE", "k", 100): 5, ("LIMITER", "k", 90): 5})
    kvs, _ = await store.range(records.RATE_LIMITS)
    assert sorted(kv.key.rsplit("/", 1)[1] for kv in kvs) == ["edge-a", "edge-b"]
    with pytest.raises(InvalidArgument, match="edge_id"):
        await book.sync("a/b", {})


async def test_rate_limit_records_go_when_their_period_has_ended(store: Store) -> None:
    rule = RateLimit("LIMITER", limit=10, period_s=1.0)
    book = RateLimitBook(store, lambda: (rule,))
    period = rule.period_at(time.time())
    await book.sync("edge-a", {("LIMITER", "k", period): 1})
    assert (await store.range(records.RATE_LIMITS))[0]

    async def gone() -> bool:
        return not (await store.range(records.RATE_LIMITS))[0]

    # The lease ends a period after the period, and at least 2 s (etcd's least) after the put.
    await eventually(gone, within=10, every=0.2, what="the period's records gone")
