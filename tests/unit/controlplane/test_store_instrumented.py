"""The instrumented store: every call is timed by operation and every StoreError counted, and
results and errors pass through unchanged. A stub inner store; the real backends have their
contract suite in tests/integration."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY

from controlplane.store import Compacted, KeyValue, Store, WatchEvent, instrument
from portside.errors import StoreError


class StubStore:
    def __init__(self) -> None:
        self.fail = False

    async def get(self, key: str) -> KeyValue | None:
        if self.fail:
            raise StoreError("etcd unreachable")
        return KeyValue(key, b"v", 1, 1)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return 7

    async def watch(self, prefix: str, start_revision: int = 0) -> AsyncGenerator[WatchEvent, None]:
        yield WatchEvent("put", KeyValue(prefix + "a", b"", 1, 1))
        if start_revision < 0:
            raise Compacted("gone")
        raise StoreError("watch broke")


def sample(name: str, op: str) -> float:
    return REGISTRY.get_sample_value(name, {"op": op}) or 0.0


@pytest.fixture
def stub() -> StubStore:
    return StubStore()


async def test_calls_are_timed_and_pass_through(stub: StubStore) -> None:
    store = instrument(cast(Store, stub))
    before = sample("portside_controlplane_store_seconds_count", "put")
    assert await store.put("/k", b"v") == 7
    assert sample("portside_controlplane_store_seconds_count", "put") == before + 1


async def test_store_errors_are_counted_by_op_and_raised(stub: StubStore) -> None:
    store = instrument(cast(Store, stub))
    stub.fail = True
    before = sample("portside_controlplane_store_errors_total", "get")
    with pytest.raises(StoreError, match="unreachable"):
        await store.get("/k")
    assert sample("portside_controlplane_store_errors_total", "get") == before + 1


async def test_a_broken_watch_counts_and_a_compacted_one_does_not(stub: StubStore) -> None:
    store = instrument(cast(Store, stub))
    before = sample("portside_controlplane_store_errors_total", "watch")
    events: Any = store.watch("/p/", -1)
    assert (await anext(events)).kv.key == "/p/a"
    with pytest.raises(Compacted):
        await anext(events)
    assert sample("portside_controlplane_store_errors_total", "watch") == before
    events = store.watch("/p/")
    await anext(events)
    with pytest.raises(StoreError, match="broke"):
        await anext(events)
    assert sample("portside_controlplane_store_errors_total", "watch") == before + 1
