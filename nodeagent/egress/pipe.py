"""A byte pipe between two TCP connections for the egress proxy's allowed non-HTTP traffic: each
side's bytes go to the other as they come, a slow side pauses the other's reading, and a
half-close passes through (each direction ends on its own)."""

from __future__ import annotations

import asyncio
import socket
from typing import cast

_WRITE_HIGH = 256 * 1024  # unsent bytes to one side beyond this pause reading the other


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
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lost = 0

    def close(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.close()

    def lost(self, side: _Side, exc: Exception | None) -> None:
        other = side.other
        if other is not None and other.transport is not None:
            if exc is not None:
                other.transport.abort()  # a reset passes on as a reset
            else:
                other.transport.close()
        self._lost += 1
        if self._lost == 2 and not self.done.done():
            self.done.set_result(None)


async def pipe(client: socket.socket, host: str, port: int, connect_s: float) -> None:
    """Connect to host:port and pass bytes between it and `client` until both are closed.
    Raises OSError (or TimeoutError) when the connection cannot be made; `client` is then the
    caller's to close."""
    loop = asyncio.get_running_loop()
    joined = _Pipe()
    async with asyncio.timeout(connect_s):
        await loop.create_connection(lambda: joined.upstream, host, port)
    try:
        await loop.connect_accepted_socket(lambda: joined.client, client)
    except BaseException:
        joined.close()
        raise
    try:
        await joined.done
    finally:
        if not joined.done.done():
            for side in (joined.client, joined.upstream):
                if side.transport is not None:
                    side.transport.abort()


__all__ = ["pipe"]
