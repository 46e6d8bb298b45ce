"""Issue 2 end to end: named containers on demand through edge → control plane → agent → Docker,
on real processes started from the CLI, a real etcd and a real Docker engine."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import docker
import pytest

import portside
from tests.e2e.harness import Cluster
from tests.support import eventually

pytestmark = pytest.mark.e2e


def config(image: str, sleep_after: str = "10m", extra: str = "") -> str:
    return f"""
[[containers]]
class_name = "Echo"
image = "{image}"
default_port = 8080
instance_type = "lite"
sleep_after = "{sleep_after}"

[[routes]]
path = "/session"
class_name = "Echo"
instance = "header:X-Session-Id"

[[routes]]
path = "/by-path"
class_name = "Echo"
instance = "path:1"
{extra}
"""


async def get(
    session: aiohttp.ClientSession, url: str, name: str | None = None, hint: str | None = None
) -> tuple[int, str, dict[str, str]]:
    headers = {}
    if name is not None:
        headers["X-Session-Id"] = name
    if hint is not None:
        headers["Portside-Location-Hint"] = hint
    async with session.get(url, headers=headers) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


def containers_of(
    client: docker.DockerClient, name: str, cluster: Cluster
) -> list[docker.models.containers.Container]:
    # Listed sparse, then inspected one by one: a container removed in between (an agent's
    # reconcile, a sleep's cleanup) is skipped, not a 404 that fails the test.
    listed = client.containers.list(
        all=True, sparse=True, filters={"label": f"portside.instance={name}"}
    )
    out = []
    for c in listed:
        if not c.attrs["Labels"]["portside.node"].startswith(cluster.tag + "-"):
            continue
        try:
            out.append(client.containers.get(c.id))
        except docker.errors.NotFound:
            continue
    return out


def stopped(container: docker.models.containers.Container) -> bool:
    container.reload()
    return bool(container.status != "running")


async def listed_asleep(cluster: Cluster, class_name: str, name: str, within: float) -> None:
    """Until the control plane lists the instance as sleeping, as its node's heartbeat reported
    it: from then on it takes no capacity and does not count against max_instances."""
    async with portside.connect(cluster.controlplane_address) as ps:

        async def asleep() -> bool:
            return name in [i.name for i in await ps.instances(class_name, state="sleeping")]

        await eventually(asleep, within=within, what=f"{class_name}/{name} listed as sleeping")


async def test_one_container_per_session_and_state_survives_sleep(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image, sleep_after="2s"))
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        status, first, _ = await get(s, f"{base}/session/whoami", "alice")
        assert status == 200, first
        for _ in range(3):
            assert (await get(s, f"{base}/session/whoami", "alice"))[1] == first
        status, other, _ = await get(s, f"{base}/session/whoami", "bob")
        assert status == 200 and other != first
        # The path:1 route takes the name from the first segment after its prefix.
        status, by_path, _ = await get(s, f"{base}/by-path/carol/whoami")
        assert status == 200 and by_path not in (first, other)
        assert len(containers_of(docker_client, "alice", cluster)) == 1
        assert len(containers_of(docker_client, "bob", cluster)) == 1

        status, _, _ = await get(s, f"{base}/session/state?write=kept-across-sleep", "alice")
        assert status == 200
        # sleep_after is 2 s: the container stops within 3 s of the last request.
        last = time.monotonic()
        (container,) = containers_of(docker_client, "alice", cluster)
        await eventually(lambda: stopped(container), within=6, every=0.1, what="alice slept")
        stopped_after = time.monotonic() - last
        assert 1.9 <= stopped_after <= 3.0, f"stopped {stopped_after:.2f}s after the last request"

        status, text, _ = await get(s, f"{base}/session/state", "alice")
        assert status == 200 and "kept-across-sleep" in text
        container.reload()
        assert container.status == "running"
        assert containers_of(docker_client, "alice", cluster)[0].id == container.id


async def test_never_sleeps_during_a_long_request(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image, sleep_after="2s"))
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    async with aiohttp.ClientSession() as s:
        status, text, _ = await get(s, f"http://{edge.address}/session/slow?5", "long")
        assert status == 200, text
        (container,) = containers_of(docker_client, "long", cluster)
        container.reload()
        assert container.status == "running"  # 5 s in flight, sleep_after 2 s: still awake


async def test_location_hint_places_near(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    cluster.start_agent("fra", "127.0.0.2")
    cluster.start_agent("sin", "127.0.0.3")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(2)
    async with aiohttp.ClientSession() as s:
        assert (await get(s, f"http://{edge.address}/session/whoami", "asia", hint="sin"))[0] == 200
        assert (await get(s, f"http://{edge.address}/session/whoami", "europe"))[0] == 200
        assert (await get(s, f"http://{edge.address}/session/whoami", "area", hint="apac"))[
            0
        ] == 200
    (asia,) = containers_of(docker_client, "asia", cluster)
    (europe,) = containers_of(docker_client, "europe", cluster)
    (area,) = containers_of(docker_client, "area", cluster)
    assert "-sin-" in asia.labels["portside.node"]
    assert "-fra-" in europe.labels["portside.node"]  # no hint: near the fra edge
    assert "-sin-" in area.labels["portside.node"]


async def test_fifty_concurrent_first_requests_from_two_edges_boot_one_container(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    # busybox httpd (not the image's nc server) so that 50 connections at once are all accepted.
    cluster.deploy(
        config(
            test_image,
            extra=f"""
[[containers]]
class_name = "Httpd"
image = "{test_image}"
instance_type = "lite"
entrypoint = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]

[[routes]]
path = "/cgi-bin"
class_name = "Httpd"
instance = "header:X-Session-Id"
""",
        )
    )
    cluster.start_agent("fra", "127.0.0.2")
    cluster.start_agent("ams", "127.0.0.3")
    edges = [cluster.start_edge("fra"), cluster.start_edge("ams")]
    cluster.wait_for_nodes(2)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as s:
        results = await asyncio.gather(
            *(get(s, f"http://{edges[i % 2].address}/cgi-bin/whoami", "crowd") for i in range(50))
        )
    assert [r[0] for r in results] == [200] * 50, [r[:2] for r in results if r[0] != 200]
    assert len({r[1] for r in results}) == 1
    assert len(containers_of(docker_client, "crowd", cluster)) == 1


async def test_error_statuses_have_real_causes(cluster: Cluster, test_image: str) -> None:
    extra = f"""
[[containers]]
class_name = "Crasher"
image = "{test_image}"
instance_type = "lite"
entrypoint = ["/bin/sh", "-c", "exit 3"]

[[containers]]
class_name = "Silent"
image = "{test_image}"
instance_type = "lite"
entrypoint = ["/bin/sleep", "3600"]
boot_timeout = "2s"

[[containers]]
class_name = "Big"
image = "{test_image}"
instance_type = "standard-2"
sleep_after = "1s"

[[routes]]
path = "/crash"
class_name = "Crasher"
instance = "query:id"

[[routes]]
path = "/silent"
class_name = "Silent"
instance = "query:id"

[[routes]]
path = "/big"
class_name = "Big"
instance = "cookie:sid"
"""
    cluster.start_controlplane()
    cluster.deploy(config(test_image, extra=extra))
    cluster.start_agent("fra", "127.0.0.1", "--vcpu", "1.5", "--memory-mib", "16384")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        status, text, headers = await get(s, f"{base}/crash/x?id=one")
        assert status == 502 and "exited with code 3" in text, text
        assert "\n" not in text.strip()

        started = time.monotonic()
        status, text, _ = await get(s, f"{base}/silent/x?id=one")
        assert status == 504 and "did not answer within 2s" in text, text
        assert time.monotonic() - started < 6

        # standard-2 is 1 vCPU; the node offers 1.5: the first fits, the second does not.
        assert (await big(s, base, "first"))[0] == 200
        status, text = await big(s, base, "second")
        assert status == 503 and "no node has capacity" in text, text

        status, text, _ = await get(s, f"{base}/nowhere")
        assert status == 404 and "no route" in text, text
        status, text, _ = await get(s, f"{base}/session/whoami")
        assert status == 400 and "X-Session-Id" in text, text
        status, text, _ = await get(s, f"{base}/session/whoami", "y", hint="atlantis")
        assert status == 400 and "unknown location" in text, text


async def big(s: aiohttp.ClientSession, base: str, sid: str) -> tuple[int, str]:
    async with s.get(f"{base}/big/whoami", cookies={"sid": sid}) as resp:
        return resp.status, await resp.text()


async def test_sleeping_instances_free_capacity_and_wake_only_where_there_is_room(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(
        config(
            test_image,
            extra=f"""
[[containers]]
class_name = "Big"
image = "{test_image}"
instance_type = "standard-2"
sleep_after = "1s"

[[routes]]
path = "/big"
class_name = "Big"
instance = "cookie:sid"
""",
        )
    )
    cluster.start_agent("fra", "127.0.0.1", "--vcpu", "1.5", "--memory-mib", "16384")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        assert (await big(s, base, "a"))[0] == 200
        status, text = await big(s, base, "b")
        assert status == 503 and "no node has capacity" in text, text
        (a,) = containers_of(docker_client, "a", cluster)
        await eventually(lambda: stopped(a), within=10, every=0.2, what="a slept")
        await listed_asleep(cluster, "Big", "a", within=10)  # a heartbeat told the control plane
        status, text = await big(s, base, "b")
        assert status == 200, text
        # a keeps its node, which b now fills: a cannot wake until b sleeps.
        status, text = await big(s, base, "a")
        assert status == 503 and "is full" in text and "can wake when others sleep" in text, text
        await listed_asleep(cluster, "Big", "b", within=10)
        assert (await big(s, base, "a"))[0] == 200


async def test_every_daemon_serves_metrics(cluster: Cluster, test_image: str) -> None:
    cp = cluster.start_controlplane()
    cluster.deploy(config(test_image, sleep_after="1s"))
    agent = cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    agent_metrics = _metrics_address(agent.popen.args)  # not the data port: edges only
    async with aiohttp.ClientSession() as s:
        assert (await get(s, f"http://{edge.address}/session/whoami", "m"))[0] == 200

        async def slept_once() -> bool:
            text = await (await s.get(f"http://{agent_metrics}/metrics")).text()
            return 'portside_agent_sleeps_total{class="Echo"} 1.0' in text

        await eventually(slept_once, within=10, every=0.2, what="the agent counted m's sleep")
        cp_metrics = _metrics_address(cp.popen.args)
        text = await (await s.get(f"http://{cp_metrics}/metrics")).text()
        assert (
            'portside_controlplane_placements_total{class="Echo",outcome="placed",reason=""} 1.0'
            in text
        )
        assert "portside_controlplane_resolve_seconds_bucket" in text
        text = await (await s.get(f"http://{agent_metrics}/metrics")).text()
        assert 'portside_agent_boots_total{class="Echo",outcome="ok"} 1.0' in text
        assert "portside_agent_boot_seconds_bucket" in text
        assert 'portside_agent_sleeps_total{class="Echo"} 1.0' in text
        assert "portside_agent_proxied_requests_total" in text
        edge_metrics = _metrics_address(edge.popen.args)
        text = await (await s.get(f"http://{edge_metrics}/metrics")).text()
        assert "portside_edge_requests_total" in text
        assert "portside_edge_proxy_seconds_bucket" in text


def _metrics_address(args: object) -> str:
    argv = list(args)  # type: ignore[call-overload]
    return str(argv[argv.index("--metrics-listen") + 1])


async def test_max_instances_counts_awake_named_instances(
    cluster: Cluster, test_image: str
) -> None:
    cluster.start_controlplane()
    cluster.deploy(
        config(test_image).replace('sleep_after = "10m"', 'sleep_after = "1s"\nmax_instances = 1')
    )
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        assert (await get(s, f"{base}/session/whoami", "one"))[0] == 200
        status, text, headers = await get(s, f"{base}/session/whoami", "two")
        assert status == 503 and "class Echo is at max_instances (1)" in text, text
        assert headers["Portside-Error"] == "no-capacity"
        await listed_asleep(cluster, "Echo", "one", within=10)  # asleep, it no longer counts
        assert (await get(s, f"{base}/session/whoami", "two"))[0] == 200
