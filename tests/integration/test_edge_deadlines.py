"""Upstream deadlines and connect retries, for real: the edge served on 127.0.0.1 in front of a
real aiohttp server that plays the node agent (only the resolver, the control plane's interface,
is a stub). The connect and first-byte deadlines bound a silent node; a response whose bytes
flow streams for as long as it likes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from edge.proxy import EdgeProxy, Target
from portside.net import Deadlines, free_port, start_http_server
from portside.spec import Config, ContainerClass, InstanceSource, Route

CONFIG = Config(
    classes=(ContainerClass("sandbox", "img"),),
    routes=(Route("/s", "sandbox", InstanceSource("header", "X-Session-Id")),),
)
SESSION = {"X-Session-Id": "s1"}
# Short deadlines, so each test shows its bound in a second or two.
DEADLINES = Deadlines(resolve=2.0, connect=2.0, first_byte=0.5, upstream_read=0.5)


class Agent:
    """Answers slowly in the ways a node agent (or its container) can."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        action = request.path.rsplit("/", 1)[-1]
        if action == "silent":
            await asyncio.sleep(30)  # a frozen node: the connection is open, nothing comes
        if action == "stream":  # head after 0.3 s, then a chunk every 0.3 s for 2.4 s
            await asyncio.sleep(0.3)
            response = web.StreamResponse()
            await response.prepare(request)
            for i in range(8):
                await asyncio.sleep(0.3)
                await response.write(b"chunk %d\n" % i)
            await response.write_eof()
            return response
        if action == "stalls":  # a head and a chunk at once, then silence
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"the first part\n")
            await asyncio.sleep(30)
        body = await request.read()
        return web.Response(text=f"{request.method} {len(body)}\n")


Serve = Callable[[str], Awaitable[web.AppRunner]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(address: str) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", Agent().handle)
        runners.append(await start_http_server(app, address))
        return runners[-1]

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


class OneNode:
    def __init__(self, target: Target) -> None:
        self.target = target

    async def resolve(self, class_name: str, instance_name: str, hint: str) -> Target:
        return self.target


Edge = Callable[[str], Awaitable[str]]


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    """An edge whose every instance lives on the agent at the address given; its URL."""
    edges: list[EdgeProxy] = []

    async def make(agent_address: str) -> str:
        proxy = EdgeProxy("weur", OneNode(Target("n1", agent_address)), DEADLINES, CONFIG)
        address = f"127.0.0.1:{free_port()}"
        await proxy.listen(address)
        edges.append(proxy)
        return f"http://{address}"

    yield make
    for proxy in edges:
        await proxy.shutdown()


async def test_a_response_whose_bytes_flow_is_never_cut(serve: Serve, edge: Edge) -> None:
    agent = f"127.0.0.1:{free_port()}"
    await serve(agent)
    url = await edge(agent)
    started = time.monotonic()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{url}/s/stream", headers=SESSION) as resp:
            assert resp.status == 200
            body = await resp.text()
    took = time.monotonic() - started
    assert body == "".join(f"chunk {i}\n" for i in range(8))
    # Longer than the first-byte and the between-bytes deadlines (0.5 s each) together.
    assert took > 2.5


async def test_a_silent_node_is_answered_504_after_the_first_byte_deadline(
    serve: Serve, edge: Edge
) -> None:
    agent = f"127.0.0.1:{free_port()}"
    await serve(agent)
    url = await edge(agent)
    started = time.monotonic()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{url}/s/silent", headers=SESSION) as resp:
            text = await resp.text()
    took = time.monotonic() - started
    assert resp.status == 504, text
    assert resp.headers["Portside-Error"] == "upstream-timeout"
    assert "first-byte deadline (0.5s)" in text
    assert 0.45 <= took < 1.5


async def test_the_first_byte_deadline_runs_from_the_request_s_last_byte(
    serve: Serve, edge: Edge
) -> None:
    agent = f"127.0.0.1:{free_port()}"
    await serve(agent)
    url = await edge(agent)

    async def slow_upload() -> AsyncIterator[bytes]:
        for _ in range(5):
            await asyncio.sleep(0.3)  # 1.5 s of upload: three first-byte deadlines
            yield b"x" * 1000

    async with aiohttp.ClientSession() as client:
        async with client.post(f"{url}/s/upload", headers=SESSION, data=slow_upload()) as resp:
            assert resp.status == 200
            assert await resp.text() == "POST 5000\n"


async def test_a_stream_that_stops_is_cut_after_the_between_bytes_deadline(
    serve: Serve, edge: Edge
) -> None:
    agent = f"127.0.0.1:{free_port()}"
    await serve(agent)
    url = await edge(agent)
    started = time.monotonic()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{url}/s/stalls", headers=SESSION) as resp:
            assert resp.status == 200  # the head came; the body breaks off
            assert await resp.content.readline() == b"the first part\n"
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    assert 0.45 <= time.monotonic() - started < 1.5


async def test_a_refused_connect_is_retried_while_the_node_lives(serve: Serve, edge: Edge) -> None:
    """An agent restarting: nothing listens for a moment, then it does. The request (a POST:
    nothing of it was sent while the connect was refused) is served, not failed."""
    agent = f"127.0.0.1:{free_port()}"
    url = await edge(agent)
    async with aiohttp.ClientSession() as client:
        request = asyncio.create_task(client.post(f"{url}/s/echo", headers=SESSION, data=b"once"))
        await asyncio.sleep(0.7)
        assert not request.done()
        await serve(agent)
        async with await request as resp:
            assert resp.status == 200
            assert await resp.text() == "POST 4\n"
