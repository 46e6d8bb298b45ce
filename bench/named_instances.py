"""Benchmark of the named-instance path on this machine, against baselines run in the same process:

1. cold start: first request to a new instance through edge → agent (boot included) versus a plain
   `docker run` of the same image until its port answers;
2. warm request: through edge and agent versus straight to the container.

Starts its own control plane (embedded store), agent and edge on 127.0.0.1, like `portside up`.
Usage: python bench/named_instances.py [--cold N] [--warm N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portside.net import free_port  # noqa: E402
from tests.images.build import build_image  # noqa: E402

IMAGE = "portside-test/echo:latest"
HTTPD = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
NODE_ID = "bench-node"


def wait_port(host: str, port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.002)
    raise RuntimeError(f"{host}:{port} did not open")


def summary(samples: list[float]) -> str:
    s = sorted(samples)

    def p(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))]

    return (
        f"median {statistics.median(s) * 1000:7.2f} ms  p90 {p(0.9) * 1000:7.2f} ms  (n={len(s)})"
    )


def docker_run_until_answers(client: docker.DockerClient, runs: int) -> list[float]:
    """The baseline: create+start a container of the same image on a bridge network and poll its
    port, as fast as a script can."""
    net = client.networks.create(f"portside-bench-{os.getpid()}", driver="bridge", internal=True)
    samples = []
    try:
        for _ in range(runs):
            start = time.perf_counter()
            c = client.containers.run(IMAGE, HTTPD, detach=True, network=net.name, init=True)
            c.reload()
            ip = c.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
            wait_port(ip, 8080)
            samples.append(time.perf_counter() - start)
            c.remove(force=True)
    finally:
        net.remove()
    return samples


async def first_requests(edge: str, runs: int) -> list[float]:
    samples = []
    async with aiohttp.ClientSession() as s:
        for i in range(runs):
            start = time.perf_counter()
            async with s.get(
                f"http://{edge}/cgi-bin/whoami", headers={"X-Session-Id": f"cold-{os.getpid()}-{i}"}
            ) as r:
                await r.read()
                assert r.status == 200, await r.text()
            samples.append(time.perf_counter() - start)
    return samples


async def warm_requests(url: str, runs: int, headers: dict[str, str]) -> list[float]:
    samples = []
    async with aiohttp.ClientSession() as s:
        for i in range(runs + 50):
            start = time.perf_counter()
            async with s.get(url, headers=headers) as r:
                await r.read()
                assert r.status == 200
            if i >= 50:  # the first 50 warm up connections and caches
                samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cold", type=int, default=20)
    parser.add_argument("--warm", type=int, default=2000)
    args = parser.parse_args()
    client = docker.from_env()
    build_image(client, IMAGE)
    tmp = Path(tempfile.mkdtemp(prefix="portside-bench-"))
    (tmp / "portside.toml").write_text(
        f"""
[[containers]]
class_name = "Bench"
image = "{IMAGE}"
instance_type = "standard-1"
entrypoint = {HTTPD!r}
[[routes]]
path = "/"
class_name = "Bench"
instance = "header:X-Session-Id"
""".replace("'", '"')
    )
    cp, agent, edge = (f"127.0.0.1:{free_port()}" for _ in range(3))
    procs = []
    py = [sys.executable, "-m", "portside", "--log-level", "warning"]
    try:
        procs.append(
            subprocess.Popen(
                [
                    *py,
                    "controlplane",
                    "--listen",
                    cp,
                    "--store",
                    f"sqlite://{tmp}/store.db",
                    "--metrics-listen",
                    f"127.0.0.1:{free_port()}",
                ],
                start_new_session=True,
            )
        )
        wait_port(cp.split(":")[0], int(cp.split(":")[1]))
        subprocess.run(
            [*py, "deploy", str(tmp / "portside.toml"), "--controlplane", cp],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        procs.append(
            subprocess.Popen(
                [
                    *py,
                    "agent",
                    "--controlplane",
                    cp,
                    "--listen",
                    agent,
                    "--region",
                    "fra",
                    "--node-id",
                    NODE_ID,
                    "--vcpu",
                    "64",
                    "--memory-mib",
                    "1000000",
                    "--api-listen",
                    f"127.0.0.1:{free_port()}",
                ],
                start_new_session=True,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    *py,
                    "edge",
                    "--controlplane",
                    cp,
                    "--listen",
                    edge,
                    "--region",
                    "fra",
                    "--metrics-listen",
                    f"127.0.0.1:{free_port()}",
                ],
                start_new_session=True,
            )
        )
        wait_port("127.0.0.1", int(edge.split(":")[1]))
        wait_port("127.0.0.1", int(agent.split(":")[1]))
        time.sleep(0.5)  # the agent registers right after opening its port

        print(f"cold start, {args.cold} runs each (image {IMAGE}, busybox httpd)")
        base = docker_run_until_answers(client, args.cold)
        cold = asyncio.run(first_requests(edge, args.cold))
        print(f"  docker run until the port answers      {summary(base)}")
        print(f"  first request through edge + agent     {summary(cold)}")
        ratio = statistics.median(cold) / statistics.median(base)
        print(f"  ratio (medians)                        {ratio:.2f}x")

        (container,) = client.containers.list(
            filters={
                "label": [f"portside.node={NODE_ID}", f"portside.instance=cold-{os.getpid()}-0"]
            }
        )
        container.reload()
        ip = next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
        headers = {"X-Session-Id": f"cold-{os.getpid()}-0"}
        print(f"warm request, {args.warm} sequential GETs on one keep-alive connection each")
        direct = asyncio.run(warm_requests(f"http://{ip}:8080/index.html", args.warm, {}))
        through = asyncio.run(warm_requests(f"http://{edge}/index.html", args.warm, headers))
        print(f"  straight to the container              {summary(direct)}")
        print(f"  through edge + agent                   {summary(through)}")
        added_ms = (statistics.median(through) - statistics.median(direct)) * 1000
        print(f"  added by Portside (medians)            {added_ms:.2f} ms")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            p.wait(15)
        for c in client.containers.list(all=True, filters={"label": f"portside.node={NODE_ID}"}):
            c.remove(force=True)


if __name__ == "__main__":
    main()
