"""Leader election through a store lease: exactly one control-plane replica runs the
autoscaler. The leader key is created only if absent, under a lease its holder refreshes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from controlplane import records
from controlplane.metrics import LEADER
from controlplane.store import Store
from portside.errors import StoreError

log = logging.getLogger(__name__)

# A leader steps down this long before its lease could expire, counted from the last refresh it
# sent: by then its next refresh has not answered, and another replica may soon take over.
MARGIN_S = 0.5


class LeaderElection:
    """`is_leader` is true while this replica holds the key. A leader that cannot refresh its
    lease in time steps down before the lease can expire elsewhere (it refreshes every ttl/3,
    and gives each refresh only what is left of the lease).

    Store failures never end it: it steps down and tries again every ttl/3. When the store comes
    back (a failover, quorum regained) and the key is still this replica's — its lease lived on,
    or its create was applied though the answer was lost — it takes the key up again rather than
    wait for the lease to run out."""

    def __init__(
        self,
        store: Store,
        replica_id: str,
        ttl_s: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.replica_id = replica_id
        self.ttl_s = ttl_s
        self.clock = clock
        self.lease = 0
        self.is_leader = False
        self._held_until = 0.0  # by `clock`: the lease lives at least until then

    async def run(self) -> None:
        while True:
            try:
                await self._turn()
            except StoreError as exc:
                self._step_down(f"store error: {exc}")
            await asyncio.sleep(self.ttl_s / 3)

    async def _turn(self) -> None:
        if self.is_leader:
            await self._refresh(self.lease)
            return
        current = await self.store.get(records.LEADER)
        if current is not None:
            if current.value == self.replica_id.encode() and current.lease:
                await self._refresh(current.lease)  # ours still: take it up again if it lives
            return
        sent = self.clock()
        lease = await self.store.grant_lease(self.ttl_s)
        # A create whose answer is lost (StoreError) may have been applied: the next turn reads
        # the key, finds it ours and takes it up.
        if await self.store.compare_and_swap(records.LEADER, 0, self.replica_id.encode(), lease):
            self._lead(lease, sent + self.ttl_s)
        else:
            await self.store.revoke_lease(lease)

    async def _refresh(self, lease: int) -> None:
        sent = self.clock()
        # A refresh proves nothing once the lease may have expired: it gets what is left of it.
        left = self._held_until - MARGIN_S - sent if self.is_leader else self.ttl_s - MARGIN_S
        if left <= 0:
            self._step_down("the lease was not refreshed in time")
            return
        try:
            async with asyncio.timeout(left):
                alive = await self.store.refresh_lease(lease)
        except TimeoutError:
            self._step_down(f"no refresh of the lease answered within {left:.1f}s")
            return
        if alive:
            self._lead(lease, sent + self.ttl_s)
        else:
            self._step_down("lease expired")

    def _lead(self, lease: int, held_until: float) -> None:
        self.lease, self._held_until = lease, held_until
        if not self.is_leader:
            self.is_leader = True
            LEADER.set(1)
            log.info("replica %s is the leader: it runs the autoscaler", self.replica_id)

    def _step_down(self, why: str) -> None:
        if self.is_leader:
            log.warning("replica %s is no longer the leader: %s", self.replica_id, why)
        self.is_leader = False
        LEADER.set(0)

    async def resign(self) -> None:
        """Hand over at once (on shutdown): revoking the lease deletes the key (if it is still
        this replica's after a step-down, too)."""
        self.is_leader = False
        LEADER.set(0)
        if self.lease:
            try:
                await self.store.revoke_lease(self.lease)
            except StoreError as exc:
                log.warning("could not resign leadership: %s", exc)
