"""`portside edge --workers N` end to end: N processes share the edge's port, each serves and
counts its share, a worker that dies is started again, and SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import aiohttp
import pytest

from portside.net import with_port_offset
from tests.e2e.harness import Cluster
from tests.e2e.test_named_instances import config
from tests.support import eventually, eventually_sync

pytestmark = pytest.mark.e2e


def worker_pids(supervisor: int) -> list[int]:
    """The edge workers' pids: the supervisor's children."""
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
        return [int(pid) for pid in f.read().split()]


def listeners(address: str) -> int:
    """How many sockets listen on `address` (one per worker)."""
    port = address.rsplit(":", 1)[1]
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    )
    return len(out.stdout.splitlines())


async def served_by_worker(session: aiohttp.ClientSession, metrics: str) -> float:
    async with session.get(f"http://{metrics}/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("portside_edge_requests_total{") and 'code="200"' in line
    )


async def test_workers_share_the_port_and_come_back(cluster: Cluster, test_image: str) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra", "127.0.0.1", "--workers", "2")
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}"
    metrics = [with_port_offset(edge.option("--metrics-listen"), i) for i in (0, 1)]
    eventually_sync(lambda: listeners(edge.address) == 2, within=20, what="2 workers listening")

    # A new connection per request: the kernel spreads connections over the two listeners.
    for _ in range(40):
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/session/whoami", headers={"X-Session-Id": "ada"}) as r:
                assert r.status == 200, await r.text()
    async with aiohttp.ClientSession() as s:
        served = [await served_by_worker(s, m) for m in metrics]
    assert sum(served) == 40
    assert min(served) > 0, f"one worker served every request: {served}"

    # A worker that dies is started again; the port serves meanwhile.
    first, second = worker_pids(edge.popen.pid)
    os.kill(first, signal.SIGKILL)
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            async with s.get(f"{base}/session/whoami", headers={"X-Session-Id": "ada"}) as r:
                assert r.status == 200, await r.text()

    def replaced() -> bool:
        pids = worker_pids(edge.popen.pid)
        return len(pids) == 2 and first not in pids and second in pids

    await eventually(replaced, within=10, what="the killed worker started again")
    eventually_sync(lambda: listeners(edge.address) == 2, within=20, what="it listens again")

    # SIGTERM to the supervisor stops every worker.
    workers = worker_pids(edge.popen.pid)
    assert cluster.stop(edge) == 0
    await asyncio.sleep(0.2)
    for pid in workers:
        assert _gone(pid), f"worker {pid} still runs"


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its parent counts: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True
