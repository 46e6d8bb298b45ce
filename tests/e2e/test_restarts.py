"""Issue 10, restarts: an agent stopped with SIGTERM drains (its data port refuses new connections
at once, a request in flight finishes, its containers keep running for the next agent), and a
container that crashes at start is retried with backoff, which `portside ps` shows. Real processes
started from the CLI, the real engine and etcd."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time

import aiohttp
import docker
import pytest

from tests.e2e.harness import PORTSIDE, Cluster
from tests.support import eventually

pytestmark = pytest.mark.e2e


def config(image: str) -> str:
    return f"""
[[containers]]
class_name = "Echo"
image = "{image}"
default_port = 8080
instance_type = "lite"
sleep_after = "10m"

[[containers]]
class_name = "Crash"
image = "{image}"
default_port = 8080
instance_type = "lite"
sleep_after = "10m"
entrypoint = ["/bin/sh", "-c", "echo failing; exit 3"]

[[routes]]
path = "/session"
class_name = "Echo"
instance = "header:X-Session-Id"

[[routes]]
path = "/crash"
class_name = "Crash"
instance = "header:X-Session-Id"
"""


async def get(session: aiohttp.ClientSession, url: str, name: str) -> tuple[int, str, str]:
    async with session.get(url, headers={"X-Session-Id": name}) as resp:
        return resp.status, await resp.text(), resp.headers.get("Portside-Error", "")


def refuses(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True


def portside_ps(cluster: Cluster, *args: str) -> str:
    env = dict(os.environ, PORTSIDE_CONTROLPLANE=cluster.controlplane_address)
    out = subprocess.run(
        [*PORTSIDE, "ps", *args], capture_output=True, text=True, env=env, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_sigterm_drains_and_the_next_agent_adopts_the_running_container(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    agent = cluster.start_agent("fra", "127.0.0.1", "--drain-grace", "8")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        status, whoami, _ = await get(s, f"{base}/session/whoami", "vic")
        assert status == 200, whoami
        assert (await get(s, f"{base}/session/state?write=1", "vic"))[0] == 200  # a first visit

        slow = asyncio.create_task(get(s, f"{base}/session/slow?3", "vic"))
        await asyncio.sleep(0.5)  # the request reaches the container (a margin, not a sync)
        signalled = time.monotonic()
        agent.popen.send_signal(signal.SIGTERM)
        # New connections are refused at once, while the slow request is still in flight.
        await eventually(lambda: refuses(agent.address), within=1.0, what="data port closed")
        assert not slow.done()
        assert await slow == (200, "slept 3", "")  # it finished through the drain
        code = await asyncio.to_thread(agent.popen.wait, 15)
        assert code == 0
        took = time.monotonic() - signalled
        assert took < 8, f"the agent took {took:.1f}s to exit, past its drain grace"
        log = agent.log_text()
        assert "drained: 1 requests finished" in log, log[-3000:]

        (container,) = [
            c
            for c in docker_client.containers.list(
                all=True, filters={"label": "portside.instance=vic"}
            )
            if c.labels["portside.node"].startswith(cluster.tag + "-")
        ]
        assert container.status == "running"  # left running for the next agent

        again = cluster.restart(agent)
        cluster.wait_for_nodes(1)
        status, after, _ = await get(s, f"{base}/session/whoami", "vic")
        assert (status, after) == (200, whoami)  # the same container, adopted
        assert (await get(s, f"{base}/session/state", "vic"))[1] == "1"  # the visit it kept
        assert "adopted 1 containers (1 running)" in again.log_text()


async def test_a_crash_loop_backs_off_and_ps_shows_it(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        for crash in (1, 2, 3):
            status, text, kind = await get(s, f"{base}/crash/x", "zed")
            assert (status, kind) == (502, "container-exited"), text
            assert "exited with code 3" in text and "next try in" in text
            # Refused at once while it backs off, with the code and the wait.
            asked = time.monotonic()
            status, text, kind = await get(s, f"{base}/crash/x", "zed")
            assert (status, kind) == (502, "container-exited")
            assert "exited with code 3 at start; next try in" in text
            assert time.monotonic() - asked < 0.5
            if crash < 3:
                await asyncio.sleep(2.0 ** (crash - 1) + 0.1)  # its backoff, then a new try
        # Now 4 s to wait: ps shows the crashes and the wait.
        (row,) = [r for r in portside_ps(cluster).splitlines() if "zed" in r]
        assert "stopped_with_code (3), 3 crashes, retry in" in row, row
        (listed,) = json.loads(portside_ps(cluster, "--json", "--class", "Crash"))
        assert listed["restarts"] == 3 and listed["backoff_until"] > time.time()
        assert listed["exit_code"] == 3
        # The engine started the container three times, no more.
        (container,) = [
            c
            for c in docker_client.containers.list(
                all=True, filters={"label": "portside.instance=zed"}
            )
            if c.labels["portside.node"].startswith(cluster.tag + "-")
        ]
        starts = docker_client.api.events(
            since=time.time() - 120,
            until=time.time(),
            filters={"container": container.id, "event": "start"},
            decode=True,
        )
        assert sum(1 for _ in starts) == 3
