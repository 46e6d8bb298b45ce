"""The gateway module on a real cluster (issue 14): a config with a gateway and no routes sends
everything to its `fetch`, which routes by header to two classes through an edge; a handler
that raises is a 500 gateway-error with its traceback in the edge's log, and the next request is
fine; one past the deadline is a 504; a deploy swaps the module while a slow request is in
flight, which completes on the old one; a stub's lifecycle calls; a WebSocket through the
gateway. One cluster for the module: control plane, one agent, one edge."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import docker
import pytest

import portside
from tests.e2e.harness import Cluster, Proc
from tests.support import eventually

pytestmark = pytest.mark.e2e

MODULE = """
import asyncio
from portside.gateway import Response

VERSION = "{version}"


async def fetch(request, env):
    path = request.path
    if path == "/boom":
        raise RuntimeError("boom on purpose")
    if path == "/slow":
        await asyncio.sleep(float(request.query["s"]))
        return Response(f"{{VERSION}} slept\\n")
    if path == "/version":
        return Response(f"{{VERSION}}\\n")
    if path == "/life":
        box = env.V1.get(request.query["name"])
        info = await box.stop(grace=1) if "stop" in request.query else await box.state()
        return Response(f"{{info.state.value}}\\n")
    binding = env.V2 if request.headers.get("x-version") == "v2" else env.V1
    return await binding.get(request.headers.get("x-session", "main")).fetch(request)
"""


def config(image: str, deadline: str) -> str:
    return f"""
[[containers]]
class_name = "ApiV1"
binding = "V1"
image = "{image}"
instance_type = "lite"

[[containers]]
class_name = "ApiV2"
binding = "V2"
image = "{image}"
instance_type = "lite"

[gateway]
module = "gateway.py"
deadline = "{deadline}"
"""


def deploy(cluster: Cluster, image: str, version: str, deadline: str = "10s") -> None:
    (cluster.tmp / "gateway.py").write_text(MODULE.format(version=version))
    cluster.deploy(config(image, deadline))


@pytest.fixture(scope="module")
def gateway_cluster(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    etcd_url: str,
    docker_client: docker.DockerClient,
    test_image: str,
) -> Iterator[tuple[Cluster, Proc]]:
    subprocess.run(
        ["etcdctl", "--endpoints", etcd_url.removeprefix("etcd://")]
        + ["del", "--prefix", "/portside/"],
        check=True,
        capture_output=True,
    )
    tmp: Path = tmp_path_factory.mktemp("gateway")
    cluster = Cluster(tmp=tmp, store_url=etcd_url, tag="t" + secrets.token_hex(3))
    failed_before = request.session.testsfailed
    try:
        cluster.start_controlplane()
        deploy(cluster, test_image, "one")
        cluster.start_agent("fra")
        edge = cluster.start_edge("fra")
        cluster.wait_for_nodes(1)
        yield cluster, edge
    finally:
        if request.session.testsfailed > failed_before:
            print(cluster.logs())
        cluster.close(docker_client)


async def get(
    session: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, str, str | None]:
    async with session.get(url, headers=headers) as resp:
        return resp.status, await resp.text(), resp.headers.get("Portside-Error")


async def version_is(session: aiohttp.ClientSession, base: str, version: str) -> None:
    async def check() -> bool:
        got = await get(session, f"{base}/version")
        assert got[:2] == (200, f"{version}\n"), got
        return True

    await eventually(check, within=20, every=0.1, what=f"gateway module {version} serving")


async def test_routes_by_header_to_two_classes_and_drives_a_stub(
    gateway_cluster: tuple[Cluster, Proc],
) -> None:
    cluster, edge = gateway_cluster
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        await version_is(s, base, "one")
        status, v1, _ = await get(s, f"{base}/whoami", **{"x-session": "alice"})
        assert status == 200 and v1.split()[1] == "alice", v1
        status, v2, _ = await get(s, f"{base}/whoami", **{"x-session": "alice", "x-version": "v2"})
        assert status == 200 and v2.split()[1] == "alice", v2
        assert v1.split()[0] != v2.split()[0]  # two containers: one per class
        # The request goes on as the client sent it: method, target, body (streamed through).
        async with s.post(f"{base}/echo?x=1", data=b"payload", headers={"x-session": "bob"}) as r:
            assert r.status == 200 and await r.read() == b"POST /echo?x=1\npayload"
        async with portside.connect(cluster.controlplane_address) as ps:
            assert (await ps.container("ApiV2", "alice").state()).running
            assert not [i for i in await ps.instances("ApiV2") if i.name == "bob"]

        # A stub's lifecycle, from gateway code: state, then stop.
        status, state, _ = await get(s, f"{base}/life?name=alice")
        assert status == 200 and state.strip() in ("running", "healthy"), state
        status, state, _ = await get(s, f"{base}/life?name=alice&stop=1")
        assert (status, state) == (200, "stopped\n")


async def test_failures_are_one_line_and_do_not_touch_other_requests(
    gateway_cluster: tuple[Cluster, Proc], test_image: str
) -> None:
    cluster, edge = gateway_cluster
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        await version_is(s, base, "one")
        fine = asyncio.create_task(get(s, f"{base}/slow?s=0.5"))
        status, text, kind = await get(s, f"{base}/boom")
        assert (status, kind) == (500, "gateway-error")
        assert text == "the gateway's fetch raised RuntimeError; the traceback is in the log\n"
        assert "Traceback" in edge.log_text() and "boom on purpose" in edge.log_text()
        assert (await fine)[:2] == (200, "one slept\n")
        assert (await get(s, f"{base}/version"))[:2] == (200, "one\n")

        deploy(cluster, test_image, "short", deadline="1s")
        await version_is(s, base, "short")
        status, text, kind = await get(s, f"{base}/slow?s=30")
        assert (status, kind) == (504, "gateway-timeout"), text
        assert (await get(s, f"{base}/version"))[:2] == (200, "short\n")


async def test_a_deploy_swaps_the_module_under_a_request_in_flight(
    gateway_cluster: tuple[Cluster, Proc], test_image: str
) -> None:
    cluster, edge = gateway_cluster
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        deploy(cluster, test_image, "old")
        await version_is(s, base, "old")
        slow = asyncio.create_task(get(s, f"{base}/slow?s=4"))
        await asyncio.sleep(0.2)
        deploy(cluster, test_image, "new")
        await version_is(s, base, "new")
        assert not slow.done()  # the swap came while it was in flight
        assert (await slow)[:2] == (200, "old slept\n")


async def test_a_websocket_through_the_gateway(gateway_cluster: tuple[Cluster, Proc]) -> None:
    _, edge = gateway_cluster
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(f"http://{edge.address}/ws", headers={"x-version": "v2"}) as ws,
    ):
        await ws.send_str("hello through the gateway")
        assert await ws.receive_str(timeout=10) == "hello through the gateway"
        await ws.send_bytes(b"\x00\x01")
        assert await ws.receive_bytes(timeout=10) == b"\x00\x01"
