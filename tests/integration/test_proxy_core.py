"""The proxy core against real servers on 127.0.0.1: an HttpServer whose handler relays each
request through a ProxyCore (as the edge and the node agent do) in front of a real upstream — an
aiohttp server, or a raw asyncio server where the exact bytes matter — driven by real clients
(aiohttp, or raw sockets where the exact bytes matter). No Docker, no etcd."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from portside import pki
from portside.errors import (
    PortsideError,
    UpstreamFailed,
    UpstreamRefused,
    UpstreamReset,
    UpstreamTimeout,
)
from portside.net import ClientTls, Deadlines, LiveIdentity, ServerTls, free_port, request_peer
from portside.net import start_http_server as start_aiohttp
from portside.pki import PeerRole
from portside.proxy import (
    Forward,
    HttpServer,
    HttpTransport,
    ProxyCore,
    Request,
    UpstreamResponse,
    answer_error,
    forward_request,
)
from tests.support import eventually

DEADLINES = Deadlines(connect=1.0, first_byte=2.0, upstream_read=2.0)
STEP_S = 2.0  # the most any one read or wait of a test may take
REPO = Path(__file__).resolve().parents[2]


# --- the hop under test ------------------------------------------------------------------------


class Relay:
    """A hop as a daemon builds one: every request goes on to one upstream; Portside's own
    errors are answered from the one table. `settle_s`: a pause between opening the upstream
    and delivering it (the node agent checks its fence there). `local`: paths it answers itself
    with that many bytes."""

    def __init__(
        self,
        upstream: str,
        *,
        deadlines: Deadlines = DEADLINES,
        tls: ClientTls | None = None,
        settle_s: float = 0.0,
    ) -> None:
        self.upstream = upstream
        self.core = ProxyCore(HttpTransport(deadlines, tls), name="relay")
        self.server = HttpServer(self.handle, name="relay")
        self.settle_s = settle_s
        self.local: dict[str, int] = {}
        self.breaks: list[UpstreamFailed] = []
        self.address = ""

    async def start(self) -> None:
        port = free_port()
        await self.server.listen("127.0.0.1", port, reuse_port=False)
        self.address = f"127.0.0.1:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def handle(self, request: Request) -> None:
        if request.path in self.local:
            request.respond(200, b"l" * self.local[request.path])
            return
        forward = forward_request(request, ingress=True)
        try:
            upstream = await self.core.open(self.upstream, forward)
            if self.settle_s:
                await asyncio.sleep(self.settle_s)
            await self.core.deliver(request, upstream, on_break=self.breaks.append)
        except PortsideError as exc:
            if request.status:
                request.abort()
            else:
                answer_error(request, exc)

    async def stop(self) -> None:
        await self.core.shutdown(self.server, 0)


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def relay() -> AsyncIterator[RelayFactory]:
    relays: list[Relay] = []

    async def make(upstream: str, **options: object) -> Relay:
        hop = Relay(upstream, **options)  # type: ignore[arg-type]
        await hop.start()
        relays.append(hop)
        return hop

    yield make
    for hop in relays:
        await hop.stop()


# --- upstreams ---------------------------------------------------------------------------------


class AppUpstream:
    """An application server (aiohttp): echoes, streams, breaks off, answers WebSockets; keeps
    the connections requests came on."""

    def __init__(self) -> None:
        self.transports: list[object] = []
        self.upload_started = asyncio.Event()
        self.go_on = asyncio.Event()
        self.ws_closed_with: tuple[int, str | None] | None = None
        self.address = ""

    @property
    def connections(self) -> int:
        return len({id(t) for t in self.transports})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.transports.append(request.transport)
        first, _, rest = request.path.strip("/").partition("/")
        if first == "ws":
            return await self.websocket(request)
        if first == "bytes":
            return web.Response(body=b"b" * int(rest))
        if first == "status":
            return web.Response(status=int(rest), headers={"ETag": '"v1"'})
        if first == "slow":
            await asyncio.sleep(int(rest) / 1000)
            return web.Response(text=request.query["n"])
        if first == "stream":
            return await self.stream(request)
        if first == "upload":
            return await self.upload(request)
        if first == "broken":
            return await self.broken(request)
        if first == "peer":
            peer = request_peer(request)
            return web.Response(text=peer.common_name if peer else "nobody")
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "target": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body": body.decode(),
            }
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Chunked, in three parts; with ?wait, the last two only once the test says so."""
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"part one, ")
        if "wait" in request.query:
            await asyncio.wait_for(self.go_on.wait(), STEP_S)
        await response.write(b"part two, ")
        await response.write(b"part three")
        await response.write_eof()
        return response

    async def upload(self, request: web.Request) -> web.StreamResponse:
        body = b""
        async for chunk in request.content.iter_any():
            body += chunk
            self.upload_started.set()
        return web.json_response(
            {
                "body": body.decode(),
                "chunked": "chunked" in str(request.headers.get("Transfer-Encoding")),
            }
        )

    async def broken(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first part")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()  # dies mid-body, as a crashing container would
        return response

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/refuse"):
            return web.Response(status=404, text="no such socket\n")
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                if msg.data == "close-4002":
                    await ws.close(code=4002, message=b"later")
                    break
                if msg.data == "drop":
                    assert request.transport is not None
                    request.transport.close()  # no close frame
                    break
                await ws.send_str(msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                self.ws_closed_with = (msg.data, msg.extra)
                break
            else:
                break
        return ws


@pytest.fixture
async def app_upstream() -> AsyncIterator[AppUpstream]:
    upstream = AppUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    upstream.address = f"127.0.0.1:{free_port()}"
    runner = await start_aiohttp(app, upstream.address)
    yield upstream
    await runner.cleanup()


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """A server that says exactly what its test makes it say, one `serve` per connection."""

    def __init__(self, serve: Serve) -> None:
        self._serve = serve
        self.connections = 0
        self.address = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        port = free_port()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.address = f"127.0.0.1:{port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


RawFactory = Callable[[Serve], Awaitable[RawUpstream]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawFactory]:
    started: list[RawUpstream] = []

    async def make(serve: Serve) -> RawUpstream:
        upstream = RawUpstream(serve)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.stop()


# --- HTTP/1.1 by hand --------------------------------------------------------------------------


class Message:
    """One message read off the wire: its start line, headers, body and trailers."""

    def __init__(self, start: str, headers: CIMultiDict[str]) -> None:
        self.start = start
        self.headers = headers
        self.body = b""
        self.trailers: CIMultiDict[str] = CIMultiDict()

    @property
    def status(self) -> int:
        return int(self.start.split()[1])

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "")


async def read_head(reader: asyncio.StreamReader) -> Message:
    head = await reader.readuntil(b"\r\n\r\n")
    start, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return Message(start, headers)


async def read_chunked(reader: asyncio.StreamReader, message: Message) -> None:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            break
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
    while line := (await reader.readuntil(b"\r\n"))[:-2].decode("latin-1"):
        name, _, value = line.partition(":")
        message.trailers.add(name.strip(), value.strip())
    message.body = bytes(body)


async def read_response(
    reader: asyncio.StreamReader, method: str = "GET", *, interim: bool = False
) -> Message:
    """The next response (1xx skipped unless `interim`), its body read by its framing."""
    async with asyncio.timeout(STEP_S):
        while True:
            message = await read_head(reader)
            if not 100 <= message.status < 200 or interim:
                break
        if method == "HEAD" or message.status in (204, 304) or message.status < 200:
            return message
        if message.chunked:
            await read_chunked(reader, message)
        elif "Content-Length" in message.headers:
            message.body = await reader.readexactly(int(message.headers["Content-Length"]))
        else:
            message.body = await reader.read()  # until the connection closes
        return message


async def read_request(reader: asyncio.StreamReader) -> Message:
    message = await read_head(reader)
    if message.chunked:
        await read_chunked(reader, message)
    elif "Content-Length" in message.headers:
        message.body = await reader.readexactly(int(message.headers["Content-Length"]))
    return message


class Client:
    """A client on a raw connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def to(cls, address: str) -> Client:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def get(self, target: str, *headers: str, method: str = "GET") -> None:
        lines = [f"{method} {target} HTTP/1.1", "Host: portside.example", *headers, "", ""]
        self.send("\r\n".join(lines).encode())

    async def response(self, method: str = "GET", *, interim: bool = False) -> Message:
        return await read_response(self.reader, method, interim=interim)

    async def closed(self) -> bool:
        """Whether the server closes the connection (within STEP_S), reading what is left."""
        try:
            async with asyncio.timeout(STEP_S):
                while await self.reader.read(65536):
                    pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[str], Awaitable[Client]]]:
    opened: list[Client] = []

    async def connect(address: str) -> Client:
        client = await Client.to(address)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.writer.transport.abort()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent",)) as client:
        yield client


def plain_answer(body: bytes, *headers: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *headers, "", ""]
    return "\r\n".join(lines).encode() + body


# --- keep-alive and bodies ---------------------------------------------------------------------


async def test_upstream_connections_are_kept_and_reused(
    app_upstream: AppUpstream, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    hop = await relay(app_upstream.address)
    first, second = await clients(hop.address), await clients(hop.address)
    for i in range(6):
        client = first if i % 2 else second  # two client connections, one upstream one
        client.get(f"/slow/0?n={i}")
        assert (await client.response()).body == str(i).encode()
    assert app_upstream.connections == 1


async def test_a_chunked_request_body_streams_through(
    app_upstream: AppUpstream, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    hop = await relay(app_upstream.address)
    client = await clients(hop.address)
    client.get("/upload", "Transfer-Encoding: chunked", method="POST")
    client.send(b"6\r\nfirst \r\n")
    # The upstream has the first chunk while the client has not sent the rest: nothing waits
    # for the whole body.
    await asyncio.wait_for(app_upstream.upload_started.wait(), STEP_S)
    client.send(b"6\r\nsecond\r\n0\r\n\r\n")
    answer = await client.response()
    assert json.loads(answer.body) == {"body": "first second", "chunked": True}


async def test_trailers_pass_both_ways(
    raw_upstream: RawFactory, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    received: list[Message] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_request(reader))
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Answer-Sum\r\n\r\n"
            b"4\r\nbody\r\n0\r\nX-Answer-Sum: 2\r\n\r\n"
        )
        await reader.read()

    upstream = await raw_upstream(serve)
    hop = await relay(upstream.address)
    client = await clients(hop.address)
    client.get("/t", "Transfer-Encoding: chunked", "TE: trailers", method="POST")
    client.send(b"3\r\nabc\r\n0\r\nX-Request-Sum: 1\r\n\r\n")
    answer = await client.response()
    assert (answer.body, answer.chunked) == (b"body", True)
    assert answer.trailers.get("X-Answer-Sum") == "2"
    assert received[0].body == b"abc"
    assert received[0].trailers.get("X-Request-Sum") == "1"


async def test_a_length_answer_keeps_its_length(
    app_upstream: AppUpstream, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    hop = await relay(app_upstream.address)
    client = await clients(hop.address)
    client.get("/bytes/100000")
    answer = await client.response()
    assert answer.headers["Content-Length"] == "100000" and not answer.chunked
    assert answer.body == b"b" * 100_000


async def test_head_has_its_length_and_no_body_and_the_connection_goes_on(
    app_upstream: AppUpstream, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    hop = await relay(app_upstream.address)
    client = await clients(hop.address)
    client.get("/bytes/1000", method="HEAD")
    head = await client.response("HEAD")
    assert head.status == 200 and head.headers["Content-Length"] == "1000"
    # The next answer starts right after the head: no body came between.
    client.get("/bytes/7")
    assert (await client.response()).body == b"b" * 7
    client.get("/bytes/5", method="HEAD")
    assert (await client.response("HEAD")).headers["Content-Length"] == "5"
    client.get("/bytes/3")
    assert (await client.response()).body == b"bbb"
    assert app_upstream.connections == 1  # the upstream connection survived the HEADs too


async def test_a_head_error_answer_leaves_the_connection_usable(
    relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    hop = await relay(f"127.0.0.1:{free_port()}")  # nobody listens there
    client = await clients(hop.address)
    client.get("/x", method="HEAD")
    head = await client.response("HEAD")
    assert head.status == 502 and head.headers["Portside-Error"] == "upstream-refused"
    client.get("/x")
    answer = await client.response()
    assert answer.status == 502 and answer.body == b"Connection refused\n"


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses(
    status: int,
    app_upstream: AppUpstream,
    relay: RelayFactory,
    clients: Callable[[str], Awaitable[Client]],
) -> None:
    hop = await relay(app_upstream.address)
    client = await clients(hop.address)
    client.get(f"/status/{status}")
    answer = await client.response()
    assert answer.status == status and not answer.chunked
    assert answer.headers["ETag"] == '"v1"'
    client.get("/bytes/2")  # nothing was left between: the next answer parses
    assert (await client.response()).body == b"bb"


@pytest.mark.parametrize(
    ("target", "body", "length"),
    [("/stream", b"part one, part two, part three", None), ("/bytes/10", b"b" * 10, "10")],
)
async def test_an_http10_client_gets_an_answer_it_can_read_then_the_connection_closes(
    target: str,
    body: bytes,
    length: str | None,
    app_upstream: AppUpstream,
    relay: RelayFactory,
    clients: Callable[[str], Awaitable[Client]],
) -> None:
    hop = await relay(app_upstream.address)
    client = await clients(hop.address)
    client.send(f"GET {target} HTTP/1.0\r\n\r\n".encode())
    answer = await client.response()
    assert answer.start.startswith("HTTP/1.1 200")
    assert "Transfer-Encoding" not in answer.headers  # HTTP/1.0 knows no chunks
    assert answer.headers.get("Content-Length") == length
    assert answer.headers["Connection"] == "close"
    assert answer.body == body
    assert await client.closed()


async def _close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
    if request.start.split()[1] != "/empty":
        writer.write(b"until ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"the end")


async def test_an_answer_without_length_reaches_a_11_client_chunked(
    raw_upstream: RawFactory, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    upstream = await raw_upstream(_close_delimited)
    hop = await relay(upstream.address)
    client = await clients(hop.address)
    client.get("/x")
    answer = await client.response()
    assert answer.chunked and answer.body == b"until the end"
    assert "Connection" not in answer.headers  # the client's connection stays
    client.get("/y")
    assert (await client.response()).body == b"until the end"
    assert upstream.connections == 2


async def _empty_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")


@pytest.mark.parametrize("serve", [_empty_chunked, _close_delimited], ids=["chunked", "close"])
async def test_an_empty_body_without_length_reaches_the_client_whole(
    serve: Serve,
    raw_upstream: RawFactory,
    relay: RelayFactory,
    clients: Callable[[str], Awaitable[Client]],
) -> None:
    upstream = await raw_upstream(serve)
    hop = await relay(upstream.address)
    client = await clients(hop.address)
    client.get("/empty")
    answer = await client.response()
    assert answer.status == 200 and answer.body == b""
    client.get("/empty")
    assert (await client.response()).status == 200


async def test_expect_100_continue(
    app_upstream: AppUpstream, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    hop = await relay(app_upstream.address)
    client = await clients(hop.address)
    client.get("/echo", "Content-Length: 5", "Expect: 100-continue", method="POST")
    go_ahead = await client.response(interim=True)
    assert go_ahead.status == 100  # before any of the body was sent
    client.send(b"hello")
    seen = json.loads((await client.response()).body)
    assert seen["body"] == "hello"
    assert "expect" not in {k.lower() for k, _ in seen["headers"]}  # answered by the hop


async def test_a_pipelined_expect_100_does_not_break_into_the_answer_before_it(
    app_upstream: AppUpstream, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    """A 100 Continue belongs to its own request: said while an earlier answer is still going
    out, it would land in the middle of that answer's body."""
    hop = await relay(app_upstream.address)
    client = await clients(hop.address)
    client.get("/stream?wait")
    async with asyncio.timeout(STEP_S):
        assert (await read_head(client.reader)).status == 200
        assert await client.reader.readuntil(b"part one, \r\n")
    client.get("/echo", "Content-Length: 5", "Expect: 100-continue", method="POST")
    await asyncio.sleep(0.1)
    app_upstream.go_on.set()
    rest = Message("HTTP/1.1 200 OK", CIMultiDict())
    async with asyncio.timeout(STEP_S):
        await read_chunked(client.reader, rest)
    assert rest.body == b"part two, part three"
    assert (await client.response(interim=True)).status == 100
    client.send(b"hello")
    assert json.loads((await client.response()).body)["body"] == "hello"


async def test_pipelined_requests_are_answered_in_order(
    app_upstream: AppUpstream, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    hop = await relay(app_upstream.address)
    client = await clients(hop.address)
    # All at once; the first is the slowest to answer.
    client.send(
        b"GET /slow/150?n=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /slow/0?n=3 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert (await client.response()).body == b"1"
    assert json.loads((await client.response()).body)["body"] == "abc"
    assert (await client.response()).body == b"3"


# --- header hygiene ----------------------------------------------------------------------------


async def test_hop_by_hop_request_headers_stop_at_the_hop(
    app_upstream: AppUpstream, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    hop = await relay(app_upstream.address)
    client = await clients(hop.address)
    client.get(
        "/echo/a%2Fb?x=1&y=%20z",
        "Connection: keep-alive, X-Drop-Me, Upgrade",
        "X-Drop-Me: 1",
        "Keep-Alive: timeout=5",
        "TE: trailers",
        "Upgrade: h2c",
        "Proxy-Connection: keep-alive",
        "Proxy-Authorization: Basic eA==",
        "X-Forwarded-For: 127.0.0.9",
        "X-Custom: kept",
    )
    seen = json.loads((await client.response()).body)
    headers: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    assert seen["target"] == "/echo/a%2Fb?x=1&y=%20z"  # raw, as sent
    for gone in (
        "connection",
        "x-drop-me",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
    ):
        assert gone not in headers, gone
    assert headers["x-forwarded-for"] == ["127.0.0.9, 127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-host"] == ["portside.example"]
    assert headers["x-custom"] == ["kept"]
    assert headers["host"] == [app_upstream.address]
    client.get("/bytes/1")  # an upgrade to another protocol is not taken: the connection goes on
    assert (await client.response()).body == b"b"


async def test_hop_by_hop_response_headers_stop_at_the_hop(
    raw_upstream: RawFactory, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            plain_answer(
                b"ok",
                "Connection: X-Internal",
                "X-Internal: 1",
                "Keep-Alive: timeout=5",
                "Proxy-Authenticate: Basic",
                "Set-Cookie: a=1",
                "Set-Cookie: b=2",
                "X-Kept: yes",
            )
        )
        await reader.read()

    upstream = await raw_upstream(serve)
    hop = await relay(upstream.address)
    client = await clients(hop.address)
    client.get("/")
    answer = await client.response()
    assert answer.body == b"ok" and answer.headers["X-Kept"] == "yes"
    assert answer.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    for gone in ("X-Internal", "Keep-Alive", "Proxy-Authenticate", "Connection"):
        assert gone not in answer.headers, gone


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["header", "request-line", "two-lengths"],
)
async def test_a_malformed_request_gets_400_and_the_connection_closes(
    request_bytes: bytes,
    app_upstream: AppUpstream,
    relay: RelayFactory,
    clients: Callable[[str], Awaitable[Client]],
) -> None:
    hop = await relay(app_upstream.address)
    client = await clients(hop.address)
    client.send(request_bytes)
    answer = await client.response()
    assert answer.status == 400 and answer.headers["Connection"] == "close"
    assert answer.body.startswith(b"malformed HTTP request")
    assert await client.closed()
    assert app_upstream.connections == 0


# --- backpressure and breaks -------------------------------------------------------------------

# The relay of `Relay`, as a process of its own, so that its memory can be measured alone.
RELAY_PROCESS = """
import asyncio, sys
from portside.errors import PortsideError
from portside.net import Deadlines, free_port
from portside.proxy import HttpServer, HttpTransport, ProxyCore, answer_error, forward_request

async def main():
    core = ProxyCore(HttpTransport(Deadlines(connect=1, first_byte=5, upstream_read=5)), name="r")

    async def handle(request):
        try:
            upstream = await core.open(sys.argv[1], forward_request(request, ingress=True))
            await core.deliver(request, upstream, on_break=lambda exc: None)
        except PortsideError as exc:
            answer_error(request, exc)

    server = HttpServer(handle, name="relay")
    port = free_port()
    await server.listen("127.0.0.1", port, reuse_port=False)
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""
BIG = 256 * 1024 * 1024
BLOCK = b"\xab" * (1024 * 1024)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Streamer:
    """Sends a 256 MiB answer as fast as it is taken, counting what it sent."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n".encode())
        try:
            while self.sent < BIG:
                writer.write(BLOCK)
                self.sent += len(BLOCK)
                await writer.drain()
        finally:
            self.closed.set()


async def test_a_slow_client_makes_the_relay_hold_back_not_buffer(
    raw_upstream: RawFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    streamer = Streamer()
    upstream = await raw_upstream(streamer.serve)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RELAY_PROCESS,
        upstream.address,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), 10))
        client = await clients(f"127.0.0.1:{port}")
        client.get("/big")
        async with asyncio.timeout(STEP_S):
            assert (await read_head(client.reader)).headers["Content-Length"] == str(BIG)
        baseline = rss_bytes(process.pid)
        received, peak = 0, baseline
        loop = asyncio.get_running_loop()
        until = loop.time() + 0.6
        while loop.time() < until:  # about 3 MiB/s: far slower than the upstream sends
            received += len(await client.reader.read(64 * 1024))
            peak = max(peak, rss_bytes(process.pid))
            await asyncio.sleep(0.02)
        # What the upstream got rid of is what the client took plus the socket buffers on the
        # way: the relay read no more than it could pass on.
        assert streamer.sent - received < 48 * 1024 * 1024, (streamer.sent, received)
        assert peak - baseline < 64 * 1024 * 1024, (peak, baseline)
    finally:
        process.kill()
        await process.wait()


async def test_a_slow_client_is_not_taken_for_a_silent_upstream(
    app_upstream: AppUpstream, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    # The upstream's bytes stop coming for longer than the read deadline because the relay
    # stops reading them while its client is slow: that is no upstream timeout.
    deadlines = Deadlines(connect=1.0, first_byte=0.3, upstream_read=0.3)
    hop = await relay(app_upstream.address, deadlines=deadlines)
    client = await clients(hop.address)
    size = 32 * 1024 * 1024
    client.get(f"/bytes/{size}")
    async with asyncio.timeout(STEP_S):
        await read_head(client.reader)
        await asyncio.sleep(0.8)
        body = await client.reader.readexactly(size)
    assert body == b"b" * size and hop.breaks == []


async def test_a_pipelined_answer_to_a_slow_client_is_not_buffered_either(
    raw_upstream: RawFactory, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    """The second answer starts while the client is still behind on the first (its connection
    paused for writing): the upstream must be held back from its first byte."""
    streamer = Streamer()
    upstream = await raw_upstream(streamer.serve)
    hop = await relay(upstream.address)
    hop.local["/local"] = 16 * 1024 * 1024  # answered by the hop itself, all at once
    client = await clients(hop.address)
    client.send(b"GET /local HTTP/1.1\r\nHost: x\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: streamer.sent > 0, within=STEP_S, what="the upstream answering")
    await asyncio.sleep(0.5)  # the client reads nothing meanwhile
    assert streamer.sent < 48 * 1024 * 1024, streamer.sent
    buffered = [c.transport.get_write_buffer_size() for c in hop.server.connections]
    assert max(buffered) < 48 * 1024 * 1024, buffered


async def test_a_client_that_leaves_mid_answer_closes_the_upstream_connection_at_once(
    raw_upstream: RawFactory, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        try:
            await reader.read()  # the answer never ends; the relay's closing ends this
        finally:
            closed.set()

    upstream = await raw_upstream(serve)
    hop = await relay(upstream.address)
    client = await clients(hop.address)
    client.get("/forever")
    async with asyncio.timeout(STEP_S):
        await read_head(client.reader)
        await client.reader.readuntil(b"first\r\n")
    client.writer.transport.abort()
    await asyncio.wait_for(closed.wait(), 0.5)


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_an_upstream_breaking_mid_body_cuts_the_client(
    framing: str,
    raw_upstream: RawFactory,
    relay: RelayFactory,
    clients: Callable[[str], Awaitable[Client]],
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await writer.drain()
        await asyncio.sleep(0.05)  # then dies, as a crashing container would

    upstream = await raw_upstream(serve)
    hop = await relay(upstream.address)
    client = await clients(hop.address)
    client.get("/broken")
    # The client never takes what it got for a whole answer: no last chunk, no full length.
    with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
        await client.response()
    assert len(hop.breaks) == 1 and isinstance(hop.breaks[0], UpstreamReset)


async def test_an_aiohttp_client_sees_a_broken_answer_as_broken(
    app_upstream: AppUpstream, relay: RelayFactory, session: aiohttp.ClientSession
) -> None:
    hop = await relay(app_upstream.address)
    async with session.get(f"{hop.url}/broken") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


# --- WebSockets --------------------------------------------------------------------------------


async def test_websocket_messages_pass_both_ways(
    app_upstream: AppUpstream, relay: RelayFactory, session: aiohttp.ClientSession
) -> None:
    hop = await relay(app_upstream.address)
    async with session.ws_connect(f"{hop.url}/ws", protocols=("other", "chat")) as ws:
        assert ws.protocol == "chat"  # the upstream's choice
        await ws.send_str("héllo")
        assert await ws.receive_str(timeout=STEP_S) == "héllo"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes(timeout=STEP_S) == b"\x00\x01\x02"
        big = os.urandom(1024 * 1024)
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=STEP_S) == big


async def test_a_client_close_code_and_reason_reach_the_upstream(
    app_upstream: AppUpstream, relay: RelayFactory, session: aiohttp.ClientSession
) -> None:
    hop = await relay(app_upstream.address)
    async with session.ws_connect(f"{hop.url}/ws") as ws:
        await ws.send_str("ping")
        assert await ws.receive_str(timeout=STEP_S) == "ping"
        await asyncio.wait_for(ws.close(code=4001, message=b"bye"), STEP_S)
    await eventually(
        lambda: app_upstream.ws_closed_with == (4001, "bye"), within=STEP_S, what="the close"
    )


async def test_an_upstream_close_code_and_reason_reach_the_client(
    app_upstream: AppUpstream, relay: RelayFactory, session: aiohttp.ClientSession
) -> None:
    hop = await relay(app_upstream.address)
    async with session.ws_connect(f"{hop.url}/ws") as ws:
        await ws.send_str("close-4002")
        msg = await ws.receive(timeout=STEP_S)
        assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4002, "later")


async def test_an_upstream_dropping_its_websocket_is_told_to_the_client_as_1011(
    app_upstream: AppUpstream, relay: RelayFactory, session: aiohttp.ClientSession
) -> None:
    hop = await relay(app_upstream.address)
    async with session.ws_connect(f"{hop.url}/ws") as ws:
        await ws.send_str("drop")
        msg = await ws.receive(timeout=STEP_S)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1011)


async def test_going_away_closes_both_sides_with_1001(
    app_upstream: AppUpstream, relay: RelayFactory, session: aiohttp.ClientSession
) -> None:
    hop = await relay(app_upstream.address)
    async with session.ws_connect(f"{hop.url}/ws") as ws:
        await ws.send_str("ping")
        assert await ws.receive_str(timeout=STEP_S) == "ping"
        hop.core.going_away()
        msg = await ws.receive(timeout=STEP_S)
        assert (msg.type, msg.data, msg.extra) == (
            aiohttp.WSMsgType.CLOSE,
            1001,
            "relay shutting down",
        )
    await eventually(
        lambda: app_upstream.ws_closed_with == (1001, "relay shutting down"),
        within=STEP_S,
        what="the upstream hearing 1001",
    )


async def test_a_refused_upgrade_is_answered_as_an_error(
    app_upstream: AppUpstream, relay: RelayFactory, session: aiohttp.ClientSession
) -> None:
    hop = await relay(app_upstream.address)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(f"{hop.url}/ws/refuse")
    assert refused.value.status == 502
    assert refused.value.headers is not None
    assert refused.value.headers["Portside-Error"] == "upstream-refused"


def _accept(key: str) -> str:
    magic = key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    return base64.b64encode(hashlib.sha1(magic).digest()).decode()


async def test_what_an_upstream_says_right_after_its_101_is_not_lost(
    raw_upstream: RawFactory, relay: RelayFactory, session: aiohttp.ClientSession
) -> None:
    """A greeting that comes apart from the 101, while the daemon still decides (the node agent
    checks its fence between opening and delivering), reaches the client."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handshake = await read_request(reader)
        writer.write(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {_accept(handshake.headers['Sec-WebSocket-Key'])}\r\n"
            "\r\n".encode()
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"\x81\x05hello")  # a text frame, unmasked as a server's are
        await reader.read(1)  # the client's close frame: answered with ours, then done
        writer.write(b"\x88\x02\x03\xe8")
        await writer.drain()

    upstream = await raw_upstream(serve)
    hop = await relay(upstream.address, settle_s=0.2)
    async with session.ws_connect(f"{hop.url}/ws") as ws:
        msg = await ws.receive(timeout=STEP_S)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "hello")


# --- the transport's failures, classified once --------------------------------------------------


def _get(method: str = "GET") -> Forward:
    return Forward(method, "/", CIMultiDict())


async def _hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await reader.read()  # and never answers


async def test_a_refused_connection() -> None:
    transport = HttpTransport(DEADLINES)
    try:
        with pytest.raises(UpstreamRefused) as refused:
            await transport.open(f"127.0.0.1:{free_port()}", _get())
        assert str(refused.value) == "Connection refused"
    finally:
        await transport.close()


async def test_a_connect_that_takes_too_long() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connects hang.
    listener = socket.socket()
    fillers = [socket.socket() for _ in range(2)]
    transport = HttpTransport(Deadlines(connect=0.2))
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(UpstreamRefused) as refused:
            await transport.open(f"127.0.0.1:{listener.getsockname()[1]}", _get())
        assert str(refused.value) == "no connection within the connect deadline"
        assert 0.15 <= time.monotonic() - started < 1.0
    finally:
        await transport.close()
        for sock in (*fillers, listener):
            sock.close()


@pytest.mark.parametrize(
    ("reset", "reason"), [(False, "the connection closed"), (True, "Connection reset by peer")]
)
async def test_a_connection_closed_before_the_answer(
    reset: bool, reason: str, raw_upstream: RawFactory
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    upstream = await raw_upstream(serve)
    transport = HttpTransport(DEADLINES)
    try:
        with pytest.raises(UpstreamReset) as broke:
            await transport.open(upstream.address, _get("POST"))
        assert str(broke.value) == reason
    finally:
        await transport.close()


async def test_no_answer_within_the_first_byte_deadline(raw_upstream: RawFactory) -> None:
    upstream = await raw_upstream(_hang)
    transport = HttpTransport(Deadlines(first_byte=0.2))
    try:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as late:
            await transport.open(upstream.address, _get())
        assert str(late.value) == "no answer within the first-byte deadline (0.2s)"
        assert time.monotonic() - started < 1.0
    finally:
        await transport.close()


async def test_the_first_byte_deadline_on_a_reused_connection(raw_upstream: RawFactory) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(plain_answer(b"once"))
        await _hang(reader, writer)  # the second request on this connection gets nothing

    upstream = await raw_upstream(serve)
    transport = HttpTransport(Deadlines(first_byte=0.2))
    try:
        first = await transport.open(upstream.address, _get())
        assert isinstance(first, UpstreamResponse)
        assert b"".join([c async for c in first.chunks()]) == b"once"
        first.release()
        with pytest.raises(UpstreamTimeout) as late:
            async with asyncio.timeout(1.5):  # the deadline is 0.2 s, not the pool's idle time
                await transport.open(upstream.address, _get())
        assert str(late.value) == "no answer within the first-byte deadline (0.2s)"
        assert upstream.connections == 1
    finally:
        await transport.close()


async def test_no_bytes_within_the_read_deadline(raw_upstream: RawFactory) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await reader.read()  # and the rest never comes

    upstream = await raw_upstream(serve)
    transport = HttpTransport(Deadlines(first_byte=0.3, upstream_read=0.3))
    try:
        answer = await transport.open(upstream.address, _get())
        assert isinstance(answer, UpstreamResponse)
        got = b""
        with pytest.raises(UpstreamTimeout) as late:
            async with asyncio.timeout(1.5):
                async for chunk in answer.chunks():
                    got += chunk
        assert got == b"abc"
        assert str(late.value) == "no answer within the read deadline between bytes (0.3s)"
        answer.release()
    finally:
        await transport.close()


async def test_the_read_deadline_when_it_is_shorter_than_the_first_byte_one(
    raw_upstream: RawFactory,
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await reader.read()

    upstream = await raw_upstream(serve)
    transport = HttpTransport(Deadlines(first_byte=5.0, upstream_read=0.2))
    try:
        answer = await transport.open(upstream.address, _get())
        assert isinstance(answer, UpstreamResponse)
        with pytest.raises(UpstreamTimeout):
            async with asyncio.timeout(1.5):
                async for _ in answer.chunks():
                    pass
        answer.release()
    finally:
        await transport.close()


@pytest.mark.parametrize(("method", "resent"), [("GET", True), ("POST", False)])
async def test_a_kept_connection_the_upstream_closed_as_the_request_went(
    method: str, resent: bool, raw_upstream: RawFactory
) -> None:
    """RFC 9112 9.3.1: an idempotent request on a reused connection closed without a byte of
    answer goes again once on a new one; another is the upstream's reset."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(plain_answer(b"one"))
        if upstream.connections == 1:
            await read_request(reader)  # its idle timer fires as the second request comes
            return
        await read_request(reader)

    upstream = await raw_upstream(serve)
    transport = HttpTransport(DEADLINES)
    try:
        first = await transport.open(upstream.address, _get())
        assert isinstance(first, UpstreamResponse)
        assert b"".join([c async for c in first.chunks()]) == b"one"
        first.release()
        if resent:
            again = await transport.open(upstream.address, _get(method))
            assert isinstance(again, UpstreamResponse) and again.status == 200
            again.release()
            assert upstream.connections == 2
        else:
            with pytest.raises(UpstreamReset):
                await transport.open(upstream.address, _get(method))
    finally:
        await transport.close()


async def test_a_break_mid_body_through_the_relay_is_heard_by_on_break(
    raw_upstream: RawFactory, relay: RelayFactory, clients: Callable[[str], Awaitable[Client]]
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await reader.read()

    upstream = await raw_upstream(serve)
    hop = await relay(upstream.address, deadlines=Deadlines(first_byte=0.3, upstream_read=0.3))
    client = await clients(hop.address)
    client.get("/stalls")
    with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
        await client.response()
    assert len(hop.breaks) == 1 and isinstance(hop.breaks[0], UpstreamTimeout)


# --- TLS on the upstream hop -------------------------------------------------------------------


async def test_the_upstream_hop_over_mutual_tls(
    relay: RelayFactory, session: aiohttp.ClientSession
) -> None:
    ca = pki.CertificateAuthority.create("test", time.time())

    def identity(role: PeerRole, ident: str) -> pki.Identity:
        key = pki.new_key()
        cert = ca.issue(pki.signing_request(key), pki.Peer(role, ident), time.time(), 3600.0)
        return pki.Identity(key, cert, ca.cert_pem)

    upstream = AppUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    address = f"127.0.0.1:{free_port()}"
    agent = ServerTls(LiveIdentity(identity(PeerRole.AGENT, "n1")), frozenset({PeerRole.EDGE}))
    runner = await start_aiohttp(app, address, agent, "the data port")
    try:
        edge = ClientTls(ca.cert_pem, server=PeerRole.AGENT, identity=identity(PeerRole.EDGE, "e1"))
        hop = await relay(address, tls=edge)
        for _ in range(3):
            async with session.get(f"{hop.url}/peer") as response:
                assert (response.status, await response.text()) == (200, "edge/e1")
        assert upstream.connections == 1  # one handshake, then kept
        # Without a certificate of the cluster's, the hop cannot connect at all.
        stranger = pki.CertificateAuthority.create("other", time.time())
        wrong = await relay(address, tls=ClientTls(stranger.cert_pem, server=PeerRole.AGENT))
        async with session.get(f"{wrong.url}/peer") as response:
            assert response.status == 502
            assert response.headers["Portside-Error"] == "upstream-refused"
            assert (await response.text()).startswith("TLS handshake failed")
    finally:
        await runner.cleanup()


async def _refuse_the_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)  # the body is not read: answered at once, then closed
    writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\n\r\nbig!")
    await writer.drain()


async def test_an_answer_before_the_whole_request_body_drops_the_rest(
    raw_upstream: RawFactory,
    relay: RelayFactory,
    clients: Callable[[str], Awaitable[Client]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = await raw_upstream(_refuse_the_body)
    hop = await relay(upstream.address)
    client = await clients(hop.address)
    client.get("/upload", "Content-Length: 1048576", method="POST")
    client.send(b"x" * 65536)
    answer = await client.response("POST")
    assert (answer.status, answer.body) == (413, b"big!")
    for _ in range(8):  # the client goes on sending what is left: dropped, not an error
        with contextlib.suppress(ConnectionError):
            client.send(b"x" * 65536)
            await client.writer.drain()
        await asyncio.sleep(0.01)
    # The body was not read whole, so the connection cannot go on: the relay closes it (the
    # client hears EOF, or a broken pipe on its next send).
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(STEP_S):
            while await client.reader.read(65536):
                pass
    assert client.reader.at_eof() or client.writer.transport.is_closing()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
