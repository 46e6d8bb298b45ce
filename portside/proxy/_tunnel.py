"""A WebSocket between a client and an upstream, once both have switched protocols: their bytes
pass as they come, with backpressure both ways. The relay follows frame boundaries (never parses
a payload), so it can say the end itself: 1011 to one side when the other dropped without a
close frame, 1001 to both when this hop shuts down."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

from portside.proxy._transport import WS_CLOSE_TIMEOUT
from portside.proxy._wire import FrameTracker, close_frame

_INTERNAL_ERROR: Final = 1011  # what a side hears when the other dropped (1006 is never sent)
_GOING_AWAY: Final = 1001


class Tunnel:
    """Bridges `client` (the connection a request came on) and `upstream` (the one its 101 came
    on). `done` resolves when both are closed."""

    def __init__(self, client: Any, upstream: Any) -> None:
        self._client = client
        self._upstream = upstream
        self._to_upstream = FrameTracker()  # what the client sends
        self._to_client = FrameTracker()  # what the upstream sends
        self._open = 2
        self._cut_later: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self, from_client: bytes, from_upstream: bytes) -> None:
        """Both sides are the tunnel's from here on; `from_*`: bytes that came with the
        handshake."""
        self._client.tunnel = self
        self._upstream.tunnel = self
        if from_upstream:
            self.received(self._upstream, from_upstream)
        if from_client:
            self.received(self._client, from_client)
        self._client.reading.resume("upgrade")
        self._upstream.resume_reading()
        for side in (self._client, self._upstream):
            if side.transport.is_closing():
                self.lost(side)

    def received(self, side: Any, data: bytes) -> None:
        if side is self._client:
            self._to_upstream.feed(data)
            self._upstream.transport.write(data)
        else:
            self._to_client.feed(data)
            self._client.transport.write(data)

    def writing_paused(self, side: Any) -> None:
        other = self._other(side)
        with contextlib.suppress(RuntimeError):
            other.transport.pause_reading()

    def writing_resumed(self, side: Any) -> None:
        other = self._other(side)
        if not other.transport.is_closing():
            with contextlib.suppress(RuntimeError):
                other.transport.resume_reading()

    def lost(self, side: Any) -> None:
        """`side`'s connection ended. If it never sent a close frame, it dropped: the other side
        hears 1011 from the relay. Either way the other side's connection closes once what it was
        sent has gone."""
        if getattr(side, "_tunnel_lost", False):
            return
        side._tunnel_lost = True
        self._open -= 1
        other = self._other(side)
        sent = self._to_upstream if side is self._client else self._to_client
        if not sent.closed:
            self._say_close(other, _INTERNAL_ERROR, b"")
        other.transport.close()
        if self._open == 0 and not self.done.done():
            self.done.set_result(None)
            if self._cut_later is not None:
                self._cut_later.cancel()

    def going_away(self, reason: bytes) -> None:
        """This hop is shutting down: both sides hear 1001 with `reason`, and are cut if they
        have not closed within WS_CLOSE_TIMEOUT."""
        for side in (self._client, self._upstream):
            self._say_close(side, _GOING_AWAY, reason)
        self._cut_later = asyncio.get_running_loop().call_later(WS_CLOSE_TIMEOUT, self.abort)

    def abort(self) -> None:
        for side in (self._client, self._upstream):
            side.transport.abort()

    def _say_close(self, side: Any, code: int, reason: bytes) -> None:
        tracker = self._to_client if side is self._client else self._to_upstream
        if side.transport.is_closing() or tracker.closed or not tracker.at_boundary:
            return  # mid-frame a frame of ours would corrupt the stream: the cut says it
        tracker.closed = True
        side.transport.write(close_frame(code, reason, masked=side is self._upstream))

    def _other(self, side: Any) -> Any:
        return self._upstream if side is self._client else self._client


def close_upstream(connection: Any, code: int, reason: bytes) -> None:
    """Close an upstream WebSocket that was never bridged: a close frame, then the connection."""
    if not connection.transport.is_closing():
        connection.transport.write(close_frame(code, reason, masked=True))
        connection.transport.close()
