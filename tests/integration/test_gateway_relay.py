"""The gateway's relay (portside/gateway/relay.py) over real sockets on 127.0.0.1: an HttpServer
whose requests run a gateway module, as an edge runs them, with a Router that sends a stub's
request through the proxy core to a real aiohttp upstream. Bodies both ways, passed on unread
or made by the handler; headers and statuses a handler changes; a WebSocket through it; what a
broken handler answers; and an edge's own gateway ingress when its client leaves midway. No
Docker, no etcd."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from edge.gateway import EdgeRouter, GatewayIngress
from edge.proxy import EdgeProxy, Target
from portside.errors import PortsideError
from portside.gateway import GatewayRuntime, Request, Response, relay
from portside.net import Deadlines, free_port
from portside.net import start_http_server as start_aiohttp
from portside.proxy import HttpServer, HttpTransport, ProxyCore, answer_error
from portside.proxy import Request as ClientRequest
from portside.spec import Config, ContainerClass, Gateway

DEADLINES = Deadlines(connect=1.0, first_byte=5.0, upstream_read=5.0)
BIG = 3 * 1024 * 1024 + 7  # more than any buffer on the way

MODULE = """
from portside.gateway import Request, Response


async def fetch(request, env):
    box = env.APP.get("one")
    if request.path == "/read-then-forward":
        data = await request.read()
        return await box.fetch("/echo", method="POST", headers=request.headers, body=data)
    if request.path == "/generated-upload":
        async def parts():
            for part in (b"a" * 10, b"b" * 70000, b"c"):
                yield part
        return await box.fetch("/echo", method="PUT", body=parts())
    if request.path == "/generated-answer":
        async def parts():
            for i in range(3):
                yield f"part {i};".encode()
        return Response(parts(), status=201, headers={"X-Made": "here"})
    if request.path == "/restyled":
        upstream = await box.fetch("/stream")
        upstream.status = 203
        upstream.headers["X-Seen"] = "gateway"
        return upstream
    if request.path == "/dropped":
        await box.fetch("/stream")  # never read: its connection is released at the end
        return Response("mine")
    if request.path == "/read-twice":
        upstream = await box.fetch("/stream")
        await upstream.read()
        return upstream
    if request.path == "/pass-body":  # the client's body, streamed on by the gateway
        return await box.fetch("/echo", method="POST", body=request.body)
    return await box.fetch(request)
"""


class Router:
    """A host's Router in its smallest form: every instance is the one upstream."""

    def __init__(self, core: ProxyCore, upstream: str) -> None:
        self.core = core
        self.upstream = upstream

    async def fetch(
        self, class_name: str, name: str | None, request: Request, location_hint: str
    ) -> Response:
        forward = relay.forward_of(request, add={"Portside-Instance": name or ""})
        return relay.response_of(await self.core.open(self.upstream, forward))


class Lifecycle:
    """Not used here: the stubs only fetch."""


class OneUpstream:
    """An edge's resolver for which every instance is the one upstream."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

    async def resolve(self, class_name: str, instance_name: str, hint: str) -> Target:
        return Target("node", self.upstream, instance_name)


class Limiter:
    async def limit(self, binding: str, key: str) -> bool:
        return True


CONNECTIONS: set[int] = set()  # the upstream connections requests came on


async def upstream_app(request: web.Request) -> web.StreamResponse:
    CONNECTIONS.add(id(request.transport))
    name = request.path.strip("/")
    if name == "ws":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str("echo " + message.data)
        return ws
    if name == "stream":
        response = web.StreamResponse(headers={"X-Up": "1"})
        await response.prepare(request)
        for part in (b"one ", b"two ", b"three"):
            await response.write(part)
        await response.write_eof()
        return response
    if name == "big":
        return web.Response(body=b"z" * BIG)
    body = await request.read()
    response = web.Response(body=body)
    response.headers["X-Method"] = request.method
    response.headers["X-Target"] = request.raw_path
    response.headers["X-Length"] = request.headers.get("Content-Length", "none")
    response.headers["X-Chunked"] = str("chunked" in request.headers.get("Transfer-Encoding", ""))
    response.headers["X-Instance"] = request.headers.get("Portside-Instance", "")
    response.headers["X-Forwarded-For"] = request.headers.get("X-Forwarded-For", "")
    return response


@pytest.fixture
async def gateway() -> AsyncIterator[str]:
    app = web.Application(client_max_size=BIG * 2)
    app.router.add_route("*", "/{tail:.*}", upstream_app)
    upstream = f"127.0.0.1:{free_port()}"
    runner = await start_aiohttp(app, upstream)
    core = ProxyCore(HttpTransport(DEADLINES), name="gateway")
    runtime = GatewayRuntime(Router(core, upstream), Lifecycle(), Limiter(), {})  # type: ignore[arg-type]
    runtime.load(
        Config(
            classes=(ContainerClass("App", "img"),),
            gateway=Gateway("gateway.py", textwrap.dedent(MODULE), deadline_s=5.0),
        )
    )

    async def handle(client: ClientRequest) -> None:
        try:
            with relay.exchange():
                response = await runtime.fetch(relay.request_of(client))
                await relay.answer(client, response, core, on_break=lambda exc: None)
        except PortsideError as exc:
            answer_error(client, exc)

    server = HttpServer(handle, name="gateway")
    port = free_port()
    await server.listen("127.0.0.1", port, reuse_port=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await core.shutdown(server, 0)
        await runner.cleanup()


async def test_a_client_body_and_an_upstream_body_pass_through_unread(gateway: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gateway}/echo?q=1", data=b"x" * BIG) as r:
            assert r.status == 200
            assert r.headers["X-Target"] == "/echo?q=1"
            assert r.headers["X-Length"] == str(BIG)  # the client's framing kept
            assert r.headers["X-Instance"] == "one"
            assert r.headers["X-Forwarded-For"] == "127.0.0.1"
            assert await r.read() == b"x" * BIG
        async with s.get(f"{gateway}/big") as r:
            assert r.headers["Content-Length"] == str(BIG)
            assert await r.read() == b"z" * BIG


async def test_bodies_the_handler_made_or_read(gateway: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gateway}/read-then-forward", data=b"read me") as r:
            assert (r.headers["X-Method"], r.headers["X-Length"]) == ("POST", "7")
            assert await r.read() == b"read me"
        # A client's chunked body, read by the handler, goes on with its length.
        async with s.post(f"{gateway}/read-then-forward", data=_chunks(b"ab", b"cd")) as r:
            assert (r.headers["X-Length"], r.headers["X-Chunked"]) == ("4", "False")
            assert await r.read() == b"abcd"
        async with s.get(f"{gateway}/generated-upload") as r:
            assert (r.headers["X-Length"], r.headers["X-Chunked"]) == ("none", "True")
            assert await r.read() == b"a" * 10 + b"b" * 70000 + b"c"
        async with s.get(f"{gateway}/generated-answer") as r:
            assert (r.status, r.headers["X-Made"]) == (201, "here")
            assert await r.read() == b"part 0;part 1;part 2;"


async def test_a_handler_may_change_an_upstream_answer_or_drop_it(gateway: str) -> None:
    async with aiohttp.ClientSession() as s:
        CONNECTIONS.clear()
        for _ in range(3):
            async with s.get(f"{gateway}/restyled") as r:
                assert (r.status, r.headers["X-Seen"], r.headers["X-Up"]) == (203, "gateway", "1")
                assert await r.read() == b"one two three"
        assert len(CONNECTIONS) == 1  # relayed whole, the upstream connection is kept alive
        for _ in range(3):  # connections dropped unread are released, not leaked
            async with s.get(f"{gateway}/dropped") as r:
                assert (r.status, await r.read()) == (200, b"mine")
        async with s.get(f"{gateway}/read-twice") as r:
            assert (r.status, r.headers["Portside-Error"]) == (500, "gateway-error")
            assert "read already" in await r.text()


async def test_a_websocket_through_the_gateway(gateway: str) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{gateway}/ws") as ws:
        for text in ("hello", "again"):
            await ws.send_str(text)
            assert await ws.receive_str(timeout=5) == "echo " + text


REQUESTS = "portside_edge_requests_total"


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition`, 5 s at most (the assertions after it say what did not happen)."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_a_client_leaving_midway_through_its_body_is_one_quiet_line_at_the_edge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream_app)
    upstream = f"127.0.0.1:{free_port()}"
    runner = await start_aiohttp(app, upstream)
    edge = EdgeProxy("weur", OneUpstream(upstream), DEADLINES)
    runtime = GatewayRuntime(EdgeRouter(edge), Lifecycle(), Limiter(), {})  # type: ignore[arg-type]
    config = Config(
        classes=(ContainerClass("App", "img"),),
        gateway=Gateway("gateway.py", textwrap.dedent(MODULE), deadline_s=5.0),
    )
    edge.set_config(config)
    runtime.load(config)
    edge.gateway = GatewayIngress(edge, runtime).serve
    address = f"127.0.0.1:{free_port()}"
    await edge.listen(address)
    gone = {"class": "", "route": "/", "code": "499", "region": "weur"}
    before = REGISTRY.get_sample_value(REQUESTS, gone) or 0.0
    CONNECTIONS.clear()
    try:
        with caplog.at_level(logging.DEBUG):
            host, port = address.split(":")
            _, writer = await asyncio.open_connection(host, int(port))
            head = "POST /pass-body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
            writer.write(head.encode() + b"0123456789")
            await writer.drain()
            await until(lambda: bool(CONNECTIONS))  # the body is on its way upstream
            writer.close()
            await until(lambda: "broke off" in caplog.text)
            await until(lambda: REGISTRY.get_sample_value(REQUESTS, gone) != before)
    finally:
        await edge.shutdown(0)
        await runner.cleanup()
    assert REGISTRY.get_sample_value(REQUESTS, gone) == before + 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert "the client closed its connection during the request body" in caplog.text
