"""A Store that times every call and counts the StoreErrors of each operation, for /metrics.

Wraps any backend (`instrument(await open_store(url))`); watches count errors, not latency."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar

from controlplane.metrics import STORE_ERRORS, STORE_SECONDS
from portside.errors import StoreError

from ._base import Compacted, KeyValue, Store, Swap, Swapped, WatchEvent

T = TypeVar("T")


class InstrumentedStore:
    """Delegates every call to `inner`, observing `portside_controlplane_store_seconds{op}` and
    counting `portside_controlplane_store_errors_total{op}` when it raises StoreError."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    async def _timed(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        try:
            return await call()
        except StoreError:
            STORE_ERRORS.labels(op).inc()
            raise
        finally:
            STORE_SECONDS.labels(op).observe(time.perf_counter() - started)

    async def get(self, key: str) -> KeyValue | None:
        return await self._timed("get", lambda: self.inner.get(key))

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        return await self._timed("range", lambda: self.inner.range(prefix))

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return await self._timed("put", lambda: self.inner.put(key, value, lease))

    async def delete(self, key: str) -> bool:
        return await self._timed("delete", lambda: self.inner.delete(key))

    async def compare_and_swap(
        self,
        key: str,
        mod_revision: int,
        value: bytes | None,
        lease: int = 0,
        *,
        absent: str = "",
        unchanged: tuple[str, int] | None = None,
    ) -> bool:
        return await self._timed(
            "compare_and_swap",
            lambda: self.inner.compare_and_swap(
                key, mod_revision, value, lease, absent=absent, unchanged=unchanged
            ),
        )

    async def swap_all(self, swaps: Sequence[Swap]) -> list[Swapped]:
        return await self._timed("swap_all", lambda: self.inner.swap_all(swaps))

    async def watch(self, prefix: str, start_revision: int = 0) -> AsyncGenerator[WatchEvent, None]:
        # An async generator itself, so that calling watch() still does no I/O.
        events = self.inner.watch(prefix, start_revision)
        try:
            async for event in events:
                yield event
        except Compacted:
            raise  # the caller asked for history that is gone: not a store fault
        except StoreError:
            STORE_ERRORS.labels("watch").inc()
            raise
        finally:
            await events.aclose()

    async def grant_lease(self, ttl_s: int) -> int:
        return await self._timed("grant_lease", lambda: self.inner.grant_lease(ttl_s))

    async def refresh_lease(self, lease: int) -> bool:
        return await self._timed("refresh_lease", lambda: self.inner.refresh_lease(lease))

    async def revoke_lease(self, lease: int) -> None:
        await self._timed("revoke_lease", lambda: self.inner.revoke_lease(lease))

    async def close(self) -> None:
        await self.inner.close()


def instrument(store: Store) -> Store:
    return InstrumentedStore(store)
