"""Placement constraints end to end: a hint outside a class's jurisdiction lands on an allowed
node and the response says where (Portside-Location), a WebSocket's 101 as well, and so does a
response the gateway module passes on from a binding whose `get(..., location_hint=...)` was
moved; a labels constraint picks the labelled node over a nearer one; constraints no node meets
are refused with the constraint named, and bad ones at `portside deploy`."""

from __future__ import annotations

import asyncio
import subprocess

import aiohttp
import docker
import pytest

from portside.headers import ERROR, LOCATION
from tests.e2e.harness import PORTSIDE, Cluster
from tests.e2e.test_named_instances import containers_of, get

pytestmark = pytest.mark.e2e


def config(image: str) -> str:
    classes = {
        "InEu": 'constraints = { jurisdiction = "eu" }',
        "OnGpu": 'constraints = { labels = { gpu = "yes" } }',
        "InSin": 'constraints = { regions = ["sin"] }',
    }
    out = []
    for name, line in classes.items():
        out.append(
            f'[[containers]]\nclass_name = "{name}"\nimage = "{image}"\ninstance_type = "lite"\n'
            f'{line}\n\n[[routes]]\npath = "/{name.lower()}"\nclass_name = "{name}"\n'
            'instance = "header:X-Session-Id"\n'
        )
    out.append('[[routes]]\npath = "/gw"\ngateway = true\n\n[gateway]\nmodule = "gateway.py"\n')
    return "\n".join(out)


# Any path under /gw: instance X-Session-Id of InEu, placed near sin, which its jurisdiction
# moves; the response (a WebSocket's 101 too) is returned as the binding gave it.
MODULE = """
async def fetch(request, env):
    box = env.IN_EU.get(request.headers["x-session-id"], location_hint="sin")
    return await box.fetch(request)
"""


async def upgrade(address: str, path: str, name: str) -> str:
    """The head of the edge's answer to a WebSocket upgrade of `path` for instance `name`."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nX-Session-Id: {name}\r\n\r\n".encode()
        )
        return (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode()
    finally:
        writer.close()


def deploy(cluster: Cluster, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PORTSIDE, "deploy", path, "--controlplane", cluster.controlplane_address],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_constraints_move_hints_pick_labelled_nodes_and_refuse_clearly(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    (cluster.tmp / "gateway.py").write_text(MODULE)
    cluster.deploy(config(test_image))
    cluster.start_agent("iad", "127.0.0.2")
    cluster.start_agent("fra", "127.0.0.3", "--label", "gpu=yes")
    edge = cluster.start_edge("iad")
    cluster.wait_for_nodes(2)
    base = f"http://{edge.address}"

    def node_of(name: str) -> str:
        (container,) = containers_of(docker_client, name, cluster)
        return str(container.labels["portside.node"])

    async with aiohttp.ClientSession() as s:
        # The edge's own region (iad) is the hint; the EU class goes to fra and says so.
        status, body, headers = await get(s, f"{base}/ineu/x", "eu-1")
        assert status == 200, body
        assert "-fra-" in node_of("eu-1")
        assert headers[LOCATION] == "dub; hint=iad"
        status, _, headers = await get(s, f"{base}/ineu/x", "eu-1", hint="ams")
        assert status == 200 and LOCATION not in headers  # a hint within: nothing moved
        head = await upgrade(edge.address, "/ineu/ws", "eu-1")
        assert head.startswith("HTTP/1.1 101 ") and f"\r\n{LOCATION}: dub; hint=iad\r\n" in head

        # Through the gateway: the stub's hint (sin) is moved, and the handler passes it on.
        status, body, headers = await get(s, f"{base}/gw/x", "eu-2")
        assert status == 200, body
        assert headers[LOCATION] == "otp; hint=sin"
        head = await upgrade(edge.address, "/gw/ws", "eu-2")
        assert head.startswith("HTTP/1.1 101 ") and f"\r\n{LOCATION}: otp; hint=sin\r\n" in head

        # iad is nearer, but only fra carries gpu=yes; labels move no hint.
        status, body, headers = await get(s, f"{base}/ongpu/x", "gpu-1")
        assert status == 200, body
        assert "-fra-" in node_of("gpu-1")
        assert LOCATION not in headers

        status, body, headers = await get(s, f"{base}/insin/x", "sin-1")
        assert status == 503 and headers[ERROR] == "no-capacity"
        assert body.startswith("no node satisfies the constraints of class InSin (regions sin):")

    bad = cluster.tmp / "bad.toml"
    bad.write_text(config(test_image).replace('jurisdiction = "eu"', 'jurisdiction = "mars"'))
    out = deploy(cluster, str(bad))
    assert out.returncode != 0
    assert f"{bad}: containers[0].constraints.jurisdiction: " in out.stderr
    assert "use one of eu, fedramp, us" in out.stderr
