"""The floor of a proxy hop in Python on this machine: a relay with no features, for
bench/dataplane.py's "relay" row (issue 11).

uvloop and the llhttp parser (httptools), one task per request, a pool of keep-alive upstream
connections, the response parsed only to find its end. It does none of Portside's work: no
routing, header hygiene, streaming, backpressure, deadlines, errors, activity or metrics. GET
without a body only; what it cannot relay, it closes. It measures what the event loop and the
system calls alone cost a hop, so the distance between it and Portside is the price of the
features.
Usage: python bench/relay.py --listen PORT --upstream HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; one exchange at a time."""

    def __init__(self, idle: list[Upstream]) -> None:
        self.idle = idle
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: list[bytes] = []
        self.answer: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        answer, self.answer = self.answer, None
        data, self.chunks = b"".join(self.chunks), []
        if answer is not None and not answer.done():
            answer.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError("upstream closed"))


class Relay:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Upstream] = []

    async def exchange(self, head: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        if self.idle:
            upstream = self.idle.pop()
        else:
            _, upstream = await loop.create_connection(
                lambda: Upstream(self.idle), self.host, self.port
            )
        assert upstream.transport is not None
        upstream.answer = loop.create_future()
        upstream.transport.write(head)
        data = await upstream.answer
        self.idle.append(upstream)
        return data


class Client(asyncio.Protocol):
    """One client connection: GET requests in, answers out, one at a time (no pipelining)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += (name, b": ", value, b"\r\n")

    def on_message_complete(self) -> None:
        head = b"".join((b"GET ", self.url, b" HTTP/1.1\r\n", *self.headers, b"\r\n"))
        self.headers = []
        asyncio.get_running_loop().create_task(self.serve(head))

    async def serve(self, head: bytes) -> None:
        assert self.transport is not None
        try:
            answer = await self.relay.exchange(head)
        except OSError:
            self.transport.close()
            return
        if not self.transport.is_closing():
            self.transport.write(answer)


async def serve(listen: int, upstream: str) -> None:
    host, _, port = upstream.rpartition(":")
    relay = Relay(host, int(port))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(relay), "127.0.0.1", listen, backlog=1024)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.upstream))


if __name__ == "__main__":
    main()
