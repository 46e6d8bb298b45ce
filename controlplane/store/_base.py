"""The store contract: a dozen async methods every backend honours (etcd, embedded SQLite).

Every write can be made conditional on a key's mod revision; keys are str, values bytes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from portside.errors import StoreError


class Compacted(StoreError):
    """A watch asked for history the store no longer keeps."""


class LeaseNotFound(StoreError):
    """A write named a lease the store does not have (expired, or lost with a restore)."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0  # 0: no lease


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["put", "delete"]
    kv: KeyValue  # for "delete", value is b"" and mod_revision is the deleting revision


@dataclass(frozen=True)
class Put:
    """A plain write that goes with a Swap (Store.swap_all)."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Swap:
    """One conditional write of Store.swap_all: `value` at `key` if the key is at `mod_revision`
    (0: absent) and the key `absent` (if any) does not exist; if so, `also` is written with it
    and `read` (a key, if any) is read after the writes, all at the same revision."""

    key: str
    mod_revision: int
    value: bytes
    lease: int = 0
    absent: str = ""
    also: tuple[Put, ...] = ()
    read: str = ""


@dataclass(frozen=True)
class Swapped:
    """The outcome of one Swap: whether its check held, and (if it held) the key it read."""

    succeeded: bool
    read: KeyValue | None = None


#: Most swaps one swap_all takes, keys of the swaps and their puts all distinct: etcd refuses a
#: transaction of more than 128 operations (--max-txn-ops) or that writes one key twice.
MAX_SWAPS = 128


class Store(Protocol):
    """What the control plane needs from its state store.

    Revisions are one cluster-wide, increasing counter, as in etcd.
    """

    async def get(self, key: str) -> KeyValue | None: ...

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under `prefix`, sorted by key, and the store revision they were read at."""
        ...

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write unconditionally; returns the new revision."""
        ...

    async def delete(self, key: str) -> bool:
        """True if the key existed."""
        ...

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
        """Write `value` (or delete, if None) only if the key's mod revision is `mod_revision`
        (and, with `absent`, only if that other key does not exist; with `unchanged` (another
        key, its mod revision), only if that key is still at that revision: one transaction).

        `mod_revision == 0` means "only if absent": create-if-absent. False if the check failed.
        """
        ...

    async def swap_all(self, swaps: Sequence[Swap]) -> list[Swapped]:
        """Apply each Swap whose check holds, in one transaction (one revision, one round trip);
        a swap whose check fails changes nothing, and does not stop the others. At most
        MAX_SWAPS, no key written twice (ValueError otherwise). One outcome per swap, in order.
        """
        ...

    def watch(self, prefix: str, start_revision: int = 0) -> AsyncGenerator[WatchEvent, None]:
        """Events under `prefix` from `start_revision` (0: from now on), until the iterator
        is closed. Raises Compacted if that revision has been compacted away.

        Calling watch() does no I/O: the watch starts at the first `__anext__`, so "now" is
        then. To miss nothing, watch from the revision `range()` returned, plus one.
        `aclose()` (or `contextlib.aclosing`) cancels the watch at once; merely leaving an
        `async for` leaves that to the garbage collector. If the store is closed while the
        watch is open, the iterator raises StoreError rather than ending quietly.
        """
        ...

    async def grant_lease(self, ttl_s: int) -> int:
        """A new lease id; keys put with it vanish when it is not refreshed within ttl_s.

        The store may grant more than ttl_s (etcd's minimum is 2 s with default timings)."""
        ...

    async def refresh_lease(self, lease: int) -> bool:
        """Keep the lease alive; False if it has already expired."""
        ...

    async def revoke_lease(self, lease: int) -> None:
        """End the lease now, deleting its keys; an expired or unknown lease is not an error."""
        ...

    async def close(self) -> None: ...


def check_swaps(swaps: Sequence[Swap]) -> None:
    """Refuse, before any I/O, a batch that swap_all cannot take whole."""
    if len(swaps) > MAX_SWAPS:
        raise ValueError(f"swap_all takes at most {MAX_SWAPS} swaps, not {len(swaps)}")
    written = [s.key for s in swaps] + [p.key for s in swaps for p in s.also]
    if len(set(written)) != len(written):
        raise ValueError("swap_all: a key is written twice in one batch")


StoreKind = Literal["etcd", "sqlite"]
