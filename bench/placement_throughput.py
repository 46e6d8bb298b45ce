"""Benchmark of named-instance placement throughput against etcd, container start excluded:
N distinct names resolved through a real control plane's Resolve RPC, versus raw etcd
create-if-absent transactions through Portside's store layer, at the same concurrency.

Starts its own etcd (127.0.0.1:23790, peer 23800, a temporary data dir; never the shared one on
2379), a control plane process on it, and 8 fake nodes in 4 regions that only heartbeat: nothing
boots, the agents' data addresses are never contacted.
A trivial call (gRPC health Check) on the same control plane at the same concurrency gives the
floor of the gRPC server's own cost per call.
Usage: python bench/placement_throughput.py [--names N] [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.store import Store, open_store  # noqa: E402
from controlplane.view import PENDING_S  # noqa: E402
from portside import geo  # noqa: E402
from portside.api.v1 import controlplane_pb2 as cp  # noqa: E402
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc  # noqa: E402
from portside.api.v1 import types_pb2 as pb  # noqa: E402
from portside.errors import StoreError  # noqa: E402
from portside.net import free_port  # noqa: E402

ETCD_CLIENT = "127.0.0.1:23790"
ETCD_PEER = "127.0.0.1:23800"
ETCD_URL = f"etcd://{ETCD_CLIENT}"
CLASS = "BenchPlace"
REGIONS = ("fra", "iad", "sin", "syd")
NODES_PER_REGION = 2
# Hints cycle over the nodes' regions and some neighbours, so every region takes placements.
HINTS = ("fra", "iad", "sin", "syd", "ams", "ewr", "nrt", "mel", "weur", "enam")
CONFIG = f"""
[[containers]]
class_name = "{CLASS}"
image = "none"
instance_type = "lite"

[[routes]]
path = "/"
class_name = "{CLASS}"
instance = "header:X-Session-Id"
"""
ANCHORS = (
    "Nomad: 1,500-3,750 placements/s cluster-wide",
    "Kubernetes: 100-300 pods/s",
)


def wait_port(address: str, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, int(port)), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{address} did not open within {timeout_s}s")


def wait_etcd(timeout_s: float = 20.0) -> None:
    """etcd binds its client port before it serves: wait until a read answers."""

    async def read() -> None:
        store = await open_store(ETCD_URL, timeout_s=1.0)
        await store.close()

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            asyncio.run(read())
            return
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def refuse_if_taken(address: str) -> None:
    """Our etcd must be ours: if something already listens there, stop rather than use it."""
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.2):
        raise SystemExit(f"{address} is already in use: this benchmark starts its own etcd there")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def fake_nodes(tag: str) -> list[pb.Node]:
    nodes = []
    for region in REGIONS:
        where = geo.lookup(region)
        for i in range(NODES_PER_REGION):
            nodes.append(
                pb.Node(
                    id=f"bench-{tag}-{region}-{i}",
                    # Never contacted: Resolve only names the node, nothing boots.
                    data_address=f"127.0.0.1:{9 + i}",
                    api_address=f"127.0.0.1:{9 + i}",
                    region=region,
                    latitude=where.latitude,
                    longitude=where.longitude,
                    vcpu=1000,
                    memory_mib=10**7,
                )
            )
    return nodes


async def heartbeat(stub: cp_grpc.ControlPlaneStub, node: pb.Node, stop: asyncio.Event) -> None:
    """Keep one fake node registered: the node first, then a message a second (lease 10 s)."""

    async def messages() -> AsyncIterator[cp.NodeHeartbeatRequest]:
        yield cp.NodeHeartbeatRequest(node=node)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if not stop.is_set():
                yield cp.NodeHeartbeatRequest()

    async for _ in stub.NodeHeartbeat(messages()):
        pass


async def run_concurrently(
    count: int, concurrency: int, one: Callable[[int], Awaitable[None]]
) -> tuple[float, list[float]]:
    """Call `one(i)` for i in 0..count-1 from `concurrency` callers; wall time and latencies."""
    latencies: list[float] = []
    next_index = iter(range(count))

    async def caller() -> None:
        for i in next_index:
            start = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def line(what: str, count: int, wall: float, latencies: list[float]) -> str:
    return (
        f"  {what:<22} {count / wall:8.0f}/s   p50 {percentile(latencies, 0.5) * 1000:6.2f} ms"
        f"   p99 {percentile(latencies, 0.99) * 1000:7.2f} ms   ({count} in {wall:.2f} s)"
    )


async def measure(
    cp_address: str, names: int, levels: list[int], tag: str, pids: dict[str, int]
) -> None:
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(cp_address) as channel:
        stub = cp_grpc.ControlPlaneStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        nodes = fake_nodes(tag)
        beats = [asyncio.create_task(heartbeat(stub, n, stop)) for n in nodes]
        try:
            deadline = time.monotonic() + 20
            while len((await stub.ListNodes(cp.ListNodesRequest(), timeout=5)).nodes) < len(nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the fake nodes did not register within 20 s")
                await asyncio.sleep(0.1)
            store = await open_store(ETCD_URL)
            try:
                # Warm up the channel, the control plane's handlers and etcd's connection.
                for i in range(50):
                    await stub.Resolve(
                        cp.ResolveRequest(class_name=CLASS, instance_name=f"warm-{i}"), timeout=10
                    )
                    await store.compare_and_swap(f"/bench-{tag}/warm/{i}", 0, b"x")
                print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
                print(
                    f"{names} distinct names per level; {len(nodes)} fake nodes in "
                    f"{len(REGIONS)} regions; etcd {ETCD_CLIENT} (own instance)"
                )
                for n, c in enumerate(levels):
                    if n:
                        # Placements count against their node for PENDING_S (or until the node
                        # reports them awake, which fake nodes never do): let the previous
                        # level's expire, so every level starts from the same state.
                        await asyncio.sleep(PENDING_S + 1)
                    await one_level(stub, health, store, names, c, tag, pids)
            finally:
                await store.close()
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*beats, return_exceptions=True), 10)


async def one_level(
    stub: cp_grpc.ControlPlaneStub,
    health: health_pb2_grpc.HealthStub,
    store: Store,
    names: int,
    c: int,
    tag: str,
    pids: dict[str, int],
) -> None:
    placed = 0

    async def resolve(i: int) -> None:
        nonlocal placed
        reply = await stub.Resolve(
            cp.ResolveRequest(
                class_name=CLASS, instance_name=f"c{c}-{i}", location_hint=HINTS[i % len(HINTS)]
            ),
            timeout=10,
        )
        placed += reply.placed

    async def cas(i: int) -> None:
        assert await store.compare_and_swap(f"/bench-{tag}/c{c}/{i:08d}", 0, payload)

    async def check(i: int) -> None:
        await health.Check(health_pb2.HealthCheckRequest(), timeout=10)

    # About the size of an instance record, so etcd writes the same bytes.
    payload = b"x" * 260
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wall_p, lat_p = await run_concurrently(names, c, resolve)
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    wall_c, lat_c = await run_concurrently(names, c, cas)
    # The floor of one call to this control plane: the gRPC server's own cost, no Portside work.
    cp_pid = pids["control plane"]
    cp_before = cpu_seconds(cp_pid)
    wall_h, lat_h = await run_concurrently(names, c, check)
    floor_ms = (cpu_seconds(cp_pid) - cp_before) / names * 1000
    assert placed == names, f"only {placed} of {names} resolves placed an instance"
    # Placements early and late in the run: the control plane's cost may grow with what it holds.
    tenth = max(1, names // 10)
    print(f"concurrency {c}")
    print(line("placements (Resolve)", names, wall_p, lat_p))
    print(line("raw etcd CAS (store)", names, wall_c, lat_c))
    print(line("Health.Check (floor)", names, wall_h, lat_h))
    ratio = (names / wall_p) / (names / wall_c)
    print(f"  placements/s / CAS/s   {ratio:8.2f}")
    print(
        "  CPU per placement: "
        + ", ".join(f"{name} {used[name] / names * 1000:.2f} ms" for name in pids)
    )
    print(f"  control plane CPU per Health.Check: {floor_ms:.2f} ms (gRPC's own, per call)")
    print(
        f"  latency of the first and last {tenth} placements: "
        f"median {statistics.median(lat_p[:tenth]) * 1000:.2f} ms -> "
        f"{statistics.median(lat_p[-tenth:]) * 1000:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--names", type=int, default=5000, help="placements per concurrency level")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated levels")
    parser.add_argument("--log-level", default="info", help="the control plane's log level")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if shutil.which("etcd") is None:
        raise SystemExit("etcd is not installed: apt-get install etcd-server")
    refuse_if_taken(ETCD_CLIENT)
    refuse_if_taken(ETCD_PEER)
    tag = f"{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="portside-bench-place-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        etcd = subprocess.Popen(
            [
                "etcd",
                "--name=bench",
                f"--data-dir={tmp / 'etcd'}",
                f"--listen-client-urls=http://{ETCD_CLIENT}",
                f"--advertise-client-urls=http://{ETCD_CLIENT}",
                f"--listen-peer-urls=http://{ETCD_PEER}",
                f"--initial-advertise-peer-urls=http://{ETCD_PEER}",
                f"--initial-cluster=bench=http://{ETCD_PEER}",
            ],
            stdout=(tmp / "etcd.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(etcd)
        wait_port(ETCD_CLIENT, etcd)
        wait_etcd()
        cp_address = f"127.0.0.1:{free_port()}"
        controlplane = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "portside",
                "--log-level",
                args.log_level,
                "controlplane",
                "--listen",
                cp_address,
                "--store",
                ETCD_URL,
                "--metrics-listen",
                f"127.0.0.1:{free_port()}",
                "--insecure",  # it measures placement, not TLS (bench/named_instances.py does)
            ],
            stdout=(tmp / "controlplane.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(controlplane)
        wait_port(cp_address, controlplane)
        (tmp / "portside.toml").write_text(CONFIG)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "portside",
                "--log-level",
                "warning",
                "deploy",
                str(tmp / "portside.toml"),
                "--controlplane",
                cp_address,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )
        pids = {"control plane": controlplane.pid, "etcd": etcd.pid, "this client": os.getpid()}
        asyncio.run(measure(cp_address, args.names, levels, tag, pids))
        print("anchors (published figures, other hardware, whole clusters):")
        for anchor in ANCHORS:
            print(f"  {anchor}")
    except BaseException:
        print(f"logs kept in {tmp}", file=sys.stderr)
        raise
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
