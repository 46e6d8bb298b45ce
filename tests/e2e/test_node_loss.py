"""Issue 10, edges follow the cluster: a node that freezes (SIGSTOP: its connections stay open,
nothing answers) loses its lease, every edge hears it on the route watch at once, and a request
for a named instance there is answered from the instance's new place within the lease TTL plus a
boot, never held longer; a POST that was in flight there fails with node-lost, never sent twice."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import aiohttp
import docker
import pytest

from tests.e2e.harness import Cluster, Proc
from tests.e2e.test_named_instances import config, containers_of, get

pytestmark = pytest.mark.e2e

LEASE_TTL_S = 10.0  # the control plane's default --node-ttl
# Beyond the lease and the boot: the watch, placing again, the processes' own delays.
MARGIN_S = 4.0


def answered_by(docker_client: docker.DockerClient, cluster: Cluster, whoami: str) -> str:
    """The node whose container answered /whoami (`<short container id> <instance>`)."""
    short_id = whoami.split()[0]
    for c in containers_of(docker_client, whoami.split()[1], cluster):
        if c.id.startswith(short_id):
            return str(c.labels["portside.node"])
    raise AssertionError(f"no container {short_id} of this cluster answered {whoami!r}")


def boot_seconds(agent: Proc, instance: str) -> float:
    """How long the agent took to boot `instance` (a shared Docker engine can be slow)."""
    found = re.search(rf"booted \w+/{instance} in (\d+) ms", agent.log_text())
    assert found is not None, f"{agent.name} did not boot {instance}"
    return int(found.group(1)) / 1000


async def test_a_frozen_node_s_instance_is_served_from_its_new_place(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    fra = cluster.start_agent("fra", "127.0.0.2")
    sin = cluster.start_agent("sin", "127.0.0.3")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(2)
    base = f"http://{edge.address}"
    session = {"X-Session-Id": "roamer"}
    async with aiohttp.ClientSession() as s:
        status, before, _ = await get(s, f"{base}/session/whoami", "roamer")
        assert status == 200, before
        assert "-fra-" in answered_by(docker_client, cluster, before)

        async def post_in_flight() -> tuple[int, str, str, float]:
            async with s.post(f"{base}/session/slow?60", headers=session, data=b"pay") as resp:
                text = await resp.text()
                return resp.status, resp.headers.get("Portside-Error", ""), text, time.monotonic()

        post = asyncio.create_task(post_in_flight())
        await asyncio.sleep(1.0)  # at the container on fra by now, which answers in 60 s

        frozen_at = time.monotonic()
        os.kill(fra.popen.pid, signal.SIGSTOP)
        try:

            async def get_after(delay: float) -> tuple[float, int, str, float]:
                await asyncio.sleep(delay)
                started = time.monotonic()
                status, text, _ = await get(s, f"{base}/session/whoami", "roamer")
                return started - frozen_at, status, text, time.monotonic()

            # Requests that start while the node is frozen, before and around its lease's end.
            gets = await asyncio.gather(*(get_after(d) for d in (0.0, 2.0, 4.0, 7.0, 9.0)))
            post_status, post_kind, post_text, post_done = await asyncio.wait_for(post, 30)
        finally:
            os.kill(fra.popen.pid, signal.SIGCONT)

        boot = boot_seconds(sin, "roamer")
        bound = LEASE_TTL_S + boot + MARGIN_S
        print(f"\nboot on the other node {boot:.2f}s")
        first_answer = min(done for _, status, _, done in gets if status == 200) - frozen_at
        print(f"first answer from the other node {first_answer:.2f}s after SIGSTOP")
        for started, status, text, done in gets:
            held = done - frozen_at - started
            print(f"GET started {started:.1f}s after SIGSTOP: {status} after {held:.2f}s")
            assert status == 200, text
            assert "-sin-" in answered_by(docker_client, cluster, text)
            assert done - frozen_at <= bound, f"held {done - frozen_at:.1f}s past SIGSTOP"
        print(
            f"POST in flight: {post_status} {post_kind} {post_done - frozen_at:.2f}s after SIGSTOP"
        )
        assert (post_status, post_kind) == (502, "node-lost"), post_text
        assert "may have run" in post_text
        assert post_done - frozen_at <= LEASE_TTL_S + 3.0

        # Thawed, the old node registers again; the edge keeps sending the instance to its new
        # place (the control plane's record). That the thawed agent removes its own copy is
        # its fencing's (tests/e2e/test_fencing.py).
        status, after, _ = await get(s, f"{base}/session/whoami", "roamer")
        assert status == 200 and "-sin-" in answered_by(docker_client, cluster, after)
