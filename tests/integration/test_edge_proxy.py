"""The edge proxy served for real on 127.0.0.1, in front of a real aiohttp server that plays the
node agent; only the resolver (an interface to the control plane) is a stub."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from edge.proxy import EdgeProxy, Target
from portside.daemon import metrics_app
from portside.errors import NoCapacity, NotFound, PortsideError
from portside.instances import PoolMember
from portside.net import Deadlines, free_port, start_http_server
from portside.spec import Autoscaling, Config, ContainerClass, InstanceSource, Route
from tests.support import eventually

CHUNK = bytes(range(256)) * 256  # 64 KiB
BIG_CHUNKS = 320  # 20 MiB
BIG_SIZE = len(CHUNK) * BIG_CHUNKS
BIG_SHA256 = hashlib.sha256(CHUNK * BIG_CHUNKS).hexdigest()

CONFIG = Config(
    classes=(ContainerClass("stateless", "img", autoscaling=Autoscaling()),),
    routes=(
        Route("/execute-code", "sandbox", InstanceSource("header", "X-Session-Id")),
        Route("/u", "profile", InstanceSource("path", index=1)),
        Route("/pool", "stateless"),
    ),
)
SESSION = {"X-Session-Id": "s1"}


class Agent:
    """A node agent's data plane, as far as the edge can tell: echoes what it received, streams
    big bodies, answers WebSockets and refuses the way the real agent does."""

    def __init__(self) -> None:
        self.upload_started = asyncio.Event()
        self.download_read = asyncio.Event()
        self.ws_closed_with: int | None = None
        self.resets = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.websocket(request)
        action = request.path.rsplit("/", 1)[-1]
        handlers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            "upload": self.upload,
            "download": self.download,
            "exited": self.exited,
            "broken": self.broken,
            "reset": self.reset,
        }
        return await handlers.get(action, self.echo)(request)

    async def echo(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        response = web.json_response(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body": body.decode(),
            },
            headers={"X-Upstream": "yes", "Keep-Alive": "timeout=5"},
        )
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    async def upload(self, request: web.Request) -> web.StreamResponse:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            if size == 0:
                self.upload_started.set()
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def download(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(CHUNK)
        # The rest only once the client has read the first chunk through the edge: an edge that
        # buffered the whole response would never deliver it, and the test would time out.
        await asyncio.wait_for(self.download_read.wait(), 10)
        for _ in range(BIG_CHUNKS - 1):
            await response.write(CHUNK)
        await response.write_eof()
        return response

    async def broken(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first part")
        assert request.transport is not None
        request.transport.close()  # dies mid-body, as a crashing container would
        return response

    async def reset(self, request: web.Request) -> web.StreamResponse:
        self.resets += 1
        assert request.transport is not None
        request.transport.close()  # gone before answering, as a dying agent would be
        return web.Response()

    async def exited(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=502,
            text="container sandbox/s1 exited with code 3 while booting\n",
            headers={"Portside-Error": "container-exited"},
        )

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/refuse"):
            return web.Response(
                status=502, text="exited\n", headers={"Portside-Error": "container-exited"}
            )
        if request.path.endswith("/not-a-websocket"):
            return web.Response(status=404, text="no such socket\n")
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        await ws.send_str(f"hello {request.headers['Portside-Instance']}")
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                if msg.data == "close-4001":
                    await ws.close(code=4001, message=b"bye")
                elif msg.data == "drop":
                    assert request.transport is not None
                    request.transport.close()  # no close frame: the edge sees 1006
                else:
                    await ws.send_str(msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                self.ws_closed_with = msg.data  # the code the edge passed on
                break
            else:
                break
        return ws


@dataclass
class StubResolver:
    """Answers from a script: each call takes the next target (the last one repeats), or raises."""

    targets: Sequence[Target]
    delay: float = 0.0
    error: PortsideError | None = None
    calls: int = 0

    async def resolve(self, class_name: str, instance_name: str, hint: str) -> Target:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.targets[min(self.calls, len(self.targets)) - 1]


@dataclass
class Cluster:
    edge_url: str
    agent: Agent
    agent_target: Target
    resolver: StubResolver
    proxy: EdgeProxy
    client: aiohttp.ClientSession


EdgeFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def make_cluster() -> AsyncIterator[EdgeFactory]:
    runners: list[web.AppRunner] = []
    edges: list[EdgeProxy] = []
    clients: list[aiohttp.ClientSession] = []

    async def make(targets: Sequence[Target] | None = None, **resolver_args: object) -> Cluster:
        agent = Agent()
        agent_app = web.Application()
        agent_app.router.add_route("*", "/{tail:.*}", agent.handle)
        agent_address = f"127.0.0.1:{free_port()}"
        runners.append(await start_http_server(agent_app, agent_address))
        agent_target = Target("n1", agent_address)
        resolver = StubResolver(targets or [agent_target], **resolver_args)  # type: ignore[arg-type]
        proxy = EdgeProxy("weur", resolver, Deadlines(resolve=2.0, connect=1.0), CONFIG)
        edge_address = f"127.0.0.1:{free_port()}"
        await proxy.listen(edge_address)
        edges.append(proxy)
        # The test's own client: no auto headers, so what reaches the agent is what the edge sent.
        client = aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept-Encoding"))
        clients.append(client)
        return Cluster(f"http://{edge_address}", agent, agent_target, resolver, proxy, client)

    yield make
    for client in clients:
        await client.close()
    for edge in edges:
        await edge.shutdown()  # a no-op for an edge a test stopped already
    for runner in reversed(runners):
        await runner.cleanup()


async def test_headers_are_added_stripped_and_passed(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    async with c.client.get(
        f"{c.edge_url}/execute-code/a%2Fb/c?x=1&y=%20z",
        headers={
            **SESSION,
            "Portside-Class": "evil",
            "Portside-Instance": "evil",
            "X-Forwarded-For": "127.0.1.1",
            "X-Custom": "kept",
            "X-Drop-Me": "hop",
            "Connection": "keep-alive, X-Drop-Me",
            "Portside-Location-Hint": "ENAM",
        },
    ) as response:
        assert response.status == 200
        seen = await response.json()
        assert response.headers["X-Upstream"] == "yes"
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert "Keep-Alive" not in response.headers
    headers: dict[str, list[str]] = {}
    for key, value in seen["headers"]:
        headers.setdefault(key.lower(), []).append(value)
    assert seen["path_qs"] == "/execute-code/a%2Fb/c?x=1&y=%20z"  # raw, not re-encoded
    assert headers["portside-class"] == ["sandbox"]
    assert headers["portside-instance"] == ["s1"]
    assert headers["x-forwarded-for"] == ["127.0.1.1, 127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-host"] == [c.edge_url.removeprefix("http://")]
    assert headers["x-custom"] == ["kept"]
    assert "x-drop-me" not in headers
    assert "accept-encoding" not in headers  # not invented by the edge's client
    assert headers["host"] == [c.agent_target.data_address]


async def test_pool_route_goes_to_a_member_or_asks_for_one(make_cluster: EdgeFactory) -> None:
    c = await make_cluster([Target("n1", "", "stateless-0")])
    c.resolver.targets = [Target("n1", c.agent_target.data_address, "stateless-0")]
    # No members known: the resolver names one (the control plane starts it if needed).
    async with c.client.get(f"{c.edge_url}/pool/x") as response:
        seen = await response.json()
    assert ["Portside-Instance", "stateless-0"] in seen["headers"]
    assert c.resolver.calls == 1
    # Members from the pool watch: the edge picks one itself, no resolve.
    c.proxy.set_pool_members(
        {
            "stateless": [
                PoolMember(
                    class_name="stateless",
                    instance_id="i7",
                    name="stateless-7",
                    node_id="n1",
                    data_address=c.agent_target.data_address,
                    region="fra",
                    latitude=50.1,
                    longitude=8.7,
                )
            ]
        }
    )
    async with c.client.get(f"{c.edge_url}/pool/x") as response:
        seen = await response.json()
    assert ["Portside-Instance", "stateless-7"] in seen["headers"]
    assert ["Portside-Class", "stateless"] in seen["headers"]
    assert c.resolver.calls == 1


async def test_instance_name_from_path(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    async with c.client.post(f"{c.edge_url}/u/ada/settings", data=b"hi") as response:
        seen = await response.json()
    assert ["Portside-Instance", "ada"] in seen["headers"]
    assert ["Portside-Class", "profile"] in seen["headers"]
    assert seen["body"] == "hi"


@pytest.mark.parametrize(
    ("path", "headers", "status", "kind", "text"),
    [
        ("/nope", {}, 404, "no-route", "no route for /nope"),
        ("/execute-codex", SESSION, 404, "no-route", "no route for /execute-codex"),
        (
            "/execute-code",
            {},
            400,
            "no-instance-name",
            "no instance name: route /execute-code takes it from header X-Session-Id",
        ),
        (
            "/u",
            {},
            400,
            "no-instance-name",
            "no instance name: route /u takes it from path segment 1 after /u",
        ),
        (
            "/execute-code",
            {"X-Session-Id": "x" * 300},
            400,
            "invalid-argument",
            "instance name from header X-Session-Id is 300 characters long; the limit is 256",
        ),
        (
            "/pool",
            {"Portside-Location-Hint": "atlantis"},
            400,
            "invalid-argument",
            'unknown location "atlantis": use a region code such as fra, iad, sin (all of them:'
            " portside regions) or an area: wnam, enam, sam, weur, eeur, apac, oc, afr, me",
        ),
    ],
)
async def test_refusals(
    make_cluster: EdgeFactory, path: str, headers: dict[str, str], status: int, kind: str, text: str
) -> None:
    c = await make_cluster()
    async with c.client.get(c.edge_url + path, headers=headers) as response:
        assert response.status == status
        assert response.headers["Portside-Error"] == kind
        assert response.content_type == "text/plain"
        assert await response.text() == text + "\n"
    assert c.resolver.calls == 0


async def _stream_upload(upload_started: asyncio.Event) -> AsyncIterator[bytes]:
    yield CHUNK
    # The rest only once the agent holds the first chunk: proof that the edge forwards the
    # body as it arrives instead of reading it whole first.
    await asyncio.wait_for(upload_started.wait(), 10)
    for _ in range(BIG_CHUNKS - 1):
        yield CHUNK


async def test_streams_a_20_mib_chunked_request_body(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    tracemalloc.start()
    try:
        async with c.client.put(
            f"{c.edge_url}/execute-code/upload",
            headers=SESSION,
            data=_stream_upload(c.agent.upload_started),
        ) as response:
            result = await response.json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result == {"size": BIG_SIZE, "sha256": BIG_SHA256}
    # Client, edge and agent share this process; none of them may hold the body whole.
    assert peak < BIG_SIZE / 4, f"peak {peak / 2**20:.1f} MiB while moving 20 MiB"


async def test_streams_a_20_mib_request_body_with_content_length(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    async with c.client.post(
        f"{c.edge_url}/execute-code/upload", headers=SESSION, data=CHUNK * BIG_CHUNKS
    ) as response:
        assert await response.json() == {"size": BIG_SIZE, "sha256": BIG_SHA256}


async def test_streams_a_20_mib_response(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    digest, size = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        async with (
            asyncio.timeout(20),
            c.client.get(f"{c.edge_url}/execute-code/download", headers=SESSION) as response,
        ):
            assert response.headers.get("Transfer-Encoding") == "chunked"
            async for chunk in response.content.iter_any():
                c.agent.download_read.set()
                digest.update(chunk)
                size += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (size, digest.hexdigest()) == (BIG_SIZE, BIG_SHA256)
    assert peak < BIG_SIZE / 4, f"peak {peak / 2**20:.1f} MiB while moving 20 MiB"


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_warm_requests_do_not_resolve(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    hits_before = _sample("portside_edge_route_cache_total", result="hit")
    for _ in range(20):
        async with c.client.get(f"{c.edge_url}/execute-code", headers=SESSION) as response:
            assert response.status == 200
    assert c.resolver.calls == 1
    assert _sample("portside_edge_route_cache_total", result="hit") - hits_before == 19


async def test_concurrent_cold_requests_share_one_resolve(make_cluster: EdgeFactory) -> None:
    c = await make_cluster(delay=0.2)

    async def get(name: str) -> int:
        async with c.client.get(
            f"{c.edge_url}/execute-code", headers={"X-Session-Id": name}
        ) as response:
            return response.status

    assert await asyncio.gather(*(get("s1") for _ in range(20))) == [200] * 20
    assert c.resolver.calls == 1
    assert list(await asyncio.gather(get("s2"), get("s3"))) == [200, 200]
    assert c.resolver.calls == 3


async def test_stale_route_resolves_again_and_retries(make_cluster: EdgeFactory) -> None:
    dead = Target("gone", f"127.0.0.1:{free_port()}")  # nothing listens there
    c = await make_cluster()
    c.resolver.targets = [dead, c.agent_target]
    async with c.client.post(
        f"{c.edge_url}/execute-code", headers=SESSION, data=b"payload"
    ) as response:
        assert response.status == 200
        assert (await response.json())["body"] == "payload"  # the body was not lost to the retry
    assert c.resolver.calls == 2
    assert c.proxy.cache.get("sandbox", "s1") == c.agent_target


async def test_unreachable_after_retry(make_cluster: EdgeFactory) -> None:
    dead = Target("gone", f"127.0.0.1:{free_port()}")
    c = await make_cluster([dead])
    async with c.client.get(f"{c.edge_url}/execute-code", headers=SESSION) as response:
        assert response.status == 502
        assert response.headers["Portside-Error"] == "node-unreachable"
        assert (await response.text()).startswith(
            f"node agent gone at {dead.data_address} is unreachable"
        )
    assert c.resolver.calls == 2
    assert c.proxy.cache.get("sandbox", "s1") is None


async def test_a_reset_before_the_answer_is_retried_only_when_idempotent(
    make_cluster: EdgeFactory,
) -> None:
    c = await make_cluster()
    # A GET may go again: resolved afresh (the stub names the same agent), reset again, given up.
    async with c.client.get(f"{c.edge_url}/execute-code/reset", headers=SESSION) as response:
        assert response.status == 502
        assert response.headers["Portside-Error"] == "node-unreachable"
    assert c.resolver.calls == 2
    assert c.agent.resets >= 2
    # A POST, even without a body, may have been acted on: never sent twice.
    resets = c.agent.resets
    async with c.client.post(f"{c.edge_url}/execute-code/reset", headers=SESSION) as response:
        assert response.status == 502
        assert response.headers["Portside-Error"] == "node-unreachable"
    assert c.resolver.calls == 3
    assert c.agent.resets - resets == 1


async def test_invalidation_forces_a_new_resolve(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()

    async def get() -> None:
        async with c.client.get(f"{c.edge_url}/execute-code", headers=SESSION) as response:
            assert response.status == 200

    await get()
    c.proxy.invalidate("sandbox", "s1")
    await get()
    assert c.resolver.calls == 2
    c.proxy.invalidate_node("other-node")
    await get()
    assert c.resolver.calls == 2
    c.proxy.invalidate_node("n1")
    await get()
    assert c.resolver.calls == 3


async def test_set_config_swaps_routes(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    async with c.client.get(f"{c.edge_url}/new/x") as response:
        assert response.status == 404
    c.proxy.set_config(Config(routes=(Route("/new", "fresh", InstanceSource("path", index=1)),)))
    async with c.client.get(f"{c.edge_url}/new/x") as response:
        assert response.status == 200
        assert ["Portside-Class", "fresh"] in (await response.json())["headers"]
    async with c.client.get(f"{c.edge_url}/execute-code", headers=SESSION) as response:
        assert response.status == 404


async def test_agent_refusals_pass_through(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    async with c.client.get(f"{c.edge_url}/execute-code/exited", headers=SESSION) as response:
        assert response.status == 502
        assert response.headers["Portside-Error"] == "container-exited"
        assert await response.text() == "container sandbox/s1 exited with code 3 while booting\n"


async def test_a_response_broken_midway_is_not_passed_off_as_whole(
    make_cluster: EdgeFactory,
) -> None:
    c = await make_cluster()
    before = _sample("portside_edge_upstream_errors_total", kind="broken")
    async with c.client.get(f"{c.edge_url}/execute-code/broken", headers=SESSION) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert _sample("portside_edge_upstream_errors_total", kind="broken") - before == 1


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (NoCapacity("no node near weur has 0.25 vCPU and 1024 MiB free"), 503, "no-capacity"),
        (NotFound("class sandbox is not deployed"), 404, "not-found"),
    ],
)
async def test_resolver_errors_become_statuses(
    make_cluster: EdgeFactory, error: PortsideError, status: int, kind: str
) -> None:
    c = await make_cluster(error=error)
    for _ in range(2):  # failures are not cached: each request asks again
        async with c.client.get(f"{c.edge_url}/execute-code", headers=SESSION) as response:
            assert response.status == status
            assert response.headers["Portside-Error"] == kind
            assert await response.text() == f"{error}\n"
    assert c.resolver.calls == 2


async def test_websocket_echo_through_the_edge(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    async with c.client.ws_connect(
        f"{c.edge_url}/execute-code/ws", headers=SESSION, protocols=("chat",)
    ) as ws:
        assert ws.protocol == "chat"
        assert await ws.receive_str(timeout=5) == "hello s1"
        await ws.send_str("ping?")
        assert await ws.receive_str(timeout=5) == "ping?"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes(timeout=5) == b"\x02\x01\x00"
        await ws.close(code=4000, message=b"done")
    assert await eventually(lambda: c.agent.ws_closed_with, within=5) == 4000


@pytest.mark.parametrize(
    ("agent_does", "code", "reason"),
    [
        ("close-4001", 4001, "bye"),  # its code and reason, passed on as they are
        ("drop", 1011, ""),  # 1006 (dropped) may never be sent: the client learns of an error
    ],
)
async def test_websocket_end_from_the_agent_reaches_the_client(
    make_cluster: EdgeFactory, agent_does: str, code: int, reason: str
) -> None:
    c = await make_cluster()
    async with c.client.ws_connect(f"{c.edge_url}/execute-code/ws", headers=SESSION) as ws:
        assert await ws.receive_str(timeout=5) == "hello s1"
        await ws.send_str(agent_does)
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (code, reason)


async def test_edge_shutdown_closes_websockets_with_going_away(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    async with c.client.ws_connect(f"{c.edge_url}/execute-code/ws", headers=SESSION) as ws:
        assert await ws.receive_str(timeout=5) == "hello s1"
        async with asyncio.timeout(5):
            await c.proxy.shutdown()  # must not wait out the server's shutdown grace
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (
            aiohttp.WSMsgType.CLOSE,
            1001,
            "edge shutting down",
        )
    assert await eventually(lambda: c.agent.ws_closed_with, within=5) == 1001


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/execute-code/refuse", "container-exited"),  # the agent's own kind, passed on
        ("/execute-code/not-a-websocket", "upstream-refused"),  # no kind: the edge's
    ],
)
async def test_websocket_refusal_passes_status_and_kind(
    make_cluster: EdgeFactory, path: str, kind: str
) -> None:
    c = await make_cluster()
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await c.client.ws_connect(c.edge_url + path, headers=SESSION)
    assert caught.value.status == 502
    assert caught.value.headers is not None
    assert caught.value.headers["Portside-Error"] == kind


async def test_websocket_retries_a_stale_route(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    c.resolver.targets = [Target("gone", f"127.0.0.1:{free_port()}"), c.agent_target]
    async with c.client.ws_connect(f"{c.edge_url}/execute-code/ws", headers=SESSION) as ws:
        assert await ws.receive_str(timeout=5) == "hello s1"
    assert c.resolver.calls == 2


async def test_metrics_are_served_apart_from_the_ingress(make_cluster: EdgeFactory) -> None:
    c = await make_cluster()
    async with c.client.get(f"{c.edge_url}/execute-code", headers=SESSION) as response:
        assert response.status == 200
    address = f"127.0.0.1:{free_port()}"
    runner = await start_http_server(metrics_app(), address)
    try:
        async with c.client.get(f"http://{address}/metrics") as response:
            text = await response.text()
        assert (
            'portside_edge_requests_total{class="sandbox",code="200",region="weur",'
            'route="/execute-code"}' in text
        )
        assert "portside_edge_resolve_seconds_bucket" in text
    finally:
        await runner.cleanup()
    # On the ingress, /metrics is just a path: no route covers it here.
    async with c.client.get(f"{c.edge_url}/metrics") as response:
        assert response.status == 404
        assert response.headers["Portside-Error"] == "no-route"
