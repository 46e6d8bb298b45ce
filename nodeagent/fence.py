"""When this node may serve its named instances: the agent's side of fencing.

A named instance has at most one live copy. The control plane may place it elsewhere once this
node's lease has expired, which happens no sooner than the lease TTL after the last heartbeat
message that refreshed it. The agent knows when it sent each message, and a reply says whether
that message refreshed the lease ("confirmed"). So the agent stops serving named instances
`fence_after` (shorter than the TTL) after the send of its last confirmed message, on its own
clock, whatever the network does: before anyone may place them again, with TTL - fence_after to
spare (docs/architecture.md, "Fencing").

A reply that says the store had no quorum also counts: no replica can place anything then, and
etcd gives every lease a full TTL again when a leader is elected.

It serves again only after a reconcile: a reply, sent after this node's key was written under
a new lease and read back, that names the reported instances placed elsewhere meanwhile (the
agent removes those). A fresh agent starts fenced, so containers adopted from before a restart
are never served before that check.

The clock is CLOCK_BOOTTIME: it keeps counting while the host is suspended (a paused VM, a
laptop lid), so a node that wakes from a long stop knows how long it was gone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable

from nodeagent import metrics
from portside.errors import NodeFenced
from portside.spec import instance_id

log = logging.getLogger(__name__)

DEFAULT_FENCE_AFTER_S = 7.0  # until the first reply says otherwise; the lease TTL is 10 s
STARTUP_WAIT_S = 5.0  # a request right after the agent started waits this long for its reconcile


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Fence:
    """The fencing clock. `allows_named()` is what every named request and Start asks; the
    heartbeat calls `sent`, `replied` and `reconciled`; `check()` runs on a short timer."""

    def __init__(
        self,
        fence_after_s: float = DEFAULT_FENCE_AFTER_S,
        clock: Callable[[], float] = boottime,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.fence_after_s = fence_after_s
        self._clock = clock
        self._on_change = on_change
        self._confirmed_at: float | None = None  # send time of the last confirmed message
        self._reconciled = False  # a fresh agent has not checked its instances yet
        self._sends: collections.deque[float] = collections.deque()  # unanswered, in order
        # Placed elsewhere, as the last reconcile said: refused until they are removed.
        self._elsewhere: set[str] = set()
        self._fenced = True  # as last reported through on_change and the metric
        self._first_reconcile = asyncio.Event()
        metrics.FENCED.set(1)

    def allows_named(self, instance_id: str = "") -> bool:
        """True while this node may serve named instances (checked per request: cheap)."""
        if not self._reconciled or self._confirmed_at is None or instance_id in self._elsewhere:
            return False
        return self._clock() - self._confirmed_at <= self.fence_after_s

    async def admit(self, class_name: str, name: str) -> None:
        """Let a request or a Start for named instance `name` through, or raise NodeFenced
        (counted). Right after the agent started, it waits a moment for the first reconcile
        (the first heartbeat's reply) rather than refuse."""
        iid = instance_id(class_name, name)
        if not self._reconciled and not self._first_reconcile.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STARTUP_WAIT_S):
                    await self._first_reconcile.wait()
        if self.allows_named(iid):
            return
        metrics.FENCED_REQUESTS.labels(class_name).inc()
        raise NodeFenced(
            f"this node serves no named instance now: {self.reason(iid)};"
            f" {class_name}/{name} may be placed elsewhere, resolve it again"
        )

    @property
    def fenced(self) -> bool:
        return not self.allows_named()

    def reason(self, instance_id: str = "") -> str:
        if instance_id in self._elsewhere:
            return "the control plane placed this instance on another node meanwhile"
        if not self._reconciled:
            return "it has not yet checked its instances with the control plane"
        if self._confirmed_at is None:
            return "its lease was never confirmed"
        gone = self._clock() - self._confirmed_at
        return f"its lease was last confirmed {gone:.1f}s ago (fence after {self.fence_after_s:g}s)"

    # -- the heartbeat's side --------------------------------------------------------------

    def sent(self) -> None:
        """A heartbeat message is going out now; its reply will pair with it."""
        self._sends.append(self._clock())

    def replied(self, *, confirmed: bool, fence_after_s: float = 0.0) -> None:
        """The reply to the oldest unanswered message arrived. `confirmed`: that message
        refreshed the lease, or the store had no quorum (nobody can place)."""
        sent = self._sends.popleft() if self._sends else None
        if fence_after_s > 0:
            self.fence_after_s = fence_after_s
        if confirmed and sent is not None:
            if self._confirmed_at is None or sent > self._confirmed_at:
                self._confirmed_at = sent
        self.check()

    def reconciled(self, elsewhere: set[str]) -> None:
        """A reconcile reply came: `elsewhere` are refused from now on (the agent removes
        them), the others may be served again. Call right after `replied`, in the same turn."""
        self._elsewhere = set(elsewhere)
        self._reconciled = True
        self._first_reconcile.set()
        self.check()

    def removed(self, instance_id: str) -> None:
        """An instance placed elsewhere is gone from this node: if it is placed here again
        one day, it boots afresh."""
        self._elsewhere.discard(instance_id)

    def stream_lost(self) -> None:
        """Messages of a broken stream will get no reply."""
        self._sends.clear()

    def check(self) -> bool:
        """Note a change of state (log, metric, callback); True while fenced."""
        fenced = self.fenced
        if fenced != self._fenced:
            self._fenced = fenced
            metrics.FENCED.set(1 if fenced else 0)
            if fenced:
                metrics.FENCES.inc()
                log.warning("fenced: serving no named instance, as %s", self.reason())
            else:
                log.info("lease confirmed and instances reconciled: serving named instances")
            if self._on_change is not None:
                self._on_change(fenced)
        return fenced
