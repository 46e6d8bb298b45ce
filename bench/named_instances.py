"""Benchmark of the named-instance path on this machine, against baselines run in the same process:

1. cold start: first request to a new instance through edge → agent (boot included) versus a plain
   `docker run` of the same image until its port answers;
2. warm request: through edge and agent versus straight to the container.

Starts its own control plane (embedded store, bootstrapped), agent and edge on 127.0.0.1, secured
like `portside up`: the edge → agent hop is mutual TLS.
With --compare-tls, warm requests only, on two clusters run side by side — one secured, one
started with --insecure (plaintext everywhere) — in interleaved rounds, so that both see the same
machine: what mutual TLS adds to the warm edge → agent path.
Usage: python bench/named_instances.py [--cold N] [--warm N] [--compare-tls [--rounds R]]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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


async def timed_gets(
    session: aiohttp.ClientSession, url: str, runs: int, headers: dict[str, str]
) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        async with session.get(url, headers=headers) as r:
            await r.read()
            assert r.status == 200, r.status
        samples.append(time.perf_counter() - start)
    return samples


async def warm_requests(url: str, runs: int, headers: dict[str, str]) -> list[float]:
    async with aiohttp.ClientSession() as s:
        await timed_gets(s, url, 50, headers)  # the first 50 warm up connections and caches
        return await timed_gets(s, url, runs, headers)


CONFIG = f"""
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


@dataclass
class Cluster:
    """One control plane (embedded store), agent and edge; `secure`: bootstrapped, nodes join
    with the join token (mutual TLS between the parts), else --insecure (plaintext). `config` is
    deployed first (another benchmark's classes)."""

    tmp: Path
    secure: bool
    node_id: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    edge: str = ""
    config: str = CONFIG  # the portside.toml deployed before the agent and edge start

    def start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        (self.tmp / "portside.toml").write_text(self.config)
        store = f"sqlite://{self.tmp}/store.db"
        tokens = self.tmp / "tokens"
        py = [sys.executable, "-m", "portside", "--log-level", "warning"]
        secured: list[str] = []
        client: list[str] = []
        if self.secure:
            subprocess.run(
                [*py, "bootstrap", "--store", store, "--out", str(tokens)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            secured = ["--join-token-file", str(tokens / "join.token")]
            client = ["--token-file", str(tokens / "admin.token")]
        cp, agent, self.edge = (f"127.0.0.1:{free_port()}" for _ in range(3))
        metrics = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        self.spawn(
            *py,
            "controlplane",
            "--listen",
            cp,
            "--store",
            store,
            "--metrics-listen",
            metrics[0],
            *([] if self.secure else ["--insecure"]),
        )
        wait_port(cp.split(":")[0], int(cp.split(":")[1]))
        subprocess.run(
            [*py, "deploy", str(self.tmp / "portside.toml"), "--controlplane", cp, *client],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.spawn(
            *py,
            "agent",
            "--controlplane",
            cp,
            "--listen",
            agent,
            "--region",
            "fra",
            "--node-id",
            self.node_id,
            "--vcpu",
            "64",
            "--memory-mib",
            "1000000",
            "--api-listen",
            f"127.0.0.1:{free_port()}",
            "--metrics-listen",
            metrics[1],
            *secured,
        )
        self.spawn(
            *py,
            "edge",
            "--controlplane",
            cp,
            "--listen",
            self.edge,
            "--region",
            "fra",
            "--metrics-listen",
            metrics[2],
            *secured,
        )
        wait_port("127.0.0.1", int(self.edge.split(":")[1]))
        wait_port("127.0.0.1", int(agent.split(":")[1]))
        time.sleep(0.5)  # the agent registers right after opening its port

    def spawn(self, *argv: str) -> None:
        self.procs.append(subprocess.Popen(list(argv), start_new_session=True))

    def stop(self, client: docker.DockerClient) -> None:
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)
        for c in client.containers.list(
            all=True, filters={"label": f"portside.node={self.node_id}"}
        ):
            c.remove(force=True)


def container_ip(client: docker.DockerClient, node_id: str, instance: str) -> str:
    (container,) = client.containers.list(
        filters={"label": [f"portside.node={node_id}", f"portside.instance={instance}"]}
    )
    container.reload()
    return str(next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"])


async def compare_tls(
    client: docker.DockerClient, plain: Cluster, secure: Cluster, runs: int, rounds: int
) -> None:
    """Warm GETs straight to each cluster's container, and through each cluster's edge and
    agent, in interleaved rounds on one keep-alive connection per target."""
    name = f"warm-{os.getpid()}"
    headers = {"X-Session-Id": name}
    targets: dict[str, tuple[str, dict[str, str]]] = {}
    for label, cluster in (("plaintext", plain), ("mutual TLS", secure)):
        await first_requests(cluster.edge, 0)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{cluster.edge}/index.html", headers=headers) as r:
                assert r.status == 200, await r.text()
        ip = container_ip(client, cluster.node_id, name)
        targets[f"straight to the container ({label} cluster)"] = (
            f"http://{ip}:8080/index.html",
            {},
        )
        targets[f"through edge + agent, {label}"] = (
            f"http://{cluster.edge}/index.html",
            headers,
        )
    samples: dict[str, list[float]] = {t: [] for t in targets}
    sessions = {t: aiohttp.ClientSession() for t in targets}
    try:
        for t, (url, h) in targets.items():
            await timed_gets(sessions[t], url, 50, h)  # warm up
        per_round = max(1, runs // rounds)
        for _ in range(rounds):
            for t, (url, h) in targets.items():
                samples[t].extend(await timed_gets(sessions[t], url, per_round, h))
    finally:
        for session in sessions.values():
            await session.close()
    print(f"warm request, {per_round * rounds} sequential GETs each in {rounds} interleaved rounds")
    for t, got in samples.items():
        print(f"  {t:48} {summary(got)}")
    plain_hop = statistics.median(samples["through edge + agent, plaintext"])
    tls_hop = statistics.median(samples["through edge + agent, mutual TLS"])
    base_plain = statistics.median(samples["straight to the container (plaintext cluster)"])
    base_tls = statistics.median(samples["straight to the container (mutual TLS cluster)"])
    for label, seconds in (
        ("added by Portside, plaintext (medians)", plain_hop - base_plain),
        ("added by Portside, mutual TLS (medians)", tls_hop - base_tls),
        ("mutual TLS edge → agent costs (medians)", tls_hop - plain_hop),
    ):
        print(f"  {label:48} {seconds * 1000:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cold", type=int, default=20)
    parser.add_argument("--warm", type=int, default=2000)
    parser.add_argument(
        "--compare-tls",
        action="store_true",
        help="warm requests through a secured and an --insecure cluster, side by side",
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (--compare-tls)")
    args = parser.parse_args()
    client = docker.from_env()
    build_image(client, IMAGE)
    tmp = Path(tempfile.mkdtemp(prefix="portside-bench-"))
    if args.compare_tls:
        plain = Cluster(tmp / "plain", secure=False, node_id=f"{NODE_ID}-plain")
        secure = Cluster(tmp / "secure", secure=True, node_id=f"{NODE_ID}-tls")
        try:
            plain.start()
            secure.start()
            asyncio.run(compare_tls(client, plain, secure, args.warm, args.rounds))
        finally:
            secure.stop(client)
            plain.stop(client)
        return
    cluster = Cluster(tmp, secure=True, node_id=NODE_ID)
    try:
        cluster.start()
        edge = cluster.edge
        print(f"cold start, {args.cold} runs each (image {IMAGE}, busybox httpd)")
        base = docker_run_until_answers(client, args.cold)
        cold = asyncio.run(first_requests(edge, args.cold))
        print(f"  docker run until the port answers      {summary(base)}")
        print(f"  first request through edge + agent     {summary(cold)}")
        ratio = statistics.median(cold) / statistics.median(base)
        print(f"  ratio (medians)                        {ratio:.2f}x")

        ip = container_ip(client, NODE_ID, f"cold-{os.getpid()}-0")
        headers = {"X-Session-Id": f"cold-{os.getpid()}-0"}
        print(f"warm request, {args.warm} sequential GETs on one keep-alive connection each")
        direct = asyncio.run(warm_requests(f"http://{ip}:8080/index.html", args.warm, {}))
        through = asyncio.run(warm_requests(f"http://{edge}/index.html", args.warm, headers))
        print(f"  straight to the container              {summary(direct)}")
        print(f"  through edge + agent (mutual TLS hop)  {summary(through)}")
        added_ms = (statistics.median(through) - statistics.median(direct)) * 1000
        print(f"  added by Portside (medians)            {added_ms:.2f} ms")
    finally:
        cluster.stop(client)


if __name__ == "__main__":
    main()
