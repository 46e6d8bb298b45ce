"""A byte pipe between two TCP connections for the egress proxy's allowed non-HTTP traffic: each
side's bytes go to the other as they come, a slow side pauses the other's reading, and a
half-close passes through (each direction ends on its own). A pipe that carries no byte either
way for its idle time is cut (both sides closed at once, unsent bytes dropped), so that
connections a container leaves open and silent do not hold the agent's file descriptors."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Final, cast

log = logging.getLogger(__name__)

_WRITE_HIGH = 256 * 1024  # unsent bytes to one side beyond this pause reading the other
# A pipe silent both ways this long is cut. Long enough for protocols that keep a connection
# quiet between uses (a database pool's, an SSH session's: those send keep-alives well within
# it); short enough that a container cannot pile up silent connections through its agent.
IDLE_S: Final = 300.0


class _Side(asyncio.Protocol):
    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe
        self.other: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH)
        other = self.other
        if other is None or other.transport is None:
            self.transport.pause_reading()  # nowhere to send yet: resumed when the other is up
        elif other.transport.is_closing():
            self.transport.close()  # the other side went before this one came
        else:
            other.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        assert self.other is not None and self.other.transport is not None
        self.pipe.last_bytes = self.pipe.loop.time()
        self.other.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is not None and other.transport is not None and other.transport.can_write_eof():
            other.transport.write_eof()
        if other is None or other.eof:
            self.pipe.close()
        return True  # the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.lost(self, exc)

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class _Pipe:
    def __init__(self) -> None:
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.client.other, self.upstream.other = self.upstream, self.client
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.last_bytes = self.loop.time()
        self._idle_s = 0.0
        self._idle_check: asyncio.TimerHandle | None = None
        self._lost = 0

    def watch(self, idle_s: float) -> None:
        """Cut the pipe once no byte passed either way for `idle_s` (from now on)."""
        self._idle_s = idle_s
        self.last_bytes = self.loop.time()
        self._idle_check = self.loop.call_later(idle_s, self._cut_if_idle)

    def _stop_watching(self) -> None:
        if self._idle_check is not None:
            self._idle_check.cancel()

    def close(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.close()

    def abort(self) -> None:
        self._stop_watching()
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.abort()

    def _cut_if_idle(self) -> None:
        silent = self.loop.time() - self.last_bytes
        if silent < self._idle_s:
            self._idle_check = self.loop.call_later(self._idle_s - silent, self._cut_if_idle)
            return
        log.info("egress: a pipe silent for %.0f s is cut", silent)
        self.abort()  # not close(): bytes a side does not read must not keep it open

    def lost(self, side: _Side, exc: Exception | None) -> None:
        other = side.other
        if other is not None and other.transport is not None:
            if exc is not None:
                other.transport.abort()  # a reset passes on as a reset
            else:
                other.transport.close()
        self._lost += 1
        if self._lost == 2:
            self._stop_watching()
            if not self.done.done():
                self.done.set_result(None)


async def pipe(
    client: socket.socket, host: str, port: int, connect_s: float, idle_s: float = IDLE_S
) -> None:
    """Connect to host:port and pass bytes between it and `client` until both are closed, or
    until no byte passed either way for `idle_s`. Raises OSError (or TimeoutError) when the
    connection cannot be made; `client` is then the caller's to close."""
    loop = asyncio.get_running_loop()
    joined = _Pipe()
    async with asyncio.timeout(connect_s):
        await loop.create_connection(lambda: joined.upstream, host, port)
    try:
        await loop.connect_accepted_socket(lambda: joined.client, client)
    except BaseException:
        joined.close()
        raise
    joined.watch(idle_s)
    try:
        await joined.done
    finally:
        if not joined.done.done():
            joined.abort()


__all__ = ["IDLE_S", "pipe"]
