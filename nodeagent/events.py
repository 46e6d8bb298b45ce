"""The agent's outbox of lifecycle events: queued as the instance manager emits them, sent on the
heartbeat stream, and sent again after a reconnect unless the control plane acknowledged them.

The control plane answers every heartbeat message with exactly one reply, after it handled the
message, so the N-th reply acknowledges the N-th message sent on that stream. Events of messages
not acknowledged when the stream breaks go out again on the next stream: delivery is at least
once, and a duplicate is possible when the stream broke between handling and reply.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from nodeagent import metrics
from portside.events import Event

log = logging.getLogger(__name__)

MAX_QUEUED = 10_000
MAX_PER_MESSAGE = 500  # keeps one heartbeat message far below gRPC's message size limit


class EventOutbox:
    """A bounded FIFO of events (the oldest are dropped, with a log line, when the control plane
    stays unreachable that long), batches in flight, and a callback to wake the sender."""

    def __init__(self, limit: int = MAX_QUEUED, wake: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.wake = wake
        self._pending: collections.deque[Event] = collections.deque()
        self._in_flight: collections.deque[list[Event]] = collections.deque()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._pending) + sum(len(b) for b in self._in_flight)

    def put(self, event: Event) -> None:
        self._pending.append(event)
        self._trim()
        if self.wake is not None:
            self.wake()

    def take(self) -> list[Event]:
        """The next batch for a message about to be sent; call once per message, even when it
        is empty, so that replies and batches pair up."""
        batch = [self._pending.popleft() for _ in range(min(MAX_PER_MESSAGE, len(self._pending)))]
        self._in_flight.append(batch)
        return batch

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def acknowledge(self) -> None:
        """A reply came: the oldest message in flight was handled."""
        if self._in_flight:
            self._in_flight.popleft()

    def refused(self) -> None:
        """A reply came, but the control plane could not record the message (its store was
        unreachable): the oldest batch in flight goes again, first."""
        if self._in_flight:
            self._pending.extendleft(reversed(self._in_flight.popleft()))
            self._trim()

    def stream_lost(self) -> None:
        """Put the events of unacknowledged messages back in front, in their order."""
        while self._in_flight:
            self._pending.extendleft(reversed(self._in_flight.pop()))
        self._trim()

    def _trim(self) -> None:
        excess = len(self) - self.limit
        if excess <= 0:
            return
        dropped = min(excess, len(self._pending))
        for _ in range(dropped):
            self._pending.popleft()
        self.dropped += dropped
        metrics.EVENTS_DROPPED.inc(dropped)
        log.warning(
            "event outbox full (%d): dropped the %d oldest events (%d so far); is the "
            "control plane reachable?",
            self.limit,
            dropped,
            self.dropped,
        )
