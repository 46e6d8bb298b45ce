"""Gateway rate limiters on an edge (issue 14): `await env.LIMITER.limit(key=...)` answered here,
from this edge's exact count plus the other edges' totals at its last sync with the control plane
(controlplane/ratelimits.py); a call never waits on the network.

Fixed windows: a call falls in period floor(unix time / period). A call is admitted while (the
other edges' count at the last sync) + (this edge's count) < limit; only admitted calls count.
Every half second the edge sends what it admitted since its last sync and takes the others'
totals. The error bound, and what happens while the control plane is away (each edge goes on
alone): docs/architecture.md, "Rate limiters across edges".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence

import grpc

from edge.metrics import RATE_LIMIT_CALLS, RATE_LIMIT_SYNC_FAILURES
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.convert import RateCounts, rate_counts_from_pb, rate_counts_to_pb
from portside.spec import RateLimit

log = logging.getLogger(__name__)

SYNC_EVERY_S = 0.5  # until the control plane's first reply says otherwise
MAX_KEY_CHARS = 256  # a longer key is counted by its SHA-256: records and replies stay small
MAX_SENT = 10_000  # counts in one sync, the largest first; the rest go in the next


class EdgeRateLimits:
    """This edge's limiters (`set_limits` from each deployed config) and their counts, which
    hold only current periods: a key's counts go when its period ends."""

    def __init__(self, edge_id: str, clock: Callable[[], float] = time.time) -> None:
        self.edge_id = edge_id
        self.clock = clock
        self.sync_every_s = SYNC_EVERY_S
        self._rules: dict[str, RateLimit] = {}
        self._own: RateCounts = {}  # admitted here, by (binding, key, period)
        self._unsent: RateCounts = {}  # admitted here and not yet taken by a sync that succeeded
        self._others: RateCounts = {}  # the other edges' totals at the last sync
        self._new_limiter = asyncio.Event()  # sync now: the others' counts are not known yet
        self._failing = False

    def set_limits(self, limits: Sequence[RateLimit]) -> None:
        """The deployed gateway's limiters. A limiter removed, or whose period changed, starts
        from nothing; a new `limit` applies to the counts so far."""
        old, self._rules = self._rules, {r.binding: r for r in limits}
        kept = {b for b, r in self._rules.items() if b in old and old[b].period_s == r.period_s}
        for counts in (self._own, self._unsent, self._others):
            for slot in [s for s in counts if s[0] not in kept]:
                del counts[slot]
        if set(self._rules) - kept:
            self._new_limiter.set()

    async def limit(self, binding: str, key: str) -> bool:
        """The RateLimiter protocol of the gateway runtime (portside.gateway.env)."""
        return self.admit(binding, key)

    def admit(self, binding: str, key: str) -> bool:
        """Whether this call is within `binding`'s limit for `key`, counting it if so. A binding
        no deployed limiter has (removed by a deploy while the call was in flight) admits."""
        rule = self._rules.get(binding)
        if rule is None:
            return True
        if len(key) > MAX_KEY_CHARS:
            key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        slot = (binding, key, rule.period_at(self.clock()))
        own = self._own.get(slot, 0)
        if self._others.get(slot, 0) + own >= rule.limit:
            RATE_LIMIT_CALLS.labels(binding, "limited").inc()
            return False
        self._own[slot] = own + 1
        self._unsent[slot] = self._unsent.get(slot, 0) + 1
        RATE_LIMIT_CALLS.labels(binding, "allowed").inc()
        return True

    def forget_ended(self) -> None:
        """Drop the counts of periods that have ended. Unsent ones are kept one period more:
        another edge whose clock is a little behind may still be in it."""
        now = self.clock()
        for counts, after in ((self._own, 0), (self._others, 0), (self._unsent, 1)):
            for slot in list(counts):
                rule = self._rules.get(slot[0])
                if rule is None or slot[2] < rule.period_at(now) - after:
                    del counts[slot]

    def take_unsent(self) -> RateCounts:
        """What the next sync sends (the largest MAX_SENT counts; the rest wait)."""
        if len(self._unsent) <= MAX_SENT:
            taken, self._unsent = self._unsent, {}
            return taken
        ranked = sorted(self._unsent.items(), key=lambda item: item[1], reverse=True)
        taken, self._unsent = dict(ranked[:MAX_SENT]), dict(ranked[MAX_SENT:])
        return taken

    def give_back(self, counts: RateCounts) -> None:
        """A sync failed: what it took goes in the next one."""
        for slot, count in counts.items():
            self._unsent[slot] = self._unsent.get(slot, 0) + count

    def take_totals(self, totals: RateCounts) -> None:
        """The other edges' totals from a sync's reply replace the last ones."""
        now = self.clock()
        self._others = {
            slot: count
            for slot, count in totals.items()
            if (rule := self._rules.get(slot[0])) is not None and slot[2] >= rule.period_at(now)
        }

    async def run(self, channel: grpc.aio.Channel, deadline_s: float) -> None:
        """Sync with the control plane every `sync_every_s` while any limiter is deployed, and
        at once when a new one is (an edge just started knows the others' counts after one
        call); runs until cancelled."""
        stub = cp_grpc.ControlPlaneStub(channel)
        while True:
            self._new_limiter.clear()
            self.forget_ended()
            if self._rules:
                await self._sync(stub, deadline_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_limiter.wait(), self.sync_every_s)

    async def _sync(self, stub: cp_grpc.ControlPlaneStub, deadline_s: float) -> None:
        """One sync. A failed one changes nothing but the metric: calls go on being limited on
        this edge's counts and the last totals (static stability)."""
        sent = self.take_unsent()
        request = cp.SyncRateLimitsRequest(edge_id=self.edge_id, counts=rate_counts_to_pb(sent))
        try:
            reply = await stub.SyncRateLimits(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            self.give_back(sent)
            RATE_LIMIT_SYNC_FAILURES.inc()
            if not self._failing:
                log.warning(
                    "rate-limit sync failed (%s: %s); limiting on this edge's counts and the "
                    "last totals until the control plane answers",
                    exc.code().name,
                    (exc.details() or "").strip(),
                )
            self._failing = True
            return
        if self._failing:
            log.info("rate-limit sync with the control plane works again")
        self._failing = False
        self.take_totals(rate_counts_from_pb(reply.totals))
        if reply.sync_every_seconds > 0:
            self.sync_every_s = reply.sync_every_seconds
