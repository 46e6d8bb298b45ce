"""Benchmark of pause mode's wake (issue 13): the first byte of a request to a paused instance
through Portside (edge → agent → the thawed container) against the baseline of `docker unpause`
of a paused container of the same image plus one request straight to it, in interleaved rounds
of the same run.

Starts its own control plane (embedded store), agent and edge on 127.0.0.1 as bench/
named_instances.py does (mutual TLS between them, like `portside up`), and deploys a class with
sleep_mode "pause" and sleep_after 1s (busybox httpd). Each round: wait until the agent froze the
instance (docker inspect says Paused), time `docker unpause` (Docker SDK) + GET of the baseline
container (paused again after), the same with the unpause as the agent calls it (raw HTTP on a
kept-alive engine connection, EngineCalls), then time a GET through the edge until its response
head. Every round's
Portside request must find its container paused and leave it running with the same process.
Goal: p50 ≤ 60 ms and ≤ 1.2× the baseline's.
Usage: python bench/pause_wake.py [--rounds N] [--max-seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.named_instances import HTTPD, IMAGE, Cluster, wait_port  # noqa: E402
from nodeagent.runtime.docker_streams import EngineCalls  # noqa: E402
from tests.images.build import build_image  # noqa: E402

NODE_ID = "bench-pause"
CLASS = "BenchPause"
SESSION = "frozen"
GOAL_P50_S = 0.060
GOAL_RATIO = 1.2
CONFIG = f"""
[[containers]]
class_name = "{CLASS}"
image = "{IMAGE}"
instance_type = "standard-1"
entrypoint = {HTTPD!r}
sleep_after = "1s"
sleep_mode = "pause"
pause_max = "1h"

[[routes]]
path = "/"
class_name = "{CLASS}"
instance = "header:X-Session-Id"
""".replace("'", '"')


def figures(samples: list[float]) -> tuple[float, float, float]:
    """p50, p90 and mean, in seconds."""
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, int(0.9 * len(s)))], statistics.fmean(s)


def show(label: str, samples: list[float]) -> None:
    p50, p90, mean = figures(samples)
    print(
        f"  {label:44} p50 {p50 * 1e3:6.1f} ms  p90 {p90 * 1e3:6.1f} ms  "
        f"mean {mean * 1e3:6.1f} ms  (n={len(samples)})"
    )


async def first_byte(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    """Seconds until the response head of a GET arrived (its body is read after)."""
    start = time.perf_counter()
    async with http.get(url, headers=headers) as resp:
        took = time.perf_counter() - start
        await resp.read()
        assert resp.status == 200, resp.status
    return took


def instance_container(client: docker.DockerClient) -> docker.models.containers.Container:
    (container,) = client.containers.list(
        all=True, filters={"label": [f"portside.node={NODE_ID}", f"portside.instance={SESSION}"]}
    )
    return container


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout_s:g}s")
        await asyncio.sleep(0.02)


async def rounds(client: docker.DockerClient, edge: str, count: int, max_s: float) -> None:
    api = client.api
    headers = {"X-Session-Id": SESSION}
    network = client.networks.create(f"portside-bench-{os.getpid()}", internal=True)
    baseline = client.containers.run(IMAGE, HTTPD, detach=True, network=network.name, init=True)
    portside: list[float] = []
    direct: list[float] = []
    kept: list[float] = []  # the baseline with the agent's own unpause call
    calls = EngineCalls(api)
    try:
        baseline.reload()
        ip = baseline.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]
        await asyncio.to_thread(wait_port, ip, 8080)
        api.pause(baseline.id)
        # The client keeps one connection to the edge, as a browser would; the thawed
        # container gets a new connection on both paths (busybox httpd closes each one).
        async with aiohttp.ClientSession() as http, aiohttp.ClientSession() as fresh:
            await first_byte(http, f"http://{edge}/index.html", headers)  # its one boot
            ours = instance_container(client)
            ours.reload()
            pid = ours.attrs["State"]["Pid"]
            ended = time.monotonic() + max_s
            for _ in range(count):
                if time.monotonic() > ended:
                    break

                def frozen() -> bool:
                    ours.reload()
                    return bool(ours.attrs["State"]["Paused"])

                await until(frozen, 10.0, "the agent's pause")

                start = time.perf_counter()
                await asyncio.to_thread(api.unpause, baseline.id)
                unpaused = time.perf_counter() - start
                direct.append(
                    unpaused + await first_byte(fresh, f"http://{ip}:8080/index.html", {})
                )
                api.pause(baseline.id)
                await asyncio.sleep(0.05)
                start = time.perf_counter()
                await calls.post(f"/containers/{baseline.id}/unpause")
                unpaused = time.perf_counter() - start
                kept.append(unpaused + await first_byte(fresh, f"http://{ip}:8080/index.html", {}))
                api.pause(baseline.id)
                await asyncio.sleep(0.05)  # the agent's freeze answered too (it inspects after)
                portside.append(await first_byte(http, f"http://{edge}/index.html", headers))
                ours.reload()
                state = ours.attrs["State"]
                if state["Paused"] or state["Pid"] != pid:
                    raise RuntimeError(f"the request did not thaw the same process: {state}")
    finally:
        calls.close()
        baseline.remove(force=True)
        network.remove()
    print(f"wake of a paused instance, {len(portside)} interleaved rounds (image {IMAGE}, httpd)")
    show("docker unpause + direct request (baseline)", direct)
    show("same, unpause as the agent calls it", kept)
    show("first byte through edge + agent (Portside)", portside)
    p50, base = figures(portside)[0], figures(direct)[0]
    ratio = p50 / base
    print(f"  {'ratio (p50s)':44} {ratio:.2f}x")
    print(f"  {'ratio to the agent-call baseline (p50s)':44} {p50 / figures(kept)[0]:.2f}x")
    met = p50 <= GOAL_P50_S and ratio <= GOAL_RATIO
    print(
        f"  goal p50 <= {GOAL_P50_S * 1e3:.0f} ms and <= {GOAL_RATIO}x the baseline: "
        + ("met" if met else "MISSED")
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    client = docker.from_env()
    build_image(client, IMAGE)
    tmp = Path(tempfile.mkdtemp(prefix="portside-bench-"))
    cluster = Cluster(tmp, secure=True, node_id=NODE_ID, config=CONFIG)
    try:
        cluster.start()
        asyncio.run(rounds(client, cluster.edge, args.rounds, args.max_seconds))
    finally:
        cluster.stop(client)


if __name__ == "__main__":
    main()
