"""Gateway rate limiters counted across edges (issue 14), the control plane's half: what each
edge counted per limiter and period, kept in the store, and the other edges' totals handed back.

An edge's counts of one limiter in one period are one record,
`ratelimits/<binding>/<period>/<edge id>` (a JSON object of key -> calls), under a lease that
ends a period after the period does, so every replica answers from the same records and none
outlives its use. The design and its error bound: docs/architecture.md, "Rate limiters across
edges"; the edge's half, which admits calls, is edge/ratelimits.py.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from collections.abc import Callable, Sequence

from controlplane import records
from controlplane.store import Store
from portside.convert import RateCounts
from portside.errors import InvalidArgument, StoreError, Unavailable
from portside.spec import RateLimit

SYNC_EVERY_S = 0.5  # what replies tell edges: the error bound grows with it
MAX_TOTALS = 10_000  # counts in one reply, the largest first (about 0.5 MB)
_CAS_TRIES = 3


def is_current(rule: RateLimit, period: int, now: float) -> bool:
    """The period now, or one next to it: an edge's clock may be a little off the replica's."""
    return abs(period - rule.period_at(now)) <= 1


def record_key(binding: str, period: int, edge_id: str) -> str:
    return f"{records.RATE_LIMITS}{binding}/{period}/{edge_id}"


def largest(counts: RateCounts, most: int) -> RateCounts:
    """At most `most` of the counts, the largest: those are the keys near their limit."""
    if len(counts) <= most:
        return counts
    return dict(heapq.nlargest(most, counts.items(), key=lambda item: item[1]))


class RateLimitBook:
    """SyncRateLimits on one replica. `limits` gives the deployed gateway's limiters."""

    def __init__(
        self,
        store: Store,
        limits: Callable[[], Sequence[RateLimit]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock
        # One lease per (period length, period index), shared by every record of that period.
        self._leases: dict[tuple[float, int], int] = {}

    async def sync(self, edge_id: str, counted: RateCounts) -> RateCounts:
        """Add what `edge_id` counted since its last sync to its records; return the other
        edges' totals for the current periods. Counts of a limiter the deployed gateway lacks,
        or of a period long past, are dropped."""
        if not edge_id or "/" in edge_id:
            raise InvalidArgument(f"edge_id: {edge_id!r} must be non-empty, without /")
        rules = {r.binding: r for r in self.limits()}
        now = self.clock()
        added: dict[tuple[str, int], dict[str, int]] = {}
        for (binding, key, period), count in counted.items():
            rule = rules.get(binding)
            if rule is not None and count > 0 and is_current(rule, period, now):
                added.setdefault((binding, period), {})[key] = count
        for (binding, period), counts in added.items():
            await self._add(record_key(binding, period, edge_id), rules[binding], period, counts)
        self._forget_leases(now)
        return largest(await self._others(edge_id, rules, now), MAX_TOTALS)

    async def _add(self, key: str, rule: RateLimit, period: int, counts: dict[str, int]) -> None:
        """Add `counts` into the record at `key` (compare-and-swap: one edge's sync may reach
        two replicas when a call is retried after a timeout)."""
        for _ in range(_CAS_TRIES):
            kv = await self.store.get(key)
            total: dict[str, int] = json.loads(kv.value) if kv is not None else {}
            for name, count in counts.items():
                total[name] = total.get(name, 0) + count
            value = json.dumps(total, separators=(",", ":")).encode()
            revision = kv.mod_revision if kv is not None else 0
            try:
                lease = await self._lease(rule, period)
                if await self.store.compare_and_swap(key, revision, value, lease):
                    return
            except StoreError:
                # The lease may be gone (a store restored or failed over): a new one next try.
                self._leases.pop((rule.period_s, period), None)
        raise Unavailable(f"rate-limit counts {key}: kept changing under this sync; sync again")

    async def _lease(self, rule: RateLimit, period: int) -> int:
        """The lease of the period's records: it ends a period after the period does."""
        slot = (rule.period_s, period)
        if slot not in self._leases:
            ends = (period + 2) * rule.period_s
            ttl = max(2, math.ceil(ends - self.clock()))
            self._leases[slot] = await self.store.grant_lease(ttl)
        return self._leases[slot]

    def _forget_leases(self, now: float) -> None:
        for period_s, period in list(self._leases):
            if (period + 2) * period_s < now:
                del self._leases[(period_s, period)]

    async def _others(self, edge_id: str, rules: dict[str, RateLimit], now: float) -> RateCounts:
        kvs, _ = await self.store.range(records.RATE_LIMITS)
        totals: RateCounts = {}
        for kv in kvs:
            binding, period_text, edge = kv.key[len(records.RATE_LIMITS) :].split("/", 2)
            rule = rules.get(binding)
            period = int(period_text)
            if edge == edge_id or rule is None or not is_current(rule, period, now):
                continue
            for name, count in json.loads(kv.value).items():
                slot = (binding, name, period)
                totals[slot] = totals.get(slot, 0) + count
        return totals
