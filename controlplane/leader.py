"""Leader election through a store lease: exactly one control-plane replica runs the
autoscaler. The leader key is created only if absent, under a lease its holder refreshes."""

from __future__ import annotations

import asyncio
import logging

from controlplane import records
from controlplane.metrics import LEADER
from controlplane.store import Store
from portside.errors import StoreError

log = logging.getLogger(__name__)


class LeaderElection:
    """`is_leader` is true while this replica holds the key. A leader that cannot refresh its
    lease in time steps down before the lease can expire elsewhere (it checks every ttl/3)."""

    def __init__(self, store: Store, replica_id: str, ttl_s: int = 5) -> None:
        self.store = store
        self.replica_id = replica_id
        self.ttl_s = ttl_s
        self.lease = 0
        self.is_leader = False

    async def run(self) -> None:
        while True:
            try:
                await self._turn()
            except StoreError as exc:
                self._step_down(f"store error: {exc}")
            await asyncio.sleep(self.ttl_s / 3)

    async def _turn(self) -> None:
        if self.is_leader:
            if not await self.store.refresh_lease(self.lease):
                self._step_down("lease expired")
            return
        lease = await self.store.grant_lease(self.ttl_s)
        if await self.store.compare_and_swap(records.LEADER, 0, self.replica_id.encode(), lease):
            self.lease, self.is_leader = lease, True
            LEADER.set(1)
            log.info("replica %s is the leader: it runs the autoscaler", self.replica_id)
        else:
            await self.store.revoke_lease(lease)

    def _step_down(self, why: str) -> None:
        if self.is_leader:
            log.warning("replica %s is no longer the leader: %s", self.replica_id, why)
        self.is_leader = False
        LEADER.set(0)

    async def resign(self) -> None:
        """Hand over at once (on shutdown): revoking the lease deletes the key."""
        if self.is_leader:
            self.is_leader = False
            LEADER.set(0)
            try:
                await self.store.revoke_lease(self.lease)
            except StoreError as exc:
                log.warning("could not resign leadership: %s", exc)
