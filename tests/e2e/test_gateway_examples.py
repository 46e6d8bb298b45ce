"""The gateway examples (issue 14) deployed as a user deploys them — `portside deploy` of the
example's portside.toml, its Dockerfile built by the CLI, its gateway.py shipped — on a real
cluster, each checked through an edge: version routing by header, a bearer token and a rate
limit (401, 200, 429), and an orchestrator pre-warming workers per region and reporting their
health."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.harness import PORTSIDE, Cluster
from tests.images.build import _busybox
from tests.support import eventually

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOKEN = "s3cret-token-for-the-example"
LIMIT, PERIOD_S = 5, 10.0  # examples/auth-rate-limit/portside.toml


def cli(cluster: Cluster, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        [*PORTSIDE, *args, "--controlplane", cluster.controlplane_address],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, (out.stdout, out.stderr)
    return out.stdout


def deploy_example(cluster: Cluster, name: str) -> None:
    """The example copied as a user has it (with busybox in its image's build context, as its
    README says), deployed with the CLI."""
    here = cluster.tmp / name
    shutil.copytree(EXAMPLES / name, here)
    shutil.copy2(_busybox(), here / "app" / "busybox")
    cli(cluster, "deploy", str(here / "portside.toml"))


def window() -> int:
    """The rate limiter's window now (fixed windows: floor(unix time / period))."""
    return math.floor(time.time() / PERIOD_S)


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **headers: str
) -> tuple[int, str]:
    async with session.request(method, url, headers=headers) as resp:
        return resp.status, await resp.text()


async def answered(
    session: aiohttp.ClientSession, url: str, status: int, method: str = "GET", **headers: str
) -> str:
    """The body of the first answer with `status` (the edge gets the deployed gateway, and a
    secret put, through its watches: until then it answers otherwise)."""

    async def check() -> tuple[int, str]:
        got, body = await call(session, method, url, **headers)
        assert got == status, (got, body)
        return got, body

    _, body = await eventually(check, within=30, every=0.2, what=f"{status} from {url}")
    return body


def one_node(cluster: Cluster) -> str:
    """A control plane, an agent and an edge in fra; the edge's base URL."""
    cluster.start_controlplane()
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    return f"http://{edge.address}"


async def test_version_routing(cluster: Cluster) -> None:
    edge = one_node(cluster)
    deploy_example(cluster, "version-routing")
    async with aiohttp.ClientSession() as session:
        assert await answered(session, edge + "/", 200) == "api v1 (main)\n"
        for version, want in (("v2", "api v2 (main)\n"), ("v1", "api v1 (main)\n")):
            assert await call(session, "GET", edge + "/", **{"x-version": version}) == (200, want)
        # Anything but v2 is v1, and the path goes through as it is.
        assert await call(session, "GET", edge + "/index.html", **{"X-Version": "v3"}) == (
            200,
            "api v1 (main)\n",
        )
        assert (await call(session, "GET", edge + "/missing", **{"x-version": "v2"}))[0] == 404


async def test_auth_rate_limit(cluster: Cluster) -> None:
    edge = one_node(cluster)
    deploy_example(cluster, "auth-rate-limit")
    async with aiohttp.ClientSession() as session:
        # No secret yet: nobody gets in, with or without a token.
        assert await answered(session, edge + "/", 401) == "a bearer token is needed\n"
        cli(cluster, "secret", "put", "API_TOKEN", stdin=TOKEN + "\n")
        good = {"Authorization": f"Bearer {TOKEN}"}
        # The first 200 is the first call counted (refused calls never reach the limiter).
        before = window()
        assert await answered(session, edge + "/", 200, **good) == "hello from main\n"
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
            status, _ = await call(session, "GET", edge + "/", **headers)
            assert status == 401, headers
        # limit = 5 in fixed windows of 10 s (edge/ratelimits.py): a burst within one window
        # gets what is left of it, then 429s. It runs in the first call's window when that is
        # sure and has time left, else it waits for the next window and gets all of it.
        left = PERIOD_S - time.time() % PERIOD_S
        if window() == before and left >= 2.0:
            allowed = LIMIT - 1
        else:
            await asyncio.sleep(left + 0.05)
            allowed = LIMIT
        statuses = [(await call(session, "GET", edge + "/", **good))[0] for _ in range(allowed + 2)]
    assert statuses == [200] * allowed + [429] * 2, statuses
    # The key is the client's address: another one has its own count.
    other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=other) as session:
        assert await call(session, "GET", edge + "/", **good) == (200, "hello from main\n")


async def test_orchestrator(cluster: Cluster) -> None:
    cluster.start_controlplane()
    cluster.start_agent("fra", "127.0.0.2")
    cluster.start_agent("sin", "127.0.0.3")
    edge = f"http://{cluster.start_edge('fra').address}"
    cluster.wait_for_nodes(2)
    deploy_example(cluster, "orchestrator")
    names = {"fra-0": "fra", "fra-1": "fra", "sin-0": "sin", "sin-1": "sin"}
    async with aiohttp.ClientSession() as session:
        before = json.loads(await answered(session, edge + "/status", 200))
        assert {w["state"] for w in before.values()} == {"not started"}, before
        async with session.post(edge + "/prewarm") as resp:
            assert resp.status == 200, await resp.text()
            placed: dict[str, dict[str, Any]] = await resp.json()
        assert {name: where["region"] for name, where in placed.items()} == names, placed

        async def all_healthy() -> dict[str, Any]:
            async with session.get(edge + "/status") as resp:
                status: dict[str, Any] = await resp.json()
            assert sorted(status) == sorted(names), status
            assert all(w["healthy"] and w["state"] == "healthy" for w in status.values()), status
            return status

        status = await eventually(all_healthy, within=30, every=0.5, what="4 healthy workers")
        assert {name: w["region"] for name, w in status.items()} == names
        assert {w["node"] for w in status.values()} == {w["node"] for w in placed.values()}
        # As the cluster itself reports them, not only as the gateway code does.
        listed = json.loads(
            await asyncio.to_thread(cli, cluster, "ps", "--class", "Worker", "--json")
        )
        assert {i["name"]: i["region"] for i in listed} == names, listed
        for region in ("fra", "sin"):
            got, body = await call(session, "GET", f"{edge}/?region={region}")
            assert got == 200 and body in (f"worker {region}-0\n", f"worker {region}-1\n"), body
        assert (await call(session, "GET", edge + "/?region=syd"))[0] == 404
