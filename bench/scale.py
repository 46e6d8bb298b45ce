"""Scale benchmark: a control plane with many nodes and a store full of named instances.

Starts its own etcd (127.0.0.1, free ports, a temporary data dir removed afterwards; never the
shared one on 2379) and a control plane on it as a user does (`portside controlplane`,
--insecure: it measures scale, not TLS), deploys one named class, then:

1. registers --nodes simulated agents (bench/_scale_agents.py: heartbeat streams from a few
   worker processes, regions weighted by the population they serve as in bench/world.py,
   8-64 vCPU each) and measures the control plane's memory per node and heartbeat CPU;
2. writes --instances placements straight into etcd, in batched transactions of the records
   the control plane writes (controlplane.records), spread over the nodes, and measures the
   control plane's memory per instance once its watch has applied them, and heartbeat CPU again;
3. resolves known and new names (one in flight) and reports p50/p99;
4. opens --edges route watches (WatchRoutes, as edges do) and times a moved instance reaching
   all of them;
5. starts a second replica on the full store, times it until it answers a Resolve, and
   resolves the known names there too (its view was loaded at start, not grown by the watch);
6. reports etcd's database size.

Usage: python bench/scale.py [--nodes 10000] [--instances 1000000] [--edges 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aetcd
import grpc
from aetcd import rpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import world  # noqa: E402
from bench._scale_agents import FakeNode, run_worker  # noqa: E402
from bench.placement_throughput import cpu_seconds, percentile, wait_port  # noqa: E402
from controlplane import records  # noqa: E402
from controlplane.records import InstanceRecord  # noqa: E402
from portside import geo  # noqa: E402
from portside.api.v1 import controlplane_pb2 as cp  # noqa: E402
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc  # noqa: E402
from portside.net import free_port  # noqa: E402
from portside.spec import INSTANCE_TYPES, instance_id  # noqa: E402

CLASS = "ScaleNamed"
ITYPE = INSTANCE_TYPES["lite"]
CONFIG = f"""
[[containers]]
class_name = "{CLASS}"
image = "none"
instance_type = "{ITYPE.name}"

[[routes]]
path = "/"
class_name = "{CLASS}"
instance = "header:X-Session-Id"
"""
NODE_SIZES_VCPU = (8, 16, 32, 64)  # 4 GiB a vCPU
TXN_OPS = 128  # etcd's default --max-txn-ops
FILL_IN_FLIGHT = 4
PLACED_LONG_AGO_S = 86_400.0  # older than view.PENDING_S: filled placements hold no capacity


def plan_nodes(count: int, seed: int) -> list[FakeNode]:
    """`count` nodes over the region table, each region's share that of the population it
    serves (bench/world.py, with its seeded jitter), sizes drawn from NODE_SIZES_VCPU."""
    slots = world.region_slots(world.cities(), world.Settings(seed=seed, slots=count))
    regions = [code for code in sorted(slots) for _ in range(slots[code])]
    rng = random.Random(seed)
    rng.shuffle(regions)
    biggest = max(slots, key=lambda c: slots[c])
    regions = (regions + [biggest] * count)[:count]
    nodes = []
    for i, code in enumerate(regions):
        where = geo.lookup(code)
        vcpu = rng.choice(NODE_SIZES_VCPU)
        nodes.append(
            FakeNode(
                f"scale-{code}-{i:05d}", code, where.latitude, where.longitude, vcpu, vcpu * 4096
            )
        )
    return nodes


def filled_record(i: int, nodes: list[FakeNode], placed_at: float) -> InstanceRecord:
    """The i-th filled placement, on the nodes in turn (so each holds instances / nodes)."""
    name = f"i{i:07d}"
    return InstanceRecord(
        class_name=CLASS,
        name=name,
        instance_id=instance_id(CLASS, name),
        node_id=nodes[i % len(nodes)].id,
        vcpu=ITYPE.vcpu,
        memory_mib=ITYPE.memory_mib,
        placed_at=placed_at,
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def gauge(metrics: str, name: str) -> float:
    """A gauge's value on the control plane's /metrics (0 if absent)."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def until_gauge(
    metrics: str, name: str, want: float, timeout_s: float
) -> tuple[float, float]:
    """Seconds until the gauge reaches `want` (or `timeout_s`), and the value it got to."""
    start = time.monotonic()
    while (value := await asyncio.to_thread(gauge, metrics, name)) < want:
        if time.monotonic() - start > timeout_s:
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - start, value


async def etcd_ready(store_url: str, etcd: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Until etcd answers a read: its port opens before it has elected itself leader."""
    host, port = store_url.removeprefix("etcd://").split(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with aetcd.Client(host=host, port=int(port), timeout=2) as client:
                await client.get(b"ready")
                return
        except aetcd.ClientError:
            if etcd.poll() is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


class Cluster:
    """The processes of a run: etcd, the control plane(s), the agent workers."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.etcd_client = f"127.0.0.1:{free_port()}"
        self.etcd_peer = f"127.0.0.1:{free_port()}"
        self.store_url = f"etcd://{self.etcd_client}"

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            stdout=(self.tmp / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def start_etcd(self) -> subprocess.Popen[bytes]:
        etcd = self.spawn(
            "etcd",
            [
                "etcd",
                "--name=scale",
                f"--data-dir={self.tmp / 'etcd'}",
                f"--listen-client-urls=http://{self.etcd_client}",
                f"--advertise-client-urls=http://{self.etcd_client}",
                f"--listen-peer-urls=http://{self.etcd_peer}",
                f"--initial-advertise-peer-urls=http://{self.etcd_peer}",
                f"--initial-cluster=scale=http://{self.etcd_peer}",
                "--quota-backend-bytes=8589934592",  # a million records need more than 2 GiB
            ],
        )
        wait_port(self.etcd_client, etcd)
        asyncio.run(etcd_ready(self.store_url, etcd))
        return etcd

    def start_controlplane(self, name: str) -> tuple[subprocess.Popen[bytes], str, str]:
        """A replica as a user starts one; its process, gRPC and metrics addresses."""
        address, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        proc = self.spawn(
            name,
            [
                sys.executable,
                "-m",
                "portside",
                "--log-level",
                "warning",
                "controlplane",
                "--listen",
                address,
                "--store",
                self.store_url,
                "--metrics-listen",
                metrics,
                "--insecure",
            ],
        )
        return proc, address, metrics

    def deploy(self, address: str) -> None:
        (self.tmp / "portside.toml").write_text(CONFIG)
        subprocess.run(
            [sys.executable, "-m", "portside", "--log-level", "warning", "deploy"]
            + [str(self.tmp / "portside.toml"), "--controlplane", address],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


class Agents:
    """The simulated agents, split over worker processes."""

    def __init__(self, address: str, nodes: list[FakeNode], workers: int, join_per_s: float):
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for w in range(workers):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=run_worker,
                args=(theirs, address, nodes[w::workers], join_per_s / workers),
                daemon=True,
            )
            proc.start()
            self.conns.append(ours)
            self.procs.append(proc)

    async def ask(self, command: str) -> list[Any]:
        for conn in self.conns:
            conn.send(command)
        return [await asyncio.to_thread(conn.recv) for conn in self.conns]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs if p.pid is not None)

    async def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            await asyncio.wait_for(self.ask("stop"), 60)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


async def heartbeat_window(
    label: str, agents: Agents, pids: dict[str, int], seconds: float
) -> dict[str, float]:
    """Heartbeat load over `seconds` with nothing else going on: CPU per second of wall time of
    each process, messages per second, reply latency and signs of trouble."""
    await agents.ask("reset")
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    agents_before = agents.cpu_seconds()
    start = time.monotonic()
    await asyncio.sleep(seconds)
    wall = time.monotonic() - start
    used = {name: (cpu_seconds(pid) - before[name]) / wall for name, pid in pids.items()}
    used["agents"] = (agents.cpu_seconds() - agents_before) / wall
    stats = await agents.ask("stats")
    replies = sum(s["replies"] for s in stats)
    rtt = [x for s in stats for x in s["rtt"]] or [0.0]
    trouble = {k: sum(s[k] for s in stats) for k in ("unconfirmed", "renewed", "broken")}
    registered = sum(s["registered"] for s in stats)
    rate = replies / wall
    print(
        f"heartbeats, {label}: {registered} nodes registered, "
        f"{rate:.0f} messages/s over {wall:.0f} s"
    )
    print(
        "  CPU seconds per second: "
        + ", ".join(f"{name} {v:.3f}" for name, v in used.items())
        + f"; control plane {used['control plane'] / max(rate, 1e-9) * 1e6:.0f} us a message"
    )
    print(
        f"  reply latency p50 {ms(percentile(rtt, 0.5))}  p99 {ms(percentile(rtt, 0.99))}"
        f"  max {ms(max(rtt))};  unconfirmed {trouble['unconfirmed']}, leases renewed after "
        f"expiry {trouble['renewed']}, streams broken {trouble['broken']}"
    )
    return {"cpu": used["control plane"], "rate": rate, **trouble}


async def fill(
    store_url: str, nodes: list[FakeNode], count: int, placed_at: float
) -> tuple[float, int]:
    """Write `count` placements straight into etcd, TXN_OPS a transaction; seconds taken and
    the revision after."""
    host, port = store_url.removeprefix("etcd://").split(":")
    client = aetcd.Client(host=host, port=int(port), timeout=60)
    batches: Iterator[range] = (range(i, min(count, i + TXN_OPS)) for i in range(0, count, TXN_OPS))
    done = 0
    start = time.monotonic()

    async def writer() -> None:
        nonlocal done
        for batch in batches:
            ops = []
            for i in batch:
                rec = filled_record(i, nodes, placed_at)
                key = records.instance_key(rec.class_name, rec.instance_id).encode()
                ops.append(client.transactions.put(key, rec.encode()))
            await client.transaction(compare=[], success=ops, failure=[])
            before, done = done, done + len(batch)
            if done // 100_000 != before // 100_000:
                print(f"  {done} written, {done / (time.monotonic() - start):.0f}/s", flush=True)

    try:
        await asyncio.gather(*(writer() for _ in range(FILL_IN_FLIGHT)))
        status = await client.maintenancestub.Status(rpc.StatusRequest())
        return time.monotonic() - start, int(status.header.revision)
    finally:
        await client.close()


async def move_instance(store_url: str, rec: InstanceRecord, to_node: str) -> None:
    host, port = store_url.removeprefix("etcd://").split(":")
    async with aetcd.Client(host=host, port=int(port), timeout=10) as client:
        key = records.instance_key(rec.class_name, rec.instance_id).encode()
        await client.put(key, dataclasses.replace(rec, node_id=to_node).encode())


async def etcd_db_size(store_url: str) -> tuple[int, int]:
    """etcd's database size and the part of it in use, bytes."""
    host, port = store_url.removeprefix("etcd://").split(":")
    async with aetcd.Client(host=host, port=int(port), timeout=10) as client:
        status = await client.maintenancestub.Status(rpc.StatusRequest())
        return int(status.dbSize), int(status.dbSizeInUse)


async def resolve_latencies(
    stub: cp_grpc.ControlPlaneStub, names: list[str], hints: list[str]
) -> list[float]:
    out = []
    for name, hint in zip(names, hints, strict=True):
        start = time.perf_counter()
        await stub.Resolve(
            cp.ResolveRequest(class_name=CLASS, instance_name=name, location_hint=hint), timeout=30
        )
        out.append(time.perf_counter() - start)
    return out


async def fan_out(
    address: str, store_url: str, nodes: list[FakeNode], edges: int, rounds: int
) -> list[float]:
    """`edges` WatchRoutes streams (ten to a connection); per round, an instance moved in the
    store and the time until the last stream heard of it."""
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, edges // 10))
    ]
    heard: dict[str, list[float]] = {}
    started: list[None] = []
    all_started = asyncio.Event()

    async def stream(stub: cp_grpc.ControlPlaneStub) -> None:
        first = True
        async for update in stub.WatchRoutes(cp.WatchRoutesRequest(since_revision=0)):
            now = time.perf_counter()
            if first:
                first = False
                started.append(None)
                if len(started) == edges:
                    all_started.set()
            for change in update.changes:
                heard.setdefault(change.instance_name, []).append(now)

    tasks = [
        asyncio.create_task(stream(cp_grpc.ControlPlaneStub(channels[i % len(channels)])))
        for i in range(edges)
    ]
    out = []
    try:
        await asyncio.wait_for(all_started.wait(), 60)
        now = time.time() - PLACED_LONG_AGO_S
        for r in range(rounds):
            rec = filled_record(10_000_000 + r, nodes, now)  # a name of its own, then moved
            await move_instance(store_url, rec, nodes[0].id)
            await asyncio.sleep(0.1)
            start = time.perf_counter()
            await move_instance(store_url, rec, nodes[-1].id)
            deadline = time.monotonic() + 30
            while len(heard.get(rec.name, ())) < edges:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(heard.get(rec.name, ()))} of {edges} heard")
                await asyncio.sleep(0.001)
            out.append(max(heard[rec.name]) - start)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
    return out


async def measure(args: argparse.Namespace, cluster: Cluster, tmp: Path) -> None:
    etcd = await asyncio.to_thread(cluster.start_etcd)
    controlplane, address, metrics = cluster.start_controlplane("controlplane")
    wait_port(address, controlplane, 60)
    cluster.deploy(address)
    pids = {"control plane": controlplane.pid, "etcd": etcd.pid}
    nodes = plan_nodes(args.nodes, args.seed)
    print(
        f"{len(nodes)} simulated nodes in {len({n.region for n in nodes})} regions, "
        f"{sum(n.vcpu for n in nodes):.0f} vCPU; {args.instances} placements; "
        f"{args.agent_workers} agent processes; etcd {cluster.etcd_client} (own instance)",
        flush=True,
    )
    await asyncio.sleep(2)
    rss_empty = rss_mib(controlplane.pid)
    agents = Agents(address, nodes, args.agent_workers, args.join_rate)
    try:
        took, alive = await until_gauge(
            metrics,
            "portside_controlplane_nodes_alive",
            len(nodes),
            len(nodes) / args.join_rate + 60,
        )
        print(
            f"{alive:.0f} of {len(nodes)} nodes alive {took:.1f} s after the first joined "
            f"(joining at {args.join_rate:g}/s)",
            flush=True,
        )
        await asyncio.sleep(5)
        rss_nodes = rss_mib(controlplane.pid)
        print(
            f"control-plane RSS: {rss_empty:.0f} MiB empty, {rss_nodes:.0f} MiB with the nodes: "
            f"{(rss_nodes - rss_empty) * 1024 / len(nodes):.1f} KiB a node",
            flush=True,
        )
        await heartbeat_window(f"{len(nodes)} nodes, no instances", agents, pids, args.window)
        if args.only_heartbeats:
            return

        placed_at = time.time() - PLACED_LONG_AGO_S
        wrote, revision = await fill(cluster.store_url, nodes, args.instances, placed_at)
        applied, _ = await until_gauge(
            metrics,
            f'portside_controlplane_instances_placed{{class="{CLASS}"}}',
            args.instances,
            600,
        )
        print(
            f"{args.instances} placements written to etcd in {wrote:.1f} s "
            f"({args.instances / max(wrote, 1e-9):.0f}/s, {TXN_OPS} a transaction); the control "
            f"plane's watch had applied them {applied:.1f} s later",
            flush=True,
        )
        await asyncio.sleep(5)
        rss_full = rss_mib(controlplane.pid)
        print(
            f"control-plane RSS with the placements: {rss_full:.0f} MiB: "
            f"{(rss_full - rss_nodes) * 2**20 / max(args.instances, 1):.0f} bytes an instance",
            flush=True,
        )
        await heartbeat_window(
            f"{len(nodes)} nodes, {args.instances} instances", agents, pids, args.window
        )

        rng = random.Random(args.seed)
        codes = sorted({n.region for n in nodes})
        async with grpc.aio.insecure_channel(address) as channel:
            stub = cp_grpc.ControlPlaneStub(channel)
            known = [f"i{rng.randrange(max(1, args.instances)):07d}" for _ in range(args.resolves)]
            hints = [rng.choice(codes) for _ in known]
            await resolve_latencies(stub, known[:50], hints[:50])  # warm up the channel
            known_lat = await resolve_latencies(stub, known, hints)
            new = [f"new-{os.getpid()}-{i}" for i in range(args.resolves)]
            new_lat = await resolve_latencies(stub, new, hints)
        for label, lat in (("known name", known_lat), ("new name (placed)", new_lat)):
            print(
                f"resolve, {label:<18} p50 {ms(percentile(lat, 0.5))}  p99 "
                f"{ms(percentile(lat, 0.99))}  ({len(lat)} one at a time, heartbeats running)",
                flush=True,
            )

        fan = await fan_out(address, cluster.store_url, nodes, args.edges, args.fanout_rounds)
        print(
            f"route change to {args.edges} WatchRoutes streams (store write -> last stream): "
            f"p50 {ms(percentile(fan, 0.5))}  max {ms(max(fan))}  ({len(fan)} moves)",
            flush=True,
        )
        # A new replica beside the running one (as when one is added or restarted), nodes alive.
        start = time.monotonic()
        replica, address2, _ = cluster.start_controlplane("replica2")
        wait_port(address2, replica, 900)
        opened = time.monotonic() - start
        async with grpc.aio.insecure_channel(address2) as channel:
            stub = cp_grpc.ControlPlaneStub(channel)
            await stub.Resolve(
                cp.ResolveRequest(class_name=CLASS, instance_name=known[0]), timeout=60
            )
            answered = time.monotonic() - start
            rss_replica = rss_mib(replica.pid)
            replica_lat = await resolve_latencies(stub, known, hints)
        cluster.stop(replica)
        print(
            f"a new replica on the full store: serving {opened:.1f} s after start, first Resolve "
            f"answered at {answered:.1f} s; RSS {rss_replica:.0f} MiB after loading the view; "
            f"known names there p50 {ms(percentile(replica_lat, 0.5))}  "
            f"p99 {ms(percentile(replica_lat, 0.99))}",
            flush=True,
        )
    finally:
        await agents.stop()
    size, in_use = await etcd_db_size(cluster.store_url)
    on_disk = sum(f.stat().st_size for f in (tmp / "etcd").rglob("*") if f.is_file())
    print(
        f"etcd: database {size / 2**20:.0f} MiB ({in_use / 2**20:.0f} MiB in use, revision "
        f"{revision}), data dir {on_disk / 2**20:.0f} MiB, RSS {rss_mib(etcd.pid):.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--edges", type=int, default=100, help="WatchRoutes streams")
    parser.add_argument("--resolves", type=int, default=1000, help="per kind (known, new)")
    parser.add_argument("--fanout-rounds", type=int, default=20)
    parser.add_argument("--window", type=float, default=20.0, help="heartbeat measurement, s")
    parser.add_argument("--agent-workers", type=int, default=2, help="processes simulating agents")
    parser.add_argument("--join-rate", type=float, default=1000.0, help="nodes joining a second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--only-heartbeats", action="store_true", help="stop after the first heartbeat window"
    )
    args = parser.parse_args()
    if shutil.which("etcd") is None:
        raise SystemExit("etcd is not installed: apt-get install etcd-server")
    tmp = Path(tempfile.mkdtemp(prefix="portside-bench-scale-"))
    cluster = Cluster(tmp)
    start = time.monotonic()
    try:
        asyncio.run(measure(args, cluster, tmp))
    except BaseException:
        cluster.stop_all()
        print(f"logs kept in {tmp} (etcd's data removed)", file=sys.stderr)
        shutil.rmtree(tmp / "etcd", ignore_errors=True)
        raise
    cluster.stop_all()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"run took {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
