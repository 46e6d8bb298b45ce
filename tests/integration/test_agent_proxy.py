"""The node agent's data plane on loopback, in front of real containers: forwarding, streaming
both ways, WebSockets, Portside's own errors, and in-flight accounting when clients go away."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import aiohttp
import docker
import pytest
from prometheus_client import generate_latest

from nodeagent.instances import InstanceManager, Timing
from nodeagent.proxy import DataPlane
from nodeagent.runtime import DockerRuntime
from portside.net import Deadlines, free_port
from portside.spec import ContainerClass, instance_id
from portside.states import InstanceState
from tests.images.build import ECHO_IMAGE
from tests.support import eventually

pytestmark = pytest.mark.integration

ECHO = ContainerClass("echo", ECHO_IMAGE, sleep_after_s=1.0, boot_timeout_s=10.0)
CRASH = dataclasses.replace(ECHO, name="crash", entrypoint=("/bin/sh", "-c", "exit 3"))
SILENT = dataclasses.replace(
    ECHO, name="silent", entrypoint=("/bin/sleep", "3600"), boot_timeout_s=1.0
)
CLASSES = {c.name: c for c in (ECHO, CRASH, SILENT)}


def to(cls: str, name: str) -> dict[str, str]:
    return {"Portside-Class": cls, "Portside-Instance": name}


@dataclasses.dataclass
class Agent:
    url: str
    manager: InstanceManager
    session: aiohttp.ClientSession
    plane: DataPlane

    def state(self, cls: str, name: str) -> tuple[InstanceState | None, int]:
        snap = self.manager.get(instance_id(cls, name))
        return (snap.state, snap.in_flight) if snap is not None else (None, 0)


@pytest.fixture
async def agent(node_id: str, echo_image: str) -> AsyncIterator[Agent]:
    runtime = DockerRuntime(node_id)
    manager = InstanceManager(runtime, CLASSES.get, timing=Timing(reconcile=0.5))
    await manager.adopt()
    loop = asyncio.create_task(manager.run())
    address = f"127.0.0.1:{free_port()}"
    plane = DataPlane(manager, CLASSES.get)
    await plane.listen(address)
    # The client adds no headers of its own, so tests see exactly what they send.
    session = aiohttp.ClientSession(
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"), auto_decompress=False
    )
    try:
        yield Agent(f"http://{address}", manager, session, plane)
    finally:
        await session.close()
        await plane.close()  # a no-op for an agent a test stopped already
        loop.cancel()
        await manager.close()
        await runtime.close()


async def test_metrics_and_header_errors(agent: Agent) -> None:
    # Every path of the data port is an instance's: /healthz and /metrics are on its own port.
    for path in ("/healthz", "/metrics", "/anything"):
        async with agent.session.get(f"{agent.url}{path}") as r:
            assert (r.status, r.headers["Portside-Error"]) == (400, "not-through-edge")
    async with agent.session.get(f"{agent.url}/anything") as r:
        assert (r.status, r.headers["Portside-Error"]) == (400, "not-through-edge")
        assert r.content_type == "text/plain"
        assert await r.text() == (
            "request has no Portside-Class header: send it through a Portside edge\n"
        )
    async with agent.session.get(f"{agent.url}/x", headers={"Portside-Class": "echo"}) as r:
        assert (r.status, r.headers["Portside-Error"]) == (400, "not-through-edge")
        assert "Portside-Instance" in await r.text()
    async with agent.session.get(f"{agent.url}/x", headers=to("nope", "a")) as r:
        assert (r.status, r.headers["Portside-Error"]) == (404, "not-found")
        assert await r.text() == "class nope is not deployed (this node agent does not know it)\n"
    async with agent.session.get(f"{agent.url}/session/whoami", headers=to("echo", "m")) as r:
        assert r.status == 200
    text = generate_latest().decode()  # what the agent's metrics port serves
    assert 'portside_agent_boots_total{class="echo",outcome="ok"}' in text
    assert 'portside_agent_proxied_requests_total{class="echo",code="200"}' in text
    assert 'portside_agent_boot_seconds_bucket{class="echo",le="0.05"}' in text


async def test_forwards_method_path_query_and_headers(agent: Agent) -> None:
    headers = {
        **to("echo", "alice"),
        "X-Custom": "yes",
        "Connection": "keep-alive, X-Drop",
        "X-Drop": "hop",
        "X-Forwarded-For": "198.51.100.7",
    }
    async with agent.session.get(f"{agent.url}/session/a/headers?x=1%202&y", headers=headers) as r:
        assert r.status == 200 and "Portside-Error" not in r.headers
        lines = (await r.text()).splitlines()
    assert lines[0] == "GET /session/a/headers?x=1%202&y"  # prefix kept, query untouched
    received = dict(line.split(": ", 1) for line in lines[1:] if line)
    assert received["X-Custom"] == "yes" and received["Portside-Instance"] == "alice"
    assert "Portside-Class" not in received and "X-Drop" not in received
    assert "Connection" not in received and "Accept-Encoding" not in received
    assert received["X-Forwarded-For"] == "198.51.100.7, 127.0.0.1"
    assert received["X-Forwarded-Proto"] == "http"
    assert received["X-Forwarded-Host"] == agent.url.removeprefix("http://")


async def test_bodies_stream_both_ways(agent: Agent) -> None:
    # The container echoes the body as it reads it (busybox head buffers a few KiB). The client
    # sends the second half only after most of the first came back: an agent that buffered
    # either body whole would wait forever here.
    half = b"x" * 1_000_000
    first_half_back = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield half
        await asyncio.wait_for(first_half_back.wait(), 10)
        yield half

    headers = {**to("echo", "bob"), "Content-Length": str(2 * len(half))}
    async with agent.session.post(f"{agent.url}/echo/upload", data=body(), headers=headers) as r:
        assert r.status == 200
        received = bytearray()
        async for chunk in r.content.iter_any():
            received += chunk
            if len(received) > len(half) // 2:
                first_half_back.set()
    assert bytes(received) == b"POST /echo/upload\n" + half + half

    async with agent.session.get(f"{agent.url}/big/bytes?30000000", headers=to("echo", "bob")) as r:
        assert r.headers["Content-Length"] == "30000000"
        total = 0
        async for chunk in r.content.iter_chunked(1 << 16):
            total += len(chunk)
    assert total == 30_000_000


async def test_container_errors_are_portside_errors(agent: Agent) -> None:
    async with agent.session.get(f"{agent.url}/x", headers=to("crash", "carol")) as r:
        assert (r.status, r.headers["Portside-Error"]) == (502, "container-exited")
        assert await r.text() == (
            "container for crash/carol exited with code 3 before its port 8080 answered; next try"
            " in 1s\n"
        )
    started = time.monotonic()
    async with agent.session.get(f"{agent.url}/x", headers=to("silent", "dan")) as r:
        assert (r.status, r.headers["Portside-Error"]) == (504, "boot-timeout")
        assert "port 8080 did not answer within 1s" in await r.text()
    assert time.monotonic() - started < 1.5


async def test_container_dying_mid_request_is_502_then_boots_again(agent: Agent) -> None:
    async with agent.session.get(f"{agent.url}/s/whoami", headers=to("echo", "eve")) as r:
        first = (await r.text()).split()[0]
    async with agent.session.get(f"{agent.url}/s/exit", headers=to("echo", "eve")) as r:
        assert (r.status, r.headers["Portside-Error"]) == (502, "container-exited")
        assert await r.text() == "container for echo/eve exited with code 143 while answering\n"
    async with agent.session.get(f"{agent.url}/s/whoami", headers=to("echo", "eve")) as r:
        assert r.status == 200
        assert (await r.text()).split() == [first, "eve"]  # the same container, started again


@pytest.mark.parametrize("then", ["request", "websocket"])
async def test_container_that_died_while_idle_is_booted_again_for_the_next_request(
    then: str, node_id: str, echo_image: str, docker_client: docker.DockerClient
) -> None:
    # A reconcile period far beyond the test: only the failed connect can reveal the death. A
    # connect to the dead container's address waits for ARP to give up, hence a short deadline.
    runtime = DockerRuntime(node_id)
    manager = InstanceManager(runtime, CLASSES.get, timing=Timing(reconcile=3600))
    address = f"127.0.0.1:{free_port()}"
    plane = DataPlane(manager, CLASSES.get, Deadlines(connect=1.0))
    await plane.listen(address)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{address}/s/whoami", headers=to("echo", "ivy")) as r:
                first = (await r.text()).split()[0]
            docker_client.containers.get(first).kill()
            if then == "websocket":  # an upgrade goes again the same way
                async with session.ws_connect(
                    f"http://{address}/chat/ws", headers=to("echo", "ivy")
                ) as ws:
                    await ws.send_str("back")
                    assert (await ws.receive(timeout=5)).data == "back"
                return
            async with session.get(f"http://{address}/s/whoami", headers=to("echo", "ivy")) as r:
                assert r.status == 200, await r.text()
                assert (await r.text()).split() == [first, "ivy"]
    finally:
        await plane.close()
        await manager.close()
        await runtime.close()


async def test_websocket_is_proxied_and_keeps_the_instance_awake(agent: Agent) -> None:
    async with agent.session.ws_connect(f"{agent.url}/chat/ws", headers=to("echo", "fay")) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        await ws.send_bytes(b"\x00\x01\xff")
        assert (await ws.receive(timeout=5)).data == b"\x00\x01\xff"
        # Open for twice sleep_after with no traffic: still awake, and counted in flight. (The
        # wait is the point of the test, not a synchronisation.)
        await asyncio.sleep(2.0)
        assert agent.state("echo", "fay") == (InstanceState.HEALTHY, 1)
        await ws.send_str("still there?")
        assert (await ws.receive(timeout=5)).data == "still there?"
    await eventually(lambda: agent.state("echo", "fay")[1] == 0, within=2, what="released")
    await eventually(
        lambda: agent.state("echo", "fay")[0] is InstanceState.SLEEPING, within=4, what="asleep"
    )


async def test_a_client_that_goes_away_frees_the_instance(agent: Agent) -> None:
    request = asyncio.create_task(
        agent.session.get(f"{agent.url}/s/slow?5", headers=to("echo", "gus"))
    )
    await eventually(
        lambda: agent.state("echo", "gus") == (InstanceState.HEALTHY, 1), what="in flight"
    )
    request.cancel()  # closes the connection to the agent mid-request
    with pytest.raises(asyncio.CancelledError):
        await request
    await eventually(lambda: agent.state("echo", "gus")[1] == 0, within=1, what="released")


async def test_an_upstream_that_refuses_websockets_is_a_portside_error(agent: Agent) -> None:
    # The echo server answers a non-/ws path with a plain 200, which is no WebSocket handshake.
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        async with agent.session.ws_connect(f"{agent.url}/plain", headers=to("echo", "hal")):
            pass
    assert caught.value.status == 502
    assert caught.value.headers is not None
    assert caught.value.headers["Portside-Error"] == "upstream-refused"


async def test_agent_shutdown_closes_websockets_with_going_away(agent: Agent) -> None:
    async with agent.session.ws_connect(f"{agent.url}/chat/ws", headers=to("echo", "kit")) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        async with asyncio.timeout(5):  # not the server's whole shutdown timeout
            await agent.plane.close()
        closed = await ws.receive(timeout=5)
    assert closed.type is aiohttp.WSMsgType.CLOSE
    assert (closed.data, closed.extra) == (1001, "node agent shutting down")
